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
  (`visalign.sharding`); checkpoints and exports are gathered whole and written by the main process.
- An EMA of the trainable parameters, swapped in by `ema_weights()` and for the final export.
- Checkpoints written to a temporary folder and renamed: trainable weights, optimizer, scheduler, EMA, the RNG
  states of every process (python, numpy, torch, CUDA), the step, and the caller's state (its prompt sampler). A LoRA
  checkpoint also holds the adapter in the diffusers format, so `pipe.load_lora_weights(folder)` works.
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
import os
import platform
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from visalign.config import TrainConfig, config_to_dict, save_config
from visalign.files import load_safetensors, load_state, read_text, refuse_pickles, save_state
from visalign.rundir import (
    CHECKPOINTS,
    checkpoints,
    claim_output_dir,
    count_rows,
    latest_checkpoint,
    truncate_metrics,
)
from visalign.sampler import seeded_generators
from visalign.sharding import (
    ACCELERATE,
    NONE,
    TORCH,
    full_optimizer_state,
    full_state_dict,
    full_tensor,
    load_full_optimizer_state,
    save_full_component,
    shard_like,
    shard_module,
    sharding_mode,
)
from visalign.types import RewardOutput

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient norm or weight; the message names the step and the last checkpoint."""


class EMA:
    """Exponential moving average of parameters: `ema <- decay * ema + (1 - decay) * param` every `every` steps.

    Kept in float32 on the parameters' device. Flow-GRPO uses decay 0.9 every 8 steps (without its warm-up ramp).
    """

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float, every: int):
        self.parameters = list(parameters)
        self.decay, self.every = decay, every
        self.shadow = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every == 0:
            for s, p in zip(self.shadow, self.parameters):
                s.lerp_(p.detach().float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Parameters hold the EMA inside the block and their own values again after it."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.parameters):
                p.copy_(s)
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


class PromptSampler:
    """The prompts of each training iteration, drawn from `Generator(seed, iteration)`: deterministic and resumable.

    `draw(n)` returns `n` prompts in a fresh random order (without replacement while `n <= len(prompts)`, then
    cycling the same permutation). Its state is the iteration count.
    """

    def __init__(self, prompts: Sequence[str], seed: int):
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("`prompts` must be a non-empty list of strings")
        self.prompts = list(prompts)
        self.seed = seed
        self.iteration = 0

    def draw(self, n: int) -> list[str]:
        generator = seeded_generators([(self.seed, 0x5EED, self.iteration)])[0]
        order = torch.randperm(len(self.prompts), generator=generator)
        order = order.repeat(math.ceil(n / len(self.prompts)))[:n]
        self.iteration += 1
        return [self.prompts[i] for i in order.tolist()]

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])


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
    """

    def __init__(
        self,
        config: TrainConfig,
        pipe: DiffusionPipeline,
        *,
        component: str = "transformer",
        keep_reference: bool = False,
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
        if self.sharding != NONE and self.reference_model is not None:
            shard_module(self.reference_model, compute_dtype)  # sharded too: no full copy per process
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
            (self.output_dir / "run.json").write_text(json.dumps(run_info() | {"status": "running"}, indent=2))
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
        main = self.accelerator.is_local_main_process
        self.progress = tqdm(total=config.max_steps, desc="training", disable=not main)

    # -- distribution -------------------------------------------------------------------------------------------

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
        return self.accelerator.autocast()

    @contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Wrap the forward and backward of one micro-step; only the last one of an update may `sync` gradients."""
        with nullcontext() if sync else self.accelerator.no_sync(self.model):
            yield

    def backward(self, loss: Tensor) -> None:
        self._loss_finite &= torch.isfinite(loss.detach()).all()  # no host sync here: checked once per update
        self.accelerator.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step the optimizer and the schedule, update the EMA; returns `grad_norm` and `lr`.

        Raises `NonFiniteError` (before touching the weights) when a loss of this update or the gradient norm is not
        finite, on every process alike. Under fp16 a non-finite gradient is the loss scaler's business (it skips the
        step and lowers the scale), so only the loss is checked there.
        """
        lr = self.lr_scheduler.get_last_lr()[0]
        if self.config.max_grad_norm > 0:
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

    def ema_weights(self) -> AbstractContextManager:
        """A context in which the trained parameters hold their EMA (a no-op without EMA)."""
        return nullcontext() if self.ema is None else self.ema.swapped_in()

    # -- logging --------------------------------------------------------------------------------------------------

    def log(self, metrics: dict[str, float]) -> None:
        """Record scalars at the current step: `history`, the trackers, `output_dir/metrics.jsonl` (main process)."""
        self.history.append({"step": self.step, **metrics})
        if self.config.report_to != "none":
            self.accelerator.log(metrics, step=self.step)
        if self.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            self.progress.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)

    # -- saving and resuming --------------------------------------------------------------------------------------

    def trained_state(self) -> dict[str, Tensor]:
        """The trained parameters by name, whole: gathered when sharded (a collective: call it on every process)."""
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
        if self.sharding != NONE:  # gathered on every process (a collective), written by the main one
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
            run = self.output_dir / "run.json"
            info = json.loads(run.read_text()) if run.is_file() else {}
            run.write_text(json.dumps(info | {"status": "finished", "step": self.step}, indent=2))
        self.accelerator.wait_for_everyone()
        self.progress.close()
        self.accelerator.end_training()
        return folder

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
        """Checkpoint when `checkpointing_steps` steps have passed since the last one (or `force`)."""
        every = self.config.checkpointing_steps
        due = every > 0 and self.step // every > self._last_checkpoint_step // every
        if not (due or force) or self.step == self._last_checkpoint_step:
            return None
        return self.save_checkpoint(state)

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Write `output_dir/checkpoints/checkpoint-{step}` atomically (temporary folder, then rename)."""
        root = self.output_dir / CHECKPOINTS
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".checkpoint-{self.step}.tmp"
        self._check_finite_weights(f"checkpoint-{self.step}")
        if self.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        save_state(random_states(), tmp / f"random_states_{self.process_index}.safetensors")
        # whole tensors on every process (gathers when sharded, so every process takes part), written by the main one
        trained = self.trained_state()
        ema = None if self.ema is None else {k: full_tensor(v) for k, v in self.ema.state_dict().items()}
        sharded = self.sharding != NONE
        optimizer = full_optimizer_state(self.unwrapped, self.optimizer.optimizer) if sharded else None
        if self.is_main_process:
            save_file({n: t.cpu().contiguous() for n, t in trained.items()}, tmp / "trainable.safetensors")
            save_state(optimizer if sharded else self.optimizer.state_dict(), tmp / "optimizer.safetensors")
            save_state(self.lr_scheduler.state_dict(), tmp / "scheduler.safetensors")
            if ema is not None:
                save_file({k: v.cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
            if self.config.use_lora:
                self.save_lora(tmp, trained if sharded else None)
            save_config(self.config, tmp / "config.yaml")
            metrics = self.output_dir / "metrics.jsonl"
            state = {"step": self.step, "metrics_rows": count_rows(metrics), **state}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints(root)
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        self._last_checkpoint_step = self.step
        return final

    def resume(self) -> dict[str, Any] | None:
        """Restore the checkpoint `config.resume_from` names; returns the caller's state, or None when starting fresh.

        `"latest"` picks the newest checkpoint under `output_dir` and starts fresh when there is none. Resuming an
        earlier checkpoint of this run rewinds it: the later checkpoints (and metrics rows) are removed, so that
        `"latest"` never mixes the abandoned future with the new one.
        """
        if self.config.resume_from is None:
            return None
        if self.config.resume_from == "latest":
            folder = latest_checkpoint(self.output_dir)
            if folder is None:
                logger.info("resume_from='latest': no checkpoint under %s, starting fresh", self.output_dir)
                return None
        else:
            folder = Path(self.config.resume_from)
        state = self.load_checkpoint(folder)
        later = [c for c in checkpoints(self.output_dir) if int(c.name.split("-")[-1]) > self.step]
        if later and self.is_main_process:  # a rewound run: those checkpoints belong to the future being rewritten
            logger.warning("resumed at step %d: removing the later checkpoints %s", self.step, [c.name for c in later])
            for old in later:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return state

    def load_checkpoint(self, folder: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, schedule, EMA, RNG states and step from `folder`; returns the caller's state.

        Nothing is unpickled: a folder holding a pickle is refused, naming the file. `output_dir/metrics.jsonl` is cut
        back to the rows it had when the checkpoint was written (each step is then logged exactly once).
        """
        folder = Path(folder)
        if not (folder / "state.json").exists():
            raise FileNotFoundError(f"no visalign checkpoint at {folder} (state.json missing)")
        refuse_pickles(folder)
        # read on the CPU (safetensors refuses "cpu:0", the device of a multi-process CPU run); copy_ moves them
        weights = load_safetensors(folder / "trainable.safetensors", device="cpu")
        names = [n for n, _ in self.named_parameters]
        if sorted(weights) != sorted(names):
            missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
            raise ValueError(
                f"checkpoint {folder} does not match the trained parameters (missing {missing[:3]}, extra "
                f"{extra[:3]}): was it written with the same model and LoRA settings?"
            )
        with torch.no_grad():
            for n, p in self.named_parameters:
                p.copy_(shard_like(weights[n], p))  # this process's shard when sharded
        if self.sharding == NONE:
            self.optimizer.load_state_dict(load_state(folder / "optimizer.safetensors"))
        else:
            optimizer = load_state(folder / "optimizer.safetensors")
            load_full_optimizer_state(self.unwrapped, self.optimizer.optimizer, optimizer)
        self.lr_scheduler.load_state_dict(load_state(folder / "scheduler.safetensors"))
        if self.ema is not None:
            ema = load_safetensors(folder / "ema.safetensors", device="cpu")
            self.ema.load_state_dict({k: shard_like(v, self.ema.shadow[int(k)]) for k, v in ema.items()})
        rng = folder / f"random_states_{self.process_index}.safetensors"
        if rng.exists():
            set_random_states(load_state(rng))
        try:
            state = json.loads(read_text(folder / "state.json"))
            step, rows = int(state.pop("step")), state.pop("metrics_rows", None)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'state.json'} is not a visalign checkpoint state ({e})") from None
        self.step = self._last_checkpoint_step = step
        if self.is_main_process:
            truncate_metrics(self.output_dir / "metrics.jsonl", rows, self.step)
        self.progress.update(self.step)
        logger.info("resumed from %s at step %d", folder, self.step)
        return state

    def _prune_checkpoints(self, root: Path) -> None:
        limit = self.config.checkpoints_total_limit
        if limit is None:
            return
        for old in checkpoints(root.parent)[:-limit]:
            shutil.rmtree(old)


def load_pipeline(pretrained: str) -> DiffusionPipeline:
    """The pipeline a config names: `tiny:<family>` (`visalign.testing`), `world:<family>` (the shapes world's
    shipped model), or a diffusers folder or hub id (an SD3 folder saved without T5 loads without it): the names
    every command takes, through the one loader (`visalign.loading.load_generator`)."""
    from visalign.loading import load_generator

    return load_generator(pretrained)[0]


def load_prompts(spec: str) -> list[str]:
    """Prompts a config names: `world:train` / `world:test` (the shapes world's splits), `world:heldout` (its
    evaluation set), or a text file with one prompt a line."""
    kind, _, split = spec.partition(":")
    if kind == "world" and split == "heldout":
        from visalign.world.evaluate import heldout_prompts

        return [p.text for p in heldout_prompts()]
    if kind == "world" and split:
        from visalign.world.scenes import prompt_split

        return [p.text for group in prompt_split(split).values() for p in group]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompts {spec!r}: not `world:<split>` and no such file")
    prompts = [line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt")
    return prompts


def random_states() -> dict[str, Any]:
    """python, numpy and torch (CPU and CUDA) RNG states of this process (stored by `visalign.files.save_state`)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def run_info() -> dict[str, Any]:
    """What a run needs for reproduction besides its config: command, versions, platform."""
    packages = ("visalign", "torch", "diffusers", "transformers", "accelerate", "peft")
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
