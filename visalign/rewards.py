"""The reward interface (`RewardModel`) and the registry behind `load_reward` / `list_rewards`.

A reward model is an `nn.Module` whose `score(pixels, prompts)` returns a `RewardOutput`. Subclasses implement
`_score` on validated inputs; `score` (and calling the model) validates inputs and outputs around it. Pairwise
comparison and group rewards have defaults that pointwise models inherit: Bradley-Terry on score differences and
plain scoring of the group. Pairwise judges override `compare` and `group`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from visalign.types import RewardOutput, check_pixels, check_prompts, check_scores


class RewardModel(nn.Module):
    """Base class of every reward. Class attributes describe capabilities:

    - `name`: the registry name.
    - `differentiable`: whether `score` is a torch function of the pixels (gradients reach them).
    - `modalities`: `{"image"}`, `{"video"}` or both.
    - `aspect_names`: the keys of `RewardOutput.aspects` this model fills.
    - `heatmap_names`: the keys of `RewardOutput.heatmaps` this model fills.
    - `temperature`: the Bradley-Terry temperature `tau` of the default `compare`.
    """

    name: str = "reward"
    differentiable: bool = True
    modalities: frozenset[str] = frozenset({"image"})
    aspect_names: tuple[str, ...] = ()
    heatmap_names: tuple[str, ...] = ()
    temperature: float = 1.0

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, **options: Any
    ) -> RewardModel:
        """Load from a hub id or a local folder/file. The only method that touches files.

        `dtype` is the precision of the backbone; small heads and score arithmetic stay float32.
        """
        raise NotImplementedError(f"{cls.__name__} does not load from files; construct it directly")

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput | Tensor:
        """Score validated inputs. Return a `RewardOutput` or just the `[B]` score tensor."""
        raise NotImplementedError

    def score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        """Reward for each sample.

        Args:
            pixels (`Tensor` `[B, 3, H, W]` or `[B, T, 3, H, W]`, float in [0, 1]): images or videos.
            prompts (`list[str]` of length B): the prompt of each sample.
        """
        video = {frozenset({"image"}): False, frozenset({"video"}): True}.get(frozenset(self.modalities))
        check_pixels(pixels, "pixels", video=video)
        prompts = check_prompts(prompts, pixels.shape[0])
        out = self._score(pixels, prompts)
        if isinstance(out, Tensor):
            out = RewardOutput(out)
        b = pixels.shape[0]
        out.score = check_scores(out.score, b, f"{self.name} score").float()
        for k, v in out.aspects.items():
            out.aspects[k] = check_scores(v, b, f"{self.name} aspect {k!r}").float()
        for k, v in out.heatmaps.items():
            if v.ndim != 3 or v.shape[0] != b:
                raise ValueError(f"{self.name} heatmap {k!r} must be [B, H, W] with B={b}, got {tuple(v.shape)}")
        return out

    def forward(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        return self.score(pixels, prompts)

    def compare(self, a: Tensor, b: Tensor, prompts: list[str]) -> Tensor:
        """Probability that `a[i]` is preferred to `b[i]`, `[B]`.

        Default: Bradley-Terry on score differences, `sigmoid((s_a - s_b) / temperature)`, with one forward pass
        per image (both sides scored in one batch).
        """
        if a.shape != b.shape:
            raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        prompts = check_prompts(prompts, a.shape[0])
        s = self.score(torch.cat([a, b]), prompts + prompts).score
        s_a, s_b = s.chunk(2)
        return torch.sigmoid((s_a - s_b) / self.temperature)

    def group(self, pixels: Tensor, prompt: str) -> RewardOutput:
        """Rewards for G samples of one prompt (`pixels` `[G, ...]`). Default: `score` of each sample."""
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` must be a single string for a group, got {type(prompt).__name__}")
        return self.score(pixels, [prompt] * pixels.shape[0])


# Registry: names -> "module:Class" (optionally with default options). Classes load through `from_pretrained`.
REWARDS: dict[str, str | tuple[str, dict[str, Any]]] = {
    "world-verifier": "visalign.world.rewards:WorldVerifierReward",
    # Flow-GRPO's partial GenEval score on the world (exact counts): what Flow-GRPO trains on
    "world-verifier-partial": ("visalign.world.rewards:WorldVerifierReward", {"score": "partial"}),
    # the clause fraction with those exact counts (extra objects of a requested shape fail their clause)
    "world-verifier-exact": ("visalign.world.rewards:WorldVerifierReward", {"score": "exact"}),
    "world-verifier-tidy": ("visalign.world.rewards:WorldVerifierReward", {"score": "tidy"}),
    "world-verifier-bonus": ("visalign.world.rewards:WorldVerifierReward", {"score": "bonus"}),
    "world-defects": "visalign.world.rewards:WorldDefectsReward",
    "world-clip": "visalign.reward_models.clip:WorldCLIPReward",
    "pickscore": "visalign.reward_models.clip:PickScore",
    "hpsv2": ("visalign.reward_models.hps:HPSv2", {"version": "v2.0"}),
    "hpsv2.1": ("visalign.reward_models.hps:HPSv2", {"version": "v2.1"}),
    "imagereward": "visalign.reward_models.imagereward:ImageReward",
    "aesthetic": "visalign.reward_models.aesthetic:LAIONAesthetic",
    "clipscore": "visalign.reward_models.clip:CLIPScore",
    "unifiedreward-pairwise": "visalign.reward_models.pairwise_vlm:UnifiedRewardPairwise",
    "pairwise-http": "visalign.reward_models.pairwise:HTTPPairwiseJudge",
    "unifiedreward-think": (
        "visalign.reward_models.pairwise_vlm:UnifiedRewardPairwise",
        {"prompt_template": "unifiedreward-think"},
    ),
    "unifiedreward-think-http": (
        "visalign.reward_models.pairwise:HTTPPairwiseJudge",
        {"prompt_template": "unifiedreward-think"},
    ),
    "imagedoctor": "visalign.reward_models.imagedoctor:ImageDoctor",
    "frame-aggregate": "visalign.reward_models.video:FrameAggregate",
    "videoreward": "visalign.reward_models.video:VideoReward",
    # Flow-GRPO's `video_ocr` (Wan recipe): OCR on 9 frames spread over the video (every 4th of 33), averaged
    "video-ocr": ("visalign.reward_models.video:FrameAggregate", {"reward": "ocr", "num_frames": 9}),
    # the shapes world's verifier and defect reward on every frame of a video, averaged (Wan on the world, tests)
    "world-verifier-video": (
        "visalign.reward_models.video:FrameAggregate",
        {"reward": "world-verifier", "num_frames": None},
    ),
    "world-defects-video": (
        "visalign.reward_models.video:FrameAggregate",
        {"reward": "world-defects", "num_frames": None},
    ),
    "geneval": "visalign.reward_models.geneval:GenEvalReward",
    # a reward `visalign train reward` wrote (any head: score, aspects, heatmaps); `pretrained` is its folder
    "learned": "visalign.reward_models.learned:LearnedReward",
    "ocr": "visalign.reward_models.ocr:OCRReward",
}


def list_rewards() -> list[str]:
    """Names accepted by `load_reward`."""
    return sorted(REWARDS)


def _resolve(target: str) -> type[RewardModel]:
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"reward target {target!r} must look like 'package.module:ClassName'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, RewardModel)):
        raise ValueError(f"reward target {target!r} is not a visalign.RewardModel subclass")
    return obj


def load_reward(
    name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> RewardModel:
    """Build a registered reward model.

    Args:
        name: a name from `list_rewards()`, or `"package.module:ClassName"` for a reward outside the registry.
        pretrained: hub id, local folder or file of the weights; `None` uses the model's default.
        device, dtype: where and in which precision the backbone runs (heads may stay float32).
        options: model-specific keyword arguments.
    """
    if name in REWARDS:
        entry = REWARDS[name]
        target, defaults = (entry, {}) if isinstance(entry, str) else entry
        options = {**defaults, **options}
    elif ":" in name:
        target = name
    else:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(list_rewards())}")
    cls = _resolve(target)
    model = cls.from_pretrained(pretrained, dtype=dtype, **options)
    if device is not None:
        model.to(device=device)
    return model.eval()
