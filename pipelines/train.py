"""`visalign train METHOD [--config FILE_OR_NAME] [--set key=value ...] [--smoke]`: run an alignment recipe.

    visalign train diffusion-dpo --config world_dpo --smoke          # a bundled recipe, cut to seconds
    visalign train flow-grpo --config configs/world_flow_grpo.yaml
    visalign train pref-grpo --config world_pref_grpo --set max_steps=20 output_dir=runs/pref
    torchrun --nproc_per_node 2 -m visalign.cli train flow-grpo --config tiny_flow_grpo --set cpu=true

`--config` takes a YAML file, or the name of a recipe shipped in the package (`visalign.configs`, the repository's
`configs/` folder): `world_dpo` finds `world_dpo.yaml`. `visalign train METHOD --help` lists the method's config keys
with their help and defaults; `--set` overrides them. `--smoke` applies `SMOKE` on top: a few tiny steps on the
shapes-world models with no evaluation, so any recipe runs end to end in seconds (a recipe for a real checkpoint
keeps its structure and swaps in the world model of its family and the world verifier).

Before anything loads, a preflight checks every model, reward, prompt file and dataset the config names and lists
all that is missing at once. Each method names its config class and its trainer, which builds what the config names
(`Trainer.from_config`) and trains; the run writes its resolved config, metrics, checkpoints and final weights (the
LoRA in `output_dir/final`) under `output_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import re
import signal
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# method -> ("module:ConfigClass", "module:TrainerClass"); a trainer class has `from_config(config)` and `train()`.
METHODS: dict[str, tuple[str, str]] = {
    "flow-grpo": ("visalign.pipelines.grpo:FlowGRPOConfig", "visalign.pipelines.grpo:FlowGRPOTrainer"),
    "pref-grpo": ("visalign.pipelines.grpo:PrefGRPOConfig", "visalign.pipelines.grpo:FlowGRPOTrainer"),
    "tempflow-grpo": (
        "visalign.pipelines.tempflow:TempFlowGRPOConfig",
        "visalign.pipelines.tempflow:TempFlowGRPOTrainer",
    ),
    "diffusion-dpo": ("visalign.pipelines.dpo:DPOConfig", "visalign.pipelines.dpo:DPOTrainer"),
    "diffusion-dro": ("visalign.pipelines.dro:DROConfig", "visalign.pipelines.dro:DROTrainer"),
    "prdp": ("visalign.pipelines.prdp:PRDPConfig", "visalign.pipelines.prdp:PRDPTrainer"),
    "reward": ("visalign.pipelines.reward_training:RewardConfig", "visalign.pipelines.reward_training:RewardTrainer"),
}
FLOW_METHODS = ("flow-grpo", "pref-grpo", "tempflow-grpo")

# `--smoke`: values that make any recipe finish in seconds; a key the method's config lacks is skipped.
SMOKE: dict[str, Any] = {
    "max_steps": 2,
    "save_steps": 0,
    "report_to": "none",
    "eval_prompts": None,
    "eval_data": None,
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,
    "num_inference_steps": 4,
    "eval_num_inference_steps": 4,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "lr_warmup_steps": 0,
    # Flow-GRPO family: one iteration of two groups of two per optimizer step
    "group_size": 2,
    "sample_batch_size": 4,
    "num_batches_per_iteration": 1,
    "gradient_accumulation_steps": 1,
    "per_device_train_batch_size": 4,
    "num_branch_steps": 2,
    "sde_window_size": 0,
    "sde_window_range": None,  # a recipe's window or branch steps may not fit the 4 steps
    # Diffusion-DPO online pairs and PRDP epochs
    "prompts_per_round": 16,
    "num_images_per_prompt": 4,
    "prompts_per_epoch": 2,
    "images_per_prompt": 2,
    "inner_updates": 2,
    "prompts_per_update": 1,
    # Diffusion-DRO
    "policy_update_steps": 1,
    "buffer_size": 4,
    "rollouts_per_micro_step": 4,
    # reward training on world pairs
    "world_pairs": 32,
    "world_eval_pairs": 16,
    "world_generator": None,
    "eval_steps": 0,
}


def bundled_configs() -> dict[str, Path]:
    """The recipes shipped in the package, by name (file stem)."""
    folder = Path(str(resources.files("visalign.configs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_config(name: str | None) -> Path | None:
    """`--config`: an existing YAML file, else a bundled recipe's name (with or without `.yaml`)."""
    if name is None or Path(name).is_file():
        return None if name is None else Path(name)
    bundled = bundled_configs()
    stem = Path(name).name.removesuffix(".yaml")
    if stem in bundled and not Path(name).parent.parts[1:]:  # `world_dpo`, `world_dpo.yaml`, `configs/world_dpo.yaml`
        return bundled[stem]
    raise FileNotFoundError(
        f"--config {name}: no such file, and no bundled recipe of that name; bundled: {', '.join(bundled)}"
    )


def _resolve(target: str) -> type:
    module, _, name = target.partition(":")
    return importlib.import_module(module).__dict__[name]


def config_help(method: str) -> str:
    """The method's config keys with their types, defaults and help (what `train METHOD --help` prints)."""
    cls = _resolve(METHODS[method][0])
    lines = [f"config keys of {method} ({cls.__name__}; YAML values, `--set key=value` overrides):"]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"  {f.name} ({kind}, default {default!r})\n      {f.metadata.get('help', '')}")
    names = ", ".join(bundled_configs())
    lines.append(f"\nbundled recipes (--config NAME): {names}")
    return "\n".join(lines)


class _Method(argparse.Action):
    """Stores the method and puts its config keys into the parser's help (`train METHOD --help`)."""

    def __init__(self, *args: Any, parser: argparse.ArgumentParser, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parser = parser

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        self.parser.epilog = config_help(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "method",
        choices=sorted(METHODS),
        action=_Method,
        parser=parser,
        help="the alignment method (`visalign train METHOD --help` lists its config keys)",
    )
    parser.add_argument(
        "--config", default=None, help="a YAML file of config values, or a bundled recipe's name (e.g. world_dpo)"
    )
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override values"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few tiny steps on the shapes-world models, no evaluation: checks a recipe end to end in seconds",
    )


def smoke_values(method: str, config: Any) -> dict[str, Any]:
    """`SMOKE` restricted to the config's fields, plus the world model, reward and prompts for a real-model recipe."""
    names = {f.name for f in dataclasses.fields(config)}
    values = {k: v for k, v in SMOKE.items() if k in names}
    pretrained = config.pretrained_model_name_or_path
    if "architecture" in names:  # the reward trainer: the world's CLIP and its pairs
        if config.architecture or not pretrained.startswith("world:"):
            values |= {"architecture": None, "train_data": "world:pairs"}
            values["pretrained_model_name_or_path"] = "world:clip"
    elif not pretrained.startswith(("world:", "tiny:")):
        flow = method in FLOW_METHODS or re.search(r"stable-diffusion-3|sd3|flux", pretrained.lower())
        values["pretrained_model_name_or_path"] = "world:sd3" if flow else "world:sd"
    if "num_branch_steps" in names:  # TempFlow-GRPO: a micro-batch holds a sampling batch's children at one step
        values["per_device_train_batch_size"] = values["sample_batch_size"] * values["group_size"]
    worlds = {"prompts": "world:train"} | dict.fromkeys(("reward", "external_reward", "eval_reward"), "world-verifier")
    for field, world in worlds.items():
        if field in names and getattr(config, field) is not None and not getattr(config, field).startswith("world"):
            values[field] = world
    if values.get("reward") and getattr(config, "reward_mode", None) == "win_rate":
        values["bradley_terry_temperature"] = 0.1  # the pointwise verifier's win rates (configs/world_pref_grpo.yaml)
    for field in ("reward_pretrained", "external_reward_pretrained", "dataset"):
        if field in names and getattr(config, field) is not None:
            values[field] = None
    if "experts" in names:  # Diffusion-DRO: `run` writes world renders there
        values["experts"] = "smoke_experts"
    return values


def smoke_experts(folder: Path, per_category: int = 2, seed: int = 0) -> Path:
    """Diffusion-DRO's `--smoke` experts: world renders (exact images) of a few train prompts per category."""
    import numpy as np
    import torch

    from visalign.pipelines.expert_sets import ExpertSet, save_experts
    from visalign.world.scenes import prompt_split, render_prompt

    rng = np.random.default_rng(seed)
    prompts = [p for group in prompt_split("train").values() for p in group[:per_category]]
    images = [torch.from_numpy(render_prompt(p, rng)).float() for p in prompts]
    return save_experts(ExpertSet([p.text for p in prompts], images), folder)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from visalign.config import config_from_dict, config_to_dict, load_config, parse_overrides
    from visalign.preflight import check_config

    config_cls = _resolve(METHODS[args.method][0])
    config = load_config(config_cls, find_config(args.config), args.overrides)
    if args.smoke:  # the recipe, then the smoke values, then the command line's own --set
        smoke = smoke_values(args.method, config)
        if "experts" in smoke:
            smoke["experts"] = str(smoke_experts(Path(config.output_dir) / "smoke_experts"))
        config = config_from_dict(config_cls, config_to_dict(config) | smoke | parse_overrides(args.overrides))
        logger.info("--smoke: %s", json.dumps(smoke))
    check_config(config)
    trainer = _resolve(METHODS[args.method][1]).from_config(config)
    # `kill` (SIGTERM) exits through the run loop, which marks the run stopped in run.json (resume_from=latest)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        history = trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if trainer.engine.is_main_process and history:
        logger.info("last metrics: %s", json.dumps(history[-1]))
        logger.info("trained weights: %s", Path(config.output_dir) / "final")
    return 0
