"""Heatmap helpers (latent-grid pooling, `1 - heatmap` loss weights) and gradient saliency."""

import pytest
import torch

from visalign.reward_models.heatmaps import (
    GradientSaliency,
    check_heatmap,
    gradient_saliency,
    loss_weight,
    mean_heatmap,
    to_latent_grid,
)
from visalign.rewards import RewardModel
from visalign.world.rewards import WorldDefectsReward, WorldVerifierReward


class LeftHalfBrightness(RewardModel):
    """A differentiable reward that only looks at the left half of the red channel."""

    name = "left-half"

    def _score(self, pixels, prompts):
        return pixels[:, 0, :, : pixels.shape[-1] // 2].mean(dim=(1, 2))


def test_to_latent_grid_pools_to_the_grid(generator):
    heatmap = torch.rand(2, 32, 48, generator=generator)
    pooled = to_latent_grid(heatmap, (8, 12))
    assert pooled.shape == (2, 8, 12) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[:, 0, 0], heatmap[:, :4, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled.mean(dim=(1, 2)), heatmap.mean(dim=(1, 2)))
    assert pooled.min() >= 0 and pooled.max() <= 1
    odd = to_latent_grid(heatmap, (5, 7))  # cells of uneven size stay within range
    assert odd.shape == (2, 5, 7) and odd.min() >= 0 and odd.max() <= 1


def test_loss_weight_is_one_minus_the_heatmap(generator):
    heatmap = torch.rand(3, 16, 16, generator=generator)
    weight = loss_weight(heatmap, (4, 4))
    assert weight.shape == (3, 1, 4, 4)
    torch.testing.assert_close(weight[:, 0], 1 - to_latent_grid(heatmap, (4, 4)))
    torch.testing.assert_close(loss_weight(heatmap), 1 - heatmap[:, None])
    per_element_loss = torch.ones(3, 4, 4, 4)  # [B, C, h, w] latents
    assert (per_element_loss * weight).shape == (3, 4, 4, 4)


def test_world_defects_map_feeds_the_helpers(pixels, prompts):
    out = WorldDefectsReward().score(pixels, prompts)
    heatmap = out.heatmaps["defects"]
    assert heatmap.shape == (2, 32, 32) and check_heatmap(heatmap) is heatmap
    weight = loss_weight(heatmap, (16, 16))
    assert weight.shape == (2, 1, 16, 16) and weight.min() >= 0 and weight.max() <= 1


def test_mean_heatmap(generator):
    maps = {"misalignment": torch.rand(2, 8, 8, generator=generator), "artifact": torch.zeros(2, 8, 8)}
    torch.testing.assert_close(mean_heatmap(maps, ["misalignment", "artifact"]), maps["misalignment"] / 2)
    with pytest.raises(ValueError, match="`heatmaps` lacks"):
        mean_heatmap(maps, ["misalignment", "plausibility"])
    with pytest.raises(ValueError, match="differ in shape"):
        mean_heatmap({**maps, "big": torch.zeros(2, 16, 16)}, ["misalignment", "big"])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 1, 8, 8), r"\[B, H, W\]"),
        (torch.ones(2, 8, 8, dtype=torch.long), "float"),
        (torch.full((2, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.full((2, 8, 8), float("nan")), "NaN"),
        ([[0.5]], r"\[B, H, W\]"),
    ],
)
def test_bad_heatmaps_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        to_latent_grid(bad, (4, 4))
    with pytest.raises(ValueError, match="`size`"):
        to_latent_grid(torch.rand(1, 8, 8), (4, 0))


def test_gradient_saliency_shows_where_the_reward_looks(generator):
    pixels = torch.rand(2, 3, 16, 16, generator=generator)
    saliency = gradient_saliency(LeftHalfBrightness(), pixels, ["a", "b"])
    assert saliency.shape == (2, 16, 16)
    torch.testing.assert_close(saliency[..., :8], torch.ones(2, 16, 8))
    torch.testing.assert_close(saliency[..., 8:], torch.zeros(2, 16, 8))
    smooth = gradient_saliency(
        WorldDefectsReward(), pixels, ["a red square"] * 2, samples=3, noise=0.05, generator=generator
    )
    assert smooth.shape == (2, 16, 16) and smooth.min() >= 0
    torch.testing.assert_close(smooth.amax(dim=(1, 2)), torch.ones(2))


def test_gradient_saliency_wrapper_keeps_the_score_and_its_graph(pixels, prompts):
    inner = WorldDefectsReward()
    wrapped = GradientSaliency(inner)
    x = pixels.clone().requires_grad_(True)
    out = wrapped.score(x, prompts)
    assert set(out.heatmaps) == {"defects", "saliency"} and wrapped.heatmap_names == ("defects", "saliency")
    torch.testing.assert_close(out.score, inner.score(pixels, prompts).score)
    out.score.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():  # saliency needs gradients even when the caller does not
        heat = wrapped.score(pixels, prompts).heatmaps["saliency"]
    assert heat.shape == (2, 32, 32) and heat.max() <= 1


def test_saliency_bad_inputs(pixels, prompts):
    with pytest.raises(ValueError, match="`reward`"):
        GradientSaliency(WorldVerifierReward())
    with pytest.raises(ValueError, match="`samples`"):
        gradient_saliency(WorldDefectsReward(), pixels, prompts, samples=0)
    with pytest.raises(ValueError, match="`noise`"):
        gradient_saliency(WorldDefectsReward(), pixels, prompts, samples=2)
    with pytest.raises(ValueError, match="`prompts`"):
        gradient_saliency(WorldDefectsReward(), pixels, prompts[:1])
