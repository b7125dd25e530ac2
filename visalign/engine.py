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
- An EMA of the trainable parameters, swapped in by `ema_weights()` and for the final export.
- Checkpoints written to a temporary folder and renamed: trainable weights, optimizer, scheduler, EMA, the RNG
  states of every process (python, numpy, torch), the step, and the caller's state (its prompt sampler). A LoRA
  checkpoint also holds the adapter in the diffusers format, so `pipe.load_lora_weights(folder)` works.
  `resume_from` restores all of it: a resumed run continues exactly where the checkpoint was taken.
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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from visalign.config import TrainConfig, config_to_dict, save_config
from visalign.sampler import seeded_generators
from visalign.types import RewardOutput

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.ema = EMA(self.parameters, config.ema_decay, config.ema_update_every) if config.ema_decay > 0 else None
        self.step = 0
        self._last_checkpoint_step = 0
        self.history: list[dict[str, float]] = []

        if self.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            (self.output_dir / "run.json").write_text(json.dumps(run_info(), indent=2))
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
        self.progress = tqdm(total=config.max_steps, desc="steps", disable=not self.accelerator.is_local_main_process)

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
        self.accelerator.backward(loss)

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step the optimizer and the schedule, update the EMA; returns `grad_norm` and `lr`."""
        lr = self.lr_scheduler.get_last_lr()[0]
        if self.config.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm))
        else:
            grads = [p.grad.detach().float().norm() for p in self.parameters if p.grad is not None]
            grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
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

    def save_lora(self, folder: str | Path) -> None:
        """The adapter in the diffusers format (`pytorch_lora_weights.safetensors`, for `pipe.load_lora_weights`)."""
        state = get_peft_model_state_dict(self.unwrapped)
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
        if self.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            with self.ema_weights():
                if self.config.use_lora:
                    self.save_lora(folder)
                else:
                    self.unwrapped.save_pretrained(folder / self.component)
        self.accelerator.wait_for_everyone()
        self.progress.close()
        self.accelerator.end_training()
        return folder

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
        if self.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        torch.save(random_states(), tmp / f"random_states_{self.process_index}.pt")
        if self.is_main_process:
            save_file(
                {n: p.detach().cpu().contiguous() for n, p in self.named_parameters}, tmp / "trainable.safetensors"
            )
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if self.ema is not None:
                save_file({k: v.cpu() for k, v in self.ema.state_dict().items()}, tmp / "ema.safetensors")
            if self.config.use_lora:
                self.save_lora(tmp)
            save_config(self.config, tmp / "config.yaml")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, **state}, indent=2))
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

        `"latest"` picks the newest checkpoint under `output_dir` and starts fresh when there is none.
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
        return self.load_checkpoint(folder)

    def load_checkpoint(self, folder: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, schedule, EMA, RNG states and step from `folder`; returns the caller's state."""
        folder = Path(folder)
        if not (folder / "state.json").exists():
            raise FileNotFoundError(f"no visalign checkpoint at {folder} (state.json missing)")
        weights = load_file(folder / "trainable.safetensors", device=str(self.device))
        names = [n for n, _ in self.named_parameters]
        if sorted(weights) != sorted(names):
            missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
            raise ValueError(
                f"checkpoint {folder} does not match the trained parameters (missing {missing[:3]}, extra "
                f"{extra[:3]}): was it written with the same model and LoRA settings?"
            )
        with torch.no_grad():
            for n, p in self.named_parameters:
                p.copy_(weights[n])
        self.optimizer.load_state_dict(
            torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(folder / "ema.safetensors", device=str(self.device)))
        rng = folder / f"random_states_{self.process_index}.pt"
        if rng.exists():
            set_random_states(torch.load(rng, weights_only=False))
        state = json.loads((folder / "state.json").read_text())
        self.step = self._last_checkpoint_step = int(state.pop("step"))
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
    shipped model), or a diffusers folder or hub id (an SD3 folder saved without T5 loads without it)."""
    kind, _, name = pretrained.partition(":")
    if kind == "tiny" and name:
        from visalign.testing import tiny_pipeline

        return tiny_pipeline(name)
    if kind == "world" and name:
        from visalign.world.models import load_pipeline as load_world_pipeline

        return load_world_pipeline(name)
    options = {}
    index = Path(pretrained) / "model_index.json"
    if index.exists() and json.loads(index.read_text()).get("text_encoder_3", [None])[0] is None:
        options = {"text_encoder_3": None, "tokenizer_3": None}
    pipe = DiffusionPipeline.from_pretrained(pretrained, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt")
    return prompts


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints under `output_dir`, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `output_dir`, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def random_states() -> dict[str, Any]:
    """python, numpy and torch (CPU and CUDA) RNG states of this process."""
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
