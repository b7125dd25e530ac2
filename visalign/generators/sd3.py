"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): a flow-matching MMDiT with CLIP-L, CLIP-G and T5 encoders.

CFG runs the negative and the positive prompt in one doubled batch; the transformer takes the scheduler's timestep
(0-1000) as is. A folder without T5 pads with `max_sequence_length` zero tokens, as the pipeline does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from visalign.generators.base import GeneratorAdapter
from visalign.generators.rollout import Conditioning


class SD3Adapter(GeneratorAdapter):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        """Encode `prompts` (and the negative prompt when `guidance_scale > 1`) once, without gradient."""
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=guidance_scale > 1,
            negative_prompt=self.negative_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            embeds, pooled, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled
        )

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        channels = self.model.config.in_channels
        return self.pipe.prepare_latents(
            len(generator), channels, self.height, self.width, torch.float32, self.device, generator
        )

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        model = self.model if model is None else model
        return model(
            hidden_states=x.to(cond.prompt_embeds.dtype),
            timestep=t,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        return self._vae_decode(latents)

    def encode_images(self, pixels: Tensor, generator=None) -> Tensor:
        return self._vae_encode(pixels, generator)
