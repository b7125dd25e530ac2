"""visalign: align image and video generators with preferences.

Reward models (`visalign.reward_models`) feed alignment methods (`visalign.pipelines`) that run on diffusers
pipelines; `visalign.benchmarks` evaluates the result. The core vocabulary lives here.
"""

from visalign.rewards import RewardModel, list_rewards, load_reward
from visalign.types import RewardOutput, check_pixels, check_prompts

__version__ = "0.1.0"
__all__ = ["RewardModel", "RewardOutput", "check_pixels", "check_prompts", "list_rewards", "load_reward"]
