"""The rewards of a GRPO rollout: pointwise scores (Flow-GRPO) or win rates within each group (Pref-GRPO).

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) rewards each sample with a pointwise reward model's score. Pref-GRPO
(Wang et al. 2025, arXiv 2508.20751) rewards it with its win rate among the G samples of its prompt under a pairwise
judge, `r_i = 1 / (G - 1) sum_{j != i} P(x_i > x_j)` (`RewardModel.group`): each pair's two probabilities sum to 1,
so the rates lie in [0, 1] and average 0.5 over a group, which is checked here (a pointwise reward's `group` does not
give that; `BradleyTerryWinRate` turns one into a judge). An external pointwise reward, when given, is scored on the
same samples and logged, never trained on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from visalign.generators import Rollout
from visalign.rewards import RewardModel
from visalign.types import check_scores


@torch.no_grad()
def score_rollout(
    rollout: Rollout,
    reward: RewardModel,
    reward_mode: Literal["score", "win_rate"],
    external_reward: RewardModel | None,
    aspects: dict[str, list[Tensor]],
) -> Tensor:
    """Rewards `[N]` of a rollout's samples (validated: finite, one per sample; win rates: in [0, 1], mean 0.5 per
    group); appends the reward's aspects (`reward/<aspect>`) and the external reward (`external/<name>`,
    `external/<name>/<aspect>`) to the lists in `aspects`."""
    n = len(rollout)
    if reward_mode == "score":
        out = reward.score(rollout.images, rollout.prompts)
        rewards = check_scores(out.score, n, f"{reward.name} reward").float()
        for name, values in out.aspects.items():
            aspects[f"reward/{name}"].append(values.float())
    else:
        rewards = torch.empty(n, device=rollout.images.device)
        for group in rollout.group_ids.unique():
            rows = (rollout.group_ids == group).nonzero().flatten()
            rates = reward.group(rollout.images[rows], rollout.prompts[int(rows[0])]).score
            rates = check_scores(rates, len(rows), f"{reward.name} win rates").float()
            if not ((rates >= 0) & (rates <= 1)).all() or abs(float(rates.mean()) - 0.5) > 1e-3:
                raise ValueError(
                    f"{reward.name}.group() returned {rates.tolist()}, not win rates (in [0, 1], mean 0.5 in a "
                    "group): reward_mode='win_rate' needs a pairwise judge, or a pointwise reward with "
                    "`bradley_terry_temperature`"
                )
            rewards[rows] = rates
    if external_reward is not None:
        out = external_reward.score(rollout.images, rollout.prompts)
        name = external_reward.name
        aspects[f"external/{name}"].append(check_scores(out.score, n, f"{name} external reward").float())
        for aspect, values in out.aspects.items():
            aspects[f"external/{name}/{aspect}"].append(values.float())
    return rewards
