"""The training engine every visalign trainer uses: accelerate, peft LoRA, EMA, logging and exact checkpoints.

    engine = Engine(config, pipe)                      # freezes the pipeline, adds LoRA to the denoiser
    for update in updates:
        for i, micro in enumerate(micro_batches):      # e.g. (samples, timestep) pairs
            with engine.accumulate(sync=i == len(micro_batches) - 1), engine.autocast():
                loss = ...                             # call `engine.model` (the DDP wrapper when distributed)
                engine.backward(loss / len(micro_batches))
        engine.optimizer_step()                        # clip, step, schedule, EMA, progress
        engine.log({...})
    engine.maybe_checkpoint({"prompt_sampler": ...})   # at a resumable boundary
    engine.finish()                                    # final adapter (EMA weights if any), trackers closed

What it owns:
- `accelerate.Accelerator` (DDP over NCCL or gloo, mixed precision, trackers: TensorBoard by default, W&B when
  asked, imported by accelerate only then). Gradient accumulation is explicit: the caller says which micro-step
  synchronizes (`accumulate(sync=...)`) and scales its loss, so an update is the same whatever the process count.
- The trained component (`"transformer"` or `"unet"`): LoRA adapters through diffusers' peft integration on the
  attention projections (frozen base weights in the mixed-precision dtype, adapters in float32), or full
  fine-tuning. The reference policy is the same module with adapters disabled (`reference()`); under full
  fine-tuning, a frozen copy kept when asked (`keep_reference=True`).
- AdamW and a `diffusers.optimization` learning-rate schedule, stepped once per update (never once per process).
- Sharding (`fsdp=true`, or an accelerate FSDP launch): the trained component and the full-fine-tuning reference as
  FSDP2 shards, through accelerate's plugin on accelerators and torch's `fully_shard` over gloo on CPUs
  (`visalign.sharding`); checkpoints and exports are gathered whole and written by the main process. A DeepSpeed
  ZeRO-2 launch hands backward, clipping, the step and zero_grad to DeepSpeed's engine (same files, same contract).
- An EMA of the trainable parameters, swapped in by `ema_weights()` and for the final export.
- Checkpoints (`visalign.checkpointing`) written to a temporary folder and renamed: trainable weights, optimizer,
  scheduler, EMA, the RNG states of every process (python, numpy, torch, CUDA), the step, and the caller's state (its
  prompt sampler; its tensors, such as a replay buffer, per process). A LoRA checkpoint also holds the adapter in the
  diffusers format, so `pipe.load_lora_weights(folder)` works.
  `resume_from` restores all of it: a resumed run continues exactly where the checkpoint was taken, and
  `metrics.jsonl` is cut back to the rows written before the checkpoint, so each step is logged once.
- No pickles: every checkpoint file is safetensors (tensors, and `visalign.files.save_state` for the optimizer,
  the schedule and the RNG states) or JSON/YAML; a folder holding a pickle is refused by name, never unpickled.
- A run directory belongs to one run (`claim_output_dir`): a new run where a finished or different run lives is
  refused (resume it, or `overwrite_output_dir=true` clears it first).
- A non-finite loss, gradient norm or weight stops training (`NonFiniteError` naming the step and the last good
  checkpoint); non-finite weights are never written to a checkpoint or to `final/`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn
from tqdm.auto import tqdm

from visalign.checkpointing import read_checkpoint, write_checkpoint
from visalign.config import TrainConfig, config_to_dict, save_config
from visalign.files import run_record, write_run_record
from visalign.preflight import config_inputs
from visalign.rundir import (
    claim_output_dir,
    latest_checkpoint,
    remove_checkpoints_after,
    resume_checkpoint,
    truncate_metrics,
)
from visalign.sharding import (
    ACCELERATE,
    DEEPSPEED,
    NONE,
    TORCH,
    configure_deepspeed,
    deepspeed_step,
    deepspeed_trained_state,
    full_state_dict,
    full_tensor,
    save_full_component,
    shard_module,
    sharding_mode,
)
from visalign.types import RewardOutput

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient norm or weight; the message names the step and the last checkpoint."""


class EMA:
    """Exponential moving average of parameters: `ema <- d * ema + (1 - d) * param` every `every` optimizer steps.

    `d = min(decay, (1 + step) / (10 + step))` at optimizer step `step`: the warm-up ramp of Flow-GRPO's
    `EMAModuleWrapper.get_current_decay` (and diffusers' `EMAModel` without `use_ema_warmup`), so early updates follow
    the weights instead of holding the initial ones (Flow-GRPO's 0.9 is reached at step 80). Kept in float32 on the
    parameters' device. Flow-GRPO uses decay 0.9 every 8 steps.
    """

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float, every: int):
        self.parameters = list(parameters)
        self.decay, self.every = decay, every
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    def decay_at(self, step: int) -> float:
        """The decay of the update at optimizer step `step` (the warm-up ramp capped at `decay`)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every == 0:
            weight = 1 - self.decay_at(step)
            for s, p in zip(self.shadow, self.parameters):
                s.lerp_(p.detach().float(), weight)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Parameters take the EMA's values (for good: `swapped_in` restores them after its block)."""
        for s, p in zip(self.shadow, self.parameters):
            p.copy_(s)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Parameters hold the EMA inside the block and their own values again after it."""
        backup = [p.detach().clone() for p in self.parameters]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.parameters):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return {str(i): s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the model trains {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(state[str(i)])


class ScoreTotals:
    """Sums of rewards' scores and aspects over this process's samples, averaged over every process at the end.

    totals = ScoreTotals("eval")
    for batch ...: totals.add(reward.name, reward.score(images, prompts))
    metrics = totals.means(engine, count=len(all_prompts))  # {"eval/<name>": ..., "eval/<name>/<aspect>": ...}
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, name: str, output: RewardOutput) -> None:
        self.sums[f"{self.prefix}/{name}"] += float(output.score.double().sum())
        for aspect, values in output.aspects.items():
            self.sums[f"{self.prefix}/{name}/{aspect}"] += float(values.double().sum())

    def means(self, engine: Engine, count: int) -> dict[str, float]:
        """Every process's sums added, over `count` samples in all; every process must have added the same names."""
        names = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in names], dtype=torch.float64, device=engine.device)
        if engine.num_processes > 1:
            totals = engine.accelerator.reduce(totals, reduction="sum")
        return {k: float(v) / count for k, v in zip(names, totals)}


class Engine:
    """Optimization, precision, distribution, EMA, logging and checkpoints for one trained pipeline component.

    Args:
        config (`TrainConfig`): engine settings (a method config extends it).
        pipe (`DiffusionPipeline`): the generator; every component is frozen and moved to the device, then
            `component` gets LoRA adapters or is trained whole.
        component (`str`): the trained component's name in `pipe.components` (`"transformer"`, `"unet"`).
        keep_reference (`bool`): under full fine-tuning, keep a frozen copy of the initial weights as the reference
            policy (LoRA needs none: the reference is the model with adapters disabled).
        find_unused_parameters (`bool`): DDP looks for trained parameters without a gradient in each backward (for
            denoisers whose outputs are not all used, `GeneratorAdapter.has_unused_outputs`).
    """

    def __init__(
        self,
        config: TrainConfig,
        pipe: DiffusionPipeline,
        *,
        component: str = "transformer",
        keep_reference: bool = False,
        find_unused_parameters: bool = False,
    ):
        if component not in pipe.components or not isinstance(pipe.components[component], nn.Module):
            raise ValueError(f"`component` must name a model of the pipeline, got {component!r}")
        self.config = config
        self.pipe = pipe
        self.component = component
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=str(self.output_dir),
            cpu=config.cpu,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )
        start = claim_output_dir(config)  # on every process, before any process writes there (and before loading)
        self.accelerator.wait_for_everyone()
        set_seed(config.seed)  # the same LoRA init on every process

        weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        model: nn.Module = pipe.components[component]
        for name, module in pipe.components.items():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).to(self.device)
                if config.mixed_precision != "no" and name != "vae" and (name != component or config.use_lora):
                    module.to(dtype=weight_dtype)  # frozen weights only: the VAE and full fine-tuning stay float32
        if config.use_lora:
            model.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha,
                    init_lora_weights=config.lora_init,
                    target_modules=config.lora_target_modules,
                )
            )
            cast_training_params(model, dtype=torch.float32)
        else:
            model.requires_grad_(True)
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.unwrapped = model
        self.reference_model = None
        if keep_reference and not config.use_lora:
            self.reference_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.sharding = sharding_mode(self.accelerator, config.fsdp, model, component)  # see visalign.sharding
        compute_dtype = weight_dtype if config.mixed_precision != "no" else None
        if self.sharding == TORCH:
            shard_module(model, compute_dtype)
        if self.sharding in (TORCH, ACCELERATE) and self.reference_model is not None:
            shard_module(self.reference_model, compute_dtype)  # sharded too: no full copy per process
        if self.sharding == DEEPSPEED:  # clipping, accumulation and precision in DeepSpeed's config (ZeRO-2 only)
            configure_deepspeed(self.accelerator, config.max_grad_norm, config.mixed_precision)
        self.named_parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.parameters = [p for _, p in self.named_parameters]
        optimizer = torch.optim.AdamW(
            self.parameters,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        if self.sharding == TORCH:  # sharded already; accelerate would wrap it in DDP
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.sharding == ACCELERATE:  # its FSDP2 swapped the parameters for DTensor shards, in place
            self.named_parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.parameters = [p for _, p in self.named_parameters]
        self.ema = EMA(self.parameters, config.ema_decay, config.ema_update_every) if config.ema_decay > 0 else None
        self.step = 0
        self._last_checkpoint_step = 0
        self._loss_finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss of this update finite
        self.history: list[dict[str, float]] = []

        if self.is_main_process:
            if start == "overwrite":
                logger.warning("overwrite_output_dir: clearing %s", self.output_dir)
                shutil.rmtree(self.output_dir)
            elif start == "restart":  # the same unfinished run, killed before its first checkpoint
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            record = run_record(config=config, seeds={"seed": config.seed}, inputs=config_inputs(config))
            write_run_record(self.output_dir / "run.json", record | {"status": "running"})
        self.accelerator.wait_for_everyone()
        if config.report_to != "none":
            hparams = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config_to_dict(config).items()
            }
            self.accelerator.init_trackers(config.project_name, config=hparams)
        trained = sum(p.numel() for p in self.parameters)
        total = sum(p.numel() for p in model.parameters())
        logger.info(
            "training %s: %s of %s parameters (%s), %d process(es) on %s, mixed precision %s",
            component,
            f"{trained:,}",
            f"{total:,}",
            "LoRA" if config.use_lora else "full",
            self.num_processes,
            self.device,
            config.mixed_precision,
        )
        self.progress = self._training_bar(initial=0)
        self._paused = 0  # depth of `pause_progress()`

    # -- distribution -------------------------------------------------------------------------------------------

    @classmethod
    def for_generator(cls, config: TrainConfig, adapter: Any, *, keep_reference: bool = False) -> Engine:
        """The engine training a generator adapter's denoiser (`visalign.generators.GeneratorAdapter`): its pipeline
        component, with DDP told when the denoiser has outputs its prediction never uses."""
        return cls(
            config,
            adapter.pipe,
            component=adapter.component,
            find_unused_parameters=adapter.has_unused_outputs,
            keep_reference=keep_reference,
        )

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate `tensor` (same shape on every process) across processes, in process order."""
        return self.accelerator.gather(tensor.contiguous())

    def mean_across_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over processes (for logging)."""
        if self.num_processes == 1 or not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        reduced = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(values, reduced.tolist()))

    # -- one update -----------------------------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        """The mixed-precision autocast context (a no-op in float32)."""
        if self.sharding == DEEPSPEED:  # accelerate leaves precision to DeepSpeed, which casts weights, not inputs
            mixed = self.config.mixed_precision
            return torch.autocast(self.device.type, dtype=WEIGHT_DTYPES[mixed], enabled=mixed != "no")
        return self.accelerator.autocast()

    @contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Wrap the forward and backward of one micro-step; only the last one of an update may `sync` gradients."""
        if self.sharding == DEEPSPEED:  # ZeRO-2 reduces into its partitions; it steps only at a boundary
            self.model.set_gradient_accumulation_boundary(sync)
            yield
            return
        with nullcontext() if sync else self.accelerator.no_sync(self.model):
            yield

    def backward(self, loss: Tensor) -> None:
        self._loss_finite &= torch.isfinite(loss.detach()).all()  # no host sync here: checked once per update
        if self.sharding == DEEPSPEED:  # DeepSpeed's backward (loss scaling, partitioned reduction); no step yet
            self.model.backward(loss)
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step the optimizer and the schedule, update the EMA; returns `grad_norm` and `lr`.

        Raises `NonFiniteError` (before touching the weights) when a loss of this update or the gradient norm is not
        finite, on every process alike. Under fp16 a non-finite gradient is the loss scaler's business (it skips the
        step and lowers the scale), so only the loss is checked there. Under DeepSpeed the losses are checked before
        its step and its gradient norm after it (DeepSpeed skips an overflowed step in fp16 and float32; in bf16 the
        weights may have moved, and the finite-weight checks keep them out of every checkpoint and export).
        """
        lr = self.lr_scheduler.get_last_lr()[0]
        if self.sharding == DEEPSPEED:
            grad_norm = 0.0  # DeepSpeed computes it inside its step, after the losses are checked below
        elif self.config.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
            grad_norm = float(full_tensor(norm))
        else:
            grads = [full_tensor(p.grad.detach()).float().norm() for p in self.parameters if p.grad is not None]
            grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        finite = torch.stack([self._loss_finite, torch.tensor(math.isfinite(grad_norm), device=self.device)])
        self._loss_finite = torch.ones((), dtype=torch.bool, device=self.device)
        if self.accelerator.scaler is not None:
            finite[1] = True
        if self.num_processes > 1:
            finite = self.accelerator.reduce(finite.int(), reduction="sum") == self.num_processes
        if not bool(finite.all()):
            what = "loss" if not bool(finite[0]) else f"gradient norm ({grad_norm})"
            raise NonFiniteError(self._non_finite_message(what, self.step + 1))
        if self.sharding == DEEPSPEED:  # clip, step and zero_grad in one call (the wrappers below are no-ops then)
            grad_norm = deepspeed_step(self.model)  # the same on every process; DeepSpeed skips an overflowed step
            if not math.isfinite(grad_norm) and self.config.mixed_precision != "fp16":
                raise NonFiniteError(self._non_finite_message(f"gradient norm ({grad_norm})", self.step + 1))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        self.progress.update(1)
        return {"grad_norm": grad_norm, "lr": lr}

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference policy to call without gradient: adapters disabled, or the frozen initial copy."""
        if self.config.use_lora:
            self.unwrapped.disable_adapters()
            try:
                yield self.unwrapped
            finally:
                self.unwrapped.enable_adapters()
        elif self.reference_model is not None:
            yield self.reference_model
        else:
            raise ValueError("full fine-tuning keeps a reference model only with Engine(..., keep_reference=True)")

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """A context in which the trained parameters hold their EMA (when on). It is the context of the work between
        training steps (evaluation, data sampled from the model), so its time is left out of the training bar's ETA
        (`pause_progress`)."""
        with self.pause_progress(), nullcontext() if self.ema is None else self.ema.swapped_in():
            yield

    def _training_bar(self, initial: int) -> tqdm:
        """The training bar (main process only), counting optimizer steps from `initial` (a resumed run's step)."""
        main = self.accelerator.is_local_main_process
        return tqdm(total=self.config.max_steps, initial=initial, desc="training", unit="step", disable=not main)

    @contextmanager
    def pause_progress(self) -> Iterator[None]:
        """Leave the time spent inside out of the training bar's rate and ETA: the ETA counts training steps only,
        not evaluation or pair building (which show their own bars). Nested pauses count once."""
        start = time.time()  # tqdm's clock
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if not self._paused and not self.progress.disable:
                paused = time.time() - start
                self.progress.start_t += paused
                self.progress.last_print_t += paused

    # -- logging --------------------------------------------------------------------------------------------------

    def log(self, metrics: dict[str, float]) -> None:
        """Record scalars at the current step: `history`, the trackers, `output_dir/metrics.jsonl` (main process)."""
        self.history.append({"step": self.step, **metrics})
        if self.config.report_to != "none":
            self.accelerator.log(metrics, step=self.step)
        if self.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            shown = [(k, v) for k, v in metrics.items() if not k.startswith(("eval/", "time/train_"))][:3]  # training
            if shown:
                self.progress.set_postfix({k: f"{v:.4g}" for k, v in shown}, refresh=False)

    # -- saving and resuming --------------------------------------------------------------------------------------

    def trained_state(self) -> dict[str, Tensor]:
        """The trained parameters by name, whole: gathered when sharded (a collective: call it on every process);
        under DeepSpeed the float32 master weights."""
        if self.sharding == DEEPSPEED:
            return deepspeed_trained_state(self.named_parameters)
        return {n: full_tensor(p.detach()) for n, p in self.named_parameters}

    def save_lora(self, folder: str | Path, trained: dict[str, Tensor] | None = None) -> None:
        """The adapter in the diffusers format (`pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights`);
        a sharded model passes its gathered adapter weights (`trained_state()`) as `trained`."""
        state = get_peft_model_state_dict(self.unwrapped, state_dict=trained)
        metadata_ = self.unwrapped.peft_config["default"].to_dict()
        type(self.pipe).save_lora_weights(
            folder,
            **{f"{self.component}_lora_layers": state, f"{self.component}_lora_adapter_metadata": metadata_},
        )

    def finish(self, folder: str | Path | None = None) -> Path:
        """Write the final weights (EMA ones when EMA is on) to `folder` (default `output_dir/final`), close up.

        LoRA: `pytorch_lora_weights.safetensors` (diffusers format); full fine-tuning: the component's
        `save_pretrained` folder. Returns the folder.
        """
        folder = Path(folder) if folder is not None else self.output_dir / "final"
        self._check_finite_weights("the final weights")
        gathered = None
        if self.sharding == DEEPSPEED:  # the float32 masters (or their EMA), not the module's low-precision copies
            names = [n for n, _ in self.named_parameters]
            trained = self.trained_state() if self.ema is None else dict(zip(names, self.ema.shadow))
            gathered = trained if self.config.use_lora else self.unwrapped.state_dict() | trained
        elif self.sharding != NONE:  # gathered on every process (a collective), written by the main one
            with self.ema_weights():
                gathered = self.trained_state() if self.config.use_lora else full_state_dict(self.unwrapped)
        if self.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            with self.ema_weights() if gathered is None else nullcontext():
                if self.config.use_lora:
                    self.save_lora(folder, gathered)
                elif gathered is None:
                    self.unwrapped.save_pretrained(folder / self.component)
                else:
                    save_full_component(self.unwrapped, gathered, folder / self.component)
            self.update_run_record(status="finished", step=self.step)
        self.accelerator.wait_for_everyone()
        self.progress.close()
        self.accelerator.end_training()
        return folder

    def update_run_record(self, **fields: Any) -> None:
        """Merge `fields` into the run folder's `run.json` (main process; written atomically)."""
        if self.is_main_process:
            run = self.output_dir / "run.json"
            write_run_record(run, (json.loads(run.read_text()) if run.is_file() else {}) | fields)

    def _non_finite_message(self, what: str, step: int) -> str:
        last = latest_checkpoint(self.output_dir)
        where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written yet"
        return (
            f"non-finite {what} at step {step}: training stopped, nothing of this step was written; {where} "
            "(lower learning_rate or check the loss and reward for NaN/inf, then resume with resume_from=latest)"
        )

    def _check_finite_weights(self, what: str) -> None:
        """`NonFiniteError` unless every trained parameter (and its EMA) is finite: NaN weights are never saved."""
        tensors = list(self.parameters) + ([] if self.ema is None else self.ema.shadow)
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all() if tensors else None
        if finite is not None and not bool(finite):
            raise NonFiniteError(self._non_finite_message(f"weights in {what}", self.step))

    def maybe_checkpoint(self, state: dict[str, Any], *, force: bool = False) -> Path | None:
        """Checkpoint when `save_steps` steps have passed since the last one (or `force`)."""
        every = self.config.save_steps
        due = every > 0 and self.step // every > self._last_checkpoint_step // every
        if not (due or force) or self.step == self._last_checkpoint_step:
            return None
        return self.save_checkpoint(state)

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Write `output_dir/checkpoints/checkpoint-{step}` atomically (`visalign.checkpointing.write_checkpoint`).

        `state` is the caller's: its JSON values (the main process's) go to `state.json`, its tensor values (every
        process's own, e.g. a replay buffer) to `caller_state_{process}.safetensors`.
        """
        self._check_finite_weights(f"checkpoint-{self.step}")
        final = write_checkpoint(self, state)
        self._last_checkpoint_step = self.step
        return final

    def resume(self) -> dict[str, Any] | None:
        """Restore the checkpoint `config.resume_from` names; returns the caller's state, or None when starting fresh.

        `"latest"` picks the newest checkpoint under `output_dir` and starts fresh when there is none. Resuming an
        earlier checkpoint of this run rewinds it: the later checkpoints (and metrics rows) are removed, so that
        `"latest"` never mixes the abandoned future with the new one.
        """
        folder = resume_checkpoint(self.config)
        if folder is None:
            return None
        state = self.load_checkpoint(folder)
        if self.is_main_process:
            remove_checkpoints_after(self.output_dir, self.step)
        self.accelerator.wait_for_everyone()
        return state

    def load_checkpoint(self, folder: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, schedule, EMA, RNG states and step from `folder`; returns the caller's state.

        Nothing is unpickled: a folder holding a pickle is refused, naming the file. `output_dir/metrics.jsonl` is cut
        back to the rows it had when the checkpoint was written (each step is then logged exactly once).
        """
        folder = Path(folder)
        state, step, rows = read_checkpoint(self, folder)
        self.step = self._last_checkpoint_step = step
        if self.is_main_process:
            truncate_metrics(self.output_dir / "metrics.jsonl", rows, self.step)
        self.progress.leave = False  # a fresh bar from the resumed step: restored steps take no time in its rate
        self.progress.close()
        self.progress = self._training_bar(initial=self.step)
        logger.info("resumed from %s at step %d", folder, self.step)
        return state


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated on the CUDA device, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
