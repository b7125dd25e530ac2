"""Diffusion-DRO: the ranking hinge against float64 references and its identity, the replay buffer, the lagged
policy copy, and the trainer on real tiny pipelines."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from preference_helpers import LORA, red_blue_images, sharp_tiny_pipeline, trained_weights
from safetensors.torch import load_file

from visalign.cli import main
from visalign.generators import adapter_for
from visalign.pipelines.dro import DROConfig, DROTrainer, ReplayBuffer, dro_loss
from visalign.pipelines.expert_sets import ExpertSet, save_experts
from visalign.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def errors(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64) + 0.5 for _ in range(4)]


def red_experts(n=16):
    red, _ = red_blue_images(n)
    return ExpertSet(["a red square"] * n, list(red))


def dro_config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        pretrained_model_name_or_path="tiny:sd",
        experts="in-memory",
        height=32,
        width=32,
        num_inference_steps=4,
        per_device_train_batch_size=8,
        rollouts_per_micro_step=4,
        buffer_size=4,
        max_steps=2,
        learning_rate=1e-3,
        caption_dropout=0.0,
        **LORA,
    )
    return DROConfig(**{**base, **kw})


# -- the loss ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 1e-3, 0.5])
def test_loss_equals_the_margin_at_initialization(margin):
    expert, policy, _, _ = errors()
    loss, diff = dro_loss(expert, expert.clone(), policy, policy.clone(), margin)
    assert loss.dtype == torch.float64 and float(loss) == margin and torch.equal(diff, torch.zeros(6).double())


@pytest.mark.parametrize("margin", [0.0, 1e-3, 0.05])
def test_loss_matches_the_reference_code_in_float64(margin):
    expert, expert_ref, policy, policy_ref = errors(seed=1)
    expert = expert_ref + 0.1 * (expert - 1)
    policy = policy_ref + 0.1 * (policy - 1)
    loss, diff = dro_loss(expert, expert_ref, policy, policy_ref, margin)
    e, e0, p, p0 = (t.numpy() for t in (expert, expert_ref, policy, policy_ref))
    reference_diff = (e - e0) - (p - p0)  # train.py: loss_expert_diff - loss_policy_diff
    assert float(loss) == pytest.approx(np.maximum(reference_diff + margin, 0).mean(), rel=1e-12)
    np.testing.assert_allclose(diff.numpy(), reference_diff, rtol=1e-12)


def test_the_hinge_pulls_the_expert_down_pushes_the_policy_up_and_stops_once_ranked():
    expert, expert_ref, policy, policy_ref = (t.requires_grad_() for t in errors(seed=2, n=2))
    with torch.no_grad():
        expert[0], policy[0] = expert_ref[0] + 0.1, policy_ref[0]  # row 0 ranked the wrong way
        expert[1] = expert_ref[1] - 1  # row 1 already ranked with room to spare
    loss, diff = dro_loss(expert, expert_ref, policy, policy_ref, 1e-3)
    loss.backward()
    assert expert.grad[0] == 0.5 and policy.grad[0] == -0.5  # d mean / d row = 1/2
    assert expert.grad[1] == 0 and policy.grad[1] == 0
    assert expert_ref.grad is None and diff[1] < -1e-3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(margin=-1.0), "`margin` must be a finite number >= 0"),
        (dict(policy_err=torch.ones(3)), "`policy_err` must have the shape of `expert_err`"),
        (dict(expert_err_ref=torch.ones(4, 1)), "`expert_err_ref` must be a non-empty 1-D"),
    ],
)
def test_bad_inputs_raise(kw, match):
    args = dict(
        expert_err=torch.ones(4), expert_err_ref=torch.ones(4), policy_err=torch.ones(4), policy_err_ref=torch.ones(4)
    )
    with pytest.raises(ValueError, match=match):
        dro_loss(**{**args, **kw})


# -- the buffer and the rollouts --------------------------------------------------------------------------------------


def test_replay_buffer_keeps_the_newest_trajectories_and_rows_stay_consistent():
    d = adapter_for(tiny_pipeline("sd"), height=32, width=32)
    buffer = ReplayBuffer(size=3)
    rollouts = []
    for k in range(2):
        gens = [torch.Generator().manual_seed(10 * k + j) for j in range(2)]
        prompts = [f"p{k}{j}" for j in range(2)]
        rollout = d.sample(
            prompts,
            d.encode_prompts(prompts),
            d.initial_latents(gens),
            num_inference_steps=4,
            guidance_scale=1.0,
            noise_level=0.0,
            generator=gens,
            offset=k,
        )
        x0 = torch.full((2, 4, 16, 16), float(k)) + torch.arange(2.0)[:, None, None, None] / 10
        buffer.push(x0, rollout)
        rollouts.append(rollout)
    assert len(buffer) == 3  # trimmed to the newest 3 of 4 trajectories
    kept = [(rollouts[0], 1), (rollouts[1], 0), (rollouts[1], 1)]
    rows = buffer.sample(64, torch.Generator().manual_seed(0))
    for i in range(64):
        x0 = rows.x0[i]
        which = [j for j, (r, row) in enumerate(kept) if torch.equal(x0, buffer.x0[j])]
        rollout, row = kept[which[0]]
        step = int((rollout.timesteps == rows.t[i]).nonzero())
        assert torch.equal(rows.x_t[i], rollout.latents[row, step])
        assert torch.equal(rows.prediction[i], rollout.predictions[row, step])
        assert torch.equal(rows.conditioning.prompt_embeds[i], rollout.conditioning.prompt_embeds[row])
    few = buffer.sample(3, torch.Generator().manual_seed(1))
    assert len({tuple(x.flatten()[:2].tolist()) for x in few.x0}) == 3  # without replacement when possible
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(2).sample(1, torch.Generator())


def test_perturbed_schedules_cover_every_timestep_and_end_at_the_final_alpha():
    d = adapter_for(tiny_pipeline("sd"))
    ratio = d.max_offset(20)
    seen = set()
    for offset in range(ratio):
        schedule = d.schedule(20, offset)
        timesteps, prev = schedule.timesteps, schedule.prev_timesteps
        assert int(prev[-1]) == -1 and torch.equal(prev[:-1], timesteps[1:])
        seen |= set(timesteps.tolist())
    assert len(seen) == 20 * ratio
    with pytest.raises(ValueError, match="`offset` must be in"):
        d.schedule(20, ratio)


# -- the trainer ------------------------------------------------------------------------------------------------------


def test_first_step_loss_is_the_margin_and_training_ranks_experts_above_policy_samples(tmp_path):
    trainer = DROTrainer(sharp_tiny_pipeline(), dro_config(tmp_path, max_steps=12, learning_rate=3e-2), red_experts())
    history = trainer.train()
    assert history[0]["train/loss"] == pytest.approx(1e-3, abs=1e-9) and history[0]["train/diff"] == 0
    late = history[-4:]
    assert all(h["train/expert_gap"] < h["train/policy_gap"] for h in late)
    assert np.mean([h["train/ranked"] for h in late]) > 0.9


def test_the_lagged_copy_samples_with_weights_synced_every_policy_update_steps(tmp_path):
    trainer = DROTrainer(
        sharp_tiny_pipeline(),
        dro_config(tmp_path, max_steps=3, policy_update_steps=2, learning_rate=3e-2),
        red_experts(),
    )
    initial = [p.detach().clone() for p in trainer.engine.parameters]
    snapshots = []
    trainer.refill = lambda m, original=trainer.refill: (
        snapshots.append([s.clone() for s in trainer.policy.shadow]),
        original(m),
    )[1]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], initial))  # step 1 samples the initial weights
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], initial))  # so does step 2 (no sync after step 1)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[2], initial))  # synced after step 2


def test_the_policy_term_has_error_only_while_the_copy_lags(tmp_path):
    # Synced every update, the copy's predictions are the model's own: zero policy error, hence no gradient from it.
    kw = dict(max_steps=4, learning_rate=3e-2, buffer_size=4, rollouts_per_micro_step=4)
    synced = DROTrainer(sharp_tiny_pipeline(), dro_config(tmp_path / "a", **kw), red_experts()).train()
    assert all(h["train/policy_mse"] < 1e-10 for h in synced)
    lagged = DROTrainer(
        sharp_tiny_pipeline(), dro_config(tmp_path / "b", policy_update_steps=4, **kw), red_experts()
    ).train()
    assert lagged[0]["train/policy_mse"] < 1e-10 and all(h["train/policy_mse"] > 1e-8 for h in lagged[1:])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_guided_rollouts_store_the_unguided_prediction_the_loss_trains(tmp_path, family):
    # CFG 3 steers the trajectories; synced every update, the stored predictions must still be the model's own
    # training predictions at those states (zero policy error), not the guided ones (about the guidance's size off).
    kw = dict(max_steps=2, learning_rate=1e-2, guidance_scale=3.0, pretrained_model_name_or_path=f"tiny:{family}")
    trainer = DROTrainer(tiny_pipeline(family), dro_config(tmp_path, **kw), red_experts())
    history = trainer.train()
    assert all(h["train/policy_mse"] < 1e-10 for h in history)
    guided = DROTrainer(tiny_pipeline(family), dro_config(tmp_path / "b", **kw), red_experts())
    guided.refill(0)
    rows = guided.buffer
    with torch.no_grad():
        unguided = guided.adapter.training_prediction(
            rows.x_t[:, 0], rows.t[:, 0], rows.conditioning, guided.engine.unwrapped
        )
    torch.testing.assert_close(rows.predictions[:, 0], unguided.to(rows.predictions.dtype))


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen-image"])
def test_one_dro_step_on_a_flow_model_trains_the_lora_on_the_flow_objective(tmp_path, family):
    # The rows' timesteps are the rollout's sigmas: the synced copy's velocities are then the model's own at those
    # sigmas (zero policy error); FLUX samples at its training guidance so that they are the same function.
    guidance = 3.5 if family == "flux" else 1.0
    kw = dict(max_steps=2, learning_rate=1e-2, guidance_scale=guidance)
    config = dro_config(tmp_path, pretrained_model_name_or_path=f"tiny:{family}", **kw)
    trainer = DROTrainer(tiny_pipeline(family), config, red_experts())
    before = trained_weights(trainer)
    history = trainer.train()
    assert history[0]["train/loss"] == pytest.approx(1e-3, abs=1e-9) and history[0]["train/diff"] == 0
    assert all(h["train/policy_mse"] < 1e-10 for h in history)
    assert 0 < float(trainer.buffer.t.min()) and float(trainer.buffer.t.max()) <= 1  # sigmas, not timesteps
    assert any(not torch.equal(before[n], p) for n, p in trained_weights(trainer).items())


@pytest.mark.parametrize("buffer_size", [4, 12])  # 12: the buffer carries trajectories of earlier steps
def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, buffer_size):
    kw = dict(
        max_steps=4,
        save_steps=2,
        caption_dropout=0.5,
        policy_update_steps=2,
        learning_rate=3e-2,
        buffer_size=buffer_size,
    )
    uninterrupted = DROTrainer(sharp_tiny_pipeline(), dro_config(tmp_path / "a", **kw), red_experts())
    uninterrupted.train()
    crashing = DROTrainer(sharp_tiny_pipeline(), dro_config(tmp_path / "b", **kw), red_experts())
    calls = []

    def crash(m, original=crashing.refill):
        calls.append(m)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(m)

    crashing.refill = crash
    with pytest.raises(RuntimeError, match="killed"):
        crashing.train()  # dies refilling for step 3, after the checkpoint at step 2
    resumed = DROTrainer(sharp_tiny_pipeline(), dro_config(tmp_path / "b", resume_from="latest", **kw), red_experts())
    history = resumed.train()
    assert [m["step"] for m in history] == [3, 4]
    assert history == [m for m in uninterrupted.history if m["step"] > 2]
    expected = trained_weights(uninterrupted)
    assert all(torch.equal(p, expected[n]) for n, p in trained_weights(resumed).items())
    saved = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "checkpoint-2" / "caller_state_0.safetensors"))
    assert len(saved["buffer.x0"]) == min(buffer_size, 2 * 4)


def test_bad_dro_setups_raise(tmp_path):
    with pytest.raises(ValueError, match="video family wan is not supported"):
        wan = dro_config(tmp_path, pretrained_model_name_or_path="tiny:wan", height=16, width=16)
        DROTrainer(tiny_pipeline("wan"), wan, red_experts())
    with pytest.raises(ValueError, match="`experts` must name"):
        dro_config(tmp_path, experts="")
    with pytest.raises(ValueError, match="multiple of `policy_update_steps`"):
        dro_config(tmp_path, save_steps=3, policy_update_steps=2)


def test_visalign_train_diffusion_dro_runs_a_config_file(tmp_path):
    experts = save_experts(red_experts(4), tmp_path / "experts")
    out = tmp_path / "cli"
    code = main(
        [
            "train",
            "diffusion-dro",
            "--config",
            str(ROOT / "configs" / "tiny_dro.yaml"),
            "--set",
            f"output_dir={out}",
            f"experts={experts}",
        ]
    )
    assert code == 0 and (out / "final" / "pytorch_lora_weights.safetensors").exists()
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isclose(first["train/loss"], 1e-3, abs_tol=1e-9)  # LoRA starts at B = 0: model = reference


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*dro*.yaml")))
def test_shipped_dro_configs_load(name):
    from visalign.config import load_config

    config = load_config(DROConfig, ROOT / "configs" / name)
    assert config.margin >= 0
