"""Dense rewards: heatmap helpers for trainers, and a gradient-saliency heatmap for any differentiable reward.

The heatmap contract (`visalign.types.RewardOutput`): `heatmaps[name]` is `[B, H, W]` at the input resolution,
values in [0, 1], higher = more defective. Sources: ImageDoctor's `misalignment` and `artifact` maps
(`visalign.reward_models.imagedoctor`), the shapes world's off-palette map (`world-defects`), `GradientSaliency`.

- `to_latent_grid(heatmap, size)`: adaptive average pooling to the generator's latent grid, each cell the mean of
  the pixels it covers (ImageDoctor's reward pools its maps to 64 x 64, SD3's latent grid at 512 x 512).
- `loss_weight(heatmap, size)`: DenseFlow-GRPO's per-position weight `1 - heatmap` on the latent grid,
  `[B, 1, h, w]`, ready to multiply a per-element loss `[B, C, h, w]`: flawed regions get less credit for a
  positive advantage (ImageDoctor, arXiv 2510.01010, `train_sd3_hp.py`).
- `mean_heatmap(heatmaps, names)`: the mean of several maps (ImageDoctor's reward averages its two).
- `gradient_saliency` / `GradientSaliency(reward)`: `|d score_i / d pixels_i|` summed over channels, averaged over
  `samples` noisy copies when asked (SmoothGrad, Smilkov et al. 2017), normalized by each image's maximum to
  [0, 1]. It shows where the reward comes from, the pixels whose change moves the score most; it is a sensitivity
  map, not a judged defect, so as a loss weight it down-weights what the reward looks at most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.rewards import RewardModel
from visalign.types import RANGE_TOLERANCE, RewardOutput, check_pixels, check_prompts


def check_heatmap(heatmap: object, name: str = "heatmap") -> Tensor:
    """Check that `heatmap` is a finite float tensor `[B, H, W]` with values in [0, 1]; returns it unchanged."""
    if not isinstance(heatmap, Tensor) or heatmap.ndim != 3 or not heatmap.is_floating_point():
        shape = tuple(heatmap.shape) if isinstance(heatmap, Tensor) else type(heatmap).__name__
        raise ValueError(f"`{name}` must be a float tensor of shape [B, H, W], got {shape}")
    with torch.no_grad():
        if not torch.isfinite(heatmap).all():
            raise ValueError(f"`{name}` contains NaN or infinite values")
        lo, hi = float(heatmap.min()), float(heatmap.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"`{name}` values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return heatmap


def _check_size(size: object) -> tuple[int, int]:
    if not (isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"`size` must be (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def to_latent_grid(heatmap: Tensor, size: tuple[int, int]) -> Tensor:
    """`heatmap` `[B, H, W]` pooled to `[B, h, w]` = `size` by adaptive average pooling (float32)."""
    check_heatmap(heatmap)
    return F.adaptive_avg_pool2d(heatmap.float()[:, None], _check_size(size))[:, 0]


def loss_weight(heatmap: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """`1 - heatmap` as a per-position loss weight `[B, 1, h, w]`, pooled to `size` first when given."""
    pooled = to_latent_grid(heatmap, size) if size is not None else check_heatmap(heatmap).float()
    return (1 - pooled)[:, None]


def mean_heatmap(heatmaps: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """The mean `[B, H, W]` of the maps `names` of `heatmaps` (e.g. `RewardOutput.heatmaps`)."""
    if not names:
        raise ValueError("`names` is empty")
    missing = [n for n in names if n not in heatmaps]
    if missing:
        raise ValueError(f"`heatmaps` lacks {missing} (it holds {sorted(heatmaps)})")
    maps = [check_heatmap(heatmaps[n], f"heatmaps[{n!r}]").float() for n in names]
    if len({m.shape for m in maps}) > 1:
        raise ValueError(f"`heatmaps` {list(names)} differ in shape: {[tuple(m.shape) for m in maps]}")
    return torch.stack(maps).mean(0)


def gradient_saliency(
    reward: RewardModel,
    pixels: Tensor,
    prompts: list[str],
    *,
    samples: int = 1,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Where `reward`'s score of each image comes from: `[B, H, W]` in [0, 1].

    `|d score_i / d pixels_i|` summed over the 3 channels (mean over `samples` copies of the pixels with Gaussian
    noise of std `noise`, clamped to [0, 1]), divided by each image's maximum (an image with zero gradient gets
    zeros). Rewards score each sample on its own, so one backward pass of the summed scores gives every image's
    gradient.
    """
    if not isinstance(reward, RewardModel) or not reward.differentiable or "image" not in reward.modalities:
        raise ValueError(f"`reward` must be a differentiable image RewardModel, got {getattr(reward, 'name', reward)}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"`samples` must be a positive int, got {samples!r}")
    if not isinstance(noise, (int, float)) or noise < 0 or (samples > 1 and noise == 0):
        raise ValueError(f"`noise` must be a number >= 0 (> 0 when samples > 1), got {noise!r}")
    check_pixels(pixels)
    prompts = check_prompts(prompts, pixels.shape[0])
    total = torch.zeros(pixels.shape[0], *pixels.shape[-2:], device=pixels.device)
    with torch.enable_grad():
        for _ in range(samples):
            x = pixels.detach().float()
            if noise:
                x = x + noise * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            x = x.clamp(0, 1).requires_grad_(True)
            (grad,) = torch.autograd.grad(reward.score(x, prompts).score.sum(), x)
            total += grad.abs().sum(1)
    peak = total.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, total / peak.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


class GradientSaliency(RewardModel):
    """A differentiable image reward with its gradient-saliency map as `heatmaps["saliency"]`.

    `score`, `aspects` and the reward's own heatmaps pass through unchanged (with their graph to the pixels).

    Args:
        reward: a differentiable image reward.
        samples, noise: SmoothGrad averaging (see `gradient_saliency`).
        seed: seed of the SmoothGrad noise.
    """

    def __init__(self, reward: RewardModel, *, samples: int = 1, noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(reward, RewardModel) or not reward.differentiable or "image" not in reward.modalities:
            raise ValueError(f"`reward` must be a differentiable image RewardModel, got {type(reward).__name__}")
        if "saliency" in reward.heatmap_names:
            raise ValueError(f"`reward` {reward.name} already fills a heatmap named 'saliency'")
        self.reward = reward
        self.samples = samples
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)
        self.name = f"{reward.name}-saliency"
        self.modalities = frozenset({"image"})
        self.aspect_names = reward.aspect_names
        self.heatmap_names = (*reward.heatmap_names, "saliency")

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        out = self.reward.score(pixels, prompts)
        saliency = gradient_saliency(
            self.reward, pixels, prompts, samples=self.samples, noise=self.noise, generator=self.generator
        )
        return RewardOutput(out.score, out.aspects, {**out.heatmaps, "saliency": saliency}, out.extras)
