"""The vocabulary every part of visalign speaks: `RewardOutput` and input validation at the boundary.

Pixels are float tensors in [0, 1]: images `[B, 3, H, W]`, videos `[B, T, 3, H, W]`. Prompts are `list[str]` of
length B. Validation lives here and only here; it raises `ValueError` naming the argument and what was expected,
and never fixes an input silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

RANGE_TOLERANCE = 1e-3  # pixels may overshoot [0, 1] by this much (resampling and VAE decoders ring slightly)


@dataclass
class RewardOutput:
    """What every reward model returns.

    Args:
        score (`Tensor` `[B]`, float32): the primary scalar reward, higher is better.
        aspects (`dict[str, Tensor]`): per-aspect scores, each `[B]`.
        heatmaps (`dict[str, Tensor]`): dense maps `[B, H, W]` at input resolution, values in [0, 1],
            higher = more defective.
        extras (`dict`): anything else (judge text, parse failures, per-frame scores, logits).
    """

    score: Tensor
    aspects: dict[str, Tensor] = field(default_factory=dict)
    heatmaps: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.score.shape[0]

    def detach(self) -> RewardOutput:
        """A copy with every tensor detached from the graph (`extras` is shared)."""
        return RewardOutput(
            self.score.detach(),
            {k: v.detach() for k, v in self.aspects.items()},
            {k: v.detach() for k, v in self.heatmaps.items()},
            self.extras,
        )


def check_pixels(pixels: Any, name: str = "pixels", *, video: bool | None = False) -> Tensor:
    """Check that `pixels` is a finite float tensor in [0, 1] of shape `[B, 3, H, W]` (or `[B, T, 3, H, W]`).

    `video=False` accepts images only, `True` videos only, `None` either. Returns the tensor unchanged.
    """
    if not isinstance(pixels, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(pixels).__name__}")
    ranks = {False: (4,), True: (5,), None: (4, 5)}[video]
    layout = {4: "[B, 3, H, W]", 5: "[B, T, 3, H, W]"}
    if pixels.ndim not in ranks or pixels.shape[-3] != 3:
        expected = " or ".join(layout[r] for r in ranks)
        raise ValueError(f"`{name}` must have shape {expected} with 3 channels, got {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(pixels.shape)})")
    if not pixels.is_floating_point():
        raise ValueError(f"`{name}` must be a float tensor with values in [0, 1], got dtype {pixels.dtype}")
    with torch.no_grad():
        if not torch.isfinite(pixels).all():
            raise ValueError(f"`{name}` contains NaN or infinite values")
        lo, hi = float(pixels.min()), float(pixels.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"`{name}` values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; convert from [-1, 1] with (x + 1) / 2"
        )
    return pixels


def check_prompts(prompts: Any, batch_size: int | None = None, name: str = "prompts") -> list[str]:
    """Check that `prompts` is a non-empty list of strings, of length `batch_size` when given."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"`{name}` must be a list of strings (one per sample), got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"`{name}` is empty")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"`{name}` must hold strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if batch_size is not None and len(prompts) != batch_size:
        raise ValueError(f"`{name}` has {len(prompts)} items but the batch has {batch_size} samples")
    return list(prompts)


def check_scores(scores: Any, batch_size: int, name: str = "score") -> Tensor:
    """Check that a reward's output is a finite `[batch_size]` tensor (rewards with NaN never reach a trainer)."""
    if not isinstance(scores, Tensor) or scores.shape != (batch_size,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"`{name}` must be a tensor of shape [{batch_size}], got {shape}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"`{name}` contains NaN or infinite values: {scores.detach().cpu().tolist()}")
    return scores
