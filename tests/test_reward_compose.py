"""Composite rewards on hand-computed examples: calibrations, `weighted_raw`, `weighted_advantage`."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from visalign import RewardModel
from visalign.reward_models.compose import Affine, CompositeReward, PromptZScore, RewardPart, Scale, prompt_zscore

PROMPTS = ["p", "p", "q", "q"]
RED = [0.2, 0.6, 0.5, 0.5]
GREEN = [0.1, 0.3, 0.9, 0.5]


class ChannelMean(RewardModel):
    """The mean of one color channel: a differentiable reward whose value is known by construction."""

    def __init__(self, channel: int, name: str, differentiable: bool = True) -> None:
        super().__init__()
        self.channel, self.name, self.differentiable = channel, name, differentiable

    def _score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        score = pixels[:, self.channel].mean(dim=(1, 2))
        return score if self.differentiable else score.detach()


def images() -> Tensor:
    pixels = torch.zeros(4, 3, 8, 8)
    pixels[:, 0] = torch.tensor(RED).view(4, 1, 1)
    pixels[:, 1] = torch.tensor(GREEN).view(4, 1, 1)
    return pixels


def close(actual: Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_calibrations() -> None:
    red = torch.tensor(RED)
    close(Affine(shift=0.5, scale=0.25)(red, PROMPTS), [-1.2, 0.4, 0.0, 0.0])
    close(Scale(0.5)(red, PROMPTS), [0.4, 1.2, 1.0, 1.0])
    # p: mean 0.4, population std 0.2; q: constant, z = 0
    close(PromptZScore()(red, PROMPTS), [-1.0, 1.0, 0.0, 0.0])
    close(prompt_zscore(torch.tensor(GREEN), PROMPTS), [-1.0, 1.0, 1.0, -1.0])


def test_weighted_raw() -> None:
    composite = CompositeReward(
        [RewardPart(ChannelMean(0, "red"), 2.0), RewardPart(ChannelMean(1, "green"), 1.0, [Scale(0.5)])]
    )
    out = composite(images(), PROMPTS)
    close(out.score, [0.6, 1.8, 2.8, 2.0])  # 2 * red + green / 0.5
    close(out.aspects["red"], RED)
    close(out.aspects["green"], GREEN)
    assert composite.aspect_names == ("red", "green")


def test_calibrations_apply_in_order() -> None:
    part = RewardPart(ChannelMean(0, "red"), 1.0, [Affine(shift=0.5), Scale(0.25)])
    close(CompositeReward([part])(images(), PROMPTS).score, [-1.2, 0.4, 0.0, 0.0])


def test_weighted_advantage() -> None:
    composite = CompositeReward(
        [RewardPart(ChannelMean(0, "red"), 1.0), RewardPart(ChannelMean(1, "green"), 0.5)], mode="weighted_advantage"
    )
    out = composite(images(), PROMPTS)
    close(out.score, [-1.5, 1.5, 0.5, -0.5])  # z_red + 0.5 * z_green, each within its prompt
    close(composite.combine(out.aspects, PROMPTS), [-1.5, 1.5, 0.5, -0.5])


def test_modes_differ_when_one_reward_has_a_larger_spread() -> None:
    """Raw mixing lets the wide reward dominate; advantage mixing weighs both equally."""
    wide = RewardPart(ChannelMean(0, "red"), 1.0, [Scale(0.01)])
    parts = [wide, RewardPart(ChannelMean(1, "green"), 1.0)]
    raw = CompositeReward(parts)(images(), PROMPTS).score
    advantage = CompositeReward(parts, mode="weighted_advantage")(images(), PROMPTS).score
    assert raw[2] < raw[1] and advantage[2] > advantage[0]


@pytest.mark.parametrize("mode", ["weighted_raw", "weighted_advantage"])
def test_gradients_reach_the_pixels(mode: str) -> None:
    pixels = images().requires_grad_(True)
    composite = CompositeReward({"red": ChannelMean(0, "red"), "green": ChannelMean(1, "green")}, mode=mode)
    (composite(pixels, PROMPTS).score * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert composite.differentiable and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_non_differentiable_part() -> None:
    composite = CompositeReward({"red": ChannelMean(0, "red"), "judge": ChannelMean(1, "judge", False)})
    assert not composite.differentiable


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CompositeReward([]), "`parts` is empty"),
        (lambda: CompositeReward({"r": ChannelMean(0, "r")}, mode="sum"), "`mode`"),
        (lambda: CompositeReward([RewardPart(ChannelMean(0, "r")), RewardPart(ChannelMean(1, "r"))]), "distinct"),
        (lambda: CompositeReward([RewardPart(torch.nn.Linear(1, 1), name="x")]), "part 'x': `reward`"),
        (lambda: CompositeReward([RewardPart(ChannelMean(0, "r"), float("nan"))]), "part 'r': `weight`"),
        (lambda: Scale(0.0), "`scale` must be positive"),
        (lambda: Affine(1.0, -1.0), "`scale` must be positive"),
    ],
)
def test_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_combine_needs_every_part() -> None:
    composite = CompositeReward({"red": ChannelMean(0, "red"), "green": ChannelMean(1, "green")})
    with pytest.raises(ValueError, match=r"`part_scores` lacks \['green'\]"):
        composite.combine({"red": torch.ones(4)}, PROMPTS)
