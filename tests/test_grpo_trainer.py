"""Flow-GRPO, Pref-GRPO and TempFlow-GRPO trainers on a real tiny SD3 pipeline: learning, exact resume after a
crash, one process versus two, bad input, and the `visalign train` command."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from preference_helpers import Brightness, CrashingBrightness
from safetensors.torch import load_file

from visalign.cli import main
from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer, PrefGRPOConfig
from visalign.pipelines.tempflow import TempFlowGRPOConfig, TempFlowGRPOTrainer
from visalign.reward_models.pairwise import BradleyTerryWinRate
from visalign.testing import tiny_pipeline
from visalign.types import RewardOutput

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square", "two blue circles", "a green triangle", "three yellow circles"]


def grpo_config(tmp_path, cls=FlowGRPOConfig, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        height=8,
        width=8,
        max_sequence_length=8,
        num_inference_steps=3,
        guidance_scale=1.0,
        group_size=4,
        sample_batch_size=8,
        per_device_train_batch_size=8,
        num_batches_per_iteration=1,
        gradient_accumulation_steps=1,
        max_steps=2,
        beta=0.0,
        learning_rate=3e-2,
        lora_rank=4,
        lora_alpha=4,
        clip_range=1e-2,
        noise_level=1.0,
    )
    return cls(**{**base, **kw})


def trained_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.engine.named_parameters}


def test_flow_grpo_raises_the_training_reward(tmp_path):
    # 2x2 images (2x2 latents) keep the policy gradient's dimension small enough for a dozen iterations to show.
    config = grpo_config(
        tmp_path, height=2, width=2, sample_batch_size=32, per_device_train_batch_size=32, group_size=8, max_steps=12
    )
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    before = trained_weights(trainer)
    history = trainer.train()
    rewards = torch.tensor([m["reward/mean"] for m in history])
    assert len(rewards) == 12 and history[-1]["step"] == 12
    assert rewards[-3:].mean() > rewards[:3].mean() + 0.5 * history[0]["reward/std"]
    # every adapter moved, but the one whose output SD3's last block discards (its context queries): it stays at 0
    unchanged = [n for n, p in trained_weights(trainer).items() if torch.equal(before[n], p)]
    assert unchanged == ["transformer_blocks.0.attn.add_q_proj.lora_B.default.weight"]
    assert history[0]["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # one update per iteration: on-policy
    assert {"time/sampling", "time/reward", "time/update", "samples_per_second"} <= set(history[0])
    assert (Path(config.output_dir) / "final" / "pytorch_lora_weights.safetensors").exists()


class Darkness(Brightness):
    """A gold reward that disagrees with the training one: optimizing brightness is hacking it."""

    name = "darkness"

    def _score(self, pixels, prompts):
        return 1 - super()._score(pixels, prompts)


def test_the_monitor_flags_a_training_reward_that_rises_while_the_gold_one_falls(tmp_path):
    config = grpo_config(
        tmp_path,
        height=2,
        width=2,
        sample_batch_size=32,
        per_device_train_batch_size=32,
        group_size=8,
        max_steps=12,
        save_steps=6,
    )
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS, external_reward=Darkness())
    history = trainer.train()
    assert [m["monitor/gold"] for m in history] == pytest.approx([m["external/darkness"] for m in history])
    assert [m["monitor/train"] for m in history] == pytest.approx([m["reward/mean"] for m in history])
    assert history[-1]["monitor/gap"] > 1 and history[-1]["monitor/hacking"] == 1.0
    assert history[0]["monitor/hacking"] == 0.0
    saved = json.loads((Path(config.output_dir) / "monitor" / "monitor.json").read_text())
    assert saved["hacking"] and len(trainer.monitor.records) == 12
    # a run resumed from the step-6 checkpoint continues the monitor's curve instead of starting a new one
    resumed = FlowGRPOTrainer(
        tiny_pipeline("sd3"),
        Brightness(),
        dataclasses.replace(config, resume_from=str(Path(config.output_dir) / "checkpoints" / "checkpoint-6")),
        PROMPTS,
        external_reward=Darkness(),
    )
    resumed.train()
    assert [r.step for r in resumed.monitor.records] == [r.step for r in trainer.monitor.records]


def test_flow_grpo_trains_flux_and_its_adapter_loads_into_a_fresh_pipeline(tmp_path):
    config = grpo_config(tmp_path, height=16, width=16, guidance_scale=3.5, lora_alpha=8)
    trainer = FlowGRPOTrainer(tiny_pipeline("flux"), Brightness(), config, PROMPTS)
    trainer.train()

    def generate(pipe):
        kw = dict(height=16, width=16, max_sequence_length=8, output_type="pt")
        generator = [torch.Generator().manual_seed(0)]
        return pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=3.5, generator=generator, **kw).images

    trained = generate(trainer.adapter.pipe)
    fresh = tiny_pipeline("flux")
    base = generate(fresh)
    fresh.load_lora_weights(Path(config.output_dir) / "final")
    loaded = generate(fresh)
    assert not torch.allclose(trained, base, atol=1e-6)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)


def crash_and_resume(tmp_path, crash_at, **kw):
    """An uninterrupted run in `tmp_path/a`, and in `tmp_path/b` one killed at the reward's `crash_at`-th call then
    resumed from its latest checkpoint; returns both trainers and the resumed run's history."""
    uninterrupted = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), grpo_config(tmp_path / "a", **kw), PROMPTS)
    uninterrupted.train()
    crashing = FlowGRPOTrainer(
        tiny_pipeline("sd3"), CrashingBrightness(crash_at=crash_at), grpo_config(tmp_path / "b", **kw), PROMPTS
    )
    with pytest.raises(RuntimeError, match="killed"):
        crashing.train()
    record = json.loads((tmp_path / "b" / "run" / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: killed"
    assert record["step"] == crashing.engine.step and not (tmp_path / "b" / "run" / "final").exists()
    resumed = FlowGRPOTrainer(
        tiny_pipeline("sd3"), Brightness(), grpo_config(tmp_path / "b", resume_from="latest", **kw), PROMPTS
    )
    history = resumed.train()
    expected = trained_weights(uninterrupted)
    assert all(torch.equal(p, expected[n]) for n, p in trained_weights(resumed).items())
    return uninterrupted, resumed, history


def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    kw = dict(max_steps=4, save_steps=2, ema_decay=0.5, ema_update_every=1, beta=0.04, timestep_fraction=0.5)
    # dies sampling its third iteration, after the checkpoint at step 2
    _, _, history = crash_and_resume(tmp_path, crash_at=3, **kw)
    assert [m["step"] for m in history] == [3, 4]
    a, b = (load_file(tmp_path / x / "run" / "final" / "pytorch_lora_weights.safetensors") for x in "ab")  # EMA
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_inside_an_iteration_stops_partway_and_resumes_exactly(tmp_path):
    # 2 batches x 2 inner epochs = 4 optimizer steps per iteration; max_steps=5 takes one update of the second;
    # the crashed run dies sampling the second iteration, after the checkpoint at step 4
    kw = dict(max_steps=5, num_batches_per_iteration=2, num_inner_epochs=2, save_steps=4, beta=0.04)
    uninterrupted, _, history = crash_and_resume(tmp_path, crash_at=3, **kw)
    assert uninterrupted.engine.step == 5 and [m["step"] for m in uninterrupted.engine.history] == [4, 5]
    assert [m["step"] for m in history] == [5]
    checkpoints = sorted(p.name for p in (tmp_path / "a" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-4", "checkpoint-5"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "qwen-image"])
def test_two_processes_give_the_same_update_as_one(tmp_path, family):
    """torchrun + gloo: 2 processes x 2 samples equal 1 process x 4 samples (global batch and micro-batch alike), on
    SD3 and on Qwen-Image (true CFG with its norm rescale, masked prompt encodings)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [
        "train",
        "flow-grpo",
        "--config",
        str(ROOT / "configs" / "tiny_flow_grpo.yaml"),
        "--set",
        "cpu=true",
        "max_steps=2",
        "num_batches_per_iteration=1",
        "save_steps=0",
        f"pretrained_model_name_or_path=tiny:{family}",
    ]
    runs = {1: tmp_path / "one", 2: tmp_path / "two"}
    one = common + [f"output_dir={runs[1]}", "sample_batch_size=4", "per_device_train_batch_size=4"]
    two = common + [f"output_dir={runs[2]}", "sample_batch_size=2", "per_device_train_batch_size=2"]
    assert main(one) == 0
    subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "visalign.cli", *two], env=env, check=True, cwd=ROOT)
    weights = [load_file(str(runs[n] / "checkpoints" / "checkpoint-2" / "trainable.safetensors")) for n in (1, 2)]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], atol=1e-6, rtol=1e-4)
    metrics = [json.loads((runs[n] / "metrics.jsonl").read_text().splitlines()[-1]) for n in (1, 2)]
    assert metrics[0]["reward/mean"] == pytest.approx(metrics[1]["reward/mean"], abs=1e-6)


def test_pref_grpo_trains_on_win_rates_and_logs_the_external_reward(tmp_path):
    config = grpo_config(tmp_path, cls=PrefGRPOConfig, external_reward="brightness", max_steps=2, group_size=4)
    judge = BradleyTerryWinRate(Brightness(), temperature=0.01)
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), judge, config, PROMPTS, external_reward=Brightness())
    history = trainer.train()
    assert all(m["reward/mean"] == pytest.approx(0.5, abs=1e-6) for m in history)  # win rates average 1/2
    assert all(0.4 < m["external/brightness"] < 0.7 for m in history)


def test_tempflow_grpo_trains_one_branch_transition_per_sample(tmp_path):
    config = grpo_config(
        tmp_path,
        cls=TempFlowGRPOConfig,
        num_inference_steps=4,
        group_size=2,
        sample_batch_size=2,
        per_device_train_batch_size=4,
    )
    trainer = TempFlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    rollout = trainer.sample_batch(PROMPTS[:2], torch.tensor([0, 1]), iteration=0, batch=0)
    assert len(rollout) == 3 * 2 * 2  # branch steps 0..2, 2 seeds, 2 children
    assert ((rollout.stds > 0).sum(dim=1) == 1).all()
    assert len(rollout.group_ids.unique()) == 3 * 2
    assert trainer.trained_steps(rollout, 0).tolist() == [True, True, True, False]
    before = trained_weights(trainer)
    history = trainer.train()
    assert len(history) == 2 and history[0]["advantage/abs_mean"] > 0
    assert any(not torch.equal(before[n], p) for n, p in trained_weights(trainer).items())


def test_tempflow_grpo_with_random_branch_steps_per_batch(tmp_path):
    config = grpo_config(
        tmp_path,
        cls=TempFlowGRPOConfig,
        num_inference_steps=4,
        group_size=2,
        sample_batch_size=1,
        per_device_train_batch_size=2,
        num_branch_steps=1,
        num_batches_per_iteration=2,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    trainer = TempFlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    assert [trainer.branch_steps(0, b) for b in range(2)] != [trainer.branch_steps(1, b) for b in range(2)]
    history = trainer.train()
    assert [m["step"] for m in history] == [1, 2]


def test_tempflow_grpo_branches_only_within_sde_window_range(tmp_path):
    kw = dict(cls=TempFlowGRPOConfig, num_inference_steps=6, group_size=2, sample_batch_size=1)
    kw |= dict(per_device_train_batch_size=2, num_batches_per_iteration=2, gradient_accumulation_steps=2)
    everywhere = TempFlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), grpo_config(tmp_path, **kw), PROMPTS)
    assert everywhere.branch_steps(0, 0) == [0, 1, 2, 3, 4]
    config = grpo_config(tmp_path / "a", **kw, sde_window_range=(1, 3), num_branch_steps=1)
    trainer = TempFlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    chosen = {tuple(trainer.branch_steps(i, b)) for i in range(8) for b in range(2)}
    assert chosen == {(1,), (2,)}
    config = grpo_config(tmp_path / "b", **kw, sde_window_range=(0, 1))
    trainer = TempFlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    assert trainer.branch_steps(3, 1) == [0]


def test_tempflow_noise_aware_weights_are_the_official_sd35m_constants(tmp_path):
    config = grpo_config(
        tmp_path,
        cls=TempFlowGRPOConfig,
        num_inference_steps=4,
        group_size=2,
        sample_batch_size=2,
        per_device_train_batch_size=4,
    )
    trainer = TempFlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)
    rollout = trainer.sample_batch(PROMPTS[:2], torch.tensor([0, 1]), iteration=0, batch=0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sd35m = dataclasses.replace(rollout, sigmas=scheduler.sigmas, timesteps=scheduler.timesteps, noise_level=0.7)
    weights = trainer.step_weights(sd35m)
    expected = [1.577, 1.673, 1.208, 1.004, 0.882, 0.795, 0.719, 0.635, 0.508]  # tempflow_prdp.md section 1.2
    assert weights[:9].tolist() == pytest.approx(expected, abs=2e-3)
    assert weights[:9].mean() == pytest.approx(1.0) and weights[9] == 0


def test_kl_and_ratio_norm_paths(tmp_path):
    config = grpo_config(tmp_path, beta=0.04, kl_kind="exact", ratio_norm=True, num_batches_per_iteration=2)
    history = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS).train()
    assert history[0]["step"] == 2 and "train/kl" in history[0] and history[0]["train/kl"] >= 0


def test_evaluation_logs_the_reward_of_ode_samples(tmp_path):
    config = grpo_config(tmp_path, eval_num_inference_steps=2, eval_images_per_prompt=2)
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS, eval_prompts=PROMPTS[:3])
    history = trainer.train()
    evals = [m for m in history if "eval/brightness" in m]
    assert [m["step"] for m in evals] == [0, 2] and 0 < evals[0]["eval/brightness"] < 1


class NaNReward(Brightness):
    def _score(self, pixels, prompts):
        return torch.full((pixels.shape[0],), float("nan"))


class WrongBatchReward(Brightness):
    def score(self, pixels, prompts):
        return RewardOutput(torch.zeros(pixels.shape[0] - 1))


@pytest.mark.parametrize(
    "reward,match", [(NaNReward(), "NaN"), (WrongBatchReward(), r"must be a tensor of shape \[8\]")]
)
def test_bad_rewards_raise_clear_errors(tmp_path, reward, match):
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), reward, grpo_config(tmp_path), PROMPTS)
    with pytest.raises(ValueError, match=match):
        trainer.train()


def test_a_pointwise_reward_is_not_taken_for_win_rates(tmp_path):
    config = grpo_config(tmp_path, cls=PrefGRPOConfig, external_reward="brightness", group_size=4)
    trainer = FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS, external_reward=Brightness())
    with pytest.raises(ValueError, match="not win rates"):
        trainer.train()


def test_misconfigured_group_sizes_raise(tmp_path):
    config = grpo_config(tmp_path, group_size=3)  # 8 samples per batch do not split into groups of 3
    with pytest.raises(ValueError, match="misconfigured group sizes.*not a multiple of group_size"):
        FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(group_size=1), "group of one"),
        (dict(num_batches_per_iteration=3, gradient_accumulation_steps=2), "must cover whole sampling batches"),
        (dict(sample_batch_size=8, per_device_train_batch_size=3), "must cover whole sampling batches"),
        (dict(sde_window_size=3), "SDE window"),
        (dict(reward_mode="win_rate"), "needs `external_reward`"),
        (dict(bradley_terry_temperature=1.0), "win_rate"),
        (dict(cls=TempFlowGRPOConfig, sde_window_size=1), "branches instead"),
        (dict(cls=TempFlowGRPOConfig, num_branch_steps=3), "num_branch_steps"),
        (dict(cls=TempFlowGRPOConfig, sde_window_range=(1, 1)), "sde_window_range"),
        (dict(cls=TempFlowGRPOConfig, sde_window_range=(0, 1), num_branch_steps=2), r"num_branch_steps.*\[0, 1\]"),
    ],
)
def test_bad_configs_raise(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        grpo_config(tmp_path, **kw)


def test_kill_stops_visalign_train_and_its_run_record_says_so(tmp_path):
    out = tmp_path / "killed"
    config = str(ROOT / "configs" / "tiny_flow_grpo.yaml")
    argv = [sys.executable, "-m", "visalign.cli", "train", "flow-grpo", "--config", config]
    log = tmp_path / "stderr.log"  # a file, not a pipe: progress bars cannot fill a buffer and block the run
    with log.open("wb") as stderr:
        job = subprocess.Popen([*argv, "--set", f"output_dir={out}", "max_steps=100000"], cwd=ROOT, stderr=stderr)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # two steps logged: it is training
        assert job.poll() is None, log.read_text()[-2000:]
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail("visalign train logged no two steps in 300 s")
        time.sleep(0.2)
    job.terminate()  # SIGTERM, what `kill` and schedulers send
    assert job.wait(timeout=120) == 128 + signal.SIGTERM
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "stopped" and record["error"] == "SystemExit: 143" and record["step"] >= 2
    assert not (out / "final").exists()


def test_visalign_train_runs_a_config_file(tmp_path):
    out = tmp_path / "cli"
    code = main(
        ["train", "flow-grpo", "--config", str(ROOT / "configs" / "tiny_flow_grpo.yaml"), "--set", f"output_dir={out}"]
    )
    assert code == 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "config.yaml").exists() and (out / "run.json").exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    config = str(ROOT / "configs" / "tiny_flow_grpo.yaml")
    with pytest.raises(ValueError, match="unknown FlowGRPOConfig key"):  # --debug: the exception itself
        main(["train", "flow-grpo", "--config", config, "--set", "nope=1", "--debug"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*grpo*.yaml")))
def test_shipped_configs_load(name):
    from visalign.config import load_config
    from visalign.pipelines.train import METHODS, _resolve

    method = "pref-grpo" if "pref" in name else "tempflow-grpo" if "tempflow" in name else "flow-grpo"
    load_config(_resolve(METHODS[method][0]), ROOT / "configs" / name)


def evaluating_trainer(tmp_path, **kw) -> FlowGRPOTrainer:
    """A tiny Flow-GRPO run (group 2, batch 2, one micro-batch an iteration) that evaluates on one prompt."""
    settings = dict(group_size=2, sample_batch_size=2, per_device_train_batch_size=2, num_inference_steps=2)
    settings |= dict(eval_num_inference_steps=2, eval_batch_size=2, learning_rate=1e-3, lora_rank=2, lora_alpha=2)
    config = grpo_config(tmp_path, **(settings | kw))
    return FlowGRPOTrainer(tiny_pipeline("sd3"), Brightness(), config, PROMPTS[:1], eval_prompts=PROMPTS[:1])


def test_grpo_evaluates_on_optimizer_steps_not_iterations(tmp_path):
    # 2 optimizer steps per iteration
    trainer = evaluating_trainer(tmp_path, num_batches_per_iteration=2, max_steps=6, eval_steps=4)
    history = trainer.train()
    evaluated = [m["step"] for m in history if any(k.startswith("eval/") for k in m)]
    assert evaluated == [0, 4, 6]  # the start, the iteration that passes step 4, the end
    assert trainer.history is trainer.engine.history


TIME_KEYS = ("time/train_cpu_minutes", "time/train_wall_minutes")


def test_evaluation_rows_carry_training_minutes_that_grow_with_the_step_and_survive_a_resume(tmp_path):
    # save_steps 1: a checkpoint lands on the last step, and must still come after the last evaluation
    history = evaluating_trainer(tmp_path, max_steps=2, eval_steps=1, save_steps=1).train()
    evals = [m for m in history if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in evals] == [0, 1, 2]
    cpu = [m["time/train_cpu_minutes"] for m in evals]
    assert cpu[0] == 0.0 and cpu[0] < cpu[1] < cpu[2]
    assert all(m[TIME_KEYS[1]] > 0 for m in evals[1:])
    assert not any(k in m for m in history if m not in evals for k in TIME_KEYS)  # training rows keep their own

    # continue the finished run from its step-2 checkpoint, which kept the step-2 evaluation
    evaluating_trainer(tmp_path, max_steps=3, eval_steps=1, save_steps=1, resume_from="latest").train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]  # each evaluation logged once
    assert evals[2]["time/train_cpu_minutes"] == cpu[2] < evals[3]["time/train_cpu_minutes"]
    # the resumed step's wall time adds to the restored total, not to zero
    step3 = next(r for r in rows if r["step"] == 3 and "time/iteration" in r)
    assert evals[3][TIME_KEYS[1]] >= evals[2][TIME_KEYS[1]] + step3["time/iteration"] / 60
