"""Learned CLIP rewards: a CLIP with trained heads, as `visalign train reward` makes them, and their file layout.

`LearnedReward` is a CLIP (a transformers `CLIPModel`, as PickScore, or an open_clip `CLIP`, as HPSv2) with one of
three heads over the L2-normalized embeddings `u` (image) and `v` (text):
- `"cosine"`: `s = exp(logit_scale) * cos(u, v)`, PickScore's and HPSv2's score (Kirstain et al. 2023; Wu et al.
  2023); the served score is `s` (PickScore) or `scale * cos` (HPSv2 serves the plain cosine, `scale=1`); the
  Bradley-Terry logits are always `s`.
- `"mlp"`: the LAION aesthetic predictor's head (`AestheticMLP`, affine 1024-128-64-16-1) on `u`
  (`head_input="image"`) or on `[u, v, u * v]` (`"image_text"`, so that a frozen backbone still reads the prompt).
- `"aspects"`: one output per aspect from an MLP on the same features; the score is `sum_k w_k a_k` with fixed
  weights (ImageDoctor, arXiv 2510.01010: 0.8 / 0.1 / 0.1) or learned ones `w = softmax(alpha)` (MJ-VIDEO,
  arXiv 2502.01719, gates aspects per input; here the weights are input-independent).
An optional dense head (LayerNorm + Linear on the vision tower's last patch tokens, as HPSv2's regional predictor)
gives per-patch logits for each named map; the served `heatmaps` are their sigmoid, upsampled bilinearly to the image.

`save_reward` writes a reward in the loaders' layouts:
- transformers backbone: `config.json`, `model.safetensors` and the tokenizer (LoRA merged), so
  `load_reward("world-clip", pretrained=folder)` (or `"pickscore"` with `processor=folder`) serves the cosine score;
  an image-only `"mlp"` head also goes to the aesthetic predictor's file, so `load_reward("aesthetic",
  pretrained=folder, clip=folder)` serves it.
- open_clip backbone: `HPS_v2.1_compressed.pt` (`{"state_dict": ...}`), read by `load_reward("hpsv2.1",
  pretrained=folder, architecture=...)`.
- every kind: `reward.json` and `reward_heads.safetensors`; `LearnedReward.from_pretrained(folder)`
  (`load_reward("learned", pretrained=folder)`) serves score, aspects and maps. The CLIP loaders (PickScore, the
  world CLIP, HPSv2) refuse a folder whose head is not the cosine, which they would drop.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPModel

from visalign.reward_models.aesthetic import AESTHETIC_FILE, AestheticMLP
from visalign.reward_models.clip import (
    CLIPScorer,
    load_clip_tokenizer,
    load_open_clip,
    load_transformers_clip,
)
from visalign.reward_models.hps import HPS_FILES
from visalign.reward_models.loading import (
    REWARD_FILE,
    load_checkpoint,
    load_mapped_state_dict,
    read_json,
    resolve_folder,
)
from visalign.reward_models.preprocess import ImageTransform
from visalign.types import RewardOutput

HEADS = ("cosine", "mlp", "aspects")
HEAD_INPUTS = ("image", "image_text")
HEADS_FILE = "reward_heads.safetensors"
OPEN_CLIP_FILE = HPS_FILES["v2.1"]


class RewardHeads(nn.Module):
    """The trainable heads of a `LearnedReward` (see the module docstring for `head`).

    Args:
        head (`str`): `"cosine"`, `"mlp"` or `"aspects"`.
        embed_dim (`int`): width of the CLIP embeddings.
        head_input (`str`): features of the `"mlp"` and `"aspects"` heads: `"image"` (`u`) or `"image_text"`
            (`[u, v, u * v]`).
        aspects (`Sequence[str]`): aspect names (`"aspects"` head only).
        aspect_weights (`Sequence[float]`): fixed weights of the aspects in the score; empty = learned.
        heatmaps (`Sequence[str]`): names of the dense maps; empty = no dense head.
        token_dim (`int`): width of the vision tower's patch tokens (needed with `heatmaps`).
        hidden (`int`): hidden width of the aspect MLP.
    """

    def __init__(
        self,
        head: str,
        embed_dim: int,
        *,
        head_input: str = "image_text",
        aspects: Sequence[str] = (),
        aspect_weights: Sequence[float] = (),
        heatmaps: Sequence[str] = (),
        token_dim: int = 0,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS}, got {head!r}")
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"`head_input` must be one of {HEAD_INPUTS}, got {head_input!r}")
        if (head == "aspects") != bool(aspects):
            raise ValueError(f"`aspects` must name the aspects exactly when head='aspects' (head={head!r})")
        if len(set(aspects)) != len(aspects) or len(set(heatmaps)) != len(heatmaps):
            raise ValueError(f"names must be distinct: aspects {list(aspects)}, heatmaps {list(heatmaps)}")
        if aspect_weights and len(aspect_weights) != len(aspects):
            raise ValueError(f"`aspect_weights` has {len(aspect_weights)} values for {len(aspects)} aspects")
        if heatmaps and token_dim < 1:
            raise ValueError("`token_dim` (the vision tower's width) is needed for heatmap heads")
        self.head, self.head_input, self.embed_dim, self.hidden = head, head_input, embed_dim, hidden
        self.aspect_names, self.heatmap_names = tuple(aspects), tuple(heatmaps)
        in_dim = embed_dim * (3 if head_input == "image_text" else 1)
        self.mlp = AestheticMLP(in_dim) if head == "mlp" else None
        self.aspect_mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, len(aspects)))
            if head == "aspects"
            else None
        )
        self.aspect_logits = nn.Parameter(torch.zeros(len(aspects))) if aspects and not aspect_weights else None
        self.register_buffer("fixed_weights", torch.tensor([float(w) for w in aspect_weights]), persistent=False)
        self.heatmap = (
            nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, len(heatmaps))) if heatmaps else None
        )
        self.token_dim = token_dim

    @property
    def needs_text(self) -> bool:
        return self.head == "cosine" or self.head_input == "image_text"

    def aspect_weights(self) -> Tensor:
        """`w` `[K]`: the fixed weights, or `softmax(alpha)` when learned."""
        return self.fixed_weights if self.aspect_logits is None else torch.softmax(self.aspect_logits.float(), 0)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for `reward.json`."""
        return {
            "head": self.head,
            "embed_dim": self.embed_dim,
            "head_input": self.head_input,
            "aspects": list(self.aspect_names),
            "aspect_weights": self.fixed_weights.tolist(),
            "heatmaps": list(self.heatmap_names),
            "token_dim": self.token_dim,
            "hidden": self.hidden,
        }


class LearnedReward(CLIPScorer):
    """A CLIP reward with trained heads: scalar score, optional aspects and heatmaps (see the module docstring).

    Args:
        model, tokenizer, transform: as `CLIPScorer`.
        heads (`RewardHeads`): the heads; their `embed_dim` (and `token_dim`) must match the model.
        scale (`float`, *optional*): the served score of the cosine head is `scale * cos`; None serves
            `exp(logit_scale) * cos` (PickScore). Ignored by the other heads.
        architecture (`dict`, *optional*): an open_clip model's config (needed to save and reload it).
        name (`str`): the reward's name in logs.
    """

    name = "learned"

    def __init__(
        self,
        model: CLIPModel | open_clip.CLIP,
        tokenizer: Any,
        heads: RewardHeads,
        *,
        transform: ImageTransform | None = None,
        scale: float | None = None,
        architecture: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(model, tokenizer, transform=transform, scale=scale, name=name)
        if self.backend == "open_clip" and architecture is None:
            raise ValueError("`architecture` (the open_clip config) is required with an open_clip model")
        self.architecture = architecture
        embed_dim, token_dim = _backbone_widths(model)
        if heads.embed_dim != embed_dim or (heads.heatmap is not None and heads.token_dim != token_dim):
            raise ValueError(
                f"`heads` expect embeddings of {heads.embed_dim} and tokens of {heads.token_dim}; the model gives "
                f"{embed_dim} and {token_dim}"
            )
        self.heads = heads
        self.aspect_names = heads.aspect_names + (("cosine",) if heads.needs_text else ())
        self.heatmap_names = heads.heatmap_names

    @property
    def temperature(self) -> float:
        """The Bradley-Terry temperature of `compare`: the served score over the training logits."""
        if self.heads.head == "cosine" and self.scale is not None:
            return self.scale / float(self.model.logit_scale.detach().float().exp())
        return 1.0

    def outputs(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Everything the heads compute on preprocessed `pixel_values` `[B, 3, S, S]`, float32:

        `score` `[B]` (served), `logits` `[B]` (Bradley-Terry), `cosine` `[B]` (when the text is read),
        `aspects` `[B, K]` (aspects head) and `heatmap_logits` `[B, M, h, w]` (per-patch, dense head).
        """
        prompts = self.check_pixel_values(pixel_values, prompts)
        image, tokens = self.encode_image_tokens(pixel_values)
        u = F.normalize(image.float(), dim=-1)
        out: dict[str, Tensor] = {}
        features = u
        if self.heads.needs_text:
            distinct = list(dict.fromkeys(prompts))
            index = torch.tensor([distinct.index(p) for p in prompts], device=pixel_values.device)
            v = F.normalize(self.encode_text(distinct).float(), dim=-1)[index]
            out["cosine"] = (u * v).sum(-1)
            if self.heads.head_input == "image_text":
                features = torch.cat([u, v, u * v], dim=-1)
        if self.heads.head == "cosine":
            out["logits"] = self.model.logit_scale.float().exp() * out["cosine"]
            out["score"] = out["logits"] if self.scale is None else self.scale * out["cosine"]
        elif self.heads.head == "mlp":
            out["score"] = out["logits"] = self.heads.mlp(features).float()
        else:
            out["aspects"] = self.heads.aspect_mlp(features).float()
            out["score"] = out["logits"] = out["aspects"] @ self.heads.aspect_weights()
        if self.heads.heatmap is not None:
            out["heatmap_logits"] = self.heads.heatmap(tokens.float()).permute(0, 3, 1, 2)
        return out

    def encode_image_tokens(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Image embeddings `[B, D]` and, with a dense head, the last block's patch tokens `[B, h, w, C]`."""
        if self.heads.heatmap is None:
            return self.encode_image(pixel_values), None
        if self.backend == "transformers":
            vision = self.model.vision_model
            out = vision(pixel_values=pixel_values.to(vision.embeddings.patch_embedding.weight.dtype))
            tokens = out.last_hidden_state[:, 1:]
            side = math.isqrt(tokens.shape[1])
            return self.model.visual_projection(out.pooler_output), tokens.unflatten(1, (side, side))
        x = pixel_values.to(next(self.model.visual.parameters()).dtype)
        out = self.model.visual.forward_intermediates(x, indices=1, output_fmt="NCHW")
        return out["image_features"], out["image_intermediates"][-1].permute(0, 2, 3, 1)

    def score_pixel_values(self, pixel_values: Tensor, prompts: list[str]) -> RewardOutput:
        out = self.outputs(pixel_values, prompts)
        aspects = {"cosine": out["cosine"]} if "cosine" in out else {}
        for k, name in enumerate(self.heads.aspect_names):
            aspects[name] = out["aspects"][:, k]
        heatmaps = {}
        if "heatmap_logits" in out:
            size = pixel_values.shape[-2:]
            maps = torch.sigmoid(F.interpolate(out["heatmap_logits"], size=size, mode="bilinear", align_corners=False))
            heatmaps = {name: maps[:, m] for m, name in enumerate(self.heads.heatmap_names)}
        return RewardOutput(out["score"], aspects, heatmaps)

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        if self.heatmap_names and pixels.shape[-1] != pixels.shape[-2]:
            raise ValueError(f"heatmaps need square images (the map covers the whole image), got {pixels.shape[-2:]}")
        out = super()._score(pixels, prompts)
        out.heatmaps = {
            k: F.interpolate(v[:, None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[:, 0].to(
                pixels.device
            )
            for k, v in out.heatmaps.items()
        }
        return out

    @classmethod
    def from_pretrained(cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None) -> LearnedReward:
        """Load a reward saved by `save_reward` (`RewardTrainer`'s `output_dir`): `reward.json`, the heads and the
        backbone in its loader's layout. `dtype` is the backbone's precision (heads and scores stay float32)."""
        if pretrained is None:
            raise ValueError("LearnedReward: `pretrained` (a folder written by `visalign train reward`) is required")
        what = "learned reward"
        folder = resolve_folder(
            pretrained, ["*.json", "*.safetensors", "*.pt", "*.txt"], required=[REWARD_FILE], what=what
        )
        meta = read_json(folder / REWARD_FILE, what=what)
        if meta.get("backend") == "transformers":
            model = load_transformers_clip(folder, dtype, what=what)
            tokenizer = load_clip_tokenizer(folder, what=what)
        elif meta.get("backend") == "open_clip":
            model, tokenizer = load_open_clip(
                folder / OPEN_CLIP_FILE, meta["architecture"], dtype, key="state_dict", what=what
            )
        else:
            raise ValueError(f"{what}: {folder / REWARD_FILE} has no valid `backend` (got {meta.get('backend')!r})")
        heads = RewardHeads(**meta["heads"])
        state = load_checkpoint(folder / HEADS_FILE, what=what)
        load_mapped_state_dict(heads, state, lambda k: k, what=what, source=str(folder / HEADS_FILE))
        t = meta["transform"]
        transform = ImageTransform(t["size"], t["style"], tuple(t["mean"]), tuple(t["std"]))
        reward = cls(
            model,
            tokenizer,
            heads,
            transform=transform,
            scale=meta["scale"],
            architecture=meta.get("architecture"),
            name=meta.get("name"),
        )
        return reward.requires_grad_(False).eval()


def _backbone_widths(model: CLIPModel | open_clip.CLIP) -> tuple[int, int]:
    """`(embedding width, vision token width)` of a CLIP."""
    if isinstance(model, CLIPModel):
        return model.config.projection_dim, model.config.vision_config.hidden_size
    return model.visual.output_dim, model.visual.transformer.width


def build_reward(
    model: CLIPModel | open_clip.CLIP,
    tokenizer: Any,
    *,
    head: str = "cosine",
    head_input: str = "image_text",
    aspects: Sequence[str] = (),
    aspect_weights: Sequence[float] = (),
    heatmaps: Sequence[str] = (),
    hidden: int = 256,
    transform: ImageTransform | None = None,
    scale: float | None = None,
    architecture: dict[str, Any] | None = None,
    name: str | None = None,
) -> LearnedReward:
    """A `LearnedReward` with freshly initialized heads sized for `model` (arguments: `RewardHeads`'s and
    `LearnedReward`'s)."""
    embed_dim, token_dim = _backbone_widths(model)
    heads = RewardHeads(
        head,
        embed_dim,
        head_input=head_input,
        aspects=aspects,
        aspect_weights=aspect_weights,
        heatmaps=heatmaps,
        token_dim=token_dim if heatmaps else 0,
        hidden=hidden,
    )
    return LearnedReward(
        model, tokenizer, heads, transform=transform, scale=scale, architecture=architecture, name=name
    )


def merged_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every LoRA layer merged into its base layer and the adapters removed."""
    module = copy.deepcopy(module)
    for name, sub in list(module.named_modules()):
        if isinstance(sub, BaseTunerLayer):
            sub.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, sub.get_base_layer())
    return module


def save_reward(reward: LearnedReward, folder: str | Path) -> Path:
    """Write `reward` in the loaders' layouts (see the module docstring); `reward.json` is written last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = merged_copy(reward.model)
    meta: dict[str, Any] = {"backend": reward.backend, "name": reward.name, "scale": reward.scale}
    if reward.backend == "transformers":
        model.save_pretrained(folder)
        reward.tokenizer.save_pretrained(folder)
        if reward.heads.head == "mlp" and reward.heads.head_input == "image":
            torch.save(reward.heads.mlp.state_dict(), folder / AESTHETIC_FILE)
    else:
        torch.save({"state_dict": model.state_dict()}, folder / OPEN_CLIP_FILE)
        meta["architecture"] = reward.architecture
    t = reward.transform
    meta["transform"] = {"size": t.size, "style": t.style, "mean": list(t.mean), "std": list(t.std)}
    meta["heads"] = reward.heads.config()
    save_file({k: v.detach().cpu().contiguous() for k, v in reward.heads.state_dict().items()}, folder / HEADS_FILE)
    (folder / REWARD_FILE).write_text(json.dumps(meta, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Backbones


def load_backbone(
    pretrained: str, architecture: str | dict[str, Any] | None = None, checkpoint_key: str | None = None
) -> tuple[CLIPModel | open_clip.CLIP, Any, dict[str, Any] | None]:
    """`(model, tokenizer, open_clip config)` for a config's backbone, through the reward loaders.

    Without `architecture`: a transformers `CLIPModel` folder or hub id (`world:clip` = the shapes world's CLIP).
    With it: an open_clip `CLIP` of that architecture from the checkpoint file `pretrained` (`checkpoint_key` selects
    a nested state dict: `"state_dict"` in HPSv2's files).
    """
    if architecture is None:
        if pretrained == "world:clip":
            from visalign.world.rewards import world_clip_folder

            pretrained = str(world_clip_folder(None))
        model = load_transformers_clip(pretrained, None, what="reward backbone")
        return model, load_clip_tokenizer(pretrained, what="reward backbone"), None
    config = open_clip.get_model_config(architecture) if isinstance(architecture, str) else dict(architecture)
    if config is None:
        raise ValueError(f"`architecture` {architecture!r} is not an open_clip model name")
    model, tokenizer = load_open_clip(Path(pretrained), config, None, key=checkpoint_key, what="reward backbone")
    return model, tokenizer, config
