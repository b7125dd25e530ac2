"""ImageDoctor's heatmap head: a SAM mask decoder prompted by the hidden state of a generated special token.

The module names are the checkpoint's (EthanG97/ImageDoctor, modify/transformers/modeling_qwen2_5_vl.py):
`text_hidden_fcs` (token state -> sparse prompt), `image_hidden_fcs` (merged visual tokens -> image embedding),
`prompt_encoder` (SAM's random-frequency positions and no-mask embedding) and `heatmap` (SAM's two-way transformer
with one mask token, ImageDoctor's x16 convolutional upsampler and a hypernetwork MLP). `load_doctor_head` reads it
from the checkpoint's safetensors; SAM's point, box and mask prompt parts are stored there but never used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from visalign.reward_models.loading import load_mapped_state_dict

HEAD_PREFIXES = ("heatmap.", "text_hidden_fcs.", "image_hidden_fcs.", "prompt_encoder.")
UNUSED_PROMPT_ENCODER = (
    "prompt_encoder.point_embeddings.",
    "prompt_encoder.not_a_point_embed.",
    "prompt_encoder.mask_",
)


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
