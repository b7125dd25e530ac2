"""The reward contract (`visalign.RewardModel`), checked on a tiny reward defined here: mean brightness."""

import math

import pytest
import torch

from visalign import RewardModel, RewardOutput, list_rewards, load_reward


class Brightness(RewardModel):
    """Mean pixel value; counts the images it sees."""

    name = "brightness"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.images_seen = 0
        self.calls = 0

    @classmethod
    def from_pretrained(cls, pretrained=None, *, dtype=None, **options) -> "Brightness":
        return cls(**options)

    def _score(self, pixels, prompts):
        self.images_seen += pixels.shape[0]
        self.calls += 1
        return RewardOutput(pixels.mean(dim=(1, 2, 3)), aspects={"red": pixels[:, 0].mean(dim=(1, 2))})


class Broken(RewardModel):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def _score(self, pixels, prompts):
        return self.output


def test_call_equals_score(pixels, prompts):
    model = Brightness()
    out = model(pixels, prompts)
    assert isinstance(out, RewardOutput) and out.score.shape == (2,) and out.score.dtype == torch.float32
    assert torch.equal(out.score, model.score(pixels, prompts).score)
    assert torch.allclose(out.score, pixels.mean(dim=(1, 2, 3)))
    assert out.aspects["red"].shape == (2,)


def test_score_is_differentiable(pixels, prompts):
    pixels = pixels.clone().requires_grad_()
    Brightness()(pixels, prompts).score.sum().backward()
    assert pixels.grad is not None and torch.allclose(pixels.grad, torch.full_like(pixels, 1 / (3 * 32 * 32)))


def test_compare_is_bradley_terry_with_one_pass_per_image(generator):
    a, b = torch.rand(3, 3, 8, 8, generator=generator), torch.rand(3, 3, 8, 8, generator=generator)
    model = Brightness(temperature=0.05)
    p = model.compare(a, b, ["x", "y", "z"])
    expected = [
        1 / (1 + math.exp(-(a[i].double().mean().item() - b[i].double().mean().item()) / 0.05)) for i in range(3)
    ]
    assert p.shape == (3,)
    assert torch.allclose(p.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert (model.images_seen, model.calls) == (6, 1)
    assert torch.allclose(model.compare(b, a, ["x", "y", "z"]), 1 - p, atol=1e-6)


def test_group_equals_score(pixels):
    model = Brightness()
    assert torch.equal(model.group(pixels, "a red square").score, model.score(pixels, ["a red square"] * 2).score)
    with pytest.raises(ValueError, match="`prompt`"):
        model.group(pixels, ["a red square", "a red square"])


BAD_INPUTS = {
    "out of [0, 1]": (lambda x: x * 3 - 1, None, "`pixels`"),
    "rank 3": (lambda x: x[0], ["a"], "`pixels`"),
    "rank 5 for an image reward": (lambda x: x[:, None], None, "`pixels`"),
    "1 channel": (lambda x: x[:, :1], None, "`pixels`"),
    "4 channels": (lambda x: torch.cat([x, x[:, :1]], dim=1), None, "`pixels`"),
    "NaN": (lambda x: x.masked_fill(x > 0.9, float("nan")), None, "`pixels`"),
    "empty batch": (lambda x: x[:0], [], "`pixels`"),
    "int dtype": (lambda x: (x * 255).to(torch.uint8), None, "`pixels`"),
    "prompt count": (lambda x: x, ["one prompt"], "`prompts`"),
    "single string": (lambda x: x, "a red square", "`prompts`"),
    "not strings": (lambda x: x, [1, 2], "`prompts`"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(case, pixels, prompts):
    transform, bad_prompts, argument = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=argument):
        Brightness().score(transform(pixels), prompts if bad_prompts is None else bad_prompts)


@pytest.mark.parametrize(
    "output",
    [
        torch.tensor([0.5, float("nan")]),
        torch.zeros(3),
        torch.zeros(2, 1),
        RewardOutput(torch.zeros(2), {"a": torch.ones(1)}),
    ],
    ids=["nan", "batch 3", "rank 2", "aspect batch"],
)
def test_bad_reward_output_raises(output, pixels, prompts):
    with pytest.raises(ValueError, match="score|aspect"):
        Broken(output).score(pixels, prompts)


def test_unknown_reward_lists_registered_ones():
    with pytest.raises(ValueError) as info:
        load_reward("no-such-reward")
    assert "no-such-reward" in str(info.value)
    assert all(name in str(info.value) for name in list_rewards())


def test_module_class_fallback():
    model = load_reward(f"{Brightness.__module__}:Brightness", temperature=0.5)
    assert isinstance(model, Brightness) and model.temperature == 0.5 and not model.training
    with pytest.raises(ValueError, match="module:ClassName"):
        load_reward("visalign.rewards:")
