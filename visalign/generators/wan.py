"""Wan2.1 / Wan2.2 text-to-video (`WanPipeline`): a flow-matching video transformer over a causal 3D VAE.

What the family says (diffusers 0.42 `pipelines/wan/pipeline_wan.py`):
- Prompts: the pipeline's `encode_prompt` (UMT5, padded to `max_sequence_length`, positions past each prompt zeroed);
  the negative prompt (default `""`) is encoded when `guidance_scale > 1`. Standard CFG
  `uncond + w (text - uncond)` with no rescaling.
- Latents `[B, C, (F - 1) // 4 + 1, H / 8, W / 8]` (Wan2.1's VAE factors; the pipeline's `vae_scale_factor_temporal`
  and `_spatial` in general), float32, unpacked (the transformer patchifies `(1, 2, 2)` itself); `num_frames` must
  satisfy `(F - 1) % 4 == 0` (the VAE keeps the first frame and compresses the rest 4x in time).
- The transformer takes the scheduler timestep `t` itself (0-1000), one per sample; Wan2.2 TI2V
  (`expand_timesteps=True`) takes it once per latent token, which for text-to-video is `t` everywhere.
- Decode: `z * std + mean` with `latents_mean` / `latents_std` from `vae.config` (the pipeline writes it as
  `z / (1 / std) + mean`; so do we, for bit parity), `vae.decode`, `video_processor.postprocess_video` -> videos
  `[B, F, 3, H, W]` in [0, 1]. `encode_images` is the inverse: `(posterior mean - mean) / std` of videos in [0, 1].

The schedule. Our policy step is `visalign.sampling.sde_step` on a flow-matching sigma grid. Released Wan-Diffusers
checkpoints ship `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s)`,
a multistep solver; diffusers' tests use `FlowMatchEulerDiscreteScheduler`. With a FlowMatchEuler scheduler we set
it exactly as the pipeline does (`set_timesteps(N)`), so noise level 0 reproduces `pipe(...)`. With a flow UniPC
scheduler we step a `FlowMatchEulerDiscreteScheduler(shift=flow_shift)` over UniPC's own sigma grid
(`shift(linspace(1, 1/1000, N + 1)[:-1])`, then 0): the sigmas on which Flow-GRPO's Wan script runs its SDE (its
`wan_pipeline_with_logprob.sde_step_with_logprob` reads `pipeline.scheduler.sigmas` of the loaded UniPC scheduler
and takes Euler-Maruyama steps on them). Deviations, stated: (1) our first sigma is exactly 1 where UniPC stores
`1 - 1e-6` (a guard for its own log), and timesteps are `sigma * 1000` floats where UniPC truncates them to
integers (999, not 1000); (2) at noise level 0 this is the Euler ODE on UniPC's grid, not UniPC's predictor-corrector,
so it matches the UniPC pipeline's output only as two solvers of one ODE do; (3) Flow-GRPO's Wan SDE uses its own
diffusion `g(sigma) = sigmas[1] * sigma` without a noise level, where we offer the kinds of `sde_step` (Flow-GRPO's
image SDE `noise_level * sqrt(sigma / (1 - sigma))` by default). Training sigmas (`sample_timesteps`) are shifted
by the same `flow_shift`.

Not supported: Wan2.2's two-expert checkpoints (`transformer_2` with `boundary_ratio`): a ValueError says so.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor, nn

from visalign.generators.base import GeneratorAdapter
from visalign.generators.objective import logit_normal_sigmas
from visalign.generators.rollout import Conditioning, Schedule
from visalign.types import check_pixels

# `WanPipeline.__call__` defaults (Wan2.1 480p): height, width, num_frames.
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_NUM_FRAMES = 480, 832, 81


class WanAdapter(GeneratorAdapter):
    family = "wan"
    pipeline_class = "WanPipeline"
    video = True
    default_max_sequence_length = 512

    def __init__(
        self,
        pipe,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        **options,
    ):
        super().__init__(
            pipe, height=height or DEFAULT_HEIGHT, width=width or DEFAULT_WIDTH, num_frames=num_frames, **options
        )
        if pipe.transformer_2 is not None:
            raise ValueError(
                "two-expert Wan2.2 checkpoints (`transformer_2`, boundary_ratio "
                f"{pipe.config.get('boundary_ratio')}) are not supported; use Wan2.1 or Wan2.2 TI2V-5B"
            )
        self.num_frames = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        temporal = pipe.vae_scale_factor_temporal
        if not isinstance(self.num_frames, int) or self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise ValueError(
                f"`num_frames` must be a positive int with (num_frames - 1) divisible by {temporal} "
                f"(e.g. 33 or 81), got {self.num_frames!r}"
            )
        self.flow_scheduler = self._flow_scheduler(pipe.scheduler)

    @staticmethod
    def _flow_scheduler(scheduler) -> FlowMatchEulerDiscreteScheduler:
        """The scheduler whose sigmas we step on: the pipeline's FlowMatchEuler one, or one with UniPC's flow shift."""
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return scheduler
        config = scheduler.config
        if isinstance(scheduler, UniPCMultistepScheduler) and config.get("use_flow_sigmas", False):
            if config.get("use_dynamic_shifting", False):
                raise ValueError("a UniPCMultistepScheduler with use_dynamic_shifting is not a Wan schedule")
            return FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift
            )
        raise ValueError(
            "Wan needs a flow-matching scheduler: FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler with "
            f"use_flow_sigmas=True (the released checkpoints'); got {type(scheduler).__name__}"
        )

    # ----------------------------------------------------------------------------------------------------------
    # What the family says about itself

    def native_size(self) -> int:
        """Unused: Wan's default size is not square (480x832, set in `__init__`)."""
        return DEFAULT_HEIGHT

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.model.config.patch_size[1]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        """Encode `prompts` (and the negative prompt when `guidance_scale > 1`) once, without gradient."""
        cfg = guidance_scale > 1
        embeds, negative = self.pipe.encode_prompt(
            prompt=list(prompts),
            negative_prompt=[self.negative_prompt] * len(prompts) if cfg else None,
            do_classifier_free_guidance=cfg,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        dtype = self.model.dtype
        return Conditioning(embeds.to(dtype), negative_prompt_embeds=negative.to(dtype) if cfg else None)

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        """Gaussian latents `[B, C, (F - 1) // 4 + 1, H / 8, W / 8]`, float32, one per generator."""
        channels = self.model.config.in_channels
        return self.pipe.prepare_latents(
            len(generator),
            channels,
            self.height,
            self.width,
            self.num_frames,
            torch.float32,
            self.device,
            generator,
        )

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        """The transformer's velocity at scheduler timesteps `t` `[B]` (passed as is, 0-1000)."""
        model = self.model if model is None else model
        x = x.to(cond.prompt_embeds.dtype)
        if self.pipe.config.expand_timesteps:  # Wan2.2 TI2V: one timestep per latent token
            _, p_h, p_w = self.model.config.patch_size
            tokens = x.shape[2] * (x.shape[3] // p_h) * (x.shape[4] // p_w)
            t = t.reshape(-1, 1).expand(x.shape[0], tokens)
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]

    def schedule(self, num_inference_steps: int, offset: int = 0) -> Schedule:
        """`timesteps [T]` and `sigmas [T + 1]` (ending in 0) of the flow grid described in the module docstring."""
        if offset:
            raise ValueError("`offset` shifts DDIM schedules only; flow schedules are set by the pipeline")
        scheduler = self.flow_scheduler
        if scheduler is self.pipe.scheduler:  # what `WanPipeline.__call__` does
            scheduler.set_timesteps(num_inference_steps, device=self.device)
        else:  # UniPC's flow sigmas before its shift; the FlowMatchEuler scheduler applies `flow_shift`
            n_train = scheduler.config.num_train_timesteps
            sigmas = np.linspace(1.0, 1 / n_train, num_inference_steps + 1)[:-1]
            scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        return Schedule(scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone())

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Logit-normal training sigmas shifted by the flow scheduler's shift (UniPC's `flow_shift`)."""
        shift = float(self.flow_scheduler.config.shift)
        sigmas = logit_normal_sigmas(n, mean=self.logit_mean, std=self.logit_std, shift=shift, generator=generator)
        return sigmas.to(self.device)

    # ----------------------------------------------------------------------------------------------------------
    # Pixels <-> latents

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`(mean, std)` of the VAE's latents, `[1, z_dim, 1, 1, 1]`."""
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(device, dtype)
        std = torch.tensor(config.latents_std).view(shape).to(device, dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents `[B, C, F', h, w]` -> videos `[B, F, 3, H, W]` in [0, 1], as the pipeline's `output_type="pt"`."""
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype)
        mean, std = self._latent_stats(latents.device, latents.dtype)
        video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # z * std + mean, as the pipeline
        return self.pipe.video_processor.postprocess_video(video, output_type="pt").float()

    @torch.no_grad()
    def encode_images(
        self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Videos `[B, F, 3, H, W]` in [0, 1] -> normalized latents `[B, C, (F - 1) // 4 + 1, H / 8, W / 8]`, float32:
        the posterior mean (a posterior sample when `vae_sample_posterior`), then `(z - mean) / std`."""
        check_pixels(pixels, "pixels", video=True)
        frames = pixels.shape[1]
        if (frames - 1) % self.pipe.vae_scale_factor_temporal:
            raise ValueError(
                f"`pixels` has {frames} frames; Wan's VAE needs (frames - 1) divisible by "
                f"{self.pipe.vae_scale_factor_temporal}"
            )
        vae = self.pipe.vae
        video = pixels.to(self.device, vae.dtype).permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
        posterior = vae.encode(video).latent_dist
        z = (posterior.sample(generator=generator) if self.vae_sample_posterior else posterior.mean).float()
        mean, std = self._latent_stats(z.device, z.dtype)
        return (z - mean) / std
