"""Weighted combinations of rewards with per-reward calibration; the composite is itself a `RewardModel`.

For rewards `r_k` with weights `w_k` and calibrations `c_k` (affine, scale or per-prompt z-score, applied in order):

- `weighted_raw` (Flow-GRPO `multi_score`): `R_i = sum_k w_k c_k(r_k,i)`. The trainer normalizes `R` afterwards
  (per-prompt advantages), so the reward with the largest spread within a group dominates unless calibrated.
- `weighted_advantage` (Pref-GRPO `compute_weighted_advantages`): each calibrated reward is first normalized within
  its prompt group, `z_k,i = (c_k(r_k,i) - mean_g(i)) / (std_g(i) + eps)`, then `R_i = sum_k w_k z_k,i`.

Groups are the samples of the batch that share a prompt; `std` is the population standard deviation (a prompt with
a single sample gets z = 0). `aspects` holds each part's raw score under its name; `combine` recomputes the total from
those raw scores, so callers that score in several batches (the `visalign score` command) can normalize over all
samples of a prompt at once. The composite is differentiable when every part is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from visalign.reward_models.preprocess import score_sharing_preprocessing
from visalign.rewards import RewardModel
from visalign.types import RewardOutput, check_prompts

MODES = ("weighted_raw", "weighted_advantage")


def prompt_zscore(scores: Tensor, prompts: list[str], eps: float = 1e-6) -> Tensor:
    """`(r_i - mean_g(i)) / (std_g(i) + eps)` over the samples sharing the prompt of sample i; `[B]` -> `[B]`.

    The variance is clamped at 1e-12 before the square root so that constant groups get finite (zero) gradients.
    """
    prompts = check_prompts(prompts, scores.shape[0])
    ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    group = torch.tensor([ids[p] for p in prompts], device=scores.device)
    count = torch.bincount(group, minlength=len(ids)).to(scores.dtype)
    mean = scores.new_zeros(len(ids)).index_add(0, group, scores) / count
    centered = scores - mean[group]
    var = scores.new_zeros(len(ids)).index_add(0, group, centered**2) / count
    return centered / (var.clamp_min(1e-12).sqrt()[group] + eps)


@dataclass(frozen=True)
class Affine:
    """`r -> (r - shift) / scale` (ImageReward's built-in normalization, VideoReward's per-aspect mean and std)."""

    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"`scale` must be positive, got {self.scale}")

    def __call__(self, scores: Tensor, prompts: list[str]) -> Tensor:
        return (scores - self.shift) / self.scale


@dataclass(frozen=True)
class Scale:
    """`r -> r / scale` (PickScore / 26 in Flow-GRPO, UnifiedReward / 5)."""

    scale: float

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"`scale` must be positive, got {self.scale}")

    def __call__(self, scores: Tensor, prompts: list[str]) -> Tensor:
        return scores / self.scale


@dataclass(frozen=True)
class PromptZScore:
    """`r -> (r - mean) / (std + eps)` within each prompt's samples of the batch (see `prompt_zscore`)."""

    eps: float = 1e-6

    def __call__(self, scores: Tensor, prompts: list[str]) -> Tensor:
        return prompt_zscore(scores, prompts, self.eps)


Calibration = Affine | Scale | PromptZScore


@dataclass
class RewardPart:
    """One term of a composite: `reward` scored, calibrated by `calibration` (in order), times `weight`."""

    reward: RewardModel
    weight: float = 1.0
    calibration: Sequence[Calibration] = field(default_factory=tuple)
    name: str | None = None


class CompositeReward(RewardModel):
    """A weighted sum of calibrated rewards.

    Args:
        parts: `RewardPart`s, or a mapping `name -> RewardModel` (weight 1, no calibration).
        mode: `"weighted_raw"` or `"weighted_advantage"` (see the module docstring).
        eps: the z-score denominator offset of `weighted_advantage`.
    """

    name = "composite"

    def __init__(
        self,
        parts: Sequence[RewardPart] | Mapping[str, RewardModel],
        mode: Literal["weighted_raw", "weighted_advantage"] = "weighted_raw",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if isinstance(parts, Mapping):
            parts = [RewardPart(reward, name=name) for name, reward in parts.items()]
        if not parts:
            raise ValueError("`parts` is empty")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        names = [part.name or part.reward.name for part in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"`parts` names must be distinct, got {names}; set RewardPart.name")
        for part, name in zip(parts, names):
            if not isinstance(part.reward, RewardModel):
                raise ValueError(f"part {name!r}: `reward` must be a RewardModel, got {type(part.reward).__name__}")
            if not isinstance(part.weight, (int, float)) or not torch.isfinite(torch.tensor(float(part.weight))):
                raise ValueError(f"part {name!r}: `weight` must be a finite number, got {part.weight!r}")
        self.rewards = nn.ModuleList(part.reward for part in parts)
        self.weights = [float(part.weight) for part in parts]
        self.calibrations = [tuple(part.calibration) for part in parts]
        self.part_names = names
        self.mode = mode
        self.eps = eps
        self.aspect_names = tuple(names)
        self.differentiable = all(r.differentiable for r in self.rewards)
        self.modalities = frozenset.intersection(*(frozenset(r.modalities) for r in self.rewards))
        if not self.modalities:
            raise ValueError(f"`parts` share no modality: {[sorted(r.modalities) for r in self.rewards]}")

    def combine(self, part_scores: Mapping[str, Tensor], prompts: list[str]) -> Tensor:
        """The composite score `[B]` from each part's raw score `[B]` (keyed by part name)."""
        missing = [n for n in self.part_names if n not in part_scores]
        if missing:
            raise ValueError(f"`part_scores` lacks {missing}")
        total = None
        for name, weight, calibration in zip(self.part_names, self.weights, self.calibrations):
            r = part_scores[name].float()
            for calibrate in calibration:
                r = calibrate(r, prompts)
            if self.mode == "weighted_advantage":
                r = prompt_zscore(r, prompts, self.eps)
            total = weight * r if total is None else total + weight * r
        return total

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        scores = score_sharing_preprocessing(dict(zip(self.part_names, self.rewards)), pixels, prompts)
        return RewardOutput(self.combine(scores, prompts), aspects=scores)
