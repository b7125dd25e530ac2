"""One config vocabulary: earlier keys name their replacement; batch and step counts mean the same in every method."""

from __future__ import annotations

import dataclasses
import json

import pytest

from visalign.config import RENAMED, GeneratorConfig, TrainConfig, load_config
from visalign.lifecycle import passes
from visalign.pipelines.dpo import DPOConfig
from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer
from visalign.pipelines.reno import ReNOConfig
from visalign.pipelines.reward_training import RewardConfig
from visalign.pipelines.tempflow import TempFlowGRPOConfig
from visalign.rewards import load_reward
from visalign.testing import tiny_pipeline
from visalign.world.train import TrainBaseConfig


@pytest.mark.parametrize(
    "cls,key,match",
    [
        (DPOConfig, "train_batch_size", "renamed `per_device_train_batch_size`.*across processes in diffusion-dpo"),
        (FlowGRPOConfig, "eval_every", "renamed `eval_steps`.*counted iterations in flow-grpo"),
        (RewardConfig, "checkpointing_steps", "renamed `save_steps`"),
        (FlowGRPOConfig, "pretrained", "renamed `pretrained_model_name_or_path`"),
        (TrainBaseConfig, "eval_every", "TrainBaseConfig key `eval_every` was renamed `eval_steps`"),
        (TrainBaseConfig, "lr", "renamed `learning_rate`"),
        (TrainBaseConfig, "batch_size", "renamed `per_device_train_batch_size`"),
        (TrainBaseConfig, "sd3_lr", "renamed `sd3_learning_rate`"),
        (TrainBaseConfig, "vae_batch_size", "renamed `vae_per_device_train_batch_size`"),
    ],
)
def test_an_earlier_key_names_its_replacement(tmp_path, cls, key, match):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: 8\n")
    with pytest.raises(ValueError, match=match):
        load_config(cls, recipe)
    with pytest.raises(ValueError, match=match):
        load_config(cls, None, [f"{key}=8"])


def test_every_renamed_key_is_gone_and_its_replacement_exists():
    configs = (TrainConfig, GeneratorConfig, DPOConfig, FlowGRPOConfig, ReNOConfig, TrainBaseConfig)
    fields = {f.name for cls in configs for f in dataclasses.fields(cls)}
    for old, new in RENAMED.items():
        assert old not in fields and new in fields, old


def test_every_field_has_help():
    for cls in (GeneratorConfig, DPOConfig, FlowGRPOConfig, TempFlowGRPOConfig, RewardConfig, TrainBaseConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls.__name__


def test_grpo_steps_per_iteration_follow_the_micro_batches():
    # 4 sampling batches of 9 per iteration; a step of 2 micro-batches of 9 covers 2 batches: 2 steps per iteration
    assert FlowGRPOConfig().updates_per_iteration == 2
    config = FlowGRPOConfig(sample_batch_size=8, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    assert config.updates_per_iteration == 2
    # TempFlow: a batch of 1 seed x 6 children at a branch step
    assert TempFlowGRPOConfig(per_device_train_batch_size=3, gradient_accumulation_steps=2).updates_per_iteration == 4
    with pytest.raises(ValueError, match="must cover whole sampling batches"):
        FlowGRPOConfig(sample_batch_size=8, per_device_train_batch_size=3, gradient_accumulation_steps=1)


def test_passes_counts_multiples_crossed_by_a_multi_step_train_step():
    assert [s for s in range(1, 9) if passes(s - 1, s, 3)] == [3, 6]
    assert [after for before, after in [(0, 2), (2, 4), (4, 6)] if passes(before, after, 3)] == [4, 6]
    assert not passes(0, 10, 0)


def tiny_grpo_trainer(tmp_path, **kw) -> FlowGRPOTrainer:
    """A Flow-GRPO run on the tiny SD3 pipeline small enough to train a few steps in a test (`kw` overrides)."""
    settings = dict(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        height=8,
        width=8,
        max_sequence_length=8,
        num_inference_steps=2,
        guidance_scale=1.0,
        group_size=2,
        sample_batch_size=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_batches_per_iteration=1,
        eval_num_inference_steps=2,
        eval_batch_size=2,
        beta=0.0,
        lora_rank=2,
        lora_alpha=2,
    )
    config = FlowGRPOConfig(**(settings | kw))
    prompts = ["a red square"]
    return FlowGRPOTrainer(tiny_pipeline("sd3"), load_reward("world-defects"), config, prompts, eval_prompts=prompts)


def test_grpo_evaluates_on_optimizer_steps_not_iterations(tmp_path):
    # 2 optimizer steps per iteration
    trainer = tiny_grpo_trainer(tmp_path, num_batches_per_iteration=2, max_steps=6, eval_steps=4)
    history = trainer.train()
    evaluated = [m["step"] for m in history if any(k.startswith("eval/") for k in m)]
    assert evaluated == [0, 4, 6]  # the start, the iteration that passes step 4, the end
    assert trainer.history is trainer.engine.history


TIME_KEYS = ("time/train_cpu_minutes", "time/train_wall_minutes")


def test_evaluation_rows_carry_training_minutes_that_grow_with_the_step_and_survive_a_resume(tmp_path):
    # save_steps 1: a checkpoint lands on the last step, and must still come after the last evaluation
    history = tiny_grpo_trainer(tmp_path, max_steps=2, eval_steps=1, save_steps=1).train()
    evals = [m for m in history if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in evals] == [0, 1, 2]
    cpu = [m["time/train_cpu_minutes"] for m in evals]
    assert cpu[0] == 0.0 and cpu[0] < cpu[1] < cpu[2]
    assert all(m[TIME_KEYS[1]] > 0 for m in evals[1:])
    assert not any(k in m for m in history if m not in evals for k in TIME_KEYS)  # training rows keep their own

    # continue the finished run from its step-2 checkpoint, which kept the step-2 evaluation
    tiny_grpo_trainer(tmp_path, max_steps=3, eval_steps=1, save_steps=1, resume_from="latest").train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]  # each evaluation logged once
    assert evals[2]["time/train_cpu_minutes"] == cpu[2] < evals[3]["time/train_cpu_minutes"]
    # the resumed step's wall time adds to the restored total, not to zero
    step3 = next(r for r in rows if r["step"] == 3 and "time/iteration" in r)
    assert evals[3][TIME_KEYS[1]] >= evals[2][TIME_KEYS[1]] + step3["time/iteration"] / 60
