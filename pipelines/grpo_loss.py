"""The pure math of GRPO for flow generators (Flow-GRPO, Pref-GRPO, TempFlow-GRPO, GRPO-Guard), used by `grpo.py`.

Papers: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), DanceGRPO (Xue et al. 2025, arXiv 2505.07818), Pref-GRPO
(Wang et al. 2025, arXiv 2508.20751), TempFlow-GRPO (He et al. 2025, arXiv 2508.04324), GRPO-Guard (Wang et al.
2025, arXiv 2510.22319), on PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, Eq. 7).

- `group_advantages`: `A = (r - mean_group) / (std + eps)`; Flow-GRPO's `PerPromptStatTracker` is
  `scope="global", unbiased=False, eps=1e-4` (population std of the whole gathered batch), Pref-GRPO and
  DanceGRPO are `scope="group", unbiased=True, eps=1e-8`, TempFlow-GRPO is `scope="group", unbiased=False` per
  branch point.
- `policy_loss`: the clipped surrogate with clipped advantages, averaged over the batch (Flow-GRPO's loss).
- `ratio_norm_log_prob`: GRPO-Guard's ratio normalization (RatioNorm).
The KL to the reference policy is `visalign.sampling.kl_penalty`; Pref-GRPO's win rates are
`visalign.reward_models.pairwise.win_rates`.

Deviation: Flow-GRPO's tracker gives singleton groups 0 only through `r - mean = 0` (we force 0 in every scope, where
the unbiased std would be NaN).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

ADVANTAGE_SCOPES = ("group", "global")


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    *,
    scope: str = "group",
    unbiased: bool = False,
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages (GRPO): each reward minus its group's mean, over a std plus `eps`.

    The mean is always the group's (the group = the samples of one prompt, or of one seed for TempFlow-GRPO). The
    std is the group's (`scope="group"`) or the whole batch's (`scope="global"`), the population std or, with
    `unbiased=True`, Bessel-corrected. Members of singleton groups get advantage 0. A group whose rewards are all
    equal gets 0 too.

    Args:
        rewards (`Tensor` `[N]` or `[N, K]`): finite rewards; with `[N, K]` each column is normalized on its own
            (TempFlow-GRPO: one column per branch point).
        group_ids (`Tensor` `[N]` of integers, or a sequence of N hashables such as prompts): the group of each row.
        scope (`str`): `"group"` or `"global"`, where the std is taken.
        unbiased (`bool`): Bessel's correction for the std.
        eps (`float`): added to the std, `>= 0`.

    Returns:
        `Tensor` of the shape of `rewards`, float32 (float64 when `rewards` is).
    """
    if not isinstance(rewards, Tensor) or rewards.ndim not in (1, 2) or rewards.shape[0] == 0:
        raise ValueError("`rewards` must be a non-empty tensor of shape [N] or [N, K]")
    if scope not in ADVANTAGE_SCOPES:
        raise ValueError(f"`scope` must be one of {ADVANTAGE_SCOPES}, got {scope!r}")
    if not _is_real(eps) or not eps >= 0:
        raise ValueError(f"`eps` must be a number >= 0, got {eps!r}")
    n = rewards.shape[0]
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(dtype).reshape(n, -1)
    bad = ~torch.isfinite(r).all(dim=1)
    if bad.any():
        raise ValueError(f"`rewards` contains NaN or infinite values at rows {bad.nonzero().flatten().tolist()}")
    ids = _group_index(group_ids, n, r.device)

    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sizes = counts.to(dtype)[:, None]
    mean = torch.zeros(len(counts), r.shape[1], dtype=dtype, device=r.device).index_add_(0, inverse, r) / sizes
    centered = r - mean[inverse]
    if scope == "group":
        sq = torch.zeros_like(mean).index_add_(0, inverse, centered**2)
        std = (sq / (sizes - 1 if unbiased else sizes).clamp_min(1)).sqrt()[inverse]
    elif n > 1:
        std = r.std(dim=0, correction=int(unbiased), keepdim=True)
    else:
        std = torch.zeros_like(r)
    advantages = torch.where(counts[inverse, None] > 1, centered / (std + eps), torch.zeros_like(r))
    return advantages.reshape(rewards.shape)


def policy_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip: float | None = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate as Flow-GRPO trains it, for one step of a batch of trajectories.

    `A = clamp(advantages, -adv_clip, adv_clip)`, `r = exp(log_prob - old_log_prob)`,
    `loss = mean_B max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range))` (PPO Eq. 7, negated). On-policy
    (`log_prob == old_log_prob`) `r` is exactly 1 and `loss = -mean(A)`. `old_log_prob` and `advantages` are
    treated as constants. TempFlow-GRPO's noise-aware weight of the step multiplies this loss.

    Args:
        log_prob (`Tensor` `[B]`): the current policy's log-probs of the stored transitions (with gradient).
        old_log_prob (`Tensor` `[B]`): the log-probs recorded at rollout.
        advantages (`Tensor` `[B]`): per-sample advantages.
        clip_range (`float`): `> 0`; the references use 1e-4 because log-probs are element means.
        adv_clip (`float` or `None`): `> 0`, or `None` for no advantage clipping.

    Returns:
        `(loss, stats)`: the scalar loss and detached scalars `approx_kl` (`mean(log r^2) / 2`), `clipfrac`
        (`|r - 1| > clip_range`), `clipfrac_high`, `clipfrac_low` and `ratio_mean`.
    """
    _check_batch_vectors(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if not _is_real(clip_range) or not 0 < clip_range < math.inf:
        raise ValueError(f"`clip_range` must be a finite number > 0, got {clip_range!r}")
    if adv_clip is not None and (not _is_real(adv_clip) or not adv_clip > 0):
        raise ValueError(f"`adv_clip` must be a number > 0 or None, got {adv_clip!r}")
    dtype = _float_dtype(log_prob, old_log_prob, advantages)
    adv = advantages.detach().to(dtype)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    log_ratio = log_prob.to(dtype) - old_log_prob.detach().to(dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1).abs() > clip_range).to(dtype).mean(),
            "clipfrac_high": (ratio - 1 > clip_range).to(dtype).mean(),
            "clipfrac_low": (1 - ratio > clip_range).to(dtype).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


def ratio_norm_log_prob(
    log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: float | Tensor
) -> Tensor:
    """GRPO-Guard's ratio normalization (RatioNorm; Wang et al. 2025, arXiv 2510.22319), as a log-prob.

    For `x' = old_mean + std z` and element-mean log-probs, `log r = mean(z d) / std - mean(d^2) / (2 std^2)` with
    `d = mean - old_mean`: the second term biases `r` below 1, more so at low-noise steps, so the clip stops
    binding positive-advantage updates. RatioNorm uses `log r~ = std * log r + mean(d^2) / (2 std) = mean(z d)`,
    centred at 0 with a step-consistent spread (Pref-GRPO's `--rationorm`). Returns `old_log_prob + log r~`,
    so `policy_loss(ratio_norm_log_prob(...), old_log_prob, ...)` clips `r~`. GRPO-Guard's other part, the per-step
    gradient reweighting (Pref-GRPO divides the policy loss by `|dt|`), multiplies the loss and is the trainer's.

    Args:
        log_prob (`Tensor` `[B]`), old_log_prob (`Tensor` `[B]`): current and rollout log-probs of `x'`.
        mean (`Tensor` `[B, ...]`), old_mean (`Tensor` `[B, ...]`): current and rollout step means
            (store the rollout's `sde_step(...).mean`).
        std (`float` or `Tensor` `[]`): the transition std, `> 0`.

    Returns:
        `Tensor` `[B]`, float32 (float64 when an input is).
    """
    _check_batch_vectors(log_prob=log_prob, old_log_prob=old_log_prob)
    if not isinstance(mean, Tensor) or mean.ndim < 2 or mean.shape[0] != log_prob.shape[0]:
        raise ValueError(f"`mean` must be a tensor [B, ...] with B = {log_prob.shape[0]} (the length of `log_prob`)")
    if not isinstance(old_mean, Tensor) or old_mean.shape != mean.shape:
        raise ValueError(f"`old_mean` must be a tensor of the shape of `mean` {tuple(mean.shape)}")
    dtype = _float_dtype(log_prob, old_log_prob, mean, old_mean, *([std] if isinstance(std, Tensor) else []))
    std = torch.as_tensor(std, dtype=dtype, device=log_prob.device)
    if std.ndim != 0 or not math.isfinite(float(std)) or float(std) <= 0:
        raise ValueError(f"`std` must be a finite scalar > 0, got {std!r}")
    old = old_log_prob.detach().to(dtype)
    drift = ((mean.to(dtype) - old_mean.detach().to(dtype)) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return old + std * (log_prob.to(dtype) - old) + drift / (2 * std)


# ---------------------------------------------------------------------------------------------------------------


def _group_index(group_ids: Tensor | Sequence[Hashable], n: int, device: torch.device) -> Tensor:
    if isinstance(group_ids, Tensor):
        if group_ids.ndim != 1 or group_ids.is_floating_point() or group_ids.is_complex():
            raise ValueError(
                f"`group_ids` must be a 1-D integer tensor, got dtype {group_ids.dtype}, ndim {group_ids.ndim}"
            )
        ids = group_ids.to(device=device, dtype=torch.long)
    elif isinstance(group_ids, Sequence) and not isinstance(group_ids, str):
        index: dict[Hashable, int] = {}
        ids = torch.tensor([index.setdefault(g, len(index)) for g in group_ids], dtype=torch.long, device=device)
    else:
        raise ValueError(f"`group_ids` must be a tensor or a sequence (e.g. prompts), got {type(group_ids).__name__}")
    if len(ids) != n:
        raise ValueError(f"`group_ids` must have one entry per reward row ({n}), got {len(ids)}")
    return ids


def _check_batch_vectors(**tensors: Tensor) -> None:
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] == 0 or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a non-empty 1-D float tensor [B]")
        if shape is not None and t.shape != shape:
            first = next(iter(tensors))
            raise ValueError(f"`{name}` must have the shape of `{first}` {tuple(shape)}, got {tuple(t.shape)}")
        shape = t.shape


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
