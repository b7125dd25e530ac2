"""visalign: align image and video generators with preferences.

Reward models (`visalign.reward_models`) feed alignment methods (`visalign.pipelines`) that run on diffusers
pipelines; `visalign.benchmarks` evaluates the result. The core vocabulary is importable from here; it is loaded on
first use so that `visalign --help` does not import torch.
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
}
__all__ = ["RewardModel", "RewardOutput", "check_pixels", "check_prompts", "list_rewards", "load_reward"]

if TYPE_CHECKING:
    from visalign.rewards import RewardModel, list_rewards, load_reward
    from visalign.types import RewardOutput, check_pixels, check_prompts


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'visalign' has no attribute {name!r}")
