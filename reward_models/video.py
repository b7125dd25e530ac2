"""Video rewards: any image reward applied to frames, and VideoAlign's multi-aspect VideoReward.

- `FrameAggregate(reward, num_frames, reduce)`: scores `num_frames` frames sampled uniformly (indices
  `round(linspace(0, T - 1, n))`, as VideoScore and Pref-GRPO sample) with an image reward in one batch and reduces
  them by `mean`, `min` or `median`; the reward's aspects are reduced the same way and its heatmaps averaged over the
  frames. Aspect `temporal_consistency`: the mean similarity of adjacent sampled frames,
  `1 - ||f_t - f_t+1|| / (||f_t|| + ||f_t+1||)` in [0, 1] (1 for identical frames) on features `f` (default: the
  frame pooled to 16 x 16 pixels; pass e.g. CLIP image embeddings); `consistency_weight` adds it to the score.
  A video of identical frames scores exactly as its frame does.
- `VideoReward` [`videoreward`] (VideoAlign, Liu et al. 2025, arXiv 2501.13918; KwaiVGI/VideoAlign): a Qwen2-VL
  backbone reads the video and a prompt holding three reward tokens `<|VQ_reward|>`, `<|MQ_reward|>`,
  `<|TA_reward|>`; a bias-free linear head `rm_head` maps each token's last hidden state to its aspect (visual
  quality, motion quality, text alignment), or, without reward tokens, the last token's state to all three
  (`Qwen2VLRewardModelBT.forward`, trainer.py). Each aspect is z-normalized with the checkpoint's
  `inference_config` means and stds and `score = overall` = their sum (`VideoVLMRewardInference.reward`,
  inference.py). The whole path is torch from the pixels (differentiable, backbone frozen).

VideoReward follows the official inference (KwaiVGI/VideoAlign, commit 219ab9d) by default (the official prompt
text and checkpoint formats are in `videoalign.py`):
- prompt: `build_prompt` (prompt_template.py) with the checkpoint's `data_config.prompt_template_type`; the released
  checkpoint's `"detailed_special"` is `DETAILED_PROMPT_WITH_SPECIAL_TOKEN`, quoted verbatim in `VIDEOALIGN_PROMPTS`
  with the official placeholder `{text_prompt}`. `prompt_template="visalign"` is our earlier shorter wording.
- frames: `smart_nframes` and `_read_video_*` (vision_process.py): `n = T / video_fps * fps` (fps 2), at least 4,
  at most min(768, T), rounded to an even count (Python's `round`, halves to even), capped at T; indices
  `round(linspace(0, T - 1, n))`; or `num_frames` rounded to even when the config sets it. `frame_sampling="all"`
  (our earlier behaviour) takes every frame, or `num_frames` uniformly spread.
- pixels per frame: `smart_resize` to multiples of 28 within [`VIDEO_MIN_PIXELS` = 128 * 28^2,
  `data_config.max_frame_pixels`] (200704 = 448^2 in the release; `fetch_video`), bicubic with antialiasing.
- weights: every released format (`load_model_from_checkpoint`, utils.py): `checkpoint-<step>/model.pth`, the full
  state dict of the PEFT-wrapped model (`base_model.model.*`, LoRA layers as `*.base_layer.*` + `*.lora_A/B.default.*`)
  or a merged one; or `adapter_model.safetensors` + `non_lora_state_dict.pth`. LoRA is merged into the base weights,
  `W = W0 + s B A` (embeddings `W0 + s (B A)^T`), `s = lora_alpha / r` (`/ sqrt(r)` with rsLoRA), read from the
  checkpoint's `peft_lora_config` as the official inference builds its `LoraConfig` (`adapter_config.json` when the
  config has none).

Deviations, and why: tensors carry no frame rate, so the sampling assumes `video_fps` (default 16, Wan2.1's rate;
pass the real one); frames are resized in float from [0, 1] pixels (the reference resizes decoded uint8 frames) so
the path stays differentiable; batches are right-padded and read at the reward tokens as the reference does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AddedToken

from visalign.reward_models.loading import (
    cast_backbone,
    key_mismatch_error,
    load_checkpoint,
    load_mapped_state_dict,
    read_json,
    resolve_folder,
)
from visalign.reward_models.videoalign import (
    PLACEHOLDER,
    REWARD_TOKENS,
    SHORT_NAMES,
    checkpoint_dir,
    lora_settings,
    merge_lora,
    resolve_video_prompt,
    split_peft_state,
    videoalign_key,
)
from visalign.reward_models.vlm import VisionPatches, chat_inputs, check_qwen_vl, load_qwen_vl
from visalign.rewards import RewardModel, load_reward
from visalign.types import RewardOutput

if TYPE_CHECKING:
    from visalign.reward_models.vlm import QwenVL

REDUCTIONS = ("mean", "min", "median")
VIDEOREWARD = "KwaiVGI/VideoReward"
ASPECTS = ("visual_quality", "motion_quality", "text_alignment")
FRAME_SAMPLING = ("official", "all")
VIDEO_MIN_TOKENS = 128  # VIDEO_MIN_PIXELS = 128 * 28 * 28: merged tokens per frame pair at Qwen2-VL's 28-pixel factor
DEFAULT_MAX_PIXELS = 448 * 448  # the released checkpoint's data_config.max_frame_pixels (200704)


def _round_even(x: float) -> int:
    return round(x / 2) * 2


def videoalign_frame_count(
    total: int, video_fps: float, fps: float = 2.0, num_frames: int | None = None, min_frames: int = 4
) -> int:
    """VideoAlign's frame count for a `total`-frame video at `video_fps` (`smart_nframes`, vision_process.py).

    `num_frames` given: rounded to an even count. Else `total / video_fps * fps` clamped to
    [`min_frames` rounded up to even, min(768, `total`) rounded down to even], rounded to even. Capped at `total`.
    """
    if num_frames is not None:
        n = _round_even(num_frames)
    else:
        lowest, highest = math.ceil(min_frames / 2) * 2, math.floor(min(768, total) / 2) * 2
        n = _round_even(min(max(total / video_fps * fps, lowest), highest))
    n = min(n, total)
    if n < 2:
        raise ValueError(f"VideoAlign's sampling needs at least 2 frames; got {n} of a {total}-frame video")
    return n


def sample_frames(total: int, num_frames: int | None) -> Tensor:
    """Indices `[n]` of `num_frames` frames spread uniformly over `total` (first and last included); None: all."""
    if num_frames is None:
        return torch.arange(total)
    if not isinstance(num_frames, int) or not 1 <= num_frames <= total:
        raise ValueError(
            f"`num_frames` must be an int in [1, {total}] (the video's frames) or None, got {num_frames!r}"
        )
    return torch.linspace(0, total - 1, num_frames).round().long()


def pooled_pixels(frames: Tensor) -> Tensor:
    """Default consistency features: frames `[N, 3, H, W]` pooled to 16 x 16 pixels, flattened `[N, 768]`."""
    return F.adaptive_avg_pool2d(frames.float(), 16).flatten(1)


def adjacent_similarity(features: Tensor) -> Tensor:
    """`1 - ||f_t - f_t+1|| / (||f_t|| + ||f_t+1||)` averaged over adjacent frames: `[B, n, D]` -> `[B]` in [0, 1]."""
    if features.shape[1] < 2:
        return features.new_ones(features.shape[0])
    a, b = features[:, :-1], features[:, 1:]
    norms = a.norm(dim=-1) + b.norm(dim=-1)
    distance = (a - b).norm(dim=-1)
    similarity = torch.where(norms > 0, 1 - distance / norms.clamp_min(1e-12), torch.ones_like(norms))
    return similarity.mean(dim=1)


class FrameAggregate(RewardModel):
    """Any image reward applied to videos `[B, T, 3, H, W]`.

    Args:
        reward: an image reward.
        num_frames: frames sampled uniformly per video (None: every frame).
        reduce: `"mean"`, `"min"` or `"median"` over the sampled frames.
        features: frames `[N, 3, H, W]` -> features `[N, D]` for `temporal_consistency` (default `pooled_pixels`).
        consistency_weight: weight of `temporal_consistency` added to the score (0: an aspect only).
    """

    modalities = frozenset({"video"})

    def __init__(
        self,
        reward: RewardModel,
        num_frames: int | None = 8,
        reduce: Literal["mean", "min", "median"] = "mean",
        *,
        features: Callable[[Tensor], Tensor] = pooled_pixels,
        consistency_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(reward, RewardModel) or "image" not in reward.modalities:
            raise ValueError(f"`reward` must be an image RewardModel, got {type(reward).__name__}")
        if "temporal_consistency" in reward.aspect_names:
            raise ValueError(f"`reward` {reward.name} already has an aspect named 'temporal_consistency'")
        if reduce not in REDUCTIONS:
            raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}")
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"`num_frames` must be a positive int or None, got {num_frames!r}")
        if not isinstance(consistency_weight, (int, float)) or not math.isfinite(consistency_weight):
            raise ValueError(f"`consistency_weight` must be a finite number, got {consistency_weight!r}")
        self.reward = reward
        self.num_frames = num_frames
        self.reduce = reduce
        self.features = features
        self.consistency_weight = float(consistency_weight)
        self.name = f"{reward.name}-frames"
        self.differentiable = reward.differentiable
        self.aspect_names = (*reward.aspect_names, "temporal_consistency")
        self.heatmap_names = reward.heatmap_names

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        reward: str | None = None,
        num_frames: int | None = 8,
        reduce: Literal["mean", "min", "median"] = "mean",
        consistency_weight: float = 0.0,
        **reward_options: Any,
    ) -> FrameAggregate:
        """`load_reward(reward, pretrained, dtype=dtype, **reward_options)` applied to frames."""
        if reward is None:
            raise ValueError("frame-aggregate: `reward` must name the image reward to apply, e.g. reward='pickscore'")
        inner = load_reward(reward, pretrained, dtype=dtype, **reward_options)
        return cls(inner, num_frames, reduce, consistency_weight=consistency_weight)

    def _reduce(self, values: Tensor) -> Tensor:
        """`[B, n]` -> `[B]`."""
        if self.reduce == "mean":
            return values.mean(dim=1)
        return values.min(dim=1).values if self.reduce == "min" else values.median(dim=1).values

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        b, t = pixels.shape[:2]
        idx = sample_frames(t, self.num_frames).to(pixels.device)
        n = len(idx)
        frames = pixels[:, idx].flatten(0, 1)
        out = self.reward.score(frames, [p for p in prompts for _ in range(n)])
        frame_scores = out.score.view(b, n)
        aspects = {k: self._reduce(v.view(b, n)) for k, v in out.aspects.items()}
        aspects["temporal_consistency"] = adjacent_similarity(self.features(frames).view(b, n, -1))
        score = self._reduce(frame_scores) + self.consistency_weight * aspects["temporal_consistency"]
        heatmaps = {k: v.view(b, n, *v.shape[1:]).mean(dim=1) for k, v in out.heatmaps.items()}
        extras = {"frame_scores": frame_scores, "frame_indices": idx, "frame_extras": out.extras}
        return RewardOutput(score, aspects, heatmaps, extras)


class VideoReward(RewardModel):
    """VideoAlign's VideoReward: three z-normalized aspects from a Qwen2-VL reward model; `score` is their sum.

    Args:
        model: a `Qwen2VLForConditionalGeneration` (or Qwen2.5-VL) backbone.
        processor: its processor (with the reward tokens in its tokenizer when `reward_tokens`).
        head: `nn.Linear(hidden, 3 or 1, bias=False)`: per reward token, its aspect's value (or one value per token);
            without reward tokens, 3 values from the last token.
        reward_tokens: read the head at `<|VQ_reward|>`, `<|MQ_reward|>`, `<|TA_reward|>` (VideoAlign's "special")
            instead of at the last token.
        mean, std: per-aspect normalization (VQ, MQ, TA order).
        prompt_template: `"official"` (VideoAlign's `detailed_special`, or `detailed` without reward tokens), a
            VideoAlign `prompt_template_type` (`"detailed_special"`, `"detailed"`, `"none"`), `"visalign"` (our
            earlier wording), or a string with `{text_prompt}`.
        frame_sampling: `"official"` (VideoAlign's count at `fps`, see the module docstring) or `"all"` (every frame,
            or `num_frames` spread uniformly: our earlier behaviour).
        video_fps: frame rate of the videos given to `score` (tensors carry none; default Wan2.1's 16).
        fps: VideoAlign's sampling rate (its `data_config.fps`, 2).
        num_frames: official: a fixed count (rounded to even) instead of `fps`; `"all"`: frames kept (None: all).
        min_pixels, max_pixels: pixel budget per frame (default: VideoAlign's `VIDEO_MIN_PIXELS` =
            128 merged tokens = 128 * 28^2 for Qwen2-VL, and 448^2).
    """

    name = "videoreward"
    modalities = frozenset({"video"})
    aspect_names = ASPECTS

    def __init__(
        self,
        model: QwenVL,
        processor: Any,
        head: nn.Linear,
        *,
        reward_tokens: bool = True,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        prompt_template: str = "official",
        frame_sampling: Literal["official", "all"] = "official",
        video_fps: float = 16.0,
        fps: float = 2.0,
        num_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        check_qwen_vl(model, processor)
        hidden = model.config.text_config.hidden_size
        outputs = 1 if reward_tokens else 3
        if not isinstance(head, nn.Linear) or head.in_features != hidden or head.out_features not in {outputs, 3}:
            raise ValueError(f"`head` must be nn.Linear({hidden}, {'1 or 3' if reward_tokens else 3}), got {head}")
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"`mean` and `std` need 3 values each, stds > 0; got {mean} and {std}")
        if frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"`frame_sampling` must be one of {FRAME_SAMPLING}, got {frame_sampling!r}")
        for arg, value in (("video_fps", video_fps), ("fps", fps)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive number, got {value!r}")
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"`num_frames` must be a positive int or None, got {num_frames!r}")
        self.token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS)) if reward_tokens else []
        if reward_tokens and processor.tokenizer.unk_token_id in self.token_ids:
            raise ValueError(f"`processor`'s tokenizer lacks the reward tokens {REWARD_TOKENS}")
        template = resolve_video_prompt(prompt_template, reward_tokens)
        if reward_tokens and not all(template.count(t) == 1 for t in REWARD_TOKENS):
            raise ValueError(f"`prompt_template` must contain each of {REWARD_TOKENS} once")
        vision = VisionPatches.from_processor(processor, video=True)
        factor = vision.patch_size * vision.merge_size
        min_pixels = VIDEO_MIN_TOKENS * factor**2 if min_pixels is None else min_pixels
        for arg, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if not isinstance(value, int) or value < factor**2:
                raise ValueError(f"`{arg}` must be an int >= {factor**2} (one {factor}x{factor} cell), got {value!r}")
        self.model = model
        self.processor = processor
        self.head = head.float()
        self.reward_tokens = reward_tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.prompt_template = template
        self.frame_sampling = frame_sampling
        self.video_fps, self.fps, self.num_frames = float(video_fps), float(fps), num_frames
        self.vision = dataclasses.replace(vision, min_pixels=min_pixels, max_pixels=max_pixels)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        base: str | None = None,
        checkpoint_step: int | None = None,
        **options: Any,
    ) -> VideoReward:
        """Load VideoAlign's layout from a folder or Hub repo (default `KwaiVGI/VideoReward`).

        `base`: the Qwen2-VL base model (default: `model_config.model_name_or_path` of the checkpoint);
        `checkpoint_step`: which `checkpoint-<step>` (default the latest). The prompt, sampling rate, frame count and
        pixel budget come from the checkpoint's `data_config`, as in the official inference; `options` override the
        constructor's arguments.
        """
        what = "VideoReward"
        folder = resolve_folder(
            pretrained or VIDEOREWARD, ["*.json", "checkpoint-*/*"], required=["model_config.json"], what=what
        )
        config = read_json(folder / "model_config.json", what=what)
        model_config, data = config.get("model_config", {}), config.get("data_config", {})
        base = base or model_config.get("model_name_or_path")
        if base is None:
            raise ValueError(f"{what}: {folder}/model_config.json names no base model; pass `base`")
        reward_token = model_config.get("reward_token", "last")
        special = bool(model_config.get("use_special_tokens")) or reward_token == "special"
        if not special and reward_token != "last":
            raise ValueError(f"{what}: reward_token {reward_token!r} is not supported (only 'special' and 'last')")
        if data.get("sample_type", "uniform") != "uniform":
            raise ValueError(f"{what}: data_config.sample_type {data['sample_type']!r} is not supported ('uniform')")
        model, processor = load_qwen_vl(base, None, what=f"{what} base model")
        if special:
            processor.tokenizer.add_tokens([AddedToken(t, special=True) for t in REWARD_TOKENS])
            model.resize_token_embeddings(len(processor.tokenizer))
        head = nn.Linear(model.config.text_config.hidden_size, model_config.get("output_dim", 3), bias=False)
        norm = config.get("inference_config") or {}
        defaults = dict(
            reward_tokens=special,
            mean=tuple(float(norm.get(f"{s}_mean", 0.0)) for s in SHORT_NAMES),
            std=tuple(float(norm.get(f"{s}_std", 1.0)) for s in SHORT_NAMES),
            prompt_template=data.get("prompt_template_type", "none"),  # DataConfig's default, as build_prompt reads
            fps=float(data.get("fps", 2.0)),
            num_frames=data.get("num_frames"),
            max_pixels=int(data.get("max_frame_pixels", 240 * 320)),  # DataConfig's default
        )
        reward = cls(model, processor, head, **{**defaults, **options})
        checkpoint = checkpoint_dir(folder, checkpoint_step, what)
        reward.load_videoalign_weights(checkpoint, config.get("peft_lora_config") or {}, what=what)
        cast_backbone(reward.model, dtype)
        return reward.eval().requires_grad_(False)

    def load_videoalign_weights(self, checkpoint: Path, lora: dict[str, Any], *, what: str) -> None:
        """Load `checkpoint/model.pth` (full, PEFT-wrapped or merged), or `adapter_model.safetensors` merged into
        the current weights plus `non_lora_state_dict.pth`; every key must map onto a parameter of the same shape."""
        state = self.state_dict()

        def ours(key: str) -> Tensor | None:
            return state.get(videoalign_key(key) or "")

        full = checkpoint / "model.pth"
        if full.is_file():
            plain, adapters = split_peft_state(load_checkpoint(full, what=what))
            if adapters:
                unexpected, mismatched = merge_lora(plain, adapters, *lora_settings(lora, checkpoint, what=what), ours)
                if unexpected or mismatched:
                    raise key_mismatch_error(what, str(full), [], unexpected, mismatched)
            load_mapped_state_dict(self, plain, videoalign_key, what=what, source=str(full))
            return
        adapter, rest = checkpoint / "adapter_model.safetensors", checkpoint / "non_lora_state_dict.pth"
        if not adapter.is_file() or not rest.is_file():
            raise FileNotFoundError(f"{what}: {checkpoint} holds neither model.pth nor {adapter.name} + {rest.name}")
        plain, stray = split_peft_state(load_checkpoint(rest, what=what))
        _, adapters = split_peft_state(load_checkpoint(adapter, what=what))
        unexpected, mismatched = merge_lora(plain, adapters, *lora_settings(lora, checkpoint, what=what), ours)
        updates = {videoalign_key(k): v for k, v in plain.items()}
        updates.pop(None, None)
        known = {None, *state}  # None: PEFT's frozen copies, dropped on purpose
        unexpected += list(stray) + [k for k in plain if videoalign_key(k) not in known]
        mismatched += [
            f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)}"
            for k, v in updates.items()
            if k in state and v.shape != state[k].shape
        ]
        missing = [] if "head.weight" in updates else ["rm_head.weight"]
        if unexpected or mismatched or missing:
            raise key_mismatch_error(what, str(checkpoint), missing, unexpected, mismatched)
        self.load_state_dict({**state, **updates}, strict=True)

    def frame_indices(self, total: int) -> Tensor:
        """Indices `[n]` of the frames read from a `total`-frame video."""
        if self.frame_sampling == "all":
            return sample_frames(total, self.num_frames)
        return sample_frames(total, videoalign_frame_count(total, self.video_fps, self.fps, self.num_frames))

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        question = self.prompt_template.replace(PLACEHOLDER, prompt)  # not str.format: captions may hold braces
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        b = pixels.shape[0]
        idx = self.frame_indices(pixels.shape[1]).to(pixels.device)
        pixel_values, grid = self.vision(pixels[:, idx].to(self.device))
        inputs = chat_inputs(
            self.processor,
            [self.conversation(p) for p in prompts],
            video_grids=[grid[i : i + 1] for i in range(b)],
            padding_side="right",
            device=self.device,
        )
        hidden = self.model.model(**inputs, pixel_values_videos=pixel_values, video_grid_thw=grid).last_hidden_state
        if self.reward_tokens:
            at = torch.isin(inputs["input_ids"], torch.tensor(self.token_ids, device=self.device))
            raw = self.head(hidden[at].view(b, 3, -1).float())  # [B, 3 tokens, outputs]
            raw = raw.diagonal(dim1=1, dim2=2) if raw.shape[-1] == 3 else raw[..., 0]
        else:
            last = inputs["attention_mask"].sum(dim=1) - 1
            raw = self.head(hidden[torch.arange(b, device=self.device), last].float())
        normalized = ((raw - self.mean) / self.std).to(pixels.device)
        aspects = {name: normalized[:, k] for k, name in enumerate(ASPECTS)}
        extras = {"raw": raw.detach().to(pixels.device), "frame_indices": idx}
        return RewardOutput(normalized.sum(dim=1), aspects, extras=extras)
