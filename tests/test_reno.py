"""ReNO: the noise-norm regularizer, the optimization loop on real tiny pipelines, best-of-N, errors, the CLI."""

import json
import math

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from reward_helpers import tiny_clip
from torch import Tensor
from transformers import CLIPConfig, CLIPImageProcessor

from visalign import cli
from visalign.pipelines.reno import (
    ReNO,
    ReNOConfig,
    clip_grad_norm_per_sample_,
    noise_norm_regularizer,
)
from visalign.reward_models.clip import CLIPScorer
from visalign.reward_models.compose import CompositeReward, RewardPart
from visalign.reward_models.preprocess import ImageTransform
from visalign.rewards import RewardModel
from visalign.testing import clip_tokenizer, save_tiny, tiny_pipeline
from visalign.world.rewards import WorldVerifierReward

PROMPTS = ["a red square", "two blue circles"]


class Redness(RewardModel):
    """A synthetic differentiable reward: mean red minus mean green and blue."""

    name = "redness"

    def _score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        return pixels[:, 0].mean(dim=(1, 2)) - pixels[:, 1:].mean(dim=(1, 2, 3))


class DetachedRedness(Redness):
    """Claims to be differentiable but cuts the graph."""

    name = "detached"

    def _score(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        return super()._score(pixels, prompts).detach()


@pytest.fixture(scope="module")
def sd() -> StableDiffusionPipeline:
    return tiny_pipeline("sd")


def config(**overrides) -> ReNOConfig:
    return ReNOConfig(**{"num_iterations": 4, "height": 32, "width": 32, **overrides})


def rewards_of(out) -> Tensor:
    """`[calls, B]` weighted rewards of the history."""
    return torch.tensor([h["reward"] for h in out.history])


# --- the regularizer ----------------------------------------------------------------------------------------------


def test_regularizer_value_and_gradient_match_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    d = 4 * 16 * 16
    z64 = z.double()
    norm = z64.flatten(1).norm(dim=1)
    expected = 0.5 * norm**2 - (d - 1) * torch.log(norm)
    expected_grad = z64 * (1 - (d - 1) / norm**2).view(3, 1, 1, 1)

    z32 = z.clone().requires_grad_(True)
    value = noise_norm_regularizer(z32)
    value.sum().backward()
    assert value.dtype == torch.float32 and value.shape == (3,)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(z32.grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    # fp16 noise is regularized in float32 (||z||^2 ~ 1e3 and (d - 1) log ||z|| ~ 3.5e3 overflow nothing)
    torch.testing.assert_close(noise_norm_regularizer(z.half()).double(), expected, rtol=1e-3, atol=0)
    assert noise_norm_regularizer(z64).dtype == torch.float64


def test_regularizer_minimum_is_on_the_sphere_of_radius_sqrt_d_minus_1():
    d = 4 * 8 * 8
    u = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    radii = torch.linspace(0.5, 1.5, 2001, dtype=torch.float64) * math.sqrt(d - 1)
    values = torch.cat([noise_norm_regularizer(r * u) for r in radii])
    assert radii[values.argmin()] == pytest.approx(math.sqrt(d - 1), rel=1e-3)
    z = (math.sqrt(d - 1) * u).requires_grad_(True)
    noise_norm_regularizer(z).sum().backward()
    assert z.grad.norm() < 1e-10


def test_regularizer_errors():
    with pytest.raises(ValueError, match="`z` must be a float tensor of shape"):
        noise_norm_regularizer(torch.randn(16))
    with pytest.raises(ValueError, match="`z` needs at least 2 elements"):
        noise_norm_regularizer(torch.randn(3, 1))


def test_per_sample_gradient_clip_is_torch_clip_on_each_sample():
    scales = torch.tensor([0.001, 1.0, 5.0]).view(3, 1, 1)
    grad = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)) * scales
    expected = [row.clone() for row in grad]
    norms = clip_grad_norm_per_sample_(grad, 0.1)
    for i, row in enumerate(expected):
        p = torch.nn.Parameter(torch.zeros_like(row))
        p.grad = row.clone()
        assert torch.nn.utils.clip_grad_norm_([p], 0.1) == pytest.approx(float(norms[i]), rel=1e-6)
        torch.testing.assert_close(grad[i], p.grad)
    assert grad[0].norm() == pytest.approx(float(norms[0]), rel=1e-6)  # already small: unchanged
    assert grad[1:].flatten(1).norm(dim=1).tolist() == pytest.approx([0.1, 0.1], rel=1e-4)


# --- the loop ----------------------------------------------------------------------------------------------------


def test_reward_rises_with_a_synthetic_differentiable_reward(sd):
    gains = []
    for seed in range(3):
        out = ReNO(sd, Redness(), config(num_iterations=6))(PROMPTS, seed=10 * seed)
        r = rewards_of(out)
        assert r.shape == (6, 2) and out.generator_calls == 6
        steps = r[1:] - r[:-1]
        assert (steps > 0).float().mean() >= 0.8  # rises (almost) every iteration
        gains.append(r[-1] - r[0])
        torch.testing.assert_close(out.initial_reward, r[0])
        torch.testing.assert_close(out.reward, r.max(dim=0).values)
        assert out.best_iteration == r.argmax(dim=0).tolist()
    assert torch.stack(gains).mean() > 0


def test_result_is_the_best_iterate_and_its_noise_renders_it(sd):
    reno = ReNO(sd, Redness(), config())
    out = reno(PROMPTS, seed=3)
    assert out.images.shape == (2, 3, 32, 32) and out.noise.shape == (2, 4, 16, 16)
    assert out.noise.dtype == torch.float32 and not out.noise.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(reno.render(out.noise, PROMPTS, [3, 4]), out.images)
        torch.testing.assert_close(reno.render(out.initial_noise, PROMPTS, [3, 4]), out.initial_images)
        base = sd(PROMPTS, latents=out.initial_noise, num_inference_steps=1, guidance_scale=0.0, output_type="pt")
    torch.testing.assert_close(base.images, out.initial_images)  # iteration 0 is the base model's sample
    torch.testing.assert_close(out.initial_noise, reno.initial_noise([3, 4]))
    entry = out.history[0]
    assert set(entry) == {"iteration", "reward", "rewards", "regularizer", "total", "noise_norm"}
    assert list(entry["rewards"]) == ["redness"]
    expected_total = -torch.tensor(entry["reward"]) + 0.01 * torch.tensor(entry["regularizer"])
    torch.testing.assert_close(torch.tensor(entry["total"]), expected_total)


def test_deterministic_under_a_seed_and_batch_equals_items(sd):
    reno = ReNO(sd, Redness(), config(num_iterations=3))
    a, b, c = reno(PROMPTS, seed=7), reno(PROMPTS, seed=7), reno(PROMPTS, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.noise, b.noise) and a.history == b.history
    assert not torch.equal(a.noise, c.noise)
    for i, prompt in enumerate(PROMPTS):
        single = reno([prompt], seed=7 + i)
        torch.testing.assert_close(single.noise[0], a.noise[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(single.images[0], a.images[i], rtol=1e-4, atol=1e-5)


def test_checkpointing_gives_the_same_result_and_the_pipeline_is_restored(sd):
    modules = {name: m for name, m in sd.components.items() if isinstance(m, torch.nn.Module)}
    flags = {name: [p.requires_grad for p in m.parameters()] for name, m in modules.items()}
    with_ckpt = ReNO(sd, Redness(), config(num_iterations=3, gradient_checkpointing=True))(PROMPTS)
    without = ReNO(sd, Redness(), config(num_iterations=3, gradient_checkpointing=False))(PROMPTS)
    torch.testing.assert_close(with_ckpt.noise, without.noise)
    assert not sd.unet.is_gradient_checkpointing and not sd.vae.is_gradient_checkpointing
    assert {name: [p.requires_grad for p in m.parameters()] for name, m in modules.items()} == flags


@pytest.mark.parametrize(
    ("family", "steps", "shape"),
    [
        ("sd3", 1, (2, 4, 32, 32)),
        ("flux", 2, (2, 256, 4)),
        ("qwen-image", 2, (2, 16, 16)),
        ("sdxl", 2, (2, 4, 16, 16)),
    ],
)
def test_other_families(family, steps, shape):
    pipe = tiny_pipeline(family)
    reno = ReNO(pipe, Redness(), config(num_iterations=3, num_inference_steps=steps))
    out = reno(PROMPTS)
    assert out.noise.shape == shape  # FLUX: 2x2-packed latents [B, L, 4C]
    assert out.images.shape == (2, 3, 32, 32)
    r = rewards_of(out)
    assert (r[-1] > r[0]).all()
    baseline = reno.best_of_n(PROMPTS, 3)
    assert baseline.rewards.shape == (3, 2) and baseline.generator_calls == 3
    torch.testing.assert_close(baseline.rewards[0], out.initial_reward)  # candidate 0 is ReNO's start


def test_best_of_n_at_equal_calls(sd):
    reno = ReNO(sd, Redness(), config(num_iterations=5))
    out = reno(PROMPTS, seed=1)
    baseline = reno.best_of_n(PROMPTS, seed=1)
    assert baseline.generator_calls == out.generator_calls == 5
    torch.testing.assert_close(baseline.rewards[0], out.initial_reward)
    torch.testing.assert_close(baseline.reward, baseline.rewards.max(dim=0).values)
    assert baseline.best_index == baseline.rewards.argmax(dim=0).tolist()
    with torch.no_grad():
        torch.testing.assert_close(reno.render(baseline.noise, PROMPTS, [1, 2]), baseline.images)


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 0.05), ("lbfgs", 1.0)])
def test_other_optimizers(sd, optimizer, lr):
    out = ReNO(sd, Redness(), config(num_iterations=3, optimizer=optimizer, learning_rate=lr))(PROMPTS[:1])
    r = rewards_of(out)
    assert r.max() > r[0]
    if optimizer == "lbfgs":  # several evaluations per step, each a generator call
        assert out.generator_calls > 3 and out.history[-1]["iteration"] == 2


def test_weighted_rewards_and_shared_preprocessing(sd, monkeypatch):
    calls = []
    original = ImageTransform.__call__

    def counting(self, pixels):
        calls.append(self)
        return original(self, pixels)

    monkeypatch.setattr(ImageTransform, "__call__", counting)
    clip_a = CLIPScorer(tiny_clip(0), clip_tokenizer(), name="clip-a").eval()
    clip_b = CLIPScorer(tiny_clip(1), clip_tokenizer(), name="clip-b").eval()
    parts = [RewardPart(clip_a, 2.0), RewardPart(clip_b, 0.5), RewardPart(Redness(), 3.0)]
    out = ReNO(sd, parts, config(num_iterations=2))(PROMPTS)
    assert len(calls) == 2  # one preprocessing per generator call, shared by both CLIP rewards
    entry = out.history[0]
    parts_scores = {k: torch.tensor(v) for k, v in entry["rewards"].items()}
    expected = 2.0 * parts_scores["clip-a"] + 0.5 * parts_scores["clip-b"] + 3.0 * parts_scores["redness"]
    torch.testing.assert_close(torch.tensor(entry["reward"]), expected)
    calls.clear()
    with torch.no_grad():  # the shared pass scores exactly as each reward alone
        composite = CompositeReward(parts)(out.images, PROMPTS)
        torch.testing.assert_close(composite.aspects["clip-a"], clip_a(out.images, PROMPTS).score)
        torch.testing.assert_close(composite.aspects["clip-b"], clip_b(out.images, PROMPTS).score)


# --- errors ------------------------------------------------------------------------------------------------------


def test_non_differentiable_rewards_are_refused(sd):
    with pytest.raises(ValueError, match=r"not differentiable: world-verifier \(WorldVerifierReward\)"):
        ReNO(sd, [RewardPart(Redness()), RewardPart(WorldVerifierReward())])
    with pytest.raises(ValueError, match=r"\['detached'\] returned scores without a gradient"):
        ReNO(sd, DetachedRedness(), config())(PROMPTS)
    composite = CompositeReward([RewardPart(Redness())], mode="weighted_advantage")
    with pytest.raises(ValueError, match="'weighted_raw' mode"):
        ReNO(sd, composite)
    with pytest.raises(ValueError, match="`rewards` must be a RewardModel"):
        ReNO(sd, 3.0)


def test_pipelines_that_cannot_be_differentiated_are_refused(sd):
    with pytest.raises(ValueError, match="`pipe` must be a diffusers DiffusionPipeline"):
        ReNO(sd.unet, Redness())
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(4, 8),
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match=r"DDPMPipeline\) cannot be differentiated by ReNO: its __call__ takes no"):
        ReNO(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), Redness())
    with pytest.raises(ValueError, match="WanPipeline makes videos"):
        ReNO(tiny_pipeline("wan"), Redness())
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=layers, vision_config=layers | dict(image_size=32, patch_size=8), projection_dim=32)
    ).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    checked = StableDiffusionPipeline(
        **{**sd.components, "safety_checker": checker, "feature_extractor": extractor, "requires_safety_checker": True}
    )
    checked.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"its __call__ leaves torch .*safety_checker=None"):
        ReNO(checked, Redness(), config())(PROMPTS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": "rmsprop"}, "`optimizer` must be one of"),
        ({"learning_rate": 0}, "`learning_rate` must be a positive number"),
        ({"max_grad_norm": -1.0}, "`max_grad_norm` must be a positive number"),
        ({"num_iterations": 0}, "`num_iterations` must be a positive int"),
        ({"reg_weight": -0.1}, "`reg_weight` must be a number >= 0"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\)"),
        ({"momentum": 0.0}, "`nesterov` needs `momentum` > 0"),
        ({"height": 31.5}, "`height` must be a positive int or None"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ReNOConfig(**overrides)


def test_call_errors(sd):
    with pytest.raises(ValueError, match="`pipeline_kwargs` must not set"):
        ReNO(sd, Redness(), config(), {"latents": None})
    with pytest.raises(ValueError, match="multiples of 2 for sd, got 33x32"):
        ReNO(sd, Redness(), config(height=33))(PROMPTS)
    reno = ReNO(sd, Redness(), config())
    with pytest.raises(ValueError, match="`seed` must be an int or a list of 2 ints"):
        reno(PROMPTS, seed=[1])
    with pytest.raises(ValueError, match="`prompts` must be a list of strings"):
        reno("a red square")
    with pytest.raises(ValueError, match="`num_candidates` must be a positive int"):
        reno.best_of_n(PROMPTS, 0)


# --- the command -------------------------------------------------------------------------------------------------


def test_cli_writes_image_comparison_history(tmp_path, capsys):
    model = save_tiny(tiny_pipeline("sd"), tmp_path / "sd")
    out = tmp_path / "out"
    argv = [
        "reno",
        "--model",
        str(model),
        "--prompt",
        "a red square",
        "--reward",
        "world-defects=2",
        "--out",
        str(out),
    ]
    argv += ["--num-iterations", "3", "--height", "32", "--width", "32", "--best-of-n", "--no-gradient-checkpointing"]
    assert cli.main(argv) == 0
    for name in ("image.png", "initial.png", "best_of_n.png", "comparison.png", "history.png", "reno.json"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "reno.json").read_text())
    assert len(result["history"]) == result["generator_calls"] == 3
    assert result["rewards"] == {"world-defects": {"weight": 2.0}}
    assert result["config"]["gradient_checkpointing"] is False and result["config"]["num_iterations"] == 3
    assert result["seeds"] == {"seed": result["seed"]} and result["inputs"]["model"]["path"] == str(model)
    assert len(result["inputs"]["model"]["sha256"]) == 64
    assert result["versions"]["torch"] and result["command"]
    assert result["reward"] >= result["initial_reward"]
    assert "reward" in capsys.readouterr().out
