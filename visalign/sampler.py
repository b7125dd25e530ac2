"""Sample diffusers flow pipelines as stochastic policies, and score stored transitions under the current model.

`FlowSampler` runs the components of a `StableDiffusion3Pipeline` or a `FluxPipeline` (never its `__call__`, never
a patched scheduler): the text encoders once per batch, then the denoising loop with `visalign.sampling.sde_step`,
recording every latent, the per-step log-probs, step means and transition stds in a `Rollout`. One mechanism covers
the online RL methods of Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) and its successors:

- `sample(..., noise_steps=None)`: SDE at every step (Flow-GRPO); `noise_steps` = a window of steps, ODE (noise
  level 0) outside it (Flow-GRPO-Fast, MixGRPO).
- `branch(...)`: TempFlow-GRPO's trajectory branching (He et al. 2025, arXiv 2508.04324): each seed follows the ODE;
  at every branch step k, `num_branches` children leave it by one SDE step and finish by ODE, so a child's reward
  is credited to step k alone (its only noisy transition). All seeds, and all children alive, are denoised in one
  batch per step, so the prefix is computed once.
- `log_prob(rollout, rows, step)`: the log-density of the stored `x_{step+1}` given the stored `x_step` under the
  current transformer, with gradient: the update never re-samples and never recomputes a stored latent.

Classifier-free guidance is in the graph (SD3: negative and positive prompts in one doubled batch,
`v = v_uncond + w (v_text - v_uncond)`), for sampling and for `log_prob` alike; `log_prob(..., detach_uncond=True)`
stops the gradient of the unconditional branch, as Flow-GRPO's update does (`noise_pred_uncond.detach()` in
`scripts/train_sd3.py: compute_log_prob`), so that only `v_text` is differentiated (scaled by `w`). FLUX.1-dev is
guidance-distilled: its `guidance_scale` feeds the transformer's guidance embedding and there is no negative pass
(FLUX "true CFG" is not supported). With noise level 0 the sampler reproduces the pipeline's own output for the
same initial noise.

Groups share initial noise when the caller derives their generators from the group (`seeded_generators` keyed by
group id) rather than from the sample; SDE noise always comes from each sample's own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn

from visalign.sampling import FLOW_KINDS, StepOutput, sde_step

FlowPipeline = StableDiffusion3Pipeline | FluxPipeline


@dataclass
class Conditioning:
    """Text conditioning of a batch, one row per sample.

    Args:
        prompt_embeds (`Tensor` `[B, L, D]`), pooled_prompt_embeds (`Tensor` `[B, P]`): the prompt's encodings.
        negative_prompt_embeds, negative_pooled_prompt_embeds (`Tensor`, *optional*): the negative prompt's, for
            SD3 classifier-free guidance.
        text_ids (`Tensor` `[L, 3]`, *optional*): FLUX's text position ids (shared by the batch).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    text_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def select(self, rows: Tensor) -> Conditioning:
        """The rows `rows` (an index tensor), in that order."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rows]

        return Conditioning(
            self.prompt_embeds[rows],
            self.pooled_prompt_embeds[rows],
            pick(self.negative_prompt_embeds),
            pick(self.negative_pooled_prompt_embeds),
            self.text_ids,
        )

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate batches along the rows."""

        def cat(ts: list[Tensor | None]) -> Tensor | None:
            return None if ts[0] is None else torch.cat(ts)

        return Conditioning(
            torch.cat([p.prompt_embeds for p in parts]),
            torch.cat([p.pooled_prompt_embeds for p in parts]),
            cat([p.negative_prompt_embeds for p in parts]),
            cat([p.negative_pooled_prompt_embeds for p in parts]),
            parts[0].text_ids,
        )


@dataclass
class Rollout:
    """Trajectories sampled from a flow policy: everything the update needs, nothing recomputed.

    `T` is the number of denoising steps; step `t` maps `latents[:, t]` (at `sigmas[t]`) to `latents[:, t + 1]`.

    Args:
        prompts (`list[str]` of N): each sample's prompt.
        group_ids (`Tensor` `[N]`, long): the group of each sample (advantages are normalized within groups).
        latents (`Tensor` `[N, T + 1, ...]`, float32): `x` before every step and the final latent.
        log_probs (`Tensor` `[N, T]`): the log-density of each recorded transition at sampling time (element mean);
            0 for deterministic (ODE) transitions.
        means (`Tensor` `[N, T, ...]`): each transition's mean (GRPO-Guard's RatioNorm needs them).
        stds (`Tensor` `[N, T]`): each transition's std; 0 where the step was deterministic (untrainable).
        sigmas (`Tensor` `[T + 1]`), timesteps (`Tensor` `[T]`): the schedule.
        noise_level (`float`), kind (`str`): the SDE of the noisy steps (`visalign.sampling.sde_step`).
        guidance_scale (`float`): the guidance the velocities were computed with.
        conditioning (`Conditioning` of N rows): the text conditioning.
        images (`Tensor` `[N, 3, H, W]`, float in [0, 1]): the decoded final latents.
    """

    prompts: list[str]
    group_ids: Tensor
    latents: Tensor
    log_probs: Tensor
    means: Tensor
    stds: Tensor
    sigmas: Tensor
    timesteps: Tensor
    noise_level: float
    kind: str
    guidance_scale: float
    conditioning: Conditioning
    images: Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def select(self, rows: Tensor) -> Rollout:
        """The samples `rows` (an index tensor), in that order."""
        return replace(
            self,
            prompts=[self.prompts[i] for i in rows.tolist()],
            group_ids=self.group_ids[rows],
            latents=self.latents[rows],
            log_probs=self.log_probs[rows],
            means=self.means[rows],
            stds=self.stds[rows],
            conditioning=self.conditioning.select(rows),
            images=self.images[rows],
        )

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        """Concatenate rollouts of the same schedule and policy along the sample dimension."""
        first = parts[0]
        for p in parts[1:]:
            same_policy = (p.noise_level, p.kind, p.guidance_scale) == (
                first.noise_level,
                first.kind,
                first.guidance_scale,
            )
            if not (same_policy and torch.equal(p.sigmas, first.sigmas)):
                raise ValueError("rollouts to concatenate must share the schedule, noise level, kind and guidance")
        return replace(
            first,
            prompts=[prompt for p in parts for prompt in p.prompts],
            group_ids=torch.cat([p.group_ids for p in parts]),
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            means=torch.cat([p.means for p in parts]),
            stds=torch.cat([p.stds for p in parts]),
            conditioning=Conditioning.cat([p.conditioning for p in parts]),
            images=torch.cat([p.images for p in parts]),
        )


@dataclass
class _Cohort:
    """The children that left their seeds at branch step `k`: their latents and step means from step k on."""

    k: int
    latents: list[Tensor]
    means: list[Tensor]
    log_prob: Tensor
    std: Tensor


def seeded_generators(keys: Sequence[Sequence[int]]) -> list[torch.Generator]:
    """One CPU generator per key (a sequence of non-negative ints, e.g. `(seed, iteration, sample_index)`).

    Generators depend on their key only, so a sample's noise is the same whatever batch, process or resume it is
    drawn in; keying the initial noise by group id instead of sample id makes a group share it.
    """
    out = []
    for key in keys:
        state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint64)
        out.append(torch.Generator().manual_seed(int(state[0]) & (2**63 - 1)))
    return out


class FlowSampler:
    """Run a flow-matching pipeline's components step by step, recording a `Rollout`.

    Args:
        pipe (`StableDiffusion3Pipeline` or `FluxPipeline`): the model; its scheduler gives the sigma schedule
            (shift, dynamic shifting) exactly as the pipeline's own `__call__` would.
        height, width (`int`): image size in pixels.
        max_sequence_length (`int`): T5 tokens (SD3 pads with this many zero tokens when it has no T5; the shapes
            world's SD3 model needs `visalign.world.models.MAX_SEQUENCE_LENGTH`).
        negative_prompt (`str`): SD3's classifier-free-guidance negative prompt.
    """

    def __init__(
        self,
        pipe: FlowPipeline,
        *,
        height: int,
        width: int,
        max_sequence_length: int = 256,
        negative_prompt: str = "",
    ):
        if not isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline)):
            raise ValueError(
                f"`pipe` must be a StableDiffusion3Pipeline or a FluxPipeline, got {type(pipe).__name__}; "
                "epsilon-prediction pipelines (SD, SDXL) use `visalign.sampling.ddim_step`"
            )
        multiple = pipe.vae_scale_factor * (2 if isinstance(pipe, FluxPipeline) else 1)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"`height` and `width` must be positive multiples of {multiple}, got {height}x{width}")
        self.pipe = pipe
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        self.is_flux = isinstance(pipe, FluxPipeline)

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float) -> Conditioning:
        """Encode `prompts` (and SD3's negative prompt when `guidance_scale > 1`) once, without gradient."""
        if self.is_flux:
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return Conditioning(embeds, pooled, text_ids=text_ids)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=guidance_scale > 1,
            negative_prompt=self.negative_prompt,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(embeds, pooled, negative, negative_pooled)

    def initial_latents(self, generator: list[torch.Generator]) -> Tensor:
        """Gaussian initial latents `x` at sigma 1, one per generator (float32; FLUX's are packed `[B, L, 4C]`)."""
        config = self.pipe.transformer.config
        channels = config.in_channels // 4 if self.is_flux else config.in_channels
        out = self.pipe.prepare_latents(
            len(generator), channels, self.height, self.width, torch.float32, self.device, generator
        )
        return out[0] if self.is_flux else out

    def schedule(self, num_inference_steps: int) -> tuple[Tensor, Tensor]:
        """`(timesteps [T], sigmas [T + 1])` as the pipeline sets them (sigmas end in 0)."""
        scheduler = self.pipe.scheduler
        config = scheduler.config
        if self.is_flux:
            seq_len = (self.height // self.pipe.vae_scale_factor // 2) * (
                self.width // self.pipe.vae_scale_factor // 2
            )
            mu = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            if config.get("use_flow_sigmas", False):
                scheduler.set_timesteps(num_inference_steps, device=self.device, mu=mu)
            else:
                sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
                scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        else:
            options = {}
            if config.get("use_dynamic_shifting", False):
                patch = self.pipe.transformer.config.patch_size
                seq_len = (self.height // self.pipe.vae_scale_factor // patch) * (
                    self.width // self.pipe.vae_scale_factor // patch
                )
                options["mu"] = calculate_shift(
                    seq_len,
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                    config.get("base_shift", 0.5),
                    config.get("max_shift", 1.16),
                )
            scheduler.set_timesteps(num_inference_steps, device=self.device, **options)
        return scheduler.timesteps.clone(), scheduler.sigmas.clone()

    def velocity(
        self,
        latents: Tensor,
        timestep: Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
        transformer: nn.Module | None = None,
        *,
        detach_uncond: bool = False,
    ) -> Tensor:
        """The guided velocity at `latents` (`[B, ...]`) and scalar `timestep` (the scheduler's, 0-1000).

        `transformer` defaults to the pipeline's; pass the training wrapper (DDP) to get synchronized gradients.
        `detach_uncond=True` treats the unconditional CFG prediction as a constant in `v_uncond + w (v_text -
        v_uncond)` (same value; the gradient is then `w * d v_text` alone). No effect without a negative pass.
        """
        transformer = self.pipe.transformer if transformer is None else transformer
        if len(conditioning) != latents.shape[0]:
            raise ValueError(f"`conditioning` has {len(conditioning)} rows for {latents.shape[0]} latents")
        x = latents.to(conditioning.prompt_embeds.dtype)
        if self.is_flux:
            guidance = None
            if self.pipe.transformer.config.guidance_embeds:
                guidance = torch.full([x.shape[0]], guidance_scale, device=x.device, dtype=torch.float32)
            return transformer(
                hidden_states=x,
                timestep=timestep.expand(x.shape[0]).to(x.dtype) / 1000,
                guidance=guidance,
                pooled_projections=conditioning.pooled_prompt_embeds,
                encoder_hidden_states=conditioning.prompt_embeds,
                txt_ids=conditioning.text_ids,
                img_ids=self._image_ids(x.device, x.dtype),
                return_dict=False,
            )[0]
        cfg = guidance_scale > 1
        if cfg and conditioning.negative_prompt_embeds is None:
            raise ValueError("`guidance_scale` > 1 needs negative embeddings: encode with the same guidance_scale")
        embeds, pooled = conditioning.prompt_embeds, conditioning.pooled_prompt_embeds
        if cfg:
            x = torch.cat([x, x])
            embeds = torch.cat([conditioning.negative_prompt_embeds, embeds])
            pooled = torch.cat([conditioning.negative_pooled_prompt_embeds, pooled])
        out = transformer(
            hidden_states=x,
            timestep=timestep.expand(x.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        return uncond + guidance_scale * (text - uncond)

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
        kind: str = "sde",
        generator: list[torch.Generator] | None = None,
        group_ids: Tensor | None = None,
        transformer: nn.Module | None = None,
    ) -> Rollout:
        """Denoise `latents` (`[N, ...]` at sigma 1), SDE on `noise_steps` (all when None), ODE elsewhere.

        Args:
            prompts (`list[str]` of N), conditioning (`Conditioning` of N rows): what to draw.
            latents (`Tensor`): initial noise (`initial_latents`).
            num_inference_steps (`int`), guidance_scale (`float`): as in the pipeline's `__call__`.
            noise_level (`float`), kind (`str`): the SDE of the noisy steps; 0 makes every step the Euler step.
            noise_steps (`Sequence[int]`, *optional*): the SDE window; steps outside it have noise level 0.
            generator (`list[torch.Generator]` of N, *optional*): per-sample SDE noise.
            group_ids (`Tensor` `[N]`, *optional*): recorded in the rollout (default: every sample its own group).
        """
        n = latents.shape[0]
        self._check_batch(prompts, conditioning, n, generator, group_ids, kind)
        timesteps, sigmas = self.schedule(num_inference_steps)
        steps = range(len(timesteps))
        noisy = set(steps) if noise_steps is None else {int(s) for s in noise_steps}
        if not noisy <= set(steps):
            raise ValueError(f"`noise_steps` must lie in [0, {len(timesteps) - 1}], got {sorted(noisy)}")
        x = latents.float()
        latents_out, log_probs, means, stds = [x], [], [], []
        for i in steps:
            v = self.velocity(x, timesteps[i], conditioning, guidance_scale, transformer)
            out = sde_step(v, x, sigmas, i, noise_level if i in noisy else 0.0, kind=kind, generator=generator)
            x = out.prev_sample
            latents_out.append(x)
            log_probs.append(out.log_prob)
            means.append(out.mean)
            stds.append(out.std.expand(n))
        return Rollout(
            prompts=list(prompts),
            group_ids=torch.arange(n, device=x.device) if group_ids is None else group_ids.to(x.device),
            latents=torch.stack(latents_out, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            means=torch.stack(means, dim=1),
            stds=torch.stack(stds, dim=1).float(),
            sigmas=sigmas,
            timesteps=timesteps,
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
        transformer: nn.Module | None = None,
    ) -> Rollout:
        """TempFlow-GRPO branching: ODE from each of the S seeds in `latents`; at each step k of `branch_steps`,
        `num_branches` children by one SDE step from the seed's ODE state, each finished by ODE.

        Returns a `Rollout` of `len(branch_steps) * S * num_branches` children, ordered by branch step, then seed,
        then branch. A child's only noisy transition is its branch step (its `stds` row is 0 elsewhere); its
        latents before k are its seed's. Child `(k, s, j)` has group id `group_ids[s] * T + k`, so a group is the
        children of one seed at one step (the paper's "seed group"). Seed s's branch noise is drawn from
        `generator[s]`, in order of k then j. Branch steps must leave at least one ODE step (k <= T - 2).
        """
        s = latents.shape[0]
        self._check_batch(prompts, conditioning, s, generator, group_ids, kind)
        timesteps, sigmas = self.schedule(num_inference_steps)
        t_count = len(timesteps)
        ks = sorted({int(k) for k in branch_steps})
        if not ks or ks[0] < 0 or ks[-1] > t_count - 2:
            raise ValueError(f"`branch_steps` must be a non-empty subset of [0, {t_count - 2}], got {branch_steps}")
        if num_branches < 1:
            raise ValueError(f"`num_branches` must be >= 1, got {num_branches}")
        parents = torch.arange(s, device=self.device).repeat_interleave(num_branches)
        seed_rows = torch.arange(s, device=self.device)

        x = latents.float()
        seed_latents, seed_means = [x], []
        cohorts: list[_Cohort] = []
        for i in range(t_count):
            rows = torch.cat([seed_rows] + [parents] * len(cohorts))
            batch = torch.cat([x] + [c.latents[-1] for c in cohorts])
            v = self.velocity(batch, timesteps[i], conditioning.select(rows), guidance_scale, transformer)
            ode = sde_step(v, batch, sigmas, i, 0.0)  # seeds and live children all take the Euler step
            children = zip(cohorts, ode.prev_sample[s:].split(len(parents)), ode.mean[s:].split(len(parents)))
            for cohort, child_latents, child_means in children:
                cohort.latents.append(child_latents)
                cohort.means.append(child_means)
            if i in ks:  # new children: one SDE step from their seed's state, with the seed's velocity
                gens = None if generator is None else [generator[p] for p in parents.tolist()]
                sde = sde_step(v[:s][parents], x[parents], sigmas, i, noise_level, kind=kind, generator=gens)
                cohorts.append(_Cohort(i, [sde.prev_sample], [sde.mean], sde.log_prob, sde.std))
            seed_means.append(ode.mean[:s])
            x = ode.prev_sample[:s]
            seed_latents.append(x)

        seed_latents_t, seed_means_t = torch.stack(seed_latents, dim=1), torch.stack(seed_means, dim=1)
        n = len(parents)
        out_latents, out_means, out_log_probs, out_stds, out_groups = [], [], [], [], []
        base_groups = torch.arange(s, device=self.device) if group_ids is None else group_ids.to(self.device)
        for c in cohorts:
            out_latents.append(torch.cat([seed_latents_t[parents, : c.k + 1], torch.stack(c.latents, dim=1)], dim=1))
            out_means.append(torch.cat([seed_means_t[parents, : c.k], torch.stack(c.means, dim=1)], dim=1))
            log_prob = torch.zeros(n, t_count, device=self.device)
            log_prob[:, c.k] = c.log_prob
            std = torch.zeros(n, t_count, device=self.device)
            std[:, c.k] = c.std
            out_log_probs.append(log_prob)
            out_stds.append(std)
            out_groups.append(base_groups[parents] * t_count + c.k)
        latents_all = torch.cat(out_latents)
        all_parents = parents.repeat(len(cohorts))
        return Rollout(
            prompts=[prompts[p] for p in all_parents.tolist()],
            group_ids=torch.cat(out_groups),
            latents=latents_all,
            log_probs=torch.cat(out_log_probs),
            means=torch.cat(out_means),
            stds=torch.cat(out_stds),
            sigmas=sigmas,
            timesteps=timesteps,
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
        transformer: nn.Module | None = None,
        *,
        detach_uncond: bool = False,
    ) -> StepOutput:
        """The current model's policy at `step` for the samples `rows`, scoring their stored transitions.

        Differentiable in the transformer's parameters (with `detach_uncond=True`, through the conditional CFG
        branch only: Flow-GRPO's convention, see `velocity`). Returns `sde_step`'s `StepOutput`: `log_prob` `[b]`,
        `mean`, `std`, and `prev_sample` (the stored `x_{step+1}`). Every row must have been noisy at `step`.
        """
        if not 0 <= step < rollout.num_steps:
            raise ValueError(f"`step` must be in [0, {rollout.num_steps - 1}], got {step}")
        if not (rollout.stds[rows, step] > 0).all():
            raise ValueError(f"some rows were deterministic (ODE) at step {step}: they have no log-prob to train")
        x = rollout.latents[rows, step]
        v = self.velocity(
            x,
            rollout.timesteps[step],
            rollout.conditioning.select(rows),
            rollout.guidance_scale,
            transformer,
            detach_uncond=detach_uncond,
        )
        return sde_step(
            v,
            x,
            rollout.sigmas,
            step,
            rollout.noise_level,
            kind=rollout.kind,
            prev_sample=rollout.latents[rows, step + 1],
        )

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Final latents -> pixels `[B, 3, H, W]` in [0, 1], as the pipeline's `output_type="pt"`."""
        vae = self.pipe.vae
        if self.is_flux:
            latents = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def _image_ids(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        scale = self.pipe.vae_scale_factor * 2
        return self.pipe._prepare_latent_image_ids(1, self.height // scale, self.width // scale, device, dtype)

    @staticmethod
    def _check_batch(
        prompts: list[str],
        conditioning: Conditioning,
        n: int,
        generator: list[torch.Generator] | None,
        group_ids: Tensor | None,
        kind: str,
    ) -> None:
        if len(prompts) != n or len(conditioning) != n:
            raise ValueError(
                f"{n} latents need {n} prompts and conditioning rows, got {len(prompts)} and {len(conditioning)}"
            )
        if generator is not None and (not isinstance(generator, list) or len(generator) != n):
            raise ValueError(f"`generator` must be a list of {n} torch.Generator (one per sample)")
        if group_ids is not None and tuple(group_ids.shape) != (n,):
            raise ValueError(f"`group_ids` must have shape [{n}], got {tuple(group_ids.shape)}")
        if kind not in FLOW_KINDS:
            raise ValueError(f"`kind` must be one of {FLOW_KINDS}, got {kind!r}")
