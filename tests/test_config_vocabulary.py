"""One config vocabulary: earlier keys name their replacement; batch and step counts mean the same in every method."""

from __future__ import annotations

import dataclasses

import pytest

from visalign.config import RENAMED, GeneratorConfig, TrainConfig, load_config
from visalign.lifecycle import passes
from visalign.pipelines.dpo import DPOConfig
from visalign.pipelines.grpo import FlowGRPOConfig
from visalign.pipelines.reno import ReNOConfig
from visalign.pipelines.reward_training import RewardConfig
from visalign.pipelines.tempflow import TempFlowGRPOConfig
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
