"""What every generator family's sampler produces and every trainer reads: `Conditioning`, `Schedule`, `Rollout`.

One of each for all families (diffusers' field names). A `Rollout` records every latent of a trajectory with each
step's Gaussian policy (`log_probs`, `means`, `stds`, always per sample and step), so an update re-scores stored
transitions and never re-samples. Flow families step on `sigmas`; epsilon/v families step DDIM from `timesteps[i]`
to `prev_timesteps[i]` (`kind == "ddim"`, `noise_level` is then DDIM's eta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_ROW_FIELDS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "prompt_embeds_mask",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "negative_prompt_embeds_mask",
)

_MASKED = {"prompt_embeds": "prompt_embeds_mask", "negative_prompt_embeds": "negative_prompt_embeds_mask"}


@dataclass
class Conditioning:
    """Encoded prompts, one row per sample (diffusers' names).

    Args:
        prompt_embeds (`Tensor` `[B, L, D]`): the prompts' token encodings.
        pooled_prompt_embeds (`Tensor` `[B, P]`, *optional*): SDXL's, SD3's and FLUX's pooled encoding.
        prompt_embeds_mask (`Tensor` `[B, L]`, *optional*): 1 for real tokens (Qwen-Image).
        negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_embeds_mask (*optional*): the
            negative prompt's, present when encoded for a classifier-free-guidance pass.
        text_ids (`Tensor` `[L, 3]`, *optional*): FLUX's text position ids, shared by the batch.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    prompt_embeds_mask: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    negative_prompt_embeds_mask: Tensor | None = None
    text_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def select(self, rows: Tensor) -> Conditioning:
        """The rows `rows` (an index tensor), in that order."""
        picked = {k: None if getattr(self, k) is None else getattr(self, k)[rows] for k in _ROW_FIELDS}
        return Conditioning(**picked, text_ids=self.text_ids)

    def repeat(self, times: int) -> Conditioning:
        """The batch stacked `times` times (`[w; l]` pairs share their prompt)."""
        return Conditioning.cat([self] * times)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate batches along the rows; masked encodings of different lengths are right-padded with zeros."""
        out = {}
        for name in _ROW_FIELDS:
            ts = [getattr(p, name) for p in parts]
            if ts[0] is None:
                out[name] = None
                continue
            masked = name in _MASKED or name.endswith("_mask")  # unmasked encodings must match: no silent padding
            if masked and all(getattr(p, _MASKED.get(name, name)) is not None for p in parts):
                length = max(t.shape[1] for t in ts)
                ts = [F.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1])) for t in ts]
            out[name] = torch.cat(ts)
        return Conditioning(**out, text_ids=parts[0].text_ids)

    def negatives_first(self) -> Conditioning:
        """`[negatives; positives]` as one doubled batch without negatives (one CFG forward pass)."""
        if not self.has_negative:
            raise ValueError("classifier-free guidance needs negative embeddings: encode with the same guidance_scale")
        neg = Conditioning(
            self.negative_prompt_embeds,
            self.negative_pooled_prompt_embeds,
            self.negative_prompt_embeds_mask,
            text_ids=self.text_ids,
        )
        pos = Conditioning(
            self.prompt_embeds, self.pooled_prompt_embeds, self.prompt_embeds_mask, text_ids=self.text_ids
        )
        return Conditioning.cat([neg, pos])


@dataclass
class Schedule:
    """A sampler's steps: `timesteps [T]` in the scheduler's units, and either `sigmas [T + 1]` (flow, ending in 0)
    or `prev_timesteps [T]` (DDIM; the last is negative: the final alpha)."""

    timesteps: Tensor
    sigmas: Tensor | None = None
    prev_timesteps: Tensor | None = None


@dataclass
class Rollout:
    """Trajectories sampled from a generator: everything the update needs, nothing recomputed.

    Step `t` maps `latents[:, t]` to `latents[:, t + 1]`.

    Args:
        prompts (`list[str]` of N), group_ids (`Tensor` `[N]`): each sample's prompt and group (advantages are
            normalized within groups).
        latents (`Tensor` `[N, T + 1, ...]`, float32): `x` before every step and the final latent.
        log_probs (`Tensor` `[N, T]`): each transition's log-density at sampling time (element mean); 0 where the
            step was deterministic.
        means (`Tensor` `[N, T, ...]`): each transition's mean; predictions (`Tensor` `[N, T, ...]`): the guided
            model output at each step (velocity, epsilon or v).
        stds (`Tensor` `[N, T]`): each transition's std, per sample and step; 0 where deterministic (untrainable).
        timesteps (`Tensor` `[T]`), sigmas (`Tensor` `[T + 1]` or None), prev_timesteps (`Tensor` `[T]` or None):
            the `Schedule`.
        noise_level (`float`), kind (`str`): the step (`"sde"`, `"cps"`, `"dance"`, `"ode"`; `"ddim"` with eta).
        guidance_scale (`float`): the guidance the predictions were computed with.
        conditioning (`Conditioning` of N rows), images (`Tensor` `[N, 3, H, W]`, or videos `[N, F, 3, H, W]`, in
            [0, 1]): the text conditioning and the decoded final latents.
    """

    prompts: list[str]
    group_ids: Tensor
    latents: Tensor
    log_probs: Tensor
    means: Tensor
    predictions: Tensor
    stds: Tensor
    timesteps: Tensor
    sigmas: Tensor | None
    prev_timesteps: Tensor | None
    noise_level: float
    kind: str
    guidance_scale: float
    conditioning: Conditioning
    images: Tensor

    _PER_SAMPLE = ("group_ids", "latents", "log_probs", "means", "predictions", "stds", "images")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.timesteps, self.sigmas, self.prev_timesteps)

    def select(self, rows: Tensor) -> Rollout:
        """The samples `rows` (an index tensor), in that order."""
        return replace(
            self,
            prompts=[self.prompts[i] for i in rows.tolist()],
            conditioning=self.conditioning.select(rows),
            **{k: getattr(self, k)[rows] for k in self._PER_SAMPLE},
        )

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        """Concatenate rollouts of the same schedule and policy along the samples."""
        first = parts[0]
        for p in parts[1:]:
            same_policy = (p.noise_level, p.kind, p.guidance_scale) == (
                first.noise_level,
                first.kind,
                first.guidance_scale,
            )
            if not (same_policy and torch.equal(p.timesteps, first.timesteps)):
                raise ValueError("rollouts to concatenate must share the schedule, noise level, kind and guidance")
        return replace(
            first,
            prompts=[prompt for p in parts for prompt in p.prompts],
            conditioning=Conditioning.cat([p.conditioning for p in parts]),
            **{k: torch.cat([getattr(p, k) for p in parts]) for k in Rollout._PER_SAMPLE},
        )


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
