"""Tests of the sampler steps against diffusers' schedulers and independent float64 formulas."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from visalign.sampling import check_sde_window, ddim_step, noise_aware_weights, sde_step, sde_window, step_std

SHAPE = (3, 4, 6, 6)
STOCHASTIC = ("sde", "cps", "dance")


def flow_sigmas(num_steps=10, shift=3.0):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas  # float32, starts at 1.0, ends at 0.0


def latents(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)


def reference_mean_std(kind, v, x, sigmas, i, a):
    """Each reference's own algebra, in float64 numpy (Flow-GRPO sde/cps, DanceGRPO flux_step)."""
    v, x = v.double().numpy(), x.double().numpy()
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    dt = s_next - s
    if kind == "sde":
        g = a * math.sqrt(s / (1 - (float(sigmas[1]) if s == 1 else s)))
        mean = x * (1 + g**2 / (2 * s) * dt) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
        return mean, g * math.sqrt(-dt)
    if kind == "cps":
        std = s_next * math.sin(a * math.pi / 2)
        mean = (x - s * v) * (1 - s_next) + (x + v * (1 - s)) * math.sqrt(s_next**2 - std**2)
        return mean, std
    score = -(x - (x - s * v) * (1 - s)) / s**2  # dance
    return x + dt * v - 0.5 * a**2 * score * dt, a * math.sqrt(-dt)


def gaussian_log_prob_mean(y, mean, std):
    y = np.asarray(y, dtype=np.float64)
    density = -((y - mean) ** 2) / (2 * std**2) - np.log(std) - 0.5 * np.log(2 * np.pi)
    return density.reshape(len(y), -1).mean(axis=1)


@pytest.mark.parametrize("kind", ["sde", "cps", "dance", "ode"])
def test_noise_level_zero_is_the_diffusers_euler_step_exactly(kind):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    ours, theirs = latents()[1], latents()[1]
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        out = sde_step(v, ours, scheduler.sigmas, i, 0.0, kind=kind)
        theirs = scheduler.step(v, t, theirs).prev_sample
        assert torch.equal(out.prev_sample, theirs)
        assert torch.equal(out.mean, out.prev_sample)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0])) and float(out.std) == 0
        ours = out.prev_sample


def test_ode_kind_ignores_the_noise_level():
    v, x = latents()
    sigmas = flow_sigmas()
    out = sde_step(v, x, sigmas, 3, 0.9, kind="ode")
    assert torch.equal(out.prev_sample, x + (sigmas[4] - sigmas[3]) * v)


def test_sde_first_step_std_is_the_noise_level_thanks_to_the_sigma_one_guard():
    # At sigma = 1 the unguarded g = a sqrt(sigma / (1 - sigma)) is infinite. With sigmas[1] in the denominator,
    # g = a / sqrt(1 - sigmas[1]) and std = g sqrt(1 - sigmas[1]) = a exactly: the first step injects noise a.
    sigmas = flow_sigmas()
    assert float(sigmas[0]) == 1.0
    for a in (0.3, 0.7, 1.2):
        assert float(step_std(sigmas.double(), 0, a)) == pytest.approx(a, abs=1e-15)
        assert float(step_std(sigmas, 0, a)) == pytest.approx(a, rel=1e-6)
    v, x = torch.randn(4, 64, 64, dtype=torch.float64), torch.randn(4, 64, 64, dtype=torch.float64)
    out = sde_step(v, x, sigmas, 0, 0.7, generator=torch.Generator().manual_seed(0))
    assert float(out.std) == pytest.approx(0.7, abs=1e-15)
    assert float((out.prev_sample - out.mean).std()) == pytest.approx(0.7, rel=0.02)  # 16k draws


def test_step_std_reproduces_the_tempflow_sd35_fixture():
    # tempflow_prdp.md 1.2: SD3.5-M, shift 3, 10 steps, a = 0.7, trained steps 0..8.
    sigmas = flow_sigmas()
    stds = torch.stack([step_std(sigmas, k, 0.7) for k in range(10)])
    expected = [0.700, 0.743, 0.536, 0.446, 0.392, 0.353, 0.319, 0.282, 0.225, 0.006]
    assert stds.tolist() == pytest.approx(expected, abs=6e-4)
    mask = torch.arange(10) < 9
    weights = noise_aware_weights(stds, mask)
    expected_w = [1.577, 1.673, 1.208, 1.004, 0.882, 0.795, 0.719, 0.635, 0.508, 0.0]
    assert weights.tolist() == pytest.approx(expected_w, abs=6e-4)
    assert float(weights[mask].mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(1 / stds[:9].mean()) == pytest.approx(2.2522, abs=1e-4)  # the authors' hard-coded 2.25


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("index", [0, 4, 9])
def test_log_prob_of_a_sample_is_the_float64_gaussian_log_density_mean(kind, index):
    sigmas = flow_sigmas()
    a = 0.7
    v, x = latents(torch.float64, seed=index)
    out = sde_step(v, x, sigmas, index, a, kind=kind, generator=torch.Generator().manual_seed(1))
    mean, std = reference_mean_std(kind, v, x, sigmas, index, a)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    assert float(out.std) == pytest.approx(std, rel=1e-12, abs=1e-15)
    if std == 0:  # CPS's last step (sigma' = 0) is deterministic
        assert kind == "cps" and index == 9
        assert torch.equal(out.prev_sample, out.mean) and torch.equal(out.log_prob, torch.zeros(SHAPE[0]).double())
        np.testing.assert_allclose(out.mean.numpy(), (x - sigmas[9].double() * v).numpy(), rtol=1e-12)
        return
    np.testing.assert_allclose(out.log_prob.numpy(), gaussian_log_prob_mean(out.prev_sample, mean, std), rtol=1e-10)

    # float32 inputs follow the float64 truth closely
    out32 = sde_step(v.float(), x.float(), sigmas, index, a, kind=kind, prev_sample=out.prev_sample.float())
    assert out32.log_prob.dtype == torch.float32
    np.testing.assert_allclose(out32.mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    expected32 = gaussian_log_prob_mean(out.prev_sample.float().double(), mean, std)
    np.testing.assert_allclose(out32.log_prob.double().numpy(), expected32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_evaluating_a_stored_sample_gives_the_sampling_log_prob(kind):
    sigmas = flow_sigmas()
    v, x = latents()
    sampled = sde_step(v, x, sigmas, 2, 0.8, kind=kind, generator=torch.Generator().manual_seed(3))
    evaluated = sde_step(v, x, sigmas, 2, 0.8, kind=kind, prev_sample=sampled.prev_sample)
    assert torch.equal(evaluated.log_prob, sampled.log_prob)
    assert torch.equal(evaluated.mean, sampled.mean)
    assert torch.equal(evaluated.prev_sample, sampled.prev_sample)
    again = sde_step(v, x, sigmas, 2, 0.8, kind=kind, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.prev_sample, sampled.prev_sample)


def test_reduced_precision_inputs_are_computed_in_float32():
    sigmas = flow_sigmas()
    v, x = latents()
    stored = sde_step(v, x, sigmas, 1, 0.7, generator=torch.Generator().manual_seed(0)).prev_sample
    for dtype in (torch.bfloat16, torch.float16):
        out = sde_step(v.to(dtype), x.to(dtype), sigmas, 1, 0.7, prev_sample=stored.to(dtype))
        reference = sde_step(
            v.to(dtype).float(), x.to(dtype).float(), sigmas, 1, 0.7, prev_sample=stored.to(dtype).float()
        )
        assert out.log_prob.dtype == out.mean.dtype == out.prev_sample.dtype == torch.float32
        assert torch.equal(out.log_prob, reference.log_prob)


def test_log_prob_is_differentiable_in_the_velocity():
    sigmas = flow_sigmas()
    v, x = latents()
    stored = sde_step(v, x, sigmas, 2, 0.7, generator=torch.Generator().manual_seed(0)).prev_sample
    v = v.clone().requires_grad_(True)
    sde_step(v, x, sigmas, 2, 0.7, prev_sample=stored).log_prob.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_packed_latents_and_generator_lists_work():
    sigmas = flow_sigmas()
    v, x = torch.randn(2, 16, 8), torch.randn(2, 16, 8)  # FLUX-style packed [B, L, D]
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    out = sde_step(torch.stack([v[0], v[0]]), torch.stack([x[0], x[0]]), sigmas, 1, 0.9, generator=gens)
    assert out.log_prob.shape == (2,) and torch.equal(out.prev_sample[0], out.prev_sample[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"velocity": torch.randn(3, 4, 6, 5)}, "velocity"),
        ({"sample": torch.randn(3)}, "sample"),
        ({"prev_sample": torch.randn(2, 4, 6, 6)}, "prev_sample"),
        ({"velocity": torch.ones(SHAPE, dtype=torch.long)}, "velocity"),
        ({"index": 10}, "index"),
        ({"index": -1}, "index"),
        ({"index": 1.0}, "index"),
        ({"noise_level": -0.1}, "noise_level"),
        ({"noise_level": float("nan")}, "noise_level"),
        ({"noise_level": 1.5, "kind": "cps"}, "noise_level"),
        ({"kind": "euler"}, "kind"),
        ({"sigmas": torch.ones(2, 11)}, "sigmas"),
        ({"sigmas": torch.tensor([1.0, 0.5, 0.5, 0.0]), "index": 1}, "sigmas"),
        ({"sigmas": torch.tensor([2.0, 1.0, 0.0])}, "sigmas"),
    ],
)
def test_sde_step_rejects_bad_inputs(kwargs, match):
    v, x = latents()
    args = {"velocity": v, "sample": x, "sigmas": flow_sigmas(), "index": 0, "noise_level": 0.7}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sde_step(**args)


def ddim(prediction_type="epsilon"):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(8)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_zero_is_diffusers_ddim_step_exactly(prediction_type):
    scheduler = ddim(prediction_type)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ours = theirs = latents()[1]
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        out = ddim_step(
            eps,
            ours,
            t,
            t - stride,
            scheduler.alphas_cumprod,
            0.0,
            prediction_type=prediction_type,
            final_alpha_cumprod=scheduler.final_alpha_cumprod,
        )
        theirs = scheduler.step(eps, t, theirs, eta=0.0).prev_sample
        assert torch.equal(out.prev_sample, theirs)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        ours = out.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_log_prob_is_the_float64_gaussian_log_density_mean(prediction_type):
    acp = ddim().alphas_cumprod.double()
    t, t_prev, eta = 601, 476, 1.0
    model_out, x = latents(torch.float64)
    out = ddim_step(
        model_out, x, t, t_prev, acp, eta, generator=torch.Generator().manual_seed(0), prediction_type=prediction_type
    )
    a, a_prev = float(acp[t]), float(acp[t_prev])
    m, xn = model_out.numpy(), x.numpy()
    if prediction_type == "epsilon":
        x0, eps = (xn - math.sqrt(1 - a) * m) / math.sqrt(a), m
    else:
        x0, eps = math.sqrt(a) * xn - math.sqrt(1 - a) * m, math.sqrt(a) * m + math.sqrt(1 - a) * xn
    std = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    assert float(out.std) == pytest.approx(std, rel=1e-12)
    np.testing.assert_allclose(out.log_prob.numpy(), gaussian_log_prob_mean(out.prev_sample, mean, std), rtol=1e-10)
    evaluated = ddim_step(
        model_out, x, t, t_prev, acp, eta, prev_sample=out.prev_sample, prediction_type=prediction_type
    )
    assert torch.equal(evaluated.log_prob, out.log_prob)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta": -0.5}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"timestep": 1000}, "timestep"),
        ({"prev_timestep": 601}, "prev_timestep"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"alphas_cumprod": torch.ones(10, 10)}, "alphas_cumprod"),
        ({"noise_pred": torch.randn(3, 4)}, "noise_pred"),
    ],
)
def test_ddim_step_rejects_bad_inputs(kwargs, match):
    eps, x = latents()
    args = {"noise_pred": eps, "sample": x, "timestep": 601, "prev_timestep": 476, "eta": 1.0}
    args["alphas_cumprod"] = ddim().alphas_cumprod
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ddim_step(**args)


def test_noise_aware_weights_are_proportional_to_std_with_mean_one_on_trained_steps():
    stds = torch.tensor([0.9, 0.6, 0.3, 0.2, 0.0], dtype=torch.float64)
    mask = torch.tensor([False, True, True, True, False])
    weights = noise_aware_weights(stds, mask)
    assert weights.tolist() == pytest.approx([0.0, 0.6 / (1.1 / 3), 0.3 / (1.1 / 3), 0.2 / (1.1 / 3), 0.0], rel=1e-12)
    assert float(weights[mask].mean()) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="trained_mask"):
        noise_aware_weights(stds, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="trained_mask"):
        noise_aware_weights(stds, mask[:4])
    with pytest.raises(ValueError, match="stds"):
        noise_aware_weights(-stds, mask)
    with pytest.raises(ValueError, match="stds"):
        noise_aware_weights(stds, torch.tensor([True, False, False, False, True]).logical_and(stds == 0))


def test_sde_window_places_consecutive_steps_uniformly_within_its_range():
    assert sde_window(0, (0, 5), torch.Generator().manual_seed(0)) is None  # 0: every step noisy
    starts = []
    for seed in range(200):
        window = sde_window(2, (1, 6), torch.Generator().manual_seed(seed))
        assert window == list(range(window[0], window[0] + 2)) and 1 <= window[0] and window[-1] < 6
        starts.append(window[0])
    assert sorted(set(starts)) == [1, 2, 3, 4]  # every placement of 2 steps in [1, 6) occurs
    assert sde_window(1, (0, 1), torch.Generator().manual_seed(3)) == [0]


@pytest.mark.parametrize(
    "size, window_range, match",
    [(-1, (0, 4), "`sde_window_size` must be >= 0"), (2, (3, 4), r"\[3, 4\)"), (1, (0, 10), r"\[0, 9\)")],
)
def test_sde_windows_that_do_not_fit_the_trainable_steps_raise(size, window_range, match):
    check_sde_window(0, (5, 2), 10)  # no window: the range is unused
    check_sde_window(1, (8, 9), 10)
    with pytest.raises(ValueError, match=match):
        check_sde_window(size, window_range, 10)
