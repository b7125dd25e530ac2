"""`GeneratorAdapter`: one diffusers family behind one interface, and the one sampler every method uses.

A family (one file in this package, one line in its registry) says how to encode prompts, draw initial latents,
call its denoiser, schedule the steps and move between pixels and latents. Everything else is written once here:

- `sample(...)`: denoise with classifier-free guidance in the graph, recording a `Rollout`. Flow families step with
  `visalign.sampling.sde_step` (Flow-GRPO's SDE, CPS, DanceGRPO's, or the ODE at noise level 0; `noise_steps` limits
  the noise to a window as Flow-GRPO-Fast and MixGRPO); epsilon/v families step with `ddim_step` (`kind="ddim"`,
  `noise_level` = eta; eta 1 is DDPO's and PRDP's sampler). At noise level 0 the sampler reproduces the
  pipeline's own `__call__` for the same initial noise.
- `branch(...)`: TempFlow-GRPO's trajectory branching (He et al. 2025, arXiv 2508.04324): each seed follows the ODE;
  at every branch step k, `num_branches` children leave it by one SDE step and finish by ODE, so a child's reward is
  credited to step k alone. Seeds and live children are denoised in one batch per step.
- `log_prob(rollout, rows, step)`: the log-density of the stored `x_{step+1}` given the stored `x_step` under the
  current model, with gradient; `detach_uncond=True` stops the gradient of the unconditional CFG branch as Flow-GRPO's
  update does (`noise_pred_uncond.detach()` in `scripts/train_sd3.py: compute_log_prob`).
- `errors(...)`: the denoising objective of Diffusion-DPO/DRO (`visalign.generators.objective`).

Groups share initial noise when the caller keys their generators by group (`seeded_generators`); SDE noise always
comes from each sample's own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from visalign.generators.objective import forward_noise, logit_normal_sigmas, per_sample_mse, prediction_target
from visalign.generators.rollout import Conditioning, Rollout, Schedule
from visalign.loading import generation_defaults
from visalign.sampling import FLOW_KINDS, StepOutput, sde_step


@dataclass
class _Cohort:
    """The children that left their seeds at branch step `k`: their latents, step means and predictions from k on."""

    k: int
    latents: list[Tensor]
    means: list[Tensor]
    predictions: list[Tensor]
    log_prob: Tensor
    std: Tensor


class GeneratorAdapter:
    """One diffusers pipeline family as a policy and a denoiser.

    Args:
        pipe: the family's diffusers pipeline (`pipeline_class`, or a subclass).
        height, width (`int`, *optional*): the image size in pixels (default: the denoiser's native size).
        num_frames (`int`, *optional*): video families' frame count.
        max_sequence_length (`int`, *optional*): text tokens (default: the model's recorded sampling default, e.g. the
            shapes-world flow model's 16 (`visalign.loading.generation_defaults`), else the family's).
        negative_prompt (`str`, *optional*): the negative prompt of classifier-free guidance (default: the
            family's `default_negative_prompt`, "" for all but Qwen-Image).
        logit_mean, logit_std (`float`): flow families' training timestep density (`logit_normal_sigmas`).
        vae_sample_posterior (`bool`): `encode_images` samples the VAE posterior instead of taking its mean.
    """

    family: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""
    video: ClassVar[bool] = False
    uses_negative: ClassVar[bool] = True  # False for guidance-distilled families (FLUX.1-dev)
    default_max_sequence_length: ClassVar[int] = 256
    default_negative_prompt: ClassVar[str] = ""
    # the denoiser computes outputs its prediction never uses (Qwen-Image's last block's text stream), so some LoRA
    # weights get no gradient: DDP must look for them (`Engine(find_unused_parameters=True)`)
    has_unused_outputs: ClassVar[bool] = False

    def __init__(
        self,
        pipe: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        max_sequence_length: int | None = None,
        negative_prompt: str | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        vae_sample_posterior: bool = False,
    ):
        if self.pipeline_class not in {c.__name__ for c in type(pipe).__mro__}:
            raise ValueError(f"{type(self).__name__} needs a {self.pipeline_class}, got {type(pipe).__name__}")
        self.pipe = pipe
        native = self.native_size()
        self.height, self.width = height or native, width or native
        multiple = self.size_multiple()
        if self.height <= 0 or self.width <= 0 or self.height % multiple or self.width % multiple:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {multiple} for {self.family}, "
                f"got {self.height}x{self.width}"
            )
        self.num_frames = num_frames
        recorded = generation_defaults(pipe).get("max_sequence_length")
        self.max_sequence_length = max_sequence_length or recorded or self.default_max_sequence_length
        self.negative_prompt = self.default_negative_prompt if negative_prompt is None else negative_prompt
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.vae_sample_posterior = vae_sample_posterior

    # ----------------------------------------------------------------------------------------------------------
    # What a family says about itself (overridden per family)

    @property
    def model(self) -> nn.Module:
        """The trainable denoiser."""
        return self.pipe.transformer

    @property
    def component(self) -> str:
        """The pipeline component that is `model` (`"transformer"`, `"unet"`): what the engine trains."""
        return next(name for name, module in self.pipe.components.items() if module is self.model)

    @property
    def target(self) -> str:
        """What the model predicts: "flow" (velocity), "epsilon" or "v_prediction"."""
        return "flow"

    @property
    def default_kind(self) -> str:
        return "sde" if self.target == "flow" else "ddim"

    def native_size(self) -> int:
        return self.model.config.sample_size * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor

    def image_seq_len(self) -> int:
        """Image tokens the transformer sees (for the resolution-dependent shift `mu`)."""
        patch = self.model.config.get("patch_size", 2) or 2
        scale = self.pipe.vae_scale_factor * patch
        return (self.height // scale) * (self.width // scale)

    def encode_prompts(self, prompts: list[str], guidance_scale: float = 1.0) -> Conditioning:
        raise NotImplementedError

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        raise NotImplementedError

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_images(
        self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------
    # Shared plumbing

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device  # diffusers' `device` walks every module: slow per call

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set the pipeline's scheduler as its `__call__` does (SD3's rule: `mu` only with dynamic shifting)."""
        scheduler, config = self.pipe.scheduler, self.pipe.scheduler.config
        options = {}
        if config.get("use_dynamic_shifting", False):
            options["mu"] = self.shift_mu(max_shift_default=1.16)
        scheduler.set_timesteps(num_inference_steps, device=self.device, **options)

    def shift_mu(self, max_shift_default: float = 1.15) -> float:
        """The resolution-dependent shift `mu` (`calculate_shift` with the scheduler config's constants)."""
        config = self.pipe.scheduler.config
        return calculate_shift(
            self.image_seq_len(),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift_default),
        )

    def schedule(self, num_inference_steps: int, offset: int = 0) -> Schedule:
        """The sampler's steps as the pipeline sets them (flow: `sigmas` ending in 0)."""
        if offset:
            raise ValueError("`offset` shifts DDIM schedules only; flow schedules are set by the pipeline")
        self.set_timesteps(num_inference_steps)
        return Schedule(self.pipe.scheduler.timesteps.clone(), sigmas=self.pipe.scheduler.sigmas.clone())

    def combine(self, uncond: Tensor, text: Tensor, guidance_scale: float) -> Tensor:
        """Classifier-free guidance `uncond + w (text - uncond)`."""
        return uncond + guidance_scale * (text - uncond)

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
        """The guided model output at `x` (`[B, ...]`) and timestep `t` (scalar or `[B]`): negatives and positives in
        one doubled batch, then `combine`; the plain prediction when `guidance_scale <= 1`. `detach_uncond=True`
        treats the unconditional prediction as a constant (same value; gradient `w * d text`)."""
        if len(cond) != x.shape[0]:
            raise ValueError(f"`cond` has {len(cond)} rows for {x.shape[0]} latents")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if guidance_scale <= 1 or not self.uses_negative:
            return self.predict(x, t, cond, model)
        uncond, text = self.predict(torch.cat([x, x]), t.repeat(2), cond.negatives_first(), model).chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        return self.combine(uncond, text, guidance_scale)

    def step(
        self,
        prediction: Tensor,
        x: Tensor,
        schedule: Schedule,
        index: int,
        *,
        noise_level: float,
        kind: str,
        generator: list[torch.Generator] | None = None,
        prev_sample: Tensor | None = None,
    ) -> StepOutput:
        """One policy step of this family (flow: `sde_step`; epsilon/v families override with DDIM)."""
        if kind not in FLOW_KINDS:
            raise ValueError(f"`kind` must be one of {FLOW_KINDS} for the flow family {self.family}, got {kind!r}")
        return sde_step(
            prediction, x, schedule.sigmas, index, noise_level, kind=kind, generator=generator, prev_sample=prev_sample
        )

    # ----------------------------------------------------------------------------------------------------------
    # The sampler

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        conditioning: Conditioning,
        latents: Tensor,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        noise_level: float = 0.0,
        noise_steps: Sequence[int] | None = None,
        kind: str | None = None,
        generator: list[torch.Generator] | None = None,
        group_ids: Tensor | None = None,
        model: nn.Module | None = None,
        offset: int = 0,
    ) -> Rollout:
        """Denoise `latents` (`initial_latents`), noisy on `noise_steps` (all when None), deterministic elsewhere.

        Args:
            prompts (`list[str]` of N), conditioning (`Conditioning` of N rows): what to draw.
            num_inference_steps (`int`), guidance_scale (`float`): as in the pipeline's `__call__`.
            noise_level (`float`), kind (`str`, default the family's): the step; noise level 0 is the ODE/DDIM.
            generator (`list[torch.Generator]` of N, *optional*): per-sample step noise.
            group_ids (`Tensor` `[N]`, *optional*): recorded in the rollout (default: every sample its own group).
            model (*optional*): the denoiser to call (the training wrapper); offset (`int`): DDIM timestep shift.
        """
        kind = kind or self.default_kind
        n = latents.shape[0]
        self._check_batch(prompts, conditioning, n, generator, group_ids)
        schedule = self.schedule(num_inference_steps, offset)
        steps = range(len(schedule.timesteps))
        noisy = set(steps) if noise_steps is None else {int(s) for s in noise_steps}
        if not noisy <= set(steps):
            raise ValueError(f"`noise_steps` must lie in [0, {len(steps) - 1}], got {sorted(noisy)}")
        x = latents.float()
        latents_out, log_probs, means, predictions, stds = [x], [], [], [], []
        for i in steps:
            pred = self.guided(x, schedule.timesteps[i], conditioning, guidance_scale, model)
            level = noise_level if i in noisy else 0.0
            out = self.step(pred, x, schedule, i, noise_level=level, kind=kind, generator=generator)
            x = out.prev_sample
            latents_out.append(x)
            log_probs.append(out.log_prob)
            means.append(out.mean)
            predictions.append(pred.float())
            stds.append(out.std.float().expand(n))
        return Rollout(
            prompts=list(prompts),
            group_ids=torch.arange(n, device=x.device) if group_ids is None else group_ids.to(x.device),
            latents=torch.stack(latents_out, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            means=torch.stack(means, dim=1),
            predictions=torch.stack(predictions, dim=1),
            stds=torch.stack(stds, dim=1),
            timesteps=schedule.timesteps,
            sigmas=schedule.sigmas,
            prev_timesteps=schedule.prev_timesteps,
            noise_level=float(noise_level),
            kind=kind,
            guidance_scale=float(guidance_scale),
            conditioning=conditioning,
            images=self.decode(x),
        )

    @torch.no_grad()
    def branch(
        self,
        prompts: list[str],
        conditioning: Conditioning,
        latents: Tensor,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        noise_level: float,
        branch_steps: Sequence[int],
        num_branches: int,
        kind: str = "sde",
        generator: list[torch.Generator] | None = None,
        group_ids: Tensor | None = None,
        model: nn.Module | None = None,
    ) -> Rollout:
        """TempFlow-GRPO branching: ODE from each of the S seeds in `latents`; at each step k of `branch_steps`,
        `num_branches` children by one SDE step from the seed's ODE state, each finished by ODE.

        Returns a `Rollout` of `len(branch_steps) * S * num_branches` children, ordered by branch step, then seed,
        then branch. A child's only noisy transition is its branch step (its `stds` row is 0 elsewhere); its
        latents before k are its seed's. Child `(k, s, j)` has group id `group_ids[s] * T + k`, so a group is the
        children of one seed at one step (the paper's "seed group"). Seed s's branch noise is drawn from
        `generator[s]`, in order of k then j. Branch steps must leave at least one ODE step (k <= T - 2).
        """
        if self.target != "flow":
            raise ValueError(f"branching is a flow-model sampler; {self.family} predicts {self.target}")
        s = latents.shape[0]
        self._check_batch(prompts, conditioning, s, generator, group_ids)
        schedule = self.schedule(num_inference_steps)
        t_count = len(schedule.timesteps)
        ks = sorted({int(k) for k in branch_steps})
        if not ks or ks[0] < 0 or ks[-1] > t_count - 2:
            raise ValueError(f"`branch_steps` must be a non-empty subset of [0, {t_count - 2}], got {branch_steps}")
        if num_branches < 1:
            raise ValueError(f"`num_branches` must be >= 1, got {num_branches}")
        device = latents.device
        parents = torch.arange(s, device=device).repeat_interleave(num_branches)
        seed_rows = torch.arange(s, device=device)

        x = latents.float()
        seed_latents, seed_means, seed_preds = [x], [], []
        cohorts: list[_Cohort] = []
        for i in range(t_count):
            rows = torch.cat([seed_rows] + [parents] * len(cohorts))
            batch = torch.cat([x] + [c.latents[-1] for c in cohorts])
            v = self.guided(batch, schedule.timesteps[i], conditioning.select(rows), guidance_scale, model)
            ode = self.step(v, batch, schedule, i, noise_level=0.0, kind=kind)  # seeds and live children: ODE
            split = len(parents)
            for cohort, lat, mean, pred in zip(
                cohorts, ode.prev_sample[s:].split(split), ode.mean[s:].split(split), v[s:].float().split(split)
            ):
                cohort.latents.append(lat)
                cohort.means.append(mean)
                cohort.predictions.append(pred)
            if i in ks:  # new children: one SDE step from their seed's state, with the seed's prediction
                gens = None if generator is None else [generator[p] for p in parents.tolist()]
                v_seed = v[:s][parents]
                sde = self.step(v_seed, x[parents], schedule, i, noise_level=noise_level, kind=kind, generator=gens)
                cohorts.append(_Cohort(i, [sde.prev_sample], [sde.mean], [v_seed.float()], sde.log_prob, sde.std))
            seed_means.append(ode.mean[:s])
            seed_preds.append(v[:s].float())
            x = ode.prev_sample[:s]
            seed_latents.append(x)

        seed_latents_t = torch.stack(seed_latents, dim=1)
        seed_means_t, seed_preds_t = torch.stack(seed_means, dim=1), torch.stack(seed_preds, dim=1)
        n = len(parents)
        out: dict[str, list[Tensor]] = {
            k: [] for k in ("latents", "means", "predictions", "log_probs", "stds", "groups")
        }
        base_groups = torch.arange(s, device=device) if group_ids is None else group_ids.to(device)
        for c in cohorts:
            out["latents"].append(
                torch.cat([seed_latents_t[parents, : c.k + 1], torch.stack(c.latents, dim=1)], dim=1)
            )
            out["means"].append(torch.cat([seed_means_t[parents, : c.k], torch.stack(c.means, dim=1)], dim=1))
            out["predictions"].append(
                torch.cat([seed_preds_t[parents, : c.k], torch.stack(c.predictions, dim=1)], dim=1)
            )
            log_prob = torch.zeros(n, t_count, device=device)
            log_prob[:, c.k] = c.log_prob
            std = torch.zeros(n, t_count, device=device)
            std[:, c.k] = c.std
            out["log_probs"].append(log_prob)
            out["stds"].append(std)
            out["groups"].append(base_groups[parents] * t_count + c.k)
        latents_all = torch.cat(out["latents"])
        all_parents = parents.repeat(len(cohorts))
        return Rollout(
            prompts=[prompts[p] for p in all_parents.tolist()],
            group_ids=torch.cat(out["groups"]),
            latents=latents_all,
            log_probs=torch.cat(out["log_probs"]),
            means=torch.cat(out["means"]),
            predictions=torch.cat(out["predictions"]),
            stds=torch.cat(out["stds"]),
            timesteps=schedule.timesteps,
            sigmas=schedule.sigmas,
            prev_timesteps=schedule.prev_timesteps,
            noise_level=float(noise_level),
            kind=kind,
            guidance_scale=float(guidance_scale),
            conditioning=conditioning.select(all_parents),
            images=self.decode(latents_all[:, -1]),
        )

    def log_prob(
        self,
        rollout: Rollout,
        rows: Tensor,
        step: int,
        model: nn.Module | None = None,
        *,
        detach_uncond: bool = False,
    ) -> StepOutput:
        """The current model's policy at `step` for the samples `rows`, scoring their stored transitions.

        Differentiable in the model's parameters (with `detach_uncond=True`, through the conditional CFG branch
        only). Returns the step's `StepOutput`: `log_prob` `[b]`, `mean`, `std`, and `prev_sample` (the stored
        `x_{step+1}`). Every row must have been noisy at `step`.
        """
        if not 0 <= step < rollout.num_steps:
            raise ValueError(f"`step` must be in [0, {rollout.num_steps - 1}], got {step}")
        if not (rollout.stds[rows, step] > 0).all():
            raise ValueError(f"some rows were deterministic at step {step}: they have no log-prob to train")
        x = rollout.latents[rows, step]
        pred = self.guided(
            x,
            rollout.timesteps[step],
            rollout.conditioning.select(rows),
            rollout.guidance_scale,
            model,
            detach_uncond=detach_uncond,
        )
        return self.step(
            pred,
            x,
            rollout.schedule,
            step,
            noise_level=rollout.noise_level,
            kind=rollout.kind,
            prev_sample=rollout.latents[rows, step + 1],
        )

    # ----------------------------------------------------------------------------------------------------------
    # The denoising objective (Diffusion-DPO, Diffusion-DRO)

    @property
    def alphas_cumprod(self) -> Tensor | None:
        return None

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps: logit-normal sigmas with the scheduler's shift (flow), or uniform integers in
        `[0, num_train_timesteps)` (epsilon, v; Diffusion-DPO's)."""
        if self.target == "flow":
            shift = float(self.pipe.scheduler.config.get("shift", 1.0))
            sigmas = logit_normal_sigmas(n, mean=self.logit_mean, std=self.logit_std, shift=shift, generator=generator)
            return sigmas.to(self.device)
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    def noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """`(x_t, target)` for clean latents `x0`, noise and training timesteps `t` (`sample_timesteps`)."""
        kw = dict(target=self.target, alphas_cumprod=self.alphas_cumprod)
        return forward_noise(x0, noise, t, **kw), prediction_target(x0, noise, t, **kw)

    def training_prediction(
        self, x_t: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None
    ) -> Tensor:
        """The unguided model output at training timesteps `t` (flow sigmas are scaled to the scheduler's units)."""
        if len(cond) != x_t.shape[0] or t.shape != (x_t.shape[0],):
            raise ValueError(f"`cond` and `t` must have one row per latent ({x_t.shape[0]})")
        return self.predict(x_t, t * self.num_train_timesteps if self.target == "flow" else t, cond, model)

    def errors(
        self, x0: Tensor, noise: Tensor, t: Tensor, cond: Conditioning, model: nn.Module | None = None
    ) -> Tensor:
        """Per-sample denoising errors `per_sample_mse(model(x_t), target)`, `[B]` float32."""
        x_t, target = self.noise(x0, noise, t)
        return per_sample_mse(self.training_prediction(x_t, t, cond, model).float(), target.float())

    # ----------------------------------------------------------------------------------------------------------
    # VAE helpers for the AutoencoderKL families

    @torch.no_grad()
    def _vae_encode(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
        """Pixels `[B, 3, H, W]` in [0, 1] -> shifted, scaled latents: the posterior mean, or a sample of it when
        `vae_sample_posterior` (diffusers' training scripts; the shapes world's VAE has a wide posterior and its
        generators were trained on means, so the mean is the default)."""
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype) * 2 - 1).latent_dist
        latents = (posterior.sample(generator=generator) if self.vae_sample_posterior else posterior.mean).float()
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def _vae_decode(self, latents: Tensor) -> Tensor:
        """Shifted, scaled latents -> pixels `[B, 3, H, W]` in [0, 1], as the pipeline's `output_type="pt"`."""
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor") or 0.0
        image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    @staticmethod
    def _check_batch(
        prompts: list[str],
        conditioning: Conditioning,
        n: int,
        generator: list[torch.Generator] | None,
        group_ids: Tensor | None,
    ) -> None:
        if len(prompts) != n or len(conditioning) != n:
            raise ValueError(
                f"{n} latents need {n} prompts and conditioning rows, got {len(prompts)} and {len(conditioning)}"
            )
        if generator is not None and (not isinstance(generator, list) or len(generator) != n):
            raise ValueError(f"`generator` must be a list of {n} torch.Generator (one per sample)")
        if group_ids is not None and tuple(group_ids.shape) != (n,):
            raise ValueError(f"`group_ids` must have shape [{n}], got {tuple(group_ids.shape)}")
