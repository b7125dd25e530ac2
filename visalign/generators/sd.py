"""Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`, epsilon or v-prediction) and SDXL
(`StableDiffusionXLPipeline`): UNets sampled by DDIM.

The policy step is `visalign.sampling.ddim_step` (`kind="ddim"`, `noise_level` = eta; eta 1 is DDPO's and PRDP's
sampler) on a `DDIMScheduler` built from the pipeline's scheduler config (without x0 clipping or thresholding).
`schedule(..., offset)` shifts every timestep by `offset` (Diffusion-DRO perturbs it so that training sees every
timestep).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from visalign.generators.base import GeneratorAdapter
from visalign.generators.rollout import Conditioning, Schedule
from visalign.sampling import StepOutput, ddim_step


class SDAdapter(GeneratorAdapter):
    family = "sd"
    pipeline_class = "StableDiffusionPipeline"
    default_max_sequence_length = 77

    def __init__(self, pipe, **options):
        super().__init__(pipe, **options)
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"the scheduler's prediction_type must be epsilon or v_prediction, got {prediction}")
        self._target = prediction
        # `ddim_step` neither clips nor thresholds the predicted x0 (DDPO's step does not either); a config from
        # another scheduler (SDXL ships Euler's) would otherwise get DDIM's clip_sample=True default
        self.ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)

    @property
    def model(self) -> nn.Module:
        return self.pipe.unet

    @property
    def target(self) -> str:
        return self._target

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.ddim.alphas_cumprod.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        cfg = guidance_scale > 1
        embeds, negative = self.pipe.encode_prompt(
            prompts, self.device, 1, cfg, negative_prompt=self.negative_prompt or None
        )
        return Conditioning(embeds, negative_prompt_embeds=negative if cfg else None)

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        scale = self.pipe.vae_scale_factor
        shape = (self.model.config.in_channels, self.height // scale, self.width // scale)
        return torch.stack([torch.randn(shape, generator=g) for g in generator]).to(self.device)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        model = self.model if model is None else model
        return model(x.to(cond.prompt_embeds.dtype), t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]

    def schedule(self, num_inference_steps: int, offset: int = 0) -> Schedule:
        """DDIM's `(timesteps, prev_timesteps)`, each shifted by `offset` (the last `prev` is -1: the final alpha)."""
        self.ddim.set_timesteps(num_inference_steps)
        timesteps = self.ddim.timesteps.long()
        if not 0 <= offset < self.max_offset(num_inference_steps):
            raise ValueError(f"`offset` must be in [0, {self.max_offset(num_inference_steps)}), got {offset}")
        prev = torch.cat([timesteps[1:], timesteps.new_full((1,), -1 - offset)])
        return Schedule(timesteps + offset, prev_timesteps=prev + offset)

    def max_offset(self, num_inference_steps: int) -> int:
        """The timestep shifts `schedule` accepts: `[0, min(step ratio, num_train - first timestep))`."""
        self.ddim.set_timesteps(num_inference_steps)
        ratio = self.num_train_timesteps // num_inference_steps
        return max(1, min(ratio, self.num_train_timesteps - int(self.ddim.timesteps[0])))

    def step(
        self, prediction, x, schedule, index, *, noise_level, kind, generator=None, prev_sample=None
    ) -> StepOutput:
        if kind != "ddim":
            raise ValueError(f"`kind` must be 'ddim' for the {self.target} family {self.family}, got {kind!r}")
        final = 1.0 if self.ddim.config.set_alpha_to_one else None
        return ddim_step(
            prediction,
            x,
            int(schedule.timesteps[index]),
            int(schedule.prev_timesteps[index]),
            self.ddim.alphas_cumprod,
            noise_level,
            prediction_type=self.target,
            final_alpha_cumprod=final,
            generator=generator,
            prev_sample=prev_sample,
        )

    def decode(self, latents: Tensor) -> Tensor:
        return self._vae_decode(latents)

    def encode_images(self, pixels: Tensor, generator=None) -> Tensor:
        return self._vae_encode(pixels, generator)


class SDXLAdapter(SDAdapter):
    """SDXL: two CLIP encoders, pooled text embeddings and size micro-conditioning."""

    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        cfg = guidance_scale > 1
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=self.negative_prompt or None,
        )
        return Conditioning(
            embeds,
            pooled,
            negative_prompt_embeds=negative if cfg else None,
            negative_pooled_prompt_embeds=negative_pooled if cfg else None,
        )

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        model = self.model if model is None else model
        x = x.to(cond.prompt_embeds.dtype)
        added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": self._time_ids(x.shape[0], x.dtype)}
        return model(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]

    def _time_ids(self, n: int, dtype: torch.dtype) -> Tensor:
        """Micro-conditioning: original size, crop top-left (0, 0), target size (Diffusion-DPO's choice)."""
        ids = torch.tensor([self.height, self.width, 0, 0, self.height, self.width], dtype=dtype, device=self.device)
        return ids.expand(n, 6)
