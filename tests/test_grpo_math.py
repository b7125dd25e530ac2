"""Tests of the GRPO math (advantages, win rates, clipped surrogate, KL, GRPO-Guard) on hand and float64 cases."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from visalign.pipelines.grpo_loss import group_advantages, policy_loss, ratio_norm_log_prob
from visalign.reward_models.pairwise import win_rates
from visalign.sampling import kl_penalty, sde_step

# Flow-GRPO's own stat-tracker example: groups a = [1, 3, 6], b = [2, 5], c = [4] (a singleton).
REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
PROMPTS = ["a", "b", "a", "c", "b", "a"]
MEAN_A, MEAN_B = 10 / 3, 3.5


def test_group_advantages_group_scope_population_std_by_hand():
    std_a = math.sqrt(((1 - MEAN_A) ** 2 + (3 - MEAN_A) ** 2 + (6 - MEAN_A) ** 2) / 3)  # sqrt(114/27)
    std_b = 1.5
    eps = 1e-4
    expected = [
        (1 - MEAN_A) / (std_a + eps),
        (2 - MEAN_B) / (std_b + eps),
        (3 - MEAN_A) / (std_a + eps),
        0.0,
        (5 - MEAN_B) / (std_b + eps),
        (6 - MEAN_A) / (std_a + eps),
    ]
    out = group_advantages(REWARDS, PROMPTS)
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_group_advantages_group_scope_unbiased_is_pref_grpo():
    std_a = math.sqrt(((1 - MEAN_A) ** 2 + (3 - MEAN_A) ** 2 + (6 - MEAN_A) ** 2) / 2)
    std_b = math.sqrt(4.5)
    out = group_advantages(REWARDS, PROMPTS, unbiased=True, eps=1e-8)
    expected = [
        (1 - MEAN_A) / (std_a + 1e-8),
        (2 - MEAN_B) / (std_b + 1e-8),
        (3 - MEAN_A) / (std_a + 1e-8),
        0.0,
        (5 - MEAN_B) / (std_b + 1e-8),
        (6 - MEAN_A) / (std_a + 1e-8),
    ]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(out).all()  # the singleton's unbiased std would be NaN


def test_group_advantages_global_scope_is_flow_grpo_tracker():
    std = math.sqrt(35 / 12)  # np.std([1..6]), the population std of the whole batch
    out = group_advantages(REWARDS, PROMPTS, scope="global")
    expected = [(1 - MEAN_A), (2 - MEAN_B), (3 - MEAN_A), 0.0, (5 - MEAN_B), (6 - MEAN_A)]
    assert out.tolist() == pytest.approx([e / (std + 1e-4) for e in expected], rel=1e-12)
    unbiased = group_advantages(REWARDS, PROMPTS, scope="global", unbiased=True)
    assert unbiased.tolist() == pytest.approx([e / (float(REWARDS.std()) + 1e-4) for e in expected], rel=1e-12)


def test_group_advantages_singletons_and_constant_groups_get_zero():
    for scope in ("group", "global"):
        for unbiased in (False, True):
            single = group_advantages(torch.tensor([0.3]), ["p"], scope=scope, unbiased=unbiased)
            assert single.tolist() == [0.0]
            out = group_advantages(torch.tensor([1.0, 2.0, 7.0, 7.0]), [0, 1, 2, 2], scope=scope, unbiased=unbiased)
            assert out.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantages_tensor_ids_columns_and_dtype():
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    assert torch.equal(group_advantages(REWARDS, ids), group_advantages(REWARDS, PROMPTS))
    other = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    both = group_advantages(torch.stack([REWARDS, other], dim=1), PROMPTS, scope="global")
    torch.testing.assert_close(both[:, 0], group_advantages(REWARDS, PROMPTS, scope="global"), rtol=1e-12, atol=0)
    torch.testing.assert_close(both[:, 1], group_advantages(other, PROMPTS, scope="global"), rtol=1e-12, atol=0)
    assert group_advantages(REWARDS.to(torch.bfloat16), PROMPTS).dtype == torch.float32


@pytest.mark.parametrize(
    ("rewards", "ids", "kwargs", "match"),
    [
        (torch.tensor([1.0, float("nan"), 2.0]), [0, 0, 1], {}, "rewards"),
        (torch.tensor([1.0, float("inf")]), [0, 0], {}, "rewards"),
        (torch.tensor([1.0, 2.0, 3.0]), [0, 0], {}, "group_ids"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), {}, "group_ids"),
        (torch.tensor([1.0, 2.0]), "ab", {}, "group_ids"),
        (torch.ones(2, 2, 2), [0, 0], {}, "rewards"),
        (torch.tensor([1.0, 2.0]), [0, 0], {"scope": "batch"}, "scope"),
        (torch.tensor([1.0, 2.0]), [0, 0], {"eps": -1.0}, "eps"),
    ],
)
def test_group_advantages_rejects_bad_inputs(rewards, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, ids, **kwargs)


def test_win_rates_by_hand():
    prefs = torch.tensor([[0.5, 1.0, 0.5], [0.0, 0.5, 1.0], [0.5, 0.0, 0.5]])
    assert win_rates(prefs).tolist() == pytest.approx([0.75, 0.5, 0.25])


@pytest.mark.parametrize("g", [2, 3, 8])
def test_win_rates_of_a_consistent_judge_sum_to_half_the_group(g):
    gen = torch.Generator().manual_seed(g)
    upper = torch.rand(4, g, g, generator=gen, dtype=torch.float64).triu(1)
    prefs = upper + (1 - upper.transpose(-1, -2)).tril(-1)  # prefs[i, j] + prefs[j, i] = 1
    prefs.diagonal(dim1=-2, dim2=-1).fill_(float("nan"))  # the diagonal is ignored
    rates = win_rates(prefs)
    assert rates.shape == (4, g)
    np.testing.assert_allclose(rates.sum(dim=-1).numpy(), g / 2, rtol=1e-12)


@pytest.mark.parametrize(
    "prefs",
    [
        torch.rand(3, 4),
        torch.rand(1, 1),
        torch.tensor([[0.5, 1.2], [-0.2, 0.5]]),
        torch.tensor([[0, float("nan")], [1, 0]]),
    ],
)
def test_win_rates_rejects_bad_inputs(prefs):
    with pytest.raises(ValueError, match="prefs"):
        win_rates(prefs)


def test_on_policy_ratio_is_exactly_one_and_loss_is_minus_mean_advantage():
    gen = torch.Generator().manual_seed(0)
    log_prob = torch.randn(16, generator=gen).requires_grad_(True)
    advantages = torch.randn(16, generator=gen) * 2  # within the +-5 advantage clip
    loss, stats = policy_loss(log_prob, log_prob.detach().clone(), advantages, clip_range=1e-4)
    assert torch.equal(loss, -advantages.mean())
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 16)  # d loss / d log_prob = -A r / B


def test_policy_loss_clips_advantages():
    log_prob = torch.zeros(4)
    advantages = torch.tensor([7.0, -9.0, 1.0, 2.0])
    loss, _ = policy_loss(log_prob, log_prob, advantages, clip_range=0.1)
    assert float(loss) == pytest.approx(-(5.0 - 5.0 + 1.0 + 2.0) / 4)
    loss, _ = policy_loss(log_prob, log_prob, advantages, clip_range=0.1, adv_clip=None)
    assert float(loss) == pytest.approx(-(7.0 - 9.0 + 1.0 + 2.0) / 4)


def test_policy_loss_clipping_by_hand():
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1, clip range 0.2:
    # r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped, no gradient); r=1.5, A=-1: max(1.5, 1.2) = 1.5 (unclipped)
    # r=0.5, A=+1: max(-0.5, -0.8) = -0.5 (unclipped);            r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    old = torch.tensor([-1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    log_ratio = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)], dtype=torch.float64)
    log_prob = (old + log_ratio).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, stats = policy_loss(log_prob, old, advantages, clip_range=0.2)
    assert float(loss.detach()) == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, rel=1e-12)
    loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([0.0, 1.5 / 4, -0.5 / 4, 0.0], rel=1e-12)
    assert float(stats["clipfrac"]) == 1.0
    assert float(stats["clipfrac_high"]) == 0.5 and float(stats["clipfrac_low"]) == 0.5
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * float((log_ratio**2).mean()), rel=1e-12)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"old_log_prob": torch.zeros(3)}, "old_log_prob"),
        ({"advantages": torch.zeros(4, 1)}, "advantages"),
        ({"log_prob": torch.zeros(4, dtype=torch.long)}, "log_prob"),
        ({"clip_range": 0.0}, "clip_range"),
        ({"clip_range": -0.1}, "clip_range"),
        ({"adv_clip": 0.0}, "adv_clip"),
    ],
)
def test_policy_loss_rejects_bad_inputs(kwargs, match):
    args = {"log_prob": torch.zeros(4), "old_log_prob": torch.zeros(4), "advantages": torch.zeros(4)}
    args["clip_range"] = 1e-4
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_kl_penalty_exact_and_flow_grpo_conventions():
    gen = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    std, dt = 0.35, -0.06
    exact = kl_penalty(mean, ref, std)
    per_element = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean.double(), std), torch.distributions.Normal(ref.double(), std)
    )
    torch.testing.assert_close(exact.double(), per_element.mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)
    flow = kl_penalty(mean, ref, torch.tensor(std), kind="flow_grpo", dt=dt)
    g = std / math.sqrt(-dt)  # Flow-GRPO's std_dev_t: the diffusion coefficient before sqrt(|dt|)
    flow_grpo_code = ((mean.double() - ref.double()) ** 2).mean(dim=(1, 2, 3)) / (2 * g**2)
    torch.testing.assert_close(flow.double(), flow_grpo_code, rtol=1e-6, atol=0)
    torch.testing.assert_close(flow, exact * abs(dt))
    assert torch.equal(kl_penalty(mean, mean, std), torch.zeros(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"std": 0.0}, "std"),
        ({"std": torch.tensor([0.3, -0.1, 0.3]).view(3, 1, 1, 1)}, "std"),
        ({"kind": "reverse"}, "kind"),
        ({"kind": "flow_grpo"}, "dt"),
        ({"dt": -0.1}, "dt"),
        ({"ref_mean": torch.zeros(3, 4)}, "ref_mean"),
    ],
)
def test_kl_penalty_rejects_bad_inputs(kwargs, match):
    args = {"mean": torch.zeros(3, 4, 2, 2), "ref_mean": torch.zeros(3, 4, 2, 2), "std": 0.3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kl_penalty(**args)


def test_ratio_norm_is_exp_mean_z_times_drift():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x, v_old = torch.randn(4, 4, 6, 6, generator=gen).double(), torch.randn(4, 4, 6, 6, generator=gen).double()
    v_new = v_old + 0.05 * torch.randn(4, 4, 6, 6, generator=gen).double()
    old = sde_step(v_old, x, scheduler.sigmas, 5, 0.7, generator=gen)
    new = sde_step(v_new, x, scheduler.sigmas, 5, 0.7, prev_sample=old.prev_sample)

    on_policy = ratio_norm_log_prob(old.log_prob, old.log_prob, old.mean, old.mean, old.std)
    assert torch.equal(on_policy, old.log_prob)

    normalized = ratio_norm_log_prob(new.log_prob, old.log_prob, new.mean, old.mean, old.std)
    s = float(old.std)
    z = (old.prev_sample - old.mean) / s
    drift = new.mean - old.mean
    expected = (z * drift).mean(dim=(1, 2, 3))  # log r~ = mean(z d)
    torch.testing.assert_close(normalized - old.log_prob, expected, rtol=1e-9, atol=1e-12)
    loss, stats = policy_loss(normalized, old.log_prob, torch.ones(4, dtype=torch.float64), clip_range=1e-4)
    assert torch.isfinite(loss) and float(stats["ratio_mean"]) > 0


def test_ratio_norm_rejects_bad_inputs():
    lp, m = torch.zeros(2), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="std"):
        ratio_norm_log_prob(lp, lp, m, m, 0.0)
    with pytest.raises(ValueError, match="old_mean"):
        ratio_norm_log_prob(lp, lp, m, torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match="mean"):
        ratio_norm_log_prob(lp, lp, torch.zeros(3, 3, 4), torch.zeros(3, 3, 4), 0.5)
    with pytest.raises(ValueError, match="old_log_prob"):
        ratio_norm_log_prob(lp, torch.zeros(3), m, m, 0.5)
