"""What Diffusion-DPO, Diffusion-DRO and PRDP share around their losses: the generator settings (`DenoiserConfig`),
the trainer base (`DenoiserTrainer`: the `Denoiser`, the engine, the loop and the evaluation), and config checks.

Each method's trainer subclasses `DenoiserTrainer` and supplies `train_step` (and its checkpoint state); the
denoising objective and the epsilon sampler they call are `visalign.pipelines.denoiser.Denoiser`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import Tensor
from tqdm.auto import tqdm

from visalign.config import TrainConfig
from visalign.engine import Engine
from visalign.pipelines.denoiser import Denoiser
from visalign.prompts import load_prompts
from visalign.rewards import RewardModel, load_reward
from visalign.sampler import seeded_generators
from visalign.world.evaluate import add_levels, category_sums


@dataclass
class DenoiserConfig(TrainConfig):
    """Settings of the generator that Diffusion-DPO, Diffusion-DRO and PRDP train, on top of the engine's."""

    pretrained: str = field(
        default="world:sd",
        metadata={"help": "The pipeline: a diffusers folder or hub id, `world:sd` / `world:sd3`, `tiny:sd`."},
    )
    height: int | None = field(default=None, metadata={"help": "Image height (default: the denoiser's native)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: the denoiser's native)."})
    max_sequence_length: int = field(default=256, metadata={"help": "SD3's T5 tokens (the shapes world: 16)."})
    logit_mean: float = field(default=0.0, metadata={"help": "Flow models: logit-normal timestep mean (SD3: 0)."})
    logit_std: float = field(default=1.0, metadata={"help": "Flow models: logit-normal timestep std (SD3: 1)."})
    vae_sample_posterior: bool = field(
        default=False,
        metadata={"help": "Encode training images with a VAE posterior sample instead of its mean (`encode_images`)."},
    )
    num_inference_steps: int = field(default=20, metadata={"help": "Sampling steps of the method's own samples."})
    guidance_scale: float = field(default=7.5, metadata={"help": "CFG of the method's own samples."})
    eval_prompts: str | None = field(
        default=None, metadata={"help": "Evaluation prompts (`world:heldout`, a file); None: no evaluation."}
    )
    eval_reward: str = field(default="world-verifier", metadata={"help": "The evaluation judge (`list_rewards()`)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every this many steps (0: at start and end)."})
    eval_num_inference_steps: int = field(default=20, metadata={"help": "Sampling steps at evaluation."})
    eval_guidance_scale: float = field(default=7.5, metadata={"help": "Guidance at evaluation."})
    eval_images_per_prompt: int = field(default=1, metadata={"help": "Images per evaluation prompt."})
    eval_batch_size: int = field(default=32, metadata={"help": "Images per evaluation batch and process."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "max_sequence_length",
            "num_inference_steps",
            "eval_num_inference_steps",
            "eval_images_per_prompt",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"`eval_every` must be >= 0, got {self.eval_every}")


class DenoiserTrainer:
    """The loop of a trainer that updates an SD, SDXL or SD3 denoiser: resume, evaluate, step, log, checkpoint.

    Subclasses implement `train_step()` (one optimizer step, returning its metrics) and extend `state_dict` /
    `load_state_dict` with what their data sampling needs to resume exactly.

    Args:
        pipe: the generator (the engine freezes it and adds LoRA to, or fully trains, its denoiser).
        config (`DenoiserConfig`): the run.
        eval_prompts (`list[str]`, *optional*), eval_reward (`RewardModel`, *optional*): the evaluation.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        config: DenoiserConfig,
        *,
        eval_prompts: list[str] | None = None,
        eval_reward: RewardModel | None = None,
    ):
        if (eval_prompts is None) != (eval_reward is None):
            raise ValueError("pass both `eval_prompts` and `eval_reward`, or neither")
        self.config = config
        self.denoiser = Denoiser(
            pipe,
            height=config.height,
            width=config.width,
            max_sequence_length=config.max_sequence_length,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            vae_sample_posterior=config.vae_sample_posterior,
        )
        component = "transformer" if self.denoiser.target == "flow" else "unet"
        self.engine = Engine(config, pipe, component=component, keep_reference=not config.use_lora)
        self.eval_prompts = eval_prompts
        self.eval_reward = None if eval_reward is None else eval_reward.to(self.engine.device).eval()
        self.history: list[dict[str, float]] = []

    def train(self) -> list[dict[str, float]]:
        """Train to `max_steps` (resuming first when `resume_from` says so); returns the logged metrics."""
        state = self.engine.resume()
        if state is not None:
            self.load_state_dict(state)
        if self.eval_prompts and self.engine.step == 0:
            self._log(self.evaluate())
        while self.engine.step < self.config.max_steps:
            self._log(self.train_step())
            every = self.config.eval_every
            if (
                self.eval_prompts
                and every
                and self.engine.step % every == 0
                and self.engine.step < self.config.max_steps
            ):
                self._log(self.evaluate())
            self.engine.maybe_checkpoint(self.state_dict())
        if self.eval_prompts:
            self._log(self.evaluate())
        self.engine.maybe_checkpoint(self.state_dict(), force=True)
        self.engine.finish()
        return self.history

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds besides the engine's state (JSON-serializable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output."""

    def generation_kwargs(self, num_inference_steps: int, guidance_scale: float) -> dict[str, Any]:
        """Arguments of a pipeline call at the training size (SD3 also gets `max_sequence_length`)."""
        d = self.denoiser
        kw = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=d.height, width=d.width
        )
        if d.family == "sd3":
            kw["max_sequence_length"] = d.max_sequence_length
        return kw

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The pipeline's own samples of the evaluation prompts (EMA weights when on, fixed seeds) scored by the
        evaluation judge: `eval/<name>` and `eval/<name>/<aspect>`, means over images and processes."""
        c, engine = self.config, self.engine
        texts = [p for p in self.eval_prompts for _ in range(c.eval_images_per_prompt)]
        mine = torch.arange(engine.process_index, len(texts), engine.num_processes)
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64, device=engine.device))
        name = self.eval_reward.name
        self.denoiser.model.eval()
        batches = tqdm(mine.split(c.eval_batch_size), "evaluation", disable=not engine.is_main_process, leave=False)
        with engine.ema_weights(), engine.autocast():
            for index in batches:
                prompts = [texts[i] for i in index.tolist()]
                images = (
                    self.denoiser.pipe(
                        prompts,
                        generator=seeded_generators([(c.seed, 0xE7A1, int(i)) for i in index]),
                        output_type="pt",
                        **self.generation_kwargs(c.eval_num_inference_steps, c.eval_guidance_scale),
                    )
                    .images.float()
                    .clamp(0, 1)
                )
                out = self.eval_reward.score(images, prompts)
                sums[f"eval/{name}"] += out.score.double().sum()
                for aspect, values in out.aspects.items():
                    sums[f"eval/{name}/{aspect}"] += values.double().sum()
                by_category = category_sums(prompts, out.aspects["correct"]) if "correct" in out.aspects else None
                for category, value in (by_category or {}).items():
                    sums[f"eval/{name}/correct@{category}"] += value
        names = sorted(sums) or [f"eval/{name}"]
        totals = torch.stack([sums[k] for k in names])
        if engine.num_processes > 1:
            totals = engine.accelerator.reduce(totals, reduction="sum")
        return add_levels({k: float(v) / len(texts) for k, v in zip(names, totals)}, f"eval/{name}", texts)

    def _log(self, metrics: dict[str, float]) -> None:
        self.history.append({"step": self.engine.step, **metrics})
        self.engine.log(metrics)


def check_micro_batches(train_batch_size: int, gradient_accumulation_steps: int, caption_dropout: float) -> None:
    """The batch settings of the image-based objectives (DPO pairs, DRO rows): positive sizes, a batch that splits
    into equal micro-batches, a caption dropout probability in [0, 1)."""
    for name, value in {
        "train_batch_size": train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }.items():
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")
    if train_batch_size % gradient_accumulation_steps:
        raise ValueError(
            f"`train_batch_size` ({train_batch_size}) must be divisible by `gradient_accumulation_steps` "
            f"({gradient_accumulation_steps})"
        )
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"`caption_dropout` must be in [0, 1), got {caption_dropout}")


def evaluation_from_config(config: DenoiserConfig) -> dict[str, Any]:
    """The `eval_prompts` and `eval_reward` keyword arguments of a trainer, loaded from what the config names."""
    if config.eval_prompts is None:
        return {}
    return dict(eval_prompts=load_prompts(config.eval_prompts), eval_reward=load_reward(config.eval_reward))
