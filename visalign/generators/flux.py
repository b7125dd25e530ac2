"""FLUX.1 (`FluxPipeline`): a guidance-distilled flow-matching transformer on packed 2x2 latent tokens.

FLUX.1-dev has no negative pass: `guidance_scale` feeds the transformer's guidance embedding (FLUX "true CFG" is not
used). The transformer takes `timestep / 1000`; the schedule is `linspace(1, 1/N, N)` with the resolution shift
`mu`, as the pipeline's `__call__`. Training predictions (DPO, DRO) use guidance 3.5 when the transformer has a
guidance embedding (diffusers' `train_dreambooth_lora_flux.py` default).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from visalign.generators.base import GeneratorAdapter
from visalign.generators.rollout import Conditioning

TRAINING_GUIDANCE = 3.5


class FluxAdapter(GeneratorAdapter):
    family = "flux"
    pipeline_class = "FluxPipeline"
    uses_negative = False
    default_max_sequence_length = 512

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def native_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def image_seq_len(self) -> int:
        scale = self.pipe.vae_scale_factor * 2
        return (self.height // scale) * (self.width // scale)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning(embeds, pooled, text_ids=text_ids)

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        channels = self.model.config.in_channels // 4
        return self.pipe.prepare_latents(
            len(generator), channels, self.height, self.width, torch.float32, self.device, generator
        )[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        scheduler = self.pipe.scheduler
        mu = self.shift_mu(max_shift_default=1.15)
        if scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(num_inference_steps, device=self.device, mu=mu)
        else:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)

    def guided(self, x, t, cond, guidance_scale, model=None, *, detach_uncond=False) -> Tensor:
        """The distilled guidance: one pass with `guidance_scale` in the guidance embedding."""
        if len(cond) != x.shape[0]:
            raise ValueError(f"`cond` has {len(cond)} rows for {x.shape[0]} latents")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return self._forward(x, t, cond, model, guidance_scale)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        return self._forward(x, t, cond, model, TRAINING_GUIDANCE)

    def _forward(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None, guidance_scale: float):
        model = self.model if model is None else model
        x = x.to(cond.prompt_embeds.dtype)
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full([x.shape[0]], guidance_scale, device=x.device, dtype=torch.float32)
        scale = self.pipe.vae_scale_factor * 2
        image_ids = self.pipe._prepare_latent_image_ids(
            1, self.height // scale, self.width // scale, x.device, x.dtype
        )
        return model(
            hidden_states=x,
            timestep=t.to(x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        latents = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return self._vae_decode(latents)

    def encode_images(self, pixels: Tensor, generator=None) -> Tensor:
        latents = self._vae_encode(pixels, generator)
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)
