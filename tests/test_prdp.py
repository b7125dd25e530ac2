"""PRDP: the proximal reward-difference-prediction loss against float64 references and its identities, the DDIM
policy it trains, its exact two-pass gradient, and the trainer on real tiny pipelines."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from preference_helpers import LORA, Brightness, CrashingBrightness, trained_weights
from safetensors.torch import load_file

from visalign.cli import main
from visalign.config import ATTENTION_PROJECTIONS
from visalign.generators import adapter_for
from visalign.pipelines.prdp import PRDPConfig, PRDPTrainer, prdp_loss
from visalign.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square", "two blue circles", "a green triangle", "three yellow circles"]


def reference_prdp(lp, old, ref, rewards, groups, beta, eps, reduction):
    """Appendix G's JAX loss for one prompt, looped over prompts and pairs in float64 numpy (mean over all pairs)."""
    lp, old, ref, rewards = (np.asarray(x, dtype=np.float64) for x in (lp, old, ref, rewards))
    agg = np.mean if reduction == "mean" else np.sum
    lr, lro = lp - ref, old - ref
    lrc = np.clip(lr, lro - eps, lro + eps)
    r_hat, r_hat_c = agg(lr, axis=1), agg(lrc, axis=1)
    losses = []
    for i in range(len(rewards)):
        for j in range(len(rewards)):
            if groups[i] == groups[j] and rewards[i] - rewards[j] > 0:
                target = (rewards[i] - rewards[j]) / beta
                unclipped = (r_hat[i] - r_hat[j] - target) ** 2
                clipped = (r_hat_c[i] - r_hat_c[j] - target) ** 2
                losses.append(max(unclipped, clipped))
    return np.mean(losses)


def batch(seed=0, n=8, steps=5, spread=1e-3):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, steps, generator=g, dtype=torch.float64)
    old = ref + spread * torch.randn(n, steps, generator=g, dtype=torch.float64)
    lp = old + spread * torch.randn(n, steps, generator=g, dtype=torch.float64)
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    groups = torch.arange(n) // 4
    return lp, old, ref, rewards, groups


# -- the loss ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_zero_when_predicted_and_observed_reward_differences_agree(reduction):
    _, _, ref, rewards, groups = batch()
    beta, steps = 0.5, ref.shape[1]
    log_z = torch.tensor([3.0] * 4 + [-2.0] * 4, dtype=torch.float64)  # a per-prompt constant cancels in pairs
    total = rewards / beta + log_z  # the trajectory log-ratio the optimum implies (Eq. 9)
    split = torch.linspace(0.5, 1.5, steps, dtype=torch.float64)
    split = split / split.sum() * (steps if reduction == "mean" else 1)  # spread unevenly over the steps
    lp = ref + total[:, None] * split
    loss, stats = prdp_loss(lp, lp.clone(), ref, rewards, groups, beta=beta, clip_range=1e-4, reduction=reduction)
    assert float(loss) == pytest.approx(0.0, abs=1e-24)
    assert float(stats["pairs"]) == 12 and float(stats["rdp_error"]) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("spread, eps", [(1e-3, 1e-1), (1e-3, 5e-4), (1e-2, 1e-6)])
def test_loss_matches_appendix_g_in_float64(reduction, spread, eps):
    lp, old, ref, rewards, groups = batch(seed=1, spread=spread)
    beta = 2.0
    loss, stats = prdp_loss(lp, old, ref, rewards, groups, beta=beta, clip_range=eps, reduction=reduction)
    expected = reference_prdp(lp, old, ref, rewards, groups, beta, eps, reduction)
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(expected, rel=1e-12)
    assert 0 <= float(stats["clipfrac"]) <= 1


def test_the_pessimistic_maximum_stops_the_gradient_of_clipped_steps():
    # One pair whose unclipped prediction already overshoots the target: moving further away from pi_old is clipped,
    # the clipped branch is the larger loss, and its gradient is zero: no incentive to leave the trust region.
    ref = torch.zeros(2, 1, dtype=torch.float64)
    old = torch.zeros(2, 1, dtype=torch.float64)
    lp = torch.tensor([[-0.5], [0.5]], dtype=torch.float64, requires_grad=True)
    rewards, groups = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    loss, stats = prdp_loss(lp, old, ref, rewards, groups, beta=1.0, clip_range=0.1)
    # unclipped: (-1 - 1)^2 = 4; clipped: (-0.2 - 1)^2 = 1.44; the max is the unclipped one and it has a gradient
    assert float(loss.detach()) == pytest.approx(4.0) and float(stats["pessimistic_frac"]) == 0
    loss.backward()
    assert lp.grad.abs().sum() > 0
    lp2 = torch.tensor([[0.5], [-0.5]], dtype=torch.float64, requires_grad=True)  # overshoots the target 1 by 0
    loss2, stats2 = prdp_loss(lp2, old, ref, rewards, groups, beta=1.0, clip_range=0.1)
    # unclipped: (1 - 1)^2 = 0; clipped: (0.2 - 1)^2 = 0.64 wins, and the clipped ratio has no gradient
    assert float(loss2.detach()) == pytest.approx(0.64) and float(stats2["pessimistic_frac"]) == 1
    loss2.backward()
    assert torch.equal(lp2.grad, torch.zeros_like(lp2))


def test_pairs_stay_within_a_prompt_and_ties_give_none():
    lp, old, ref, _, _ = batch(n=4)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    loss, stats = prdp_loss(lp, old, ref, rewards, torch.tensor([0, 0, 1, 1]), beta=1.0, clip_range=1.0)
    assert float(stats["pairs"]) == 1  # (0, 1) tie; (3, 2) the only pair; none across prompts
    expected = reference_prdp(lp, old, ref, rewards, [0, 0, 1, 1], 1.0, 1.0, "mean")
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    none, stats = prdp_loss(
        lp.requires_grad_(),
        old,
        ref,
        torch.ones(4, dtype=torch.float64),
        torch.zeros(4).long(),
        beta=1.0,
        clip_range=1.0,
    )
    assert float(none.detach()) == 0 and float(stats["pairs"]) == 0
    none.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_optional_kl_term_adds_its_weighted_mean():
    lp, old, ref, rewards, groups = batch()
    kl = torch.rand(8, 5, dtype=torch.float64)
    base, _ = prdp_loss(lp, old, ref, rewards, groups, beta=1.0, clip_range=1e-3)
    with_kl, _ = prdp_loss(lp, old, ref, rewards, groups, beta=1.0, clip_range=1e-3, kl=kl, kl_coef=0.3)
    assert float(with_kl - base) == pytest.approx(0.3 * float(kl.mean()), rel=1e-12)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(beta=0.0), "`beta` must be a finite number > 0"),
        (dict(clip_range=-1.0), "`clip_range`"),
        (dict(reduction="max"), "`reduction` must be one of"),
        (dict(rewards=torch.tensor([1.0, float("nan"), 0, 0, 0, 0, 0, 0])), "`rewards` must be a finite tensor"),
        (dict(old_log_probs=torch.zeros(8, 4)), "`old_log_probs` must have the shape of `log_probs`"),
        (dict(group_ids=torch.zeros(8)), "`group_ids` must be an integer tensor"),
        (dict(kl_coef=0.1), "go together"),
    ],
)
def test_bad_inputs_raise(kw, match):
    lp, old, ref, rewards, groups = batch()
    args = dict(
        log_probs=lp,
        old_log_probs=old,
        ref_log_probs=ref,
        rewards=rewards,
        group_ids=groups,
        beta=1.0,
        clip_range=1e-4,
    )
    with pytest.raises(ValueError, match=match):
        prdp_loss(**{**args, **kw})


# -- the policy and the gradient --------------------------------------------------------------------------------------


def test_ddim_rollout_records_what_the_policy_rescores_and_eta_zero_is_the_pipeline():
    pipe = tiny_pipeline("sd")
    d = adapter_for(pipe, height=32, width=32)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    prompts = ["a red square", "a cat"]
    rollout = d.sample(
        prompts,
        d.encode_prompts(prompts, 2.0),
        d.initial_latents(generators),
        num_inference_steps=3,
        guidance_scale=2.0,
        noise_level=1.0,
        generator=generators,
    )
    assert rollout.latents.shape == (2, 4, 4, 16, 16) and rollout.log_probs.shape == (2, 3)
    assert rollout.stds.shape == (2, 3) and (rollout.stds > 0).all()  # set_alpha_to_one=False: the last step too
    for step in range(3):
        out = d.log_prob(rollout, torch.tensor([1, 0]), step)
        torch.testing.assert_close(out.log_prob, rollout.log_probs[[1, 0], step], rtol=1e-5, atol=1e-5)
    generator = [torch.Generator().manual_seed(0)]
    deterministic = d.sample(
        ["a cat"],
        d.encode_prompts(["a cat"]),
        d.initial_latents(generator),
        num_inference_steps=3,
        guidance_scale=1.0,
        noise_level=0.0,
        generator=generator,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(
        ["a cat"],
        num_inference_steps=3,
        guidance_scale=1.0,
        latents=deterministic.latents[:, 0],
        height=32,
        width=32,
        output_type="pt",
    ).images
    torch.testing.assert_close(images, deterministic.images, rtol=0, atol=1e-6)


def prdp_config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        pretrained_model_name_or_path="tiny:sd",
        height=32,
        width=32,
        max_sequence_length=8,
        num_inference_steps=3,
        guidance_scale=1.0,
        prompts_per_epoch=2,
        images_per_prompt=4,
        inner_updates=2,
        sample_batch_size=8,
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-2,
        beta=0.01,
        clip_range=1e-2,
        **LORA,
    )
    return PRDPConfig(**{**base, **kw})


@pytest.mark.parametrize("prompts_per_update", [None, 1])
def test_two_pass_gradient_equals_the_full_graph_gradient(tmp_path, prompts_per_update):
    config = prdp_config(tmp_path, per_device_train_batch_size=3, prompts_per_update=prompts_per_update)
    trainer = PRDPTrainer(tiny_pipeline("sd"), Brightness(), config, PROMPTS)
    trainer.sample_epoch()
    trainer.engine.optimizer_step()  # move off pi_old so that the clip and both branches matter
    with torch.no_grad():
        for p in trainer.engine.parameters:
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    subset = trainer.update_rows(1)
    trainer.backward(reuse_old=False, rows=subset)
    two_pass = [p.grad.clone() for p in trainer.engine.parameters]
    trainer.engine.optimizer.zero_grad()

    e, c = trainer.epoch, trainer.config
    rows = torch.arange(len(e.rollout)) if subset is None else subset
    assert len(rows) == (8 if prompts_per_update is None else 4)
    lp = torch.stack([trainer._log_prob(e.rollout, rows, t, trainer.engine.model).log_prob for t in e.steps], dim=1)
    loss, _ = prdp_loss(
        lp,
        e.rollout.log_probs[rows][:, e.steps],
        e.ref_log_probs[rows],
        e.rewards[rows],
        e.group_ids[rows],
        beta=c.beta,
        clip_range=c.clip_range,
    )
    loss.backward()
    for a, p in zip(two_pass, trainer.engine.parameters):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in two_pass)


def test_minibatch_updates_take_whole_prompts_and_cover_the_epoch_once_per_pass(tmp_path):
    config = prdp_config(
        tmp_path, prompts_per_epoch=4, images_per_prompt=2, prompts_per_update=2, inner_updates=4, max_steps=4
    )
    trainer = PRDPTrainer(tiny_pipeline("sd"), Brightness(), config, PROMPTS)
    trainer.sample_epoch()
    groups = trainer.epoch.group_ids
    passes = [[trainer.update_rows(i) for i in (0, 1)], [trainer.update_rows(i) for i in (2, 3)]]
    for first, second in passes:
        assert sorted(first.tolist() + second.tolist()) == list(range(8))
        for rows in (first, second):  # both trajectories of each chosen prompt
            assert len(rows) == 4 and sorted(groups[rows].tolist()) == sorted(list(set(groups[rows].tolist())) * 2)
    assert [r.tolist() for r in passes[0]] != [r.tolist() for r in passes[1]]  # reshuffled each pass
    with pytest.raises(ValueError, match="`prompts_per_update` \\(3\\) must divide `prompts_per_epoch` \\(4\\)"):
        prdp_config(tmp_path, prompts_per_epoch=4, prompts_per_update=3)


# -- the trainer ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler", [{}, dict(sde_window_size=1, sde_window_range=(0, 1), same_noise=True)], ids=["every-step", "window"]
)
def test_prdp_raises_the_reward_of_a_tiny_model(tmp_path, sampler):
    # 2x2 images of the tiny SD3 model keep the policy's dimension small enough for a dozen epochs to show.
    config = prdp_config(
        tmp_path,
        pretrained_model_name_or_path="tiny:sd3",
        height=2,
        width=2,
        noise_level=1.0,
        max_steps=12,
        inner_updates=1,
        prompts_per_epoch=4,
        images_per_prompt=8,
        sample_batch_size=32,
        per_device_train_batch_size=32,
        learning_rate=3e-2,
        beta=1e-3,
        lora_rank=4,
        lora_alpha=4,
        lora_target_modules=ATTENTION_PROJECTIONS,
        **sampler,
    )
    history = PRDPTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS).train()
    rewards = torch.tensor([h["reward/mean"] for h in history])
    assert rewards[-3:].mean() > rewards[:3].mean() + 0.5 * history[0]["reward/std"]
    assert all(h["train/pairs"] <= 4 * 28 for h in history)


def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    kw = dict(max_steps=4, save_steps=2, kl_coef=0.1)
    uninterrupted = PRDPTrainer(tiny_pipeline("sd"), Brightness(), prdp_config(tmp_path / "a", **kw), PROMPTS)
    uninterrupted.train()
    crashing = PRDPTrainer(
        tiny_pipeline("sd"), CrashingBrightness(crash_at=2), prdp_config(tmp_path / "b", **kw), PROMPTS
    )
    with pytest.raises(RuntimeError, match="killed"):
        crashing.train()  # dies scoring its second epoch, after the checkpoint at step 2
    resumed = PRDPTrainer(
        tiny_pipeline("sd"), Brightness(), prdp_config(tmp_path / "b", resume_from="latest", **kw), PROMPTS
    )
    history = resumed.train()
    assert [m["step"] for m in history] == [3, 4]
    expected = trained_weights(uninterrupted)
    assert all(torch.equal(p, expected[n]) for n, p in trained_weights(resumed).items())


def test_max_steps_inside_an_epoch_stops_there_and_its_checkpoint_is_not_resumed_further(tmp_path):
    kw = dict(max_steps=3, save_steps=2)  # epochs of 2 steps: the second epoch takes one of its two
    trainer = PRDPTrainer(tiny_pipeline("sd"), Brightness(), prdp_config(tmp_path, **kw), PROMPTS)
    assert [m["step"] for m in trainer.train()] == [1, 2, 3]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    longer = prdp_config(tmp_path, resume_from=str(tmp_path / "run" / "checkpoints" / "checkpoint-3"), max_steps=4)
    with pytest.raises(ValueError, match="resumed at step 3, inside an epoch"):
        PRDPTrainer(tiny_pipeline("sd"), Brightness(), longer, PROMPTS).train()


@pytest.mark.parametrize("family, size", [("sd3", 8), ("flux", 32), ("qwen-image", 32)])
def test_prdp_trains_a_flow_model_through_the_sde_sampler(tmp_path, family, size):
    kw = dict(height=size, width=size, noise_level=0.7, max_steps=2)
    config = prdp_config(tmp_path, pretrained_model_name_or_path=f"tiny:{family}", **kw)
    trainer = PRDPTrainer(tiny_pipeline(family), Brightness(), config, PROMPTS)
    before = trained_weights(trainer)
    history = trainer.train()
    assert history[0]["train/pairs"] == 12
    assert any(not torch.equal(before[n], p) for n, p in trained_weights(trainer).items())


def test_an_sde_window_with_shared_noise_samples_and_trains_only_the_window(tmp_path):
    # Flow-GRPO's world sampler: a prompt's trajectories share their initial noise and differ by one SDE step.
    kw = dict(pretrained_model_name_or_path="tiny:sd3", height=8, width=8, num_inference_steps=4, noise_level=0.7)
    config = prdp_config(tmp_path, sde_window_size=1, sde_window_range=(1, 3), same_noise=True, **kw)
    trainer = PRDPTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    trainer.sample_epoch()
    e = trainer.epoch
    (step,) = e.steps.tolist()
    assert step in (1, 2) and (e.rollout.stds[:, step] > 0).all()
    assert (e.rollout.stds[:, [t for t in range(4) if t != step]] == 0).all()
    start, end = e.rollout.latents[:, 0], e.rollout.latents[:, -1]
    for g in e.group_ids.unique():
        rows = (e.group_ids == g).nonzero().flatten()
        assert all(torch.equal(start[rows[0]], start[r]) for r in rows)  # shared initial noise
        assert not torch.equal(end[rows[0]], end[rows[1]])  # ... and a step of its own
    assert not torch.equal(start[0], start[-1])  # prompts differ
    before = trained_weights(trainer)
    trainer.update(reuse_old=True)
    assert any(not torch.equal(before[n], p) for n, p in trained_weights(trainer).items())

    unshared = PRDPTrainer(tiny_pipeline("sd3"), Brightness(), prdp_config(tmp_path / "b", **kw), PROMPTS)
    unshared.sample_epoch()  # the default: every step noisy, every trajectory its own initial noise
    assert unshared.epoch.steps.tolist() == [0, 1, 2, 3]
    assert not torch.equal(unshared.epoch.rollout.latents[0, 0], unshared.epoch.rollout.latents[1, 0])


def test_bad_prdp_setups_raise(tmp_path):
    with pytest.raises(ValueError, match="`save_steps` .* multiple of `inner_updates`"):
        prdp_config(tmp_path, save_steps=3, inner_updates=2)
    with pytest.raises(ValueError, match="`images_per_prompt` must be >= 2"):
        prdp_config(tmp_path, images_per_prompt=1)
    with pytest.raises(ValueError, match="`eta` must be in \\(0, 1\\]"):
        prdp_config(tmp_path, eta=0.0)
    with pytest.raises(ValueError, match=r"`sde_window_range` \[2, 3\) within the trainable steps \[0, 2\)"):
        prdp_config(tmp_path, sde_window_size=1, sde_window_range=(2, 3))


@pytest.mark.slow
def test_two_processes_give_the_same_update_as_one(tmp_path):
    """torchrun + gloo: 2 processes x 1 prompt equal 1 process x 2 prompts (pairs weighted across processes)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [
        "train",
        "prdp",
        "--config",
        str(ROOT / "configs" / "tiny_prdp.yaml"),
        "--set",
        "cpu=true",
        "max_steps=2",
        "save_steps=2",
        # the same batches of 4 trajectories on one process as on each of two (see the tolerance below)
        "sample_batch_size=4",
        "per_device_train_batch_size=4",
    ]
    runs = {1: tmp_path / "one", 2: tmp_path / "two"}
    assert main(common + [f"output_dir={runs[1]}"]) == 0
    subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "visalign.cli",
            *common,
            f"output_dir={runs[2]}",
        ],
        env=env,
        check=True,
        cwd=ROOT,
    )
    weights = [load_file(str(runs[n] / "checkpoints" / "checkpoint-2" / "trainable.safetensors")) for n in (1, 2)]
    # Tolerance. Adam's first step moves an element by lr g / (|g| + eps): slope lr / eps = 1e6 where |g| <~ eps,
    # and this test has such elements (|g| ~ 1e-9, cancellation residues; rms gradient 2e-5). So a gradient
    # difference dg becomes a weight difference up to lr |dg| / eps. Sampling in batches of 8 instead of 4 alone
    # (one process both times) changes the gradients by 1e-4 relative (|dg| up to 4e-8: other float32 kernels for the
    # sampled latents, then cancellation in reward gaps and log-ratios), hence 2e-4 in one weight: why the runs share
    # their batch size. Left is the order of the float32 sums (DDP's mean of two 4-row sums vs one process's two
    # micro-batches): |dg| <= 3e-11 at step 1 and 3e-9 at step 2 (7e-8 and 3e-6 relative), measured 2.5e-6 in the
    # weights, 40x under atol. A wrong cross-process pair weighting or RNG key moves elements by about lr = 1e-2.
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=1e-4, rtol=1e-3)


def test_visalign_train_prdp_runs_a_config_file(tmp_path):
    out = tmp_path / "cli"
    assert (
        main(["train", "prdp", "--config", str(ROOT / "configs" / "tiny_prdp.yaml"), "--set", f"output_dir={out}"])
        == 0
    )
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*prdp*.yaml")))
def test_shipped_prdp_configs_load(name):
    from visalign.config import load_config

    load_config(PRDPConfig, ROOT / "configs" / name)
