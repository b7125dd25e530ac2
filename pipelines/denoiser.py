"""The denoising objective and the epsilon sampler that Diffusion-DPO, Diffusion-DRO and PRDP share.

`Denoiser` gives SD/SD1.5 (`StableDiffusionPipeline`), SDXL (`StableDiffusionXLPipeline`) and SD3
(`StableDiffusion3Pipeline`) one interface: encode prompts once, encode images to latents, noise them, call the
denoiser without guidance, and sample DDIM trajectories (epsilon and v models) with their per-step log-probs and
guided predictions. Flow models are sampled by `visalign.sampler.FlowSampler`, whose encoder and velocity this reuses.
The generator settings and the trainer base those methods share are in `denoiser_trainer.py`.

The math, as pure functions (float32 inside, float64 when an input is):
- `forward_noise`: DDPM's `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` (Ho et al. 2020, Eq. 4;
  `DDPMScheduler.add_noise`) for epsilon and v models; rectified flow's `x_sigma = (1 - sigma) x0 + sigma eps`
  (Esser et al. 2024, arXiv 2403.03206, Eq. 2 with `a = 1 - t`, `b = t`) for flow models.
- `prediction_target`: `eps`; v-prediction's `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0` (Salimans & Ho 2022,
  arXiv 2202.00512, Sec. 4; `DDPMScheduler.get_velocity`); the flow velocity `eps - x0`.
- `per_sample_mse`: `||prediction - target||^2` averaged over every non-batch element (`[B]`), the error all three
  methods compare between the trained and the reference model.
- `logit_normal_sigmas`: SD3's `logit-normal(m, s)` training density (Esser et al. 2024, Sec. 3.1, Eq. 19), then the
  scheduler's static shift `shift sigma / (1 + (shift - 1) sigma)` (SD3's Eq. 23 resolution shift).

Deliberate deviation: flow timesteps are continuous (`sigma * num_train_timesteps`), where diffusers' SD3 scripts
and Flow-GRPO's DPO snap the logit-normal draw onto the scheduler's 1,000-step grid first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import Tensor, nn

from visalign.sampler import Conditioning, FlowSampler
from visalign.sampling import StepOutput, ddim_step

logger = logging.getLogger(__name__)

TARGETS = ("epsilon", "v_prediction", "flow")
FAMILIES = {StableDiffusionPipeline: "sd", StableDiffusionXLPipeline: "sdxl", StableDiffusion3Pipeline: "sd3"}


def forward_noise(
    x0: Tensor, noise: Tensor, t: Tensor, *, target: str, alphas_cumprod: Tensor | None = None
) -> Tensor:
    """The noised latent `x_t` for `target` ("epsilon", "v_prediction" or "flow").

    Args:
        x0 (`Tensor` `[B, ...]`): clean latents.
        noise (`Tensor` `[B, ...]`): standard Gaussian noise.
        t (`Tensor` `[B]`): integer training timesteps (epsilon, v) or sigmas in [0, 1] (flow).
        alphas_cumprod (`Tensor` `[num_train_timesteps]`): the DDPM schedule; epsilon and v only.

    Returns:
        `Tensor` like `x0`, float32 (float64 when an input is).
    """
    x0, noise, a, b = _coefficients(x0, noise, t, target, alphas_cumprod)
    return a * x0 + b * noise


def prediction_target(
    x0: Tensor, noise: Tensor, t: Tensor, *, target: str, alphas_cumprod: Tensor | None = None
) -> Tensor:
    """What the denoiser regresses at `x_t = forward_noise(x0, noise, t)`: `eps`, `v` or `eps - x0` (see module)."""
    x0, noise, a, b = _coefficients(x0, noise, t, target, alphas_cumprod)
    if target == "epsilon":
        return noise
    if target == "v_prediction":
        return a * noise - b * x0
    return noise - x0


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """`mean((prediction - target)^2)` over every non-batch element: `[B]`, float32 (float64 when an input is)."""
    if not isinstance(prediction, Tensor) or prediction.ndim < 2 or prediction.shape[0] == 0:
        raise ValueError("`prediction` must be a tensor [B, ...] with a non-batch dim")
    if not isinstance(target, Tensor) or target.shape != prediction.shape:
        raise ValueError(f"`target` must have the shape of `prediction` {tuple(prediction.shape)}")
    dtype = _dtype(prediction, target)
    return ((prediction.to(dtype) - target.to(dtype)) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def logit_normal_sigmas(
    n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """`n` flow-matching training sigmas: `sigmoid(N(mean, std^2))`, then `shift s / (1 + (shift - 1) s)`.

    `mean=0, std=1` is SD3's `lognorm(0.00, 1.00)` default (and Flow-GRPO's DPO); `shift` is the scheduler's
    (`FlowMatchEulerDiscreteScheduler.config.shift`: 3.0 for SD3.5, 1.0 for the shapes world). Returns `[n]` float32.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}")
    if not std > 0 or not shift > 0:
        raise ValueError(f"`std` and `shift` must be > 0, got std={std}, shift={shift}")
    sigma = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class TextConditioning:
    """Encoded prompts, one row per sample. `pooled` is SDXL's and SD3's; the negatives exist when encoded for CFG.

    Args:
        embeds (`Tensor` `[B, L, D]`), pooled (`Tensor` `[B, P]`, *optional*): the prompts' encodings.
        negative_embeds, negative_pooled (`Tensor`, *optional*): the empty prompt's, for classifier-free guidance.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    negative_embeds: Tensor | None = None
    negative_pooled: Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, rows: Tensor) -> TextConditioning:
        """The rows `rows` (an index tensor), in that order."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TextConditioning(
            pick(self.embeds), pick(self.pooled), pick(self.negative_embeds), pick(self.negative_pooled)
        )

    def repeat(self, times: int) -> TextConditioning:
        """The batch stacked `times` times (`[w; l]` pairs share their prompt)."""
        return TextConditioning.cat([self] * times)

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        """Concatenate batches along the rows."""

        def cat(ts: list[Tensor | None]) -> Tensor | None:
            return None if ts[0] is None else torch.cat(ts)

        return TextConditioning(
            *(cat([getattr(p, k) for p in parts]) for k in ("embeds", "pooled", "negative_embeds", "negative_pooled"))
        )


@dataclass
class EpsilonRollout:
    """DDIM trajectories of an epsilon or v model: what DRO's replay buffer and PRDP's update read.

    Step `i` maps `latents[:, i]` (at `timesteps[i]`) to `latents[:, i + 1]` (at `prev_timesteps[i]`; negative = the
    final alpha).

    Args:
        prompts (`list[str]` of N): each sample's prompt.
        latents (`Tensor` `[N, T + 1, C, h, w]`): `x_t` before every step and the final latent.
        log_probs (`Tensor` `[N, T]`): each transition's log-density at sampling time (element mean, DDPO's).
        predictions (`Tensor` `[N, T, C, h, w]`): the guided model output at each step (epsilon or v).
        stds (`Tensor` `[T]`): each step's transition std; 0 where the step is deterministic (untrainable).
        timesteps (`Tensor` `[T]`), prev_timesteps (`Tensor` `[T]`): the integer schedule.
        eta (`float`), guidance_scale (`float`): the sampler's.
        conditioning (`TextConditioning` of N rows): with negatives when `guidance_scale > 1`.
        images (`Tensor` `[N, 3, H, W]`, in [0, 1]): the decoded final latents.
    """

    prompts: list[str]
    latents: Tensor
    log_probs: Tensor
    predictions: Tensor
    stds: Tensor
    timesteps: Tensor
    prev_timesteps: Tensor
    eta: float
    guidance_scale: float
    conditioning: TextConditioning
    images: Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def cat(parts: list[EpsilonRollout]) -> EpsilonRollout:
        """Concatenate rollouts of the same schedule and sampler along the samples."""
        first = parts[0]
        for p in parts[1:]:
            if (p.eta, p.guidance_scale) != (first.eta, first.guidance_scale) or not torch.equal(
                p.timesteps, first.timesteps
            ):
                raise ValueError("rollouts to concatenate must share the schedule, eta and guidance")
        return replace(
            first,
            prompts=[prompt for p in parts for prompt in p.prompts],
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            predictions=torch.cat([p.predictions for p in parts]),
            conditioning=TextConditioning.cat([p.conditioning for p in parts]),
            images=torch.cat([p.images for p in parts]),
        )

    def select(self, rows: Tensor) -> EpsilonRollout:
        """The samples `rows` (an index tensor), in that order."""
        return replace(
            self,
            prompts=[self.prompts[i] for i in rows.tolist()],
            latents=self.latents[rows],
            log_probs=self.log_probs[rows],
            predictions=self.predictions[rows],
            conditioning=self.conditioning.select(rows),
            images=self.images[rows],
        )


class Denoiser:
    """One view of an SD, SDXL or SD3 pipeline for training from images and for epsilon rollouts.

    Args:
        pipe: a `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `StableDiffusion3Pipeline`.
        height, width (`int`, *optional*): image size (default: the denoiser's native sample size).
        max_sequence_length (`int`): SD3's T5 tokens (the shapes world's SD3 model needs 16).
        logit_mean, logit_std (`float`): the flow timestep density (`logit_normal_sigmas`).
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        vae_sample_posterior: bool = False,
    ):
        family = FAMILIES.get(type(pipe))
        if family is None:
            names = ", ".join(c.__name__ for c in FAMILIES)
            raise ValueError(f"`pipe` must be one of {names}, got {type(pipe).__name__}")
        self.pipe, self.family = pipe, family
        self.model: nn.Module = pipe.transformer if family == "sd3" else pipe.unet
        native = self.model.config.sample_size * pipe.vae_scale_factor
        self.height, self.width = height or native, width or native
        self.max_sequence_length = max_sequence_length
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.vae_sample_posterior = vae_sample_posterior
        if family == "sd3":
            self.target = "flow"
            self.flow = FlowSampler(
                pipe, height=self.height, width=self.width, max_sequence_length=max_sequence_length
            )
        else:
            self.target = pipe.scheduler.config.get("prediction_type", "epsilon")
            if self.target not in ("epsilon", "v_prediction"):
                raise ValueError(f"the scheduler's prediction_type must be epsilon or v_prediction, got {self.target}")
            self.ddim = DDIMScheduler.from_config(pipe.scheduler.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device  # diffusers' `device` walks every module: slow per call

    @property
    def alphas_cumprod(self) -> Tensor | None:
        return None if self.target == "flow" else self.ddim.alphas_cumprod.to(self.device)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    # ----------------------------------------------------------------------------------------------------------
    # Conditioning and latents

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, guidance_scale: float = 1.0) -> TextConditioning:
        """Encode `prompts` once (and the empty negative prompt when `guidance_scale > 1`), without gradient."""
        cfg = guidance_scale > 1
        if self.family == "sd":
            embeds, negative = self.pipe.encode_prompt(prompts, self.device, 1, cfg, negative_prompt=None)
            return TextConditioning(embeds, None, negative if cfg else None)
        if self.family == "sdxl":
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg
            )
            return TextConditioning(embeds, pooled, negative if cfg else None, negative_pooled if cfg else None)
        c = self.flow.encode(prompts, guidance_scale)
        return TextConditioning(
            c.prompt_embeds, c.pooled_prompt_embeds, c.negative_prompt_embeds, c.negative_pooled_prompt_embeds
        )

    @torch.no_grad()
    def encode_images(
        self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        """Pixels `[B, 3, H, W]` in [0, 1] -> latents, shifted and scaled as in training: the VAE posterior's mean,
        or a sample of it (`generator`, possibly a list of B, one per image) when `vae_sample_posterior`.

        The mean is the default: a sample (diffusers' training scripts) is close to it for a narrow posterior, but a
        VAE with a wide one, like the shapes world's (mean std 0.73 against mean |latent| 0.36; its generators were
        trained on means), would train on noise: the world UNet's epsilon MSE is 0.023 on means, 0.90 on samples.
        """
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype) * 2 - 1).latent_dist
        latents = (posterior.sample(generator=generator) if self.vae_sample_posterior else posterior.mean).float()
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels `[B, 3, H, W]` in [0, 1], as the pipeline's `output_type="pt"`."""
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor") or 0.0
        image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    # ----------------------------------------------------------------------------------------------------------
    # The training objective

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps: uniform integers in [0, num_train_timesteps) (epsilon, v; Diffusion-DPO's) or
        logit-normal sigmas with the scheduler's shift (flow)."""
        if self.target == "flow":
            shift = float(self.pipe.scheduler.config.get("shift", 1.0))
            sigmas = logit_normal_sigmas(n, mean=self.logit_mean, std=self.logit_std, shift=shift, generator=generator)
            return sigmas.to(self.device)
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """`(x_t, target)` for clean latents `x0`, noise and training timesteps `t`."""
        kw = dict(target=self.target, alphas_cumprod=self.alphas_cumprod)
        return forward_noise(x0, noise, t, **kw), prediction_target(x0, noise, t, **kw)

    def predict(self, x_t: Tensor, t: Tensor, cond: TextConditioning, model: nn.Module | None = None) -> Tensor:
        """The denoiser's raw (unguided) output at `x_t` and per-sample timesteps `t` (`[B]`, see `sample_timesteps`).

        `model` defaults to the pipeline's; pass the training wrapper (DDP) to get synchronized gradients.
        """
        model = self.model if model is None else model
        if len(cond) != x_t.shape[0] or t.shape != (x_t.shape[0],):
            raise ValueError(f"`cond` and `t` must have one row per latent ({x_t.shape[0]})")
        x = x_t.to(cond.embeds.dtype)
        if self.family == "sd":
            return model(x, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]
        if self.family == "sdxl":
            added = {"text_embeds": cond.pooled, "time_ids": self._time_ids(x.shape[0], x.dtype)}
            return model(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]
        return self.flow.velocity(x, t * self.num_train_timesteps, Conditioning(cond.embeds, cond.pooled), 1.0, model)

    def errors(
        self, x0: Tensor, noise: Tensor, t: Tensor, cond: TextConditioning, model: nn.Module | None = None
    ) -> Tensor:
        """Per-sample denoising errors `per_sample_mse(model(x_t), target)`, `[B]` float32."""
        x_t, target = self.noise(x0, noise, t)
        return per_sample_mse(self.predict(x_t, t, cond, model).float(), target.float())

    # ----------------------------------------------------------------------------------------------------------
    # Epsilon rollouts (DDIM with log-probs)

    def schedule(self, num_inference_steps: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """`(timesteps [T], prev_timesteps [T])` of the DDIM scheduler, each shifted by `offset` (the last `prev`
        is -1: the final alpha). DRO perturbs `offset` in `[0, max_offset(T))` so training sees every timestep."""
        self._require_epsilon("schedule")
        self.ddim.set_timesteps(num_inference_steps)
        timesteps = self.ddim.timesteps.long()
        if not 0 <= offset < self.max_offset(num_inference_steps):
            raise ValueError(f"`offset` must be in [0, {self.max_offset(num_inference_steps)}), got {offset}")
        prev = torch.cat([timesteps[1:], timesteps.new_full((1,), -1 - offset)])
        return timesteps + offset, prev + offset

    def max_offset(self, num_inference_steps: int) -> int:
        """The timestep shifts `schedule` accepts: `[0, min(step ratio, num_train - first timestep))`."""
        self.ddim.set_timesteps(num_inference_steps)
        ratio = self.num_train_timesteps // num_inference_steps
        return max(1, min(ratio, self.num_train_timesteps - int(self.ddim.timesteps[0])))

    def guided_prediction(
        self, x_t: Tensor, t: int | Tensor, cond: TextConditioning, guidance_scale: float, model: nn.Module | None
    ) -> Tensor:
        """`pred_uncond + w (pred_text - pred_uncond)` in one doubled batch (the plain prediction when `w <= 1`)."""
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device).expand(n)
        if guidance_scale <= 1:
            return self.predict(x_t, t, cond, model)
        if cond.negative_embeds is None:
            raise ValueError("`guidance_scale` > 1 needs negative embeddings: encode with the same guidance_scale")
        both = TextConditioning(
            torch.cat([cond.negative_embeds, cond.embeds]),
            None if cond.pooled is None else torch.cat([cond.negative_pooled, cond.pooled]),
        )
        uncond, text = self.predict(torch.cat([x_t, x_t]), t.repeat(2), both, model).chunk(2)
        return uncond + guidance_scale * (text - uncond)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        eta: float,
        generator: list[torch.Generator],
        offset: int = 0,
        model: nn.Module | None = None,
    ) -> EpsilonRollout:
        """DDIM trajectories (`visalign.sampling.ddim_step`; `eta=1` is DDPO's and PRDP's DDPM-like sampler).

        `generator` holds one CPU generator per prompt: it draws that sample's initial noise, then its step noise.
        """
        self._require_epsilon("sample")
        n = len(prompts)
        if not isinstance(generator, list) or len(generator) != n:
            raise ValueError(f"`generator` must be a list of {n} torch.Generator (one per prompt)")
        cond = self.encode_prompts(prompts, guidance_scale=guidance_scale)
        timesteps, prev = self.schedule(num_inference_steps, offset)
        shape = (
            self.model.config.in_channels,
            self.height // self.pipe.vae_scale_factor,
            self.width // self.pipe.vae_scale_factor,
        )
        x = torch.stack([torch.randn(shape, generator=g) for g in generator]).to(self.device)
        latents, log_probs, predictions, stds = [x], [], [], []
        for i in range(len(timesteps)):
            pred = self.guided_prediction(x, timesteps[i], cond, guidance_scale, model)
            out = self._step(pred, x, int(timesteps[i]), int(prev[i]), eta, generator=generator)
            x = out.prev_sample
            latents.append(x)
            log_probs.append(out.log_prob)
            predictions.append(pred.float())
            stds.append(out.std.float())
        return EpsilonRollout(
            prompts=list(prompts),
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            predictions=torch.stack(predictions, dim=1),
            stds=torch.stack(stds),
            timesteps=timesteps,
            prev_timesteps=prev,
            eta=float(eta),
            guidance_scale=float(guidance_scale),
            conditioning=cond,
            images=self.decode(x),
        )

    def log_prob(self, rollout: EpsilonRollout, rows: Tensor, step: int, model: nn.Module | None = None) -> StepOutput:
        """The current model's DDIM policy at `step` for samples `rows`, scoring their stored transitions (with
        gradient through `model`). Returns `ddim_step`'s `StepOutput`."""
        if not 0 <= step < rollout.num_steps:
            raise ValueError(f"`step` must be in [0, {rollout.num_steps - 1}], got {step}")
        x = rollout.latents[rows, step]
        pred = self.guided_prediction(
            x, rollout.timesteps[step], rollout.conditioning.select(rows), rollout.guidance_scale, model
        )
        t, prev = int(rollout.timesteps[step]), int(rollout.prev_timesteps[step])
        return self._step(pred, x, t, prev, rollout.eta, prev_sample=rollout.latents[rows, step + 1])

    # ----------------------------------------------------------------------------------------------------------

    def _step(self, pred: Tensor, x: Tensor, t: int, prev: int, eta: float, **kw) -> StepOutput:
        final = 1.0 if self.ddim.config.set_alpha_to_one else None
        return ddim_step(
            pred,
            x,
            t,
            prev,
            self.ddim.alphas_cumprod,
            eta,
            prediction_type=self.target,
            final_alpha_cumprod=final,
            **kw,
        )

    def _time_ids(self, n: int, dtype: torch.dtype) -> Tensor:
        """SDXL's micro-conditioning: original size, crop top-left (0, 0), target size (Diffusion-DPO's choice)."""
        ids = torch.tensor([self.height, self.width, 0, 0, self.height, self.width], dtype=dtype, device=self.device)
        return ids.expand(n, 6)

    def _require_epsilon(self, what: str) -> None:
        if self.target == "flow":
            raise ValueError(
                f"`{what}` is the epsilon/v sampler; flow pipelines sample with visalign.sampler.FlowSampler"
            )


# ---------------------------------------------------------------------------------------------------------------


def _coefficients(
    x0: Tensor, noise: Tensor, t: Tensor, target: str, alphas_cumprod: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(x0, noise, a, b)` in the compute dtype with `x_t = a x0 + b noise`, `a` and `b` shaped `[B, 1, ...]`."""
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}")
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError("`x0` must be a float tensor [B, ...] with a non-batch dim")
    if not isinstance(noise, Tensor) or noise.shape != x0.shape:
        raise ValueError(f"`noise` must have the shape of `x0` {tuple(x0.shape)}")
    if not isinstance(t, Tensor) or t.shape != (x0.shape[0],):
        raise ValueError(f"`t` must be a tensor of shape [{x0.shape[0]}] (one timestep per sample)")
    dtype = _dtype(x0, noise, *([alphas_cumprod] if alphas_cumprod is not None else []))
    view = (-1,) + (1,) * (x0.ndim - 1)
    if target == "flow":
        if not t.is_floating_point() or (t < 0).any() or (t > 1).any():
            raise ValueError("`t` must hold flow sigmas in [0, 1] for target='flow'")
        sigma = t.to(dtype).view(view)
        return x0.to(dtype), noise.to(dtype), 1 - sigma, sigma
    if alphas_cumprod is None:
        raise ValueError(f"`alphas_cumprod` is required for target={target!r}")
    if t.is_floating_point() or (t < 0).any() or (t >= len(alphas_cumprod)).any():
        raise ValueError(f"`t` must hold integer timesteps in [0, {len(alphas_cumprod) - 1}] for target={target!r}")
    abar = alphas_cumprod.to(device=x0.device, dtype=dtype)[t.to(x0.device)].view(view)
    return x0.to(dtype), noise.to(dtype), abar.sqrt(), (1 - abar).sqrt()


def _dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
