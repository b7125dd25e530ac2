"""ImageDoctor: a multi-aspect VLM scorer with dense misalignment and artifact heatmaps.

ImageDoctor (Guo et al. 2025, arXiv 2510.01010; EthanG97/ImageDoctor, weights `GYX97/ImageDoctor`) is a
Qwen2.5-VL-3B fine-tuned to "look, think, predict": it reasons in `<think>`, then answers inside `<answer>` with four
scores in [0, 1] (semantic alignment, aesthetics, plausibility, overall impression) and flaw locations. Two special
tokens it emits (`misalignment_token_id`, `artifact_token_id` in its config) prompt a SAM-style mask decoder:

- the last-layer hidden state that predicts the special token -> `text_hidden_fcs` -> a sparse prompt;
- the merged visual tokens -> `image_hidden_fcs` -> an image embedding on the merged patch grid (18 x 18 at 504^2);
- SAM's two-way transformer (depth 2, 8 heads) with a single mask token, a convolutional upsampler x16
  (`HeatmapPredictor`) and a hypernetwork MLP -> logits -> sigmoid: a heatmap of 288 x 288 at 504^2.

`ImageDoctor` [`imagedoctor`] returns `aspects` `plausibility`, `semantic_alignment`, `aesthetics`, `overall`,
`score` = `overall`, and, when the checkpoint holds the head, `heatmaps` `misalignment` and `artifact` resized to the
input resolution (a map whose token was not generated is zeros, counted in `extras["heatmap_missing"]`).

Parsing is robust and accounted for: the last `<answer>` block (the text without `<think>` when there is none);
`label score: x`, `x%`, `x/10` forms; values outside [0, 1] are rejected, not clamped. A missing or rejected aspect is
filled (`fill="mean"`: the mean of the batch's parsed values of that aspect, 0.5 if none; or a number) and counted
in `extras`: `missing` (`[B, 4]` bool), per-aspect `missing_counts` / `out_of_range_counts`, `parse_failures`
(samples with any aspect filled) and the judge's `texts`.

Deviations: the prompt wording is ours (same structure and answer format; pass `prompt_template` for the
checkpoint's training prompt); images are resized straight to `image_size` squared in torch (the reference resizes
with PIL to 512 x 512, then the processor to 504 x 504); the reference clamps out-of-range scores to [0, 1] and
fills missing ones with 0; the heatmap uses the first occurrence of each special token, including one at the first
generated position (the reference skips that position); generation is batched with left padding (the reference
decodes one image at a time).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visalign.reward_models.loading import load_mapped_state_dict, resolve_folder
from visalign.reward_models.pairwise import answer_block, check_template, format_prompt
from visalign.reward_models.vlm import (
    VLM_FILES,
    VisionPatches,
    chat_inputs,
    check_qwen_vl,
    generate_texts,
    load_qwen_vl,
)
from visalign.rewards import RewardModel
from visalign.types import RewardOutput

IMAGEDOCTOR = "GYX97/ImageDoctor"
ASPECTS = ("plausibility", "semantic_alignment", "aesthetics", "overall")
HEATMAPS = ("misalignment", "artifact")
HEAD_PREFIXES = ("heatmap.", "text_hidden_fcs.", "image_hidden_fcs.", "prompt_encoder.")
UNUSED_PROMPT_ENCODER = (
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.mask_",
)
DOCTOR_PROMPT = (
    "Here is a caption and an image generated from it. Examine the image closely and rate it on four dimensions, "
    "each with a score between 0 and 1: Semantic Alignment (how faithfully the image shows what the caption "
    "describes), Aesthetics (composition, use of color, artistic quality), Plausibility (realism, absence of "
    "artifacts and distortions) and Overall Impression (your general judgment of its quality). Reason step by step "
    "inside <think> and </think>, naming the regions that matter as boxes [x1,y1,x2,y2]. Then give your assessment "
    "inside <answer> and </answer>, exactly in this form, one item per line:\n"
    "Semantic Alignment score: ...\nMisalignment Locations: ...\nAesthetic score: ...\nPlausibility score: ...\n"
    "Artifact Locations: ...\nOverall Impression score: ...\n"
    "Text Caption: [{prompt}]"
)
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_LABELS = {
    "plausibility": r"plausibility",
    "semantic_alignment": r"semantic\s*alignment",
    "aesthetics": r"aesthetics?",
    "overall": r"overall(?:\s*impression)?",
}
_SCORES = {
    name: re.compile(rf"{label}\s*score\s*\**\s*[:=]\s*\**\s*{_NUMBER}(\s*%|\s*/\s*{_NUMBER})?", re.IGNORECASE)
    for name, label in _LABELS.items()
}


def parse_doctor_answer(text: str | None) -> dict[str, float | str]:
    """Each aspect's score in [0, 1] from an ImageDoctor answer, or `"missing"` / `"out_of_range"`.

    The last match of `"<aspect> score: x"` in the answer block decides; `x%` and `x/y` are read as fractions.
    """
    block = answer_block(text) if isinstance(text, str) else ""
    result: dict[str, float | str] = {}
    for name, pattern in _SCORES.items():
        matches = pattern.findall(block)
        if not matches:
            result[name] = "missing"
            continue
        number, suffix, denominator = matches[-1]
        value = float(number)
        if suffix.strip() == "%":
            value /= 100
        elif denominator:
            value = value / float(denominator) if float(denominator) > 0 else math.nan
        result[name] = value if math.isfinite(value) and 0.0 <= value <= 1.0 else "out_of_range"
    return result


def collect_aspects(
    texts: Sequence[str | None], fill: Literal["mean"] | float = "mean", device: torch.device | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Aspect tensors `[B]` (float32) from B answers, missing values filled, and the parse accounting."""
    parsed = [parse_doctor_answer(t) for t in texts]
    aspects, missing_counts, out_of_range = {}, {}, {}
    missing = torch.zeros(len(texts), len(ASPECTS), dtype=torch.bool)
    for k, name in enumerate(ASPECTS):
        values = [p[name] for p in parsed]
        ok = [v for v in values if isinstance(v, float)]
        default = (sum(ok) / len(ok) if ok else 0.5) if fill == "mean" else float(fill)
        aspects[name] = torch.tensor([v if isinstance(v, float) else default for v in values], device=device)
        missing[:, k] = torch.tensor([not isinstance(v, float) for v in values])
        missing_counts[name] = sum(v == "missing" for v in values)
        out_of_range[name] = sum(v == "out_of_range" for v in values)
    extras = {
        "texts": list(texts),
        "missing": missing,
        "missing_counts": missing_counts,
        "out_of_range_counts": out_of_range,
        "parse_failures": int(missing.any(dim=1).sum()),
    }
    return aspects, extras


# ---------------------------------------------------------------- the heatmap head (SAM mask decoder, ImageDoctor's)


class Attention(nn.Module):
    """SAM's attention with an optional downscaled internal width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"`num_heads`={num_heads} must divide the attention width {inner}")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        def heads(x: Tensor) -> Tensor:
            return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)))
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Tokens attend to themselves and to the image, then the image attends to the tokens (SAM)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayAttentionBlock(dim, num_heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """`image`, `image_pe` `[K, C, h, w]`, `tokens` `[K, N, C]` -> (tokens `[K, N, C]`, image `[K, h w, C]`)."""
        keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


class ChannelRMSNorm(nn.Module):
    """T5-style norm over channels `[K, C, h, w]`, no mean subtraction (ImageDoctor's `LayerNorm`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt() * self.scale


class HeatmapPredictor(nn.Module):
    """ImageDoctor's upsampler: two 3x3 convs, then 4 x (stride-2 transposed conv + residual conv pair): x16."""

    def __init__(self, channels: int, stem: tuple[int, int], widths: tuple[int, ...]) -> None:
        super().__init__()
        c0, c1 = stem
        self.conv_layers = nn.Sequential(
            nn.Conv2d(channels, c0, 3, padding="same"),
            nn.ReLU(),
            ChannelRMSNorm(c0),
            nn.Conv2d(c0, c1, 3, padding="same"),
            nn.ReLU(),
            ChannelRMSNorm(c1),
        )
        self.deconv_layers, self.conv_layers2 = nn.ModuleList(), nn.ModuleList()
        for c_in, c_out in zip((c1, *widths[:-1]), widths):
            up = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
            self.deconv_layers.append(nn.Sequential(up, ChannelRMSNorm(c_out), nn.ReLU()))
            self.conv_layers2.append(
                nn.Sequential(
                    nn.Conv2d(c_out, c_out, 3, padding="same"),
                    ChannelRMSNorm(c_out),
                    nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding="same"),
                    ChannelRMSNorm(c_out),
                )
            )
        self.last_conv1 = nn.Conv2d(widths[-1], widths[-1], 3, padding="same")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_layers(x)
        for deconv, conv in zip(self.deconv_layers, self.conv_layers2):
            x = deconv(x)
            x = F.relu(conv(x) + x)
        return F.relu(self.last_conv1(x))


class HypernetworkMLP(nn.Module):
    def __init__(self, dim: int, out: int, num_layers: int = 3) -> None:
        super().__init__()
        sizes = [dim] * num_layers + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder with one mask token and ImageDoctor's upsampler (the checkpoint's `heatmap`)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, stem: tuple[int, int], widths: tuple):
        super().__init__()
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        self.mask_tokens = nn.Embedding(1, dim)
        self.output_upscaling = HeatmapPredictor(dim, stem, widths)
        self.output_hypernetworks_mlps = nn.ModuleList([HypernetworkMLP(dim, widths[-1])])

    def forward(self, image: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> Tensor:
        """`image`, `dense` `[K, C, h, w]`, `image_pe` `[1, C, h, w]`, `sparse` `[K, N, C]` -> logits `[K, s h, s w]`
        (`s = 2 ** len(widths)`)."""
        tokens = torch.cat([self.mask_tokens.weight.expand(sparse.shape[0], -1, -1), sparse], dim=1)
        k, c, h, w = image.shape
        hs, src = self.transformer(image + dense, image_pe.expand(k, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(k, c, h, w))
        hyper = self.output_hypernetworks_mlps[0](hs[:, 0])  # [K, C_up]
        return torch.einsum("kc,kchw->khw", hyper, upscaled)


class PositionEmbeddingRandom(nn.Module):
    """SAM's positional encoding with random spatial frequencies."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def forward(self, size: tuple[int, int]) -> Tensor:
        """`[C, h, w]` for a `size` = `(h, w)` grid, at the centers of its cells."""
        h, w = size
        gaussian = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / h
        x = (torch.arange(w, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # [h, w, (x, y)]
        angles = 2 * math.pi * ((2 * coords - 1) @ gaussian)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """What ImageDoctor uses of SAM's prompt encoder: the positional encoding and the no-mask embedding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)


@dataclass(frozen=True)
class HeadConfig:
    """Sizes of ImageDoctor's head (the released one: 2048, 2048, 768, depth 2, 8 heads, mlp 2048, stem (768, 384),
    widths (768, 384, 384, 192))."""

    text_size: int
    vision_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    stem: tuple[int, int]
    widths: tuple[int, ...]

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], num_heads: int) -> HeadConfig:
        """Sizes read off the checkpoint's tensors (the number of heads is not in them)."""
        depth = len({k.split(".")[3] for k in state if k.startswith("heatmap.transformer.layers.")})
        ups = "heatmap.output_upscaling"
        n_up = len({k.split(".")[3] for k in state if k.startswith(f"{ups}.deconv_layers.")})
        return cls(
            text_size=state["text_hidden_fcs.0.0.weight"].shape[1],
            vision_size=state["image_hidden_fcs.0.0.weight"].shape[1],
            dim=state["text_hidden_fcs.0.2.weight"].shape[0],
            depth=depth,
            num_heads=num_heads,
            mlp_dim=state["heatmap.transformer.layers.0.mlp.lin1.weight"].shape[0],
            stem=(state[f"{ups}.conv_layers.0.weight"].shape[0], state[f"{ups}.conv_layers.3.weight"].shape[0]),
            widths=tuple(state[f"{ups}.deconv_layers.{i}.0.weight"].shape[1] for i in range(n_up)),
        )


def _projection(size_in: int, size_out: int) -> nn.ModuleList:
    return nn.ModuleList([nn.Sequential(nn.Linear(size_in, size_in), nn.ReLU(), nn.Linear(size_in, size_out))])


class DoctorHeatmapHead(nn.Module):
    """Token hidden states + visual tokens -> heatmaps in [0, 1]; module names are the checkpoint's."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.text_hidden_fcs = _projection(config.text_size, config.dim)
        self.image_hidden_fcs = _projection(config.vision_size, config.dim)
        self.prompt_encoder = PromptEncoder(config.dim)
        self.heatmap = MaskDecoder(
            config.dim, config.depth, config.num_heads, config.mlp_dim, config.stem, config.widths
        )

    def forward(self, states: Tensor, image_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Heatmaps `[K, s h, s w]` in [0, 1] (`s = 2 ** len(widths)`, 16 in the release) for K token states
        `[K, D_text]` with their images' merged visual tokens `[K, h w, D_vision]` on the `grid` `(h, w)`."""
        k, (h, w) = states.shape[0], grid
        sparse = self.text_hidden_fcs[0](states.float())[:, None]
        image = self.image_hidden_fcs[0](image_tokens.float()).transpose(1, 2).reshape(k, -1, h, w)
        dense = self.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1).expand(k, -1, h, w)
        image_pe = self.prompt_encoder.pe_layer((h, w))[None]
        return torch.sigmoid(self.heatmap(image, image_pe, sparse, dense))


def load_doctor_head(folder: Path, num_heads: int, *, what: str) -> DoctorHeatmapHead | None:
    """The heatmap head from the checkpoint's `*.safetensors` in `folder`, or None when they hold none of its keys."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            state |= {k: f.get_tensor(k) for k in f.keys() if k.startswith(HEAD_PREFIXES)}
    if not state:
        return None
    try:
        head = DoctorHeatmapHead(HeadConfig.from_state_dict(state, num_heads))
    except (KeyError, IndexError) as e:
        raise ValueError(f"{what}: the heatmap head in {folder} is incomplete (no {e})") from e

    def key_map(key: str) -> str | None:  # SAM's point, box and mask prompts are never used: dropped on purpose
        return None if key.startswith(UNUSED_PROMPT_ENCODER) else key

    load_mapped_state_dict(head, state, key_map, what=what, source=str(folder))
    return head.eval().requires_grad_(False)


class ImageDoctorQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that loads ImageDoctor checkpoints strictly: the head's keys are read by `load_doctor_head`."""

    _keys_to_ignore_on_load_unexpected = [rf"^{re.escape(p)}" for p in HEAD_PREFIXES]


# transformers renames Qwen2.5-VL checkpoint keys (`visual.*`, `model.*`) per class, and skips classes defined outside
# the library: give the subclass its parent's renaming.
register_checkpoint_conversion_mapping(
    ImageDoctorQwen2_5_VL.__name__,
    get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__),
    overwrite=True,
)


class ImageDoctor(RewardModel):
    """ImageDoctor's four aspect scores (and heatmaps when the head is given); `score` = `overall`.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration` (the checkpoint's VLM).
        processor: its processor.
        head: the heatmap head, or None (no heatmaps).
        misalignment_token_id, artifact_token_id: the special tokens that prompt the head (required with `head`).
        prompt_template: the question, with `{prompt}` for the caption.
        image_size: images are resized to `image_size` x `image_size` (then to the processor's multiple of 28).
        max_new_tokens: generation length (the answer comes after the reasoning).
        batch_size: images per generation batch.
        fill: `"mean"` or a number, for aspects the answer lacks (see the module docstring).
    """

    name = "imagedoctor"
    differentiable = False
    aspect_names = ASPECTS

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: Any,
        head: DoctorHeatmapHead | None = None,
        *,
        misalignment_token_id: int | None = None,
        artifact_token_id: int | None = None,
        prompt_template: str = DOCTOR_PROMPT,
        image_size: int = 512,
        max_new_tokens: int = 1024,
        batch_size: int = 4,
        fill: Literal["mean"] | float = "mean",
    ) -> None:
        super().__init__()
        check_qwen_vl(model, processor)
        if head is not None:
            if not isinstance(head, DoctorHeatmapHead):
                raise ValueError(f"`head` must be a DoctorHeatmapHead or None, got {type(head).__name__}")
            ids = (misalignment_token_id, artifact_token_id)
            if not all(isinstance(i, int) and 0 <= i < len(processor.tokenizer) for i in ids):
                raise ValueError(f"`misalignment_token_id` and `artifact_token_id` must be token ids, got {ids}")
        for arg, value in (("image_size", image_size), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be a positive int, got {value!r}")
        if fill != "mean" and not (isinstance(fill, (int, float)) and 0 <= fill <= 1):
            raise ValueError(f"`fill` must be 'mean' or a number in [0, 1], got {fill!r}")
        self.model = model
        self.processor = processor
        self.head = head
        self.special_tokens = dict(zip(HEATMAPS, (misalignment_token_id, artifact_token_id)))
        self.heatmap_names = HEATMAPS if head is not None else ()
        self.prompt_template = check_template(prompt_template)
        self.vision = VisionPatches.from_processor(processor)
        self.size = self.vision.size_for(image_size, image_size)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.fill = fill

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, num_heads: int = 8, **options: Any
    ) -> ImageDoctor:
        """Load from a folder or Hub repo (default `GYX97/ImageDoctor`); the head loads when its keys are present.

        `num_heads`: attention heads of the head's two-way transformer (8 in the release; not stored in the weights).
        """
        what = "ImageDoctor"
        folder = resolve_folder(pretrained or IMAGEDOCTOR, VLM_FILES, required=["config.json"], what=what)
        model, processor = load_qwen_vl(folder, dtype, what=what, classes={"qwen2_5_vl": ImageDoctorQwen2_5_VL})
        head = load_doctor_head(folder, num_heads, what=what)
        config = model.config.to_dict()
        ids = {f"{name}_token_id": config.get(f"{name}_token_id") for name in HEATMAPS} if head is not None else {}
        return cls(model, processor, head, **ids, **options).eval()

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        question = format_prompt(self.prompt_template, prompt)
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    @torch.no_grad()
    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        texts, maps, absent = [], {name: [] for name in self.heatmap_names}, dict.fromkeys(self.heatmap_names, 0)
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size].to(self.device)
            pixel_values, grid = self.vision(chunk[:, None], self.size)
            inputs = chat_inputs(
                self.processor,
                [self.conversation(p) for p in prompts[start : start + self.batch_size]],
                image_grids=[grid[i : i + 1] for i in range(len(chunk))],
                device=self.device,
            )
            vision = {"pixel_values": pixel_values, "image_grid_thw": grid}
            answers, new_ids = generate_texts(self.model, self.processor, inputs | vision, self.max_new_tokens)
            texts += answers
            if self.head is not None:
                for name, (heat, found) in self.heatmaps(inputs, pixel_values, grid, new_ids).items():
                    maps[name].append(F.interpolate(heat[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0])
                    absent[name] += int((~found).sum())
        aspects, extras = collect_aspects(texts, self.fill, device=pixels.device)
        heatmaps = {name: torch.cat(m).clamp(0, 1).to(pixels.device) for name, m in maps.items()}
        if self.head is not None:
            extras["heatmap_missing"] = absent
        return RewardOutput(aspects["overall"], aspects, heatmaps, extras)

    def heatmaps(
        self, inputs: dict[str, Tensor], pixel_values: Tensor, grid: Tensor, new_ids: Tensor
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per map name, heatmaps `[B, s h, s w]` (zeros where the token was not generated) and a found mask `[B]`.

        One teacher-forced pass over prompt + answer gives the last-layer state before each special token's first
        occurrence (the state that generated it); each image goes through the vision tower once.
        """
        features = self.model.get_image_features(pixel_values, grid).pooler_output  # per image [h w, D_vision]
        ids = torch.cat([inputs["input_ids"], new_ids], dim=1)
        ones = torch.ones_like(new_ids)
        hidden = self.model.model(
            input_ids=ids,
            attention_mask=torch.cat([inputs["attention_mask"], ones], dim=1),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * ones], dim=1),
            image_grid_thw=grid,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
        ).last_hidden_state
        merge = self.vision.merge_size
        h, w = (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)  # every image has the same size here
        out = {}
        for name, token in self.special_tokens.items():
            hits = new_ids == token
            found = hits.any(dim=1)
            first = inputs["input_ids"].shape[1] + hits.float().argmax(dim=1)
            scale = 2 ** len(self.head.config.widths)
            heat = torch.zeros(len(new_ids), scale * h, scale * w, device=hidden.device)
            rows = found.nonzero().flatten()
            if len(rows):
                states = hidden[rows, first[rows] - 1]
                heat[rows] = self.head(states, torch.stack([features[r] for r in rows.tolist()]), (h, w))
            out[name] = (heat, found)
        return out
