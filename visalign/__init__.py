"""visalign: align image and video generators with preferences.

Reward models (`visalign.reward_models`) feed alignment methods (`visalign.pipelines`) that run on diffusers
pipelines; `visalign.benchmarks` evaluates the result. The core vocabulary is importable from here; it is loaded on
first use so that `visalign --help` does not import torch. The public names (`visalign.__all__`):

- `load_reward(name, pretrained=None, *, device, dtype, **options)`: build a registered reward model.
- `list_rewards()`: the names `load_reward` accepts.
- `RewardModel`: the reward interface (`score`, `compare`, `group`); `RewardOutput` what `score` returns
  (`score [B]`, `aspects`, `heatmaps`, `extras`).
- `check_pixels(pixels)`, `check_prompts(prompts)`: the input checks every reward applies.
- `load_generator(model, *, lora=None, lora_scale=1.0, device=None, dtype=None)`: a diffusers pipeline from
  `world:sd`, `world:sd3`, a folder or a hub id, with a trained LoRA, and its generation defaults (the one loader
  every command uses).
- `resolve_settings(pipe, defaults, overrides)`: the exact call arguments a run samples with.
- `load_config(cls, path, overrides)`, `TrainConfig`: method configs from YAML and `key=value` overrides.
- `check_config(config)`: the preflight; lists every model, reward, prompt file and dataset a config names that is
  missing.

Each has its own docstring (`help(visalign.load_generator)`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "RewardModel": "visalign.rewards",
    "list_rewards": "visalign.rewards",
    "load_reward": "visalign.rewards",
    "RewardOutput": "visalign.types",
    "check_pixels": "visalign.types",
    "check_prompts": "visalign.types",
    "load_generator": "visalign.loading",
    "resolve_settings": "visalign.loading",
    "load_config": "visalign.config",
    "TrainConfig": "visalign.config",
    "check_config": "visalign.preflight",
}
__all__ = [
    "RewardModel",
    "RewardOutput",
    "TrainConfig",
    "check_config",
    "check_pixels",
    "check_prompts",
    "list_rewards",
    "load_config",
    "load_generator",
    "load_reward",
    "resolve_settings",
]

if TYPE_CHECKING:
    from visalign.config import TrainConfig, load_config
    from visalign.loading import load_generator, resolve_settings
    from visalign.preflight import check_config
    from visalign.rewards import RewardModel, list_rewards, load_reward
    from visalign.types import RewardOutput, check_pixels, check_prompts


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'visalign' has no attribute {name!r}")
