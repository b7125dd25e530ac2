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
  quality, motion quality, text alignment), or, without reward tokens, the last token's state to all three. Each
  aspect is z-normalized with the checkpoint's `inference_config` means and stds and `score = overall` = their sum.
  The whole path is torch from the pixels (differentiable, backbone frozen).
  Loading reads VideoAlign's layout: `model_config.json` (base model, head size, reward tokens, frame budget,
  normalization) and `checkpoint-<step>/` with `model.pth` (full state dict) or `adapter_model.safetensors` +
  `non_lora_state_dict.pth` (LoRA merged into the base weights here, `W += alpha / r * B A`, `alpha / sqrt(r)` with
  rsLoRA). The base model is a local folder or Hub id (`base=`, default the config's `model_name_or_path`).

Deviations: VideoAlign samples decoded files at 2 fps; we take `num_frames` frames of the tensor (default the
checkpoint's `num_frames`, else every frame). The prompt wording is ours with the same structure (pass
`prompt_template` for the checkpoint's training prompt, which its scores depend on).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

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
from visalign.reward_models.pairwise import check_template, format_prompt
from visalign.reward_models.vlm import QwenVL, VisionPatches, chat_inputs, check_qwen_vl, load_qwen_vl
from visalign.rewards import RewardModel, load_reward
from visalign.types import RewardOutput

REDUCTIONS = ("mean", "min", "median")
VIDEOREWARD = "KwaiVGI/VideoReward"
ASPECTS = ("visual_quality", "motion_quality", "text_alignment")
SHORT_NAMES = ("VQ", "MQ", "TA")  # VideoAlign's names, used in its config
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
_CRITERIA = (
    "You are rating a generated video on three separate criteria, each from 0 (worst) to 10 (best), each on its own."
    "\n\nVisual Quality: the static quality of the frames: plausible bodies and scenes, sharpness, rich detail in "
    "textures and lighting, pleasing color and composition, and no harmful content.\n{VQ}"
    "\n\nMotion Quality: the dynamics: stable frames without sudden jumps or flicker, physically natural and smooth "
    "movement, moving parts that blend with the background, and enough movement (a nearly static video rates low).\n"
    "{MQ}\n\nText Alignment: how well the video matches the text prompt in its subjects, their actions, the scene, "
    "the style and the camera movement.\nText prompt: {prompt}\n{TA}"
)
VIDEO_PROMPT_TOKENS = _CRITERIA.format(
    **{
        s: f"Rating of {n}: {t}\nEND"
        for s, n, t in zip(SHORT_NAMES, ("Visual Quality", "Motion Quality", "Text Alignment"), REWARD_TOKENS)
    },
    prompt="{prompt}",
)
VIDEO_PROMPT = _CRITERIA.format(
    VQ="", MQ="", TA="Rate the Visual Quality, Motion Quality and Text Alignment.", prompt="{prompt}"
)


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


def videoalign_key(key: str) -> str | None:
    """A VideoAlign checkpoint key (transformers 4 names, optionally PEFT-wrapped) -> `VideoReward`'s key."""
    key = key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    if ".original_module." in key:
        return None  # PEFT's frozen copy of a module saved in full
    if key == "rm_head.weight":
        return "head.weight"
    if key.startswith(("model.visual.", "model.language_model.")):
        return "model." + key
    if key.startswith("visual."):
        return "model.model." + key
    if key.startswith("model."):
        return "model.model.language_model." + key.removeprefix("model.")
    return "model." + key if key.startswith("lm_head.") else key


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
        prompt_template: the question with `{prompt}` (default ours, with or without the reward tokens).
        num_frames: frames sampled uniformly per video (None: all).
        max_pixels: pixel budget per frame (default the processor's).
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
        prompt_template: str | None = None,
        num_frames: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        super().__init__()
        check_qwen_vl(model, processor)
        hidden = model.config.text_config.hidden_size
        outputs = 1 if reward_tokens else 3
        if not isinstance(head, nn.Linear) or head.in_features != hidden or head.out_features not in {outputs, 3}:
            raise ValueError(f"`head` must be nn.Linear({hidden}, {'1 or 3' if reward_tokens else 3}), got {head}")
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"`mean` and `std` need 3 values each, stds > 0; got {mean} and {std}")
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"`num_frames` must be a positive int or None, got {num_frames!r}")
        self.token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS)) if reward_tokens else []
        if reward_tokens and processor.tokenizer.unk_token_id in self.token_ids:
            raise ValueError(f"`processor`'s tokenizer lacks the reward tokens {REWARD_TOKENS}")
        template = prompt_template or (VIDEO_PROMPT_TOKENS if reward_tokens else VIDEO_PROMPT)
        if reward_tokens and not all(template.count(t) == 1 for t in REWARD_TOKENS):
            raise ValueError(f"`prompt_template` must contain each of {REWARD_TOKENS} once")
        self.model = model
        self.processor = processor
        self.head = head.float()
        self.reward_tokens = reward_tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.prompt_template = check_template(template)
        self.num_frames = num_frames
        self.vision = VisionPatches.from_processor(processor, video=True, max_pixels=max_pixels)

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
        `checkpoint_step`: which `checkpoint-<step>` (default the latest). `options` override the constructor's.
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
            num_frames=data.get("num_frames"),
            max_pixels=data.get("max_frame_pixels"),
        )
        reward = cls(model, processor, head, **{**defaults, **options})
        checkpoint = _checkpoint_dir(folder, checkpoint_step, what)
        reward.load_videoalign_weights(checkpoint, config.get("peft_lora_config", {}), what=what)
        cast_backbone(reward.model, dtype)
        return reward.eval().requires_grad_(False)

    def load_videoalign_weights(self, checkpoint: Path, lora: dict[str, Any], *, what: str) -> None:
        """Load `checkpoint/model.pth`, or merge `adapter_model.safetensors` into the current weights and load
        `non_lora_state_dict.pth`; every key must map onto a parameter of the same shape."""
        full = checkpoint / "model.pth"
        if full.is_file():
            load_mapped_state_dict(self, load_checkpoint(full, what=what), videoalign_key, what=what, source=str(full))
            return
        adapter, rest = checkpoint / "adapter_model.safetensors", checkpoint / "non_lora_state_dict.pth"
        if not adapter.is_file() or not rest.is_file():
            raise FileNotFoundError(f"{what}: {checkpoint} holds neither model.pth nor {adapter.name} + {rest.name}")
        settings = (
            read_json(checkpoint / "adapter_config.json", what=what)
            if (checkpoint / "adapter_config.json").is_file()
            else {}
        )
        r = settings.get("r", lora.get("lora_r"))
        alpha = settings.get("lora_alpha", lora.get("lora_alpha"))
        if not r or alpha is None:
            raise ValueError(
                f"{what}: the LoRA rank and alpha are in neither adapter_config.json nor model_config.json"
            )
        rslora = settings.get("use_rslora", lora.get("use_rslora", False))
        scaling = alpha / (math.sqrt(r) if rslora else r)
        state = self.state_dict()
        updates = {videoalign_key(k): v for k, v in load_checkpoint(rest, what=what).items()}
        updates.pop(None, None)
        adapters = {k.replace(".default.", "."): v for k, v in load_checkpoint(adapter, what=what).items()}
        unexpected = [k for k in adapters if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        mismatched = []
        for key_a in [k for k in adapters if k.endswith(".lora_A.weight")]:
            key_b, target = key_a.replace(".lora_A.", ".lora_B."), videoalign_key(key_a.replace(".lora_A", ""))
            if key_b not in adapters or target not in state:
                unexpected.append(key_a)
                continue
            a, b = adapters[key_a].float(), adapters[key_b].float()
            base = updates.get(target, state[target])
            if (b.shape[0], a.shape[1]) != tuple(base.shape):
                mismatched.append(f"{key_a} {tuple(a.shape)} / {key_b} {tuple(b.shape)} vs {tuple(base.shape)}")
                continue
            updates[target] = base + (scaling * b @ a).to(base.dtype)
        unexpected += [k for k in updates if k not in state]
        mismatched += [
            f"{k} {tuple(v.shape)} vs {tuple(state[k].shape)}"
            for k, v in updates.items()
            if k in state and v.shape != state[k].shape
        ]
        missing = [] if "head.weight" in updates else ["rm_head.weight"]
        if unexpected or mismatched or missing:
            raise key_mismatch_error(what, str(checkpoint), missing, unexpected, mismatched)
        self.load_state_dict({**state, **updates}, strict=True)

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        question = format_prompt(self.prompt_template, prompt)
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        b = pixels.shape[0]
        frames = pixels[:, sample_frames(pixels.shape[1], self.num_frames).to(pixels.device)].to(self.device)
        pixel_values, grid = self.vision(frames)
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
        return RewardOutput(normalized.sum(dim=1), aspects, extras={"raw": raw.detach().to(pixels.device)})


def _checkpoint_dir(folder: Path, step: int | None, what: str) -> Path:
    """`folder/checkpoint-<step>`, the highest step when `step` is None."""
    steps = sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    if not steps:
        raise FileNotFoundError(f"{what}: {folder} has no checkpoint-<step> folder")
    if step is not None and step not in steps:
        raise ValueError(f"`checkpoint_step` {step} is not in {folder} (steps: {steps})")
    return folder / f"checkpoint-{steps[-1] if step is None else step}"
