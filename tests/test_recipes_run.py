"""Every recipe in `configs/` runs: `visalign train METHOD --config RECIPE --set max_steps=1 ...` in-process.

The recipe's own values stay (its method settings, loss, KL, windows, LoRA, EMA, accumulation, schedules); only what
cannot run offline or in seconds is swapped: a real checkpoint becomes the tiny random pipeline of its family, rewards
and prompt files with weights or data elsewhere become the shapes world's, and the sizes shrink (resolution, steps,
groups, pairs, epochs). One optimizer step, the evaluation at the start and the end, the final checkpoint and export.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from visalign.cli import main
from visalign.config import load_config
from visalign.pipelines.train import METHODS, _resolve, smoke_experts

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
METHOD_OF = {"tempflow_grpo": "tempflow-grpo", "pref_grpo": "pref-grpo", "flow_grpo": "flow-grpo"}
METHOD_OF |= {"dpo": "diffusion-dpo", "dro": "diffusion-dro", "prdp": "prdp", "reward": "reward"}
# family of a real checkpoint -> (tiny pipeline, image side, T5 tokens)
TINY = [("flux", "flux", 32), ("qwen", "qwen-image", 32), ("wan", "wan", 16), ("xl", "sdxl", 32)]
TINY += [("stable-diffusion-3|sd3", "sd3", 32), ("", "sd", 32)]


def method_of(recipe: Path) -> str:
    return next(m for key, m in METHOD_OF.items() if key in recipe.stem)


def tiny_overrides(method: str, config, tmp_path: Path) -> list[str]:
    """`--set` values that make the recipe's run take seconds (see the module docstring)."""
    names = set(vars(config))
    values: dict[str, object] = {"output_dir": tmp_path / "run", "max_steps": 1, "report_to": "none", "fsdp": False}
    values["mixed_precision"] = "'no'"  # float32 on CPU (a quoted YAML string: no is a boolean)
    model = config.pretrained_model_name_or_path
    if method == "reward":
        values |= {"world_pairs": 16, "world_eval_pairs": 8, "world_num_inference_steps": 2, "calibration_pairs": 16}
        values |= {"per_device_train_batch_size": 4, "eval_batch_size": 8}
        return [f"{k}={v}" for k, v in values.items()]
    if not model.startswith(("world:", "tiny:")):
        family, side = next((fam, side) for key, fam, side in TINY if re.search(key, model.lower()))
        values |= {"pretrained_model_name_or_path": f"tiny:{family}", "height": side, "width": side}
        values["max_sequence_length"] = 8
    for name in ("prompts", "eval_prompts"):
        if name in names and getattr(config, name) is not None:
            prompts = tmp_path / "prompts.txt"
            prompts.write_text("a red square\ntwo blue circles\n")
            values[name] = prompts
    suffix = "-video" if getattr(config, "num_frames", None) else ""  # a video family is rewarded on videos
    for name in ("reward", "external_reward", "eval_reward"):
        if name in names and getattr(config, name) is not None and not getattr(config, name).startswith("world"):
            values[name] = "world-verifier" + suffix
            if f"{name}_pretrained" in names:
                values[f"{name}_pretrained"] = None
    if config.num_inference_steps > 4 and not getattr(config, "sde_window_size", 0):
        values["num_inference_steps"] = 4
    values |= {"eval_num_inference_steps": 2, "eval_batch_size": 2}
    if method in ("flow-grpo", "pref-grpo", "tempflow-grpo"):
        group = 2
        values |= {"group_size": group, "sample_batch_size": 2, "num_batches_per_iteration": 1}
        rows = 2 * group if method == "tempflow-grpo" else 2
        values |= {"per_device_train_batch_size": rows, "gradient_accumulation_steps": 1}
        if method == "tempflow-grpo":
            values["num_branch_steps"] = 1
            if config.sde_window_range:  # within the 4 steps' trainable [0, 3)
                values["sde_window_range"] = f"[0,{min(config.sde_window_range[1], 3)}]"
        if config.reward_mode == "win_rate" and values.get("reward") == "world-verifier":
            values["bradley_terry_temperature"] = 0.1
    elif method == "diffusion-dpo":
        values |= {"dataset": None, "prompts_per_round": 2, "num_images_per_prompt": 2}
        values |= {"reward": "world-defects" + suffix, "reward_pretrained": None, "pair_margin": 0}  # never a tie
        values |= {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
        values.setdefault("prompts", "world:train")
    elif method == "diffusion-dro":
        values["experts"] = smoke_experts(tmp_path / "experts", per_category=1)
        values |= {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
        values |= {"rollouts_per_micro_step": 2, "buffer_size": 2}
    elif method == "prdp":
        values |= {"prompts_per_epoch": 2, "images_per_prompt": 2, "sample_batch_size": 4}
        values |= {"per_device_train_batch_size": 2, "prompts_per_update": None}
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_one_step(recipe, tmp_path):
    method = method_of(recipe)
    config = load_config(_resolve(METHODS[method][0]), recipe, ["experts=x"] if method == "diffusion-dro" else [])
    argv = ["train", method, "--config", str(recipe), "--set", *tiny_overrides(method, config, tmp_path)]
    assert main(argv) == 0, argv
    run = tmp_path / "run"
    assert (run / "checkpoints" / "checkpoint-1").is_dir()
    metrics = (run / "metrics.jsonl").read_text()
    assert '"step": 1' in metrics
    if getattr(config, "eval_prompts", None) or getattr(config, "eval_data", None):
        assert '"eval/' in metrics  # evaluated at the start and the end
