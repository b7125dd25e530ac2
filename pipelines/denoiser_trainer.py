"""What Diffusion-DPO, Diffusion-DRO and PRDP share around their losses: the generator settings (`DenoiserConfig`),
the trainer base (`DenoiserTrainer`: the family's generator adapter, the engine, the loop and the evaluation), and
config checks.

Each method's trainer subclasses `DenoiserTrainer` and supplies `train_step` (and its checkpoint state); the
denoising objective and the sampler they call are the adapter's (`visalign.generators.adapter_for`: any family).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from visalign.config import GeneratorConfig
from visalign.engine import Engine, ScoreTotals
from visalign.generators import adapter_for, seeded_generators
from visalign.lifecycle import TrainingLoop
from visalign.pipelines.preference_data import pipeline_pixels
from visalign.prompts import load_prompts
from visalign.rewards import RewardModel, load_reward
from visalign.world.evaluate import add_levels, category_sums


@dataclass
class DenoiserConfig(GeneratorConfig):
    """What Diffusion-DPO, Diffusion-DRO and PRDP share on top of `GeneratorConfig`: the denoising objective."""

    pretrained_model_name_or_path: str = field(
        default="world:sd",
        metadata={"help": "The pipeline: a diffusers folder or hub id, `world:sd` / `world:sd3`, `tiny:sd`."},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Flow models: logit-normal timestep mean (SD3: 0)."})
    logit_std: float = field(default=1.0, metadata={"help": "Flow models: logit-normal timestep std (SD3: 1)."})
    vae_sample_posterior: bool = field(
        default=False,
        metadata={"help": "Encode training images with a VAE posterior sample instead of its mean (`encode_images`)."},
    )
    eval_reward: str | None = field(
        default="world-verifier", metadata={"help": "The evaluation judge (`list_rewards()`)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.negative_prompt:
            raise ValueError(
                "`negative_prompt` is not used by DPO, DRO or PRDP: they sample with the family's default one"
            )
        if self.eval_prompts is not None and self.eval_reward is None:
            raise ValueError("`eval_prompts` needs an `eval_reward` to score them")

    def adapter_options(self) -> dict[str, Any]:
        """`GeneratorConfig.adapter_options` and the denoising objective's settings."""
        objective = dict(logit_mean=self.logit_mean, logit_std=self.logit_std)
        return super().adapter_options() | objective | {"vae_sample_posterior": self.vae_sample_posterior}


class DenoiserTrainer(TrainingLoop):
    """The base of a trainer that updates a generator's denoiser: its adapter (`adapter`), the engine, the evaluation.

    The loop is `visalign.lifecycle.TrainingLoop.train`. Subclasses implement `train_step()` (one optimizer step,
    returning its metrics) and `state_dict` / `load_state_dict` with what their data sampling needs to resume
    exactly.

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
        self.adapter = adapter_for(pipe, **config.adapter_options())
        self.engine = Engine.for_generator(config, self.adapter, keep_reference=not config.use_lora)
        self.eval_prompts = eval_prompts
        self.eval_reward = None if eval_reward is None else eval_reward.to(self.engine.device).eval()

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_prompts)

    def generation_kwargs(self, num_inference_steps: int, guidance_scale: float) -> dict[str, Any]:
        """Arguments of a pipeline call at the training size (with `max_sequence_length` and `num_frames` where the
        pipeline takes them: SD3, FLUX, Qwen-Image, Wan)."""
        a = self.adapter
        kw = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=a.height, width=a.width
        )
        accepted = inspect.signature(type(a.pipe).__call__).parameters
        if "max_sequence_length" in accepted:
            kw["max_sequence_length"] = a.max_sequence_length
        if a.video:
            kw["num_frames"] = a.num_frames
        return kw

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The pipeline's own samples of the evaluation prompts (EMA weights when on, fixed seeds) scored by the
        evaluation judge: `eval/<name>` and `eval/<name>/<aspect>`, means over images and processes."""
        c, engine = self.config, self.engine
        texts = [p for p in self.eval_prompts for _ in range(c.eval_images_per_prompt)]
        mine = torch.arange(engine.process_index, len(texts), engine.num_processes)
        totals = ScoreTotals("eval")
        name = self.eval_reward.name
        self.adapter.model.eval()
        batches = tqdm(mine.split(c.eval_batch_size), "evaluation", disable=not engine.is_main_process, leave=False)
        with engine.ema_weights(), engine.autocast():
            for index in batches:
                prompts = [texts[i] for i in index.tolist()]
                output = self.adapter.pipe(
                    prompts,
                    generator=seeded_generators([(c.seed, 0xE7A1, int(i)) for i in index]),
                    output_type="pt",
                    **self.generation_kwargs(c.eval_num_inference_steps, c.eval_guidance_scale),
                )
                images = pipeline_pixels(output)
                out = self.eval_reward.score(images, prompts)
                totals.add(name, out)
                by_category = category_sums(prompts, out.aspects["correct"]) if "correct" in out.aspects else None
                for category, value in (by_category or {}).items():
                    totals.sums[f"eval/{name}/correct@{category}"] += value
        return add_levels(totals.means(engine, len(texts)), f"eval/{name}", texts)


def evaluation_from_config(config: DenoiserConfig) -> dict[str, Any]:
    """The `eval_prompts` and `eval_reward` keyword arguments of a trainer, loaded from what the config names."""
    if config.eval_prompts is None:
        return {}
    return dict(eval_prompts=load_prompts(config.eval_prompts), eval_reward=load_reward(config.eval_reward))
