"""`visalign train METHOD --config FILE [--set key=value ...]`: run an alignment recipe.

    visalign train flow-grpo --config configs/world_flow_grpo.yaml
    visalign train pref-grpo --config configs/world_pref_grpo.yaml --set max_steps=20 output_dir=runs/pref
    torchrun --nproc_per_node 2 -m visalign.cli train flow-grpo --config configs/tiny_flow_grpo.yaml --set cpu=true

The YAML file holds values for the method's config dataclass (`--help` of a method lists nothing: read the
dataclass, whose fields carry their help); `--set` overrides them. Each method names its config class and its
trainer, which builds what the config names (`Trainer.from_config`) and trains; the run writes its resolved config,
metrics, checkpoints and final weights under `output_dir`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=sorted(METHODS), help="the alignment method")
    parser.add_argument("--config", default=None, help="YAML file of config values (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override values"
    )


def _resolve(target: str) -> type:
    module, _, name = target.partition(":")
    return importlib.import_module(module).__dict__[name]


def run(args: argparse.Namespace) -> int:
    from visalign.config import load_config

    config_target, trainer_target = METHODS[args.method]
    config = load_config(_resolve(config_target), args.config, args.overrides)
    trainer = _resolve(trainer_target).from_config(config)
    history = trainer.train()
    if trainer.engine.is_main_process and history:
        logger.info("last metrics: %s", json.dumps(history[-1]))
    return 0
