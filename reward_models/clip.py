"""CLIP rewards: the shared scorer `CLIPScorer`, PickScore, CLIPScore and the shapes world's CLIP.

Every CLIP-style reward is `score = s * f(cos(E_img(x), E_txt(p)))` with L2-normalized projections:

- PickScore v1 (Kirstain et al., 2023): `s = exp(logit_scale)`, `f = identity`, transformers `CLIPModel` (ViT-H/14)
  from `yuvalkirstain/PickScore_v1`, tokenizer and preprocessing of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`
  (`CLIPImageProcessor`: shortest edge 224 bicubic, center crop, OpenAI normalization).
- CLIPScore (Hessel et al., 2021): `s = w`, `f = max(., 0)`; `w = 2.5` in the paper, 100 in torchmetrics. The
  paper's ViT-B/32 is the default; any transformers CLIP folder, or an open_clip architecture plus checkpoint, works.
- HPSv2 / HPSv2.1 (`visalign.reward_models.hps`): `s = 1`, open_clip ViT-H-14, padded preprocessing.
- `world-clip` (`WorldCLIPReward`): the shapes world's CLIP (`visalign world train-base`), scored like PickScore.

The raw cosine is always in `aspects["cosine"]`. Text embeddings are computed once per distinct prompt in the batch
(groups of samples share prompts). The backbone runs in its own dtype; normalization, the cosine and the scale are
float32 (`logit_scale` is kept float32 when the backbone is cast). Loaded models are frozen (`requires_grad_(False)`)
and in eval mode; gradients still flow to the pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel, CLIPTokenizer, PreTrainedTokenizerBase

from visalign.reward_models.loading import (
    cast_backbone,
    load_checkpoint,
    load_mapped_state_dict,
    load_tokenizer,
    load_transformers_model,
    refuse_learned_head,
    resolve_file,
    resolve_folder,
)
from visalign.reward_models.preprocess import ImageTransform, PixelValuesReward
from visalign.types import RewardOutput

TRANSFORMERS_FILES = ["*.json", "*.safetensors", "*.txt"]  # a transformers folder with safetensors weights
OPEN_CLIP_MODELS = (open_clip.CLIP, open_clip.CustomTextCLIP)
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE = "openai/clip-vit-base-patch32"


class CLIPScorer(PixelValuesReward):
    """`score = scale * cos(E_img, E_txt)` (or `scale * max(cos, 0)`) for a transformers or open_clip CLIP.

    Build it from modules already in memory, e.g. a reward for a small world:

        scorer = CLIPScorer(clip_model, tokenizer, transform=ImageTransform(size=32), name="world-clip")
        scorer.score(pixels, prompts).score          # [B]

    Args:
        model: a transformers `CLIPModel` or an open_clip `CLIP` / `CustomTextCLIP`.
        tokenizer: for transformers, a `PreTrainedTokenizerBase` (padding and truncation to the model's
            `max_position_embeddings`); for open_clip, its tokenizer callable (`open_clip.SimpleTokenizer`).
        transform: the preprocessing; default: the model's image size with transformers' `CLIPImageProcessor`
            geometry for a transformers model and open_clip's (torchvision) geometry for an open_clip model.
        scale: `s`; None uses the model's learned `exp(logit_scale)` (PickScore).
        nonnegative: clip the cosine at 0 before scaling (CLIPScore).
        prefix: text prepended to every prompt (Hessel et al. use "A photo depicts ").
        name: the registry name reported in errors and logs.
    """

    name = "clip"
    aspect_names = ("cosine",)

    def __init__(
        self,
        model: CLIPModel | open_clip.CLIP,
        tokenizer: Any,
        *,
        transform: ImageTransform | None = None,
        scale: float | None = None,
        nonnegative: bool = False,
        prefix: str = "",
        name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, CLIPModel):
            if not isinstance(tokenizer, PreTrainedTokenizerBase):
                raise ValueError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}")
            self.backend = "transformers"
            size, style = model.config.vision_config.image_size, "transformers"
        elif isinstance(model, OPEN_CLIP_MODELS):
            if not callable(tokenizer):
                raise ValueError(f"`tokenizer` must be an open_clip tokenizer, got {type(tokenizer).__name__}")
            self.backend = "open_clip"
            size, style = model.visual.image_size[0], "torchvision"
        else:
            raise ValueError(
                f"`model` must be a transformers CLIPModel or an open_clip CLIP, got {type(model).__name__}"
            )
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"`scale` must be a positive number or None (learned logit scale), got {scale!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform if transform is not None else ImageTransform(size, style)
        self.scale = None if scale is None else float(scale)
        self.nonnegative = nonnegative
        self.prefix = prefix
        if name is not None:
            self.name = name

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        image_size: int | None = None,
        scale: float | None = None,
        nonnegative: bool = False,
        prefix: str = "",
        reward_name: str | None = None,
    ) -> CLIPScorer:
        """Load a transformers `CLIPModel` and its tokenizer from one folder or Hub repo (`pretrained`, required).

        `image_size` sets the preprocessing size (default: the model's); `reward_name` is the constructor's `name`
        (`name` is `load_reward`'s first argument); the other arguments are the constructor's.
        """
        if pretrained is None:
            raise ValueError("CLIPScorer: `pretrained` (a transformers CLIP folder or Hub repo) is required")
        what = reward_name or cls.name
        model = load_transformers_clip(pretrained, dtype, what=what)
        transform = ImageTransform(image_size or model.config.vision_config.image_size, "transformers")
        tokenizer = load_clip_tokenizer(pretrained, what=what)
        return cls(
            model,
            tokenizer,
            transform=transform,
            scale=scale,
            nonnegative=nonnegative,
            prefix=prefix,
            name=reward_name,
        ).eval()

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Image embeddings `[B, D]` (projected, not normalized) in the backbone dtype."""
        if self.backend == "transformers":
            vision = self.model.vision_model
            x = pixel_values.to(vision.embeddings.patch_embedding.weight.dtype)
            return self.model.visual_projection(vision(pixel_values=x).pooler_output)
        return self.model.encode_image(pixel_values.to(next(self.model.visual.parameters()).dtype))

    def encode_text(self, prompts: list[str]) -> Tensor:
        """Text embeddings `[B, D]` (projected, not normalized) in the backbone dtype."""
        texts = [self.prefix + p for p in prompts]
        if self.backend == "transformers":
            max_length = self.model.config.text_config.max_position_embeddings
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            return self.model.text_projection(out.pooler_output)
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def score_pixel_values(self, pixel_values: Tensor, prompts: list[str]) -> RewardOutput:
        prompts = self.check_pixel_values(pixel_values, prompts)
        distinct = list(dict.fromkeys(prompts))
        index = torch.tensor([distinct.index(p) for p in prompts], device=pixel_values.device)
        text = F.normalize(self.encode_text(distinct).float(), dim=-1)[index]
        image = F.normalize(self.encode_image(pixel_values).float(), dim=-1)
        cosine = (image * text).sum(-1)
        scale = self.model.logit_scale.float().exp() if self.scale is None else self.scale
        score = scale * (cosine.clamp_min(0.0) if self.nonnegative else cosine)
        return RewardOutput(score, aspects={"cosine": cosine})


def load_clip_tokenizer(source: str | Path, *, what: str) -> CLIPTokenizer:
    """The CLIP BPE tokenizer of a transformers folder or Hub repo."""
    return load_tokenizer(CLIPTokenizer, source, [("tokenizer.json",), ("vocab.json", "merges.txt")], what=what)


def load_transformers_clip(pretrained: str | Path, dtype: torch.dtype | None, *, what: str) -> CLIPModel:
    """A frozen transformers `CLIPModel` from a folder or Hub repo, strictly loaded, backbone cast to `dtype`."""
    folder = resolve_folder(pretrained, TRANSFORMERS_FILES, required=["config.json"], what=what)
    model = load_transformers_model(CLIPModel, folder, what=what)
    return cast_backbone(model, dtype, keep_float32=["logit_scale"]).requires_grad_(False)


def build_open_clip(architecture: str | Mapping[str, Any]) -> open_clip.CLIP:
    """A randomly initialized open_clip `CLIP` from a model name (`"ViT-H-14"`) or a config dict of that form."""
    config = open_clip.get_model_config(architecture) if isinstance(architecture, str) else dict(architecture)
    if config is None:
        raise ValueError(
            f"`architecture` {architecture!r} is not an open_clip model name (see open_clip.list_models())"
        )
    if "hf_model_name" in config.get("text_cfg", {}) or config.get("custom_text"):
        raise ValueError(f"`architecture` {architecture!r} has a custom text tower; only standard CLIP is supported")
    return open_clip.CLIP(**config)


def load_open_clip(
    path: Path, architecture: str | Mapping[str, Any], dtype: torch.dtype | None, *, key: str | None, what: str
) -> tuple[open_clip.CLIP, open_clip.SimpleTokenizer]:
    """A frozen open_clip model with the state dict of `path` (identity key map, `strict=True`) and its tokenizer."""
    state = load_checkpoint(path, key=key, what=what)
    model = build_open_clip(architecture)
    load_mapped_state_dict(model, state, lambda k: k, what=what, source=str(path))
    model = cast_backbone(model.eval(), dtype, keep_float32=["logit_scale"]).requires_grad_(False)
    return model, open_clip.SimpleTokenizer(context_length=model.context_length)


class PickScore(CLIPScorer):
    """PickScore v1: `exp(logit_scale) * cos`, about 20-23 on generated images (flow_grpo divides by 26)."""

    name = "pickscore"

    def __init__(
        self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, *, transform: ImageTransform | None = None
    ):
        super().__init__(model, tokenizer, transform=transform, scale=None, name=self.name)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        processor: str = PICKSCORE_PROCESSOR,
    ) -> PickScore:
        """Load from a transformers `CLIPModel` folder or Hub repo (default `yuvalkirstain/PickScore_v1`).

        `processor`: where the tokenizer comes from; PickScore's README takes it from the base LAION CLIP-H repo.
        """
        refuse_learned_head(pretrained, what=cls.name)
        model = load_transformers_clip(pretrained or PICKSCORE, dtype, what="PickScore")
        return cls(model, load_clip_tokenizer(processor, what="PickScore (processor)")).eval()


class WorldCLIPReward(PickScore):
    """The world's CLIP as a reward: `exp(logit_scale) * cos`, loaded through PickScore's loader with the folder's
    own tokenizer (the shipped folder when `pretrained` is None)."""

    name = "world-clip"

    @classmethod
    def from_pretrained(cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None) -> PickScore:
        from visalign.world.rewards import world_clip_folder

        folder = str(world_clip_folder(pretrained))
        return super().from_pretrained(folder, dtype=dtype, processor=folder)


class CLIPScore(CLIPScorer):
    """CLIPScore `w * max(cos, 0)`; `aspects["cosine"]` has the raw cosine."""

    name = "clipscore"

    def __init__(
        self,
        model: CLIPModel | open_clip.CLIP,
        tokenizer: Any,
        *,
        w: float = 2.5,
        prefix: str = "",
        transform: ImageTransform | None = None,
    ) -> None:
        super().__init__(
            model, tokenizer, transform=transform, scale=w, nonnegative=True, prefix=prefix, name=self.name
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        w: float = 2.5,
        prefix: str = "",
        architecture: str | Mapping[str, Any] | None = None,
        filename: str = "open_clip_model.safetensors",
    ) -> CLIPScore:
        """Load a CLIP: a transformers folder or Hub repo (default `openai/clip-vit-base-patch32`, Hessel et al.'s
        ViT-B/32), or, when `architecture` names an open_clip model (or gives its config), an open_clip state dict:
        a file, or `filename` in a folder or Hub repo.
        """
        if architecture is None:
            model = load_transformers_clip(pretrained or CLIPSCORE, dtype, what="CLIPScore")
            tokenizer = load_clip_tokenizer(pretrained or CLIPSCORE, what="CLIPScore")
        else:
            if pretrained is None:
                raise ValueError("CLIPScore: `pretrained` (an open_clip checkpoint) is required with `architecture`")
            path = resolve_file(pretrained, filename, what="CLIPScore")
            model, tokenizer = load_open_clip(path, architecture, dtype, key=None, what="CLIPScore")
        return cls(model, tokenizer, w=w, prefix=prefix).eval()
