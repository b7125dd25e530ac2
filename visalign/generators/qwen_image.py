"""Qwen-Image (`QwenImagePipeline`): a flow-matching MMDiT on packed 2x2 latent tokens, conditioned on the last
hidden state of Qwen2.5-VL, with "true" classifier-free guidance rescaled to the conditional prediction's norm.

Everything follows diffusers 0.42's `QwenImagePipeline.__call__` (`pipelines/qwenimage/pipeline_qwenimage.py`), so
that at noise level 0 the sampler reproduces the pipeline's output for the same initial latents:

- Prompts: the pipeline's own `encode_prompt` (chat template, the 34-token system prefix dropped, at most
  `max_sequence_length` tokens, default 512). Masks are always kept (ones where `encode_prompt` returns None) so that
  batches of different lengths concatenate; `predict` trims the columns no row uses and passes no mask when every
  token is real, as the pipeline does. The negative prompt defaults to `" "`, the pipeline docs' minimal negative
  prompt and Flow-GRPO's (`[" "] * B` in `scripts/train_qwenimage_edit_plus.py: compute_log_prob`).
- Latents: `prepare_latents`' noise `[B, 1, C, H/s, W/s]` (`s = vae_scale_factor`), packed 2x2 into tokens
  `[B, (H/2s)(W/2s), 4C]`; the transformer gets `img_shapes = [(1, H/2s, W/2s)]` per row and `timestep / 1000`.
- Schedule: `sigmas = linspace(1, 1/N, N)` with the resolution shift `mu = calculate_shift(image_seq_len, ...)` from
  the scheduler config (dynamic shifting is then driven by `mu`, as the pipeline's `retrieve_timesteps`).
- True CFG (`combine`): `comb = v_neg + w (v_text - v_neg)`, then `comb * ||v_text|| / ||comb||` with the norms taken
  over the last (token-channel) dimension: the pipeline's loop and Flow-GRPO's `compute_log_prob`. It runs for
  `guidance_scale > 1` (the pipeline's `true_cfg_scale`). The negative and positive prompts go through one doubled
  batch when their encodings have the same length, else through two passes as in the pipeline (no padding of the
  shorter one); with `detach_uncond=True` the unconditional pass then runs without building a graph.
- Pixels: `z_raw = z * latents_std + latents_mean` (the pipeline's `z / (1 / std) + mean`), `vae.decode` on one
  frame, the frame dimension dropped; `encode_images` is the inverse, `(E(x) - mean) / std` with the posterior mean
  (Qwen-Image-Edit's `sample_mode="argmax"`), or a posterior sample with `vae_sample_posterior=True`.

Not supported: a guidance-distilled transformer (`guidance_embeds=True`; no released Qwen-Image checkpoint has one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from visalign.generators.base import GeneratorAdapter
from visalign.generators.rollout import Conditioning

MAX_SEQUENCE_LENGTH = 1024  # the pipeline's hard limit (`check_inputs`)


class QwenImageAdapter(GeneratorAdapter):
    """`GeneratorAdapter` of `QwenImagePipeline`; `negative_prompt` defaults to `" "` (see the module docstring)."""

    family = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    default_max_sequence_length = 512  # the pipeline's `__call__` default
    has_unused_outputs = True  # the last block's text stream feeds nothing
    default_negative_prompt = " "  # the pipeline docs' minimal negative prompt (true CFG needs one), Flow-GRPO's

    def __init__(self, pipe: Any, **options: Any):
        super().__init__(pipe, **options)
        if not 0 < self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"`max_sequence_length` must be in [1, {MAX_SEQUENCE_LENGTH}] for Qwen-Image, "
                f"got {self.max_sequence_length}"
            )
        if self.model.config.guidance_embeds:
            raise ValueError("guidance-distilled Qwen-Image transformers (`guidance_embeds=True`) are not supported")

    def native_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the VAE's downsampling times the 2x2 packing

    def image_seq_len(self) -> int:
        scale = self.pipe.vae_scale_factor * 2
        return (self.height // scale) * (self.width // scale)

    # ----------------------------------------------------------------------------------------------------------
    # Prompts, latents, the model call

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        """Encode `prompts`, and `negative_prompt` for every row when `guidance_scale > 1`, once, without gradient."""
        embeds, mask = self._encode(prompts)
        if guidance_scale <= 1:
            return Conditioning(embeds, prompt_embeds_mask=mask)
        negative, negative_mask = self._encode([self.negative_prompt])
        n = len(prompts)
        return Conditioning(
            embeds,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=negative.repeat(n, 1, 1),
            negative_prompt_embeds_mask=negative_mask.repeat(n, 1),
        )

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # `encode_prompt` drops an all-ones mask; keep it so that batches concatenate
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        """Packed Gaussian latents `[B, L, 4C]`, float32, drawn as the pipeline's `prepare_latents`."""
        channels = self.model.config.in_channels // 4
        return self.pipe.prepare_latents(
            len(generator), channels, self.height, self.width, torch.float32, self.device, generator
        )

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        """The conditional velocity at packed latents `x` `[B, L, 4C]` and scheduler timesteps `t` `[B]` (0-1000)."""
        model = self.model if model is None else model
        embeds, mask = _trim(cond.prompt_embeds, cond.prompt_embeds_mask)
        x = x.to(embeds.dtype)
        scale = self.pipe.vae_scale_factor * 2
        img_shapes = [[(1, self.height // scale, self.width // scale)]] * x.shape[0]
        return model(
            hidden_states=x,
            timestep=t.to(x.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]

    def combine(self, uncond: Tensor, text: Tensor, guidance_scale: float) -> Tensor:
        """Qwen-Image's true CFG: `comb = uncond + w (text - uncond)`, rescaled to `||text||` along the last dim."""
        text = text.float()
        comb = super().combine(uncond.float(), text, guidance_scale)
        return comb * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def guided(
        self,
        x: Tensor,
        t: Tensor | int | float,
        cond: Conditioning,
        guidance_scale: float,
        model: nn.Module | None = None,
        *,
        detach_uncond: bool = False,
    ) -> Tensor:
        """As `GeneratorAdapter.guided`; negative and positive encodings of different lengths take two passes."""
        same_length = cond.has_negative and cond.negative_prompt_embeds.shape[1] == cond.prompt_embeds.shape[1]
        if guidance_scale <= 1 or not cond.has_negative or same_length:
            return super().guided(x, t, cond, guidance_scale, model, detach_uncond=detach_uncond)
        if len(cond) != x.shape[0]:
            raise ValueError(f"`cond` has {len(cond)} rows for {x.shape[0]} latents")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        text = self.predict(x, t, cond, model)
        negative = Conditioning(cond.negative_prompt_embeds, prompt_embeds_mask=cond.negative_prompt_embeds_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_uncond):
            uncond = self.predict(x, t, negative, model)
        return self.combine(uncond, text, guidance_scale)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The pipeline's schedule: `sigmas = linspace(1, 1/N, N)` and `mu` from the scheduler config."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.pipe.scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=self.shift_mu(max_shift_default=1.15))

    # ----------------------------------------------------------------------------------------------------------
    # Pixels <-> latents

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Packed latents `[B, L, 4C]` -> pixels `[B, 3, H, W]` in [0, 1], as the pipeline's `output_type="pt"`."""
        if not isinstance(latents, Tensor) or latents.ndim != 3 or latents.shape[1] != self.image_seq_len():
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be packed tokens [B, {self.image_seq_len()}, 4C], got {shape}")
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)  # [B, C, 1, h, w]
        mean, std = self._latent_stats(z.device)
        image = vae.decode((z.float() * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    @torch.no_grad()
    def encode_images(
        self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Pixels `[B, 3, H, W]` in [0, 1] -> packed latents `[B, L, 4C]` (float32), the inverse of `decode`."""
        expected = (3, self.height, self.width)
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"`pixels` must be [B, {', '.join(map(str, expected))}] in [0, 1], got {shape}")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError("`pixels` must lie in [0, 1]")
        vae = self.pipe.vae
        frames = (pixels.to(self.device, vae.dtype) * 2 - 1).unsqueeze(2)  # one frame: [B, 3, 1, H, W]
        posterior = vae.encode(frames).latent_dist
        z = (posterior.sample(generator=generator) if self.vae_sample_posterior else posterior.mean).float()
        mean, std = self._latent_stats(z.device)
        z = ((z - mean) / std)[:, :, 0]
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    def _latent_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel `latents_mean`, `latents_std`, float32 `[1, z_dim, 1, 1, 1]`."""
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, dtype=torch.float32, device=device).view(shape)
        return mean, torch.tensor(config.latents_std, dtype=torch.float32, device=device).view(shape)


def _trim(embeds: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Drop the trailing columns no row uses; no mask when every kept token is real (as `encode_prompt`)."""
    if mask is None:
        return embeds, None
    used = mask.bool().any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else embeds.shape[1]
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, None if bool(mask.all()) else mask
