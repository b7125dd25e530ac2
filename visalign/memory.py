"""Meta-device measurement of models: exact parameter counts and the bytes autograd saves for backward.

    model = build_model(bundled_config("sd35_medium_transformer"), torch.bfloat16, num_layers=1)
    saved_activation_bytes(model, inputs, checkpointing=True)

The bundled configs (`visalign/assets/configs/<name>/config.json`) are the published `config.json` files of real
architectures, configs only. On the meta device a model has shapes and no storage, so a 20B transformer builds in a
second and runs at any resolution without arithmetic; autograd still records what it would save. `visalign.plan`
turns these measurements into per-process memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

# -- parameters -------------------------------------------------------------------------------------------------------


def bundled_config(name: str) -> dict[str, Any]:
    """The bundled `config.json` of an architecture (`visalign/assets/configs/<name>/config.json`)."""
    path = resources.files("visalign.assets") / "configs" / name / "config.json"
    if not path.is_file():
        raise ValueError(f"no bundled architecture config {name!r} (looked for {path})")
    return json.loads(path.read_text())


def build_model(
    config: dict[str, Any], dtype: torch.dtype = torch.float32, *, device: str = "meta", **overrides: Any
) -> nn.Module:
    """The model a diffusers (`_class_name`) or transformers (`architectures`) config describes (with `overrides`),
    built on `device`: the meta device by default (shapes only), a real one for random weights at real sizes."""
    import diffusers
    import transformers

    config = {**config, **overrides}
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the published Qwen-Image config has a key the class ignores
    try:
        with torch.device(device):
            if "_class_name" in config:
                model = getattr(diffusers, config["_class_name"]).from_config(config)
            else:
                architecture = getattr(transformers, config["architectures"][0])
                model = architecture(transformers.AutoConfig.for_model(**config))
            return model.to(dtype)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def count_parameters(name: str) -> int:
    """Exact parameter count of a bundled architecture."""
    return sum(p.numel() for p in build_model(bundled_config(name)).parameters())


def lora_parameters(model: nn.Module, rank: int, targets: list[str]) -> int:
    """Parameters peft adds: `r (d_in + d_out)` per targeted `nn.Linear` (names ending in a target)."""
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    )


def largest_block(model: nn.Module) -> int:
    """Parameters of the largest FSDP unit: a module of a class in `_no_split_modules`, less the units nested in it
    (each is gathered on its own), or the whole model when it names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    sizes = []
    for unit in units:
        inner = {id(p) for m in unit.modules() if m is not unit and type(m).__name__ in names for p in m.parameters()}
        sizes.append(sum(p.numel() for p in unit.parameters() if id(p) not in inner))
    return max(sizes, default=sum(p.numel() for p in model.parameters()))


# -- activations ------------------------------------------------------------------------------------------------------


class _FusedAttention(torch.autograd.Function):
    """Shapes of a fused SDPA: output like q's, and saves q, k, v, the output and a float32 log-sum-exp per row."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    return _FusedAttention.apply(query, key, value)


class SavedTensors:
    """Counts the distinct storages autograd saves for backward inside `with counter:` (parameters excluded)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.sizes: dict[int, int] = {}

    def add(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        if storage._cdata not in self.exclude:
            self.sizes.setdefault(storage._cdata, storage.nbytes())

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def _pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@dataclass(frozen=True)
class Activations:
    """Bytes of one call's activations: `kept` from forward to backward, and `recomputed`, the largest checkpointed
    call's own activations, alive again while backward recomputes it (0 without checkpointing)."""

    kept: int
    recomputed: int = 0

    @property
    def total(self) -> int:
        return self.kept + self.recomputed


def measure_activations(model: nn.Module, inputs: dict[str, Any], *, checkpointing: bool = False) -> Activations:
    """What autograd keeps for one call `model(**inputs)` with gradients, attention counted as a fused kernel.

    With `checkpointing` (diffusers' `enable_gradient_checkpointing`), `kept` is what stays saved: everything
    outside the checkpointed calls plus their inputs. Works on any device; meant for the meta device.
    """
    params = {p.untyped_storage()._cdata for p in model.parameters()} | {
        b.untyped_storage()._cdata for b in model.buffers()
    }
    outer = SavedTensors(params)
    recomputed = 0

    def checkpoint(function: Callable, *args: Any) -> Any:
        nonlocal recomputed
        for t in _tensors(args):
            outer.add(t)  # a checkpoint keeps its inputs for the recomputation
        inner = SavedTensors(params | set(outer.sizes))
        with inner.counting():
            out = function(*args)
        recomputed = max(recomputed, inner.total)
        return out

    if checkpointing:
        model.enable_gradient_checkpointing(checkpoint)
    try:
        model.requires_grad_(True)
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa), outer.counting():
            model(**inputs)
    finally:
        if checkpointing:
            model.disable_gradient_checkpointing()
    return Activations(outer.total, recomputed)


def saved_activation_bytes(model: nn.Module, inputs: dict[str, Any], *, checkpointing: bool = False) -> int:
    """The peak activation bytes of one call with gradients (`measure_activations(...).total`)."""
    return measure_activations(model, inputs, checkpointing=checkpointing).total


def denoiser_inputs(
    config: dict[str, Any], batch: int, height: int, width: int, tokens: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Meta inputs of one call of the denoiser `config` describes: `batch` images of `height x width` (latents 8x
    smaller, one frame for Wan) and `tokens` text tokens."""
    h, w = height // 8, width // 8
    meta = {"device": "meta", "dtype": dtype}
    t = torch.zeros(batch, device="meta")
    cls = config["_class_name"]
    if cls == "UNet2DConditionModel":
        inputs = {
            "sample": torch.empty(batch, config["in_channels"], h, w, **meta),
            "timestep": t,
            "encoder_hidden_states": torch.empty(batch, tokens, config["cross_attention_dim"], **meta),
        }
        if config.get("addition_embed_type") == "text_time":
            time_ids = config["projection_class_embeddings_input_dim"] - 1280  # 6 x 256 besides the pooled text
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, 1280, **meta),
                "time_ids": torch.empty(batch, time_ids // config["addition_time_embed_dim"], **meta),
            }
        return inputs
    if cls == "SD3Transformer2DModel":
        return {
            "hidden_states": torch.empty(batch, config["in_channels"], h, w, **meta),
            "encoder_hidden_states": torch.empty(batch, tokens, config["joint_attention_dim"], **meta),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"], **meta),
            "timestep": t,
        }
    if cls == "FluxTransformer2DModel":
        return {
            "hidden_states": torch.empty(batch, (h // 2) * (w // 2), config["in_channels"], **meta),
            "encoder_hidden_states": torch.empty(batch, tokens, config["joint_attention_dim"], **meta),
            "pooled_projections": torch.empty(batch, config["pooled_projection_dim"], **meta),
            "timestep": t,
            "img_ids": torch.zeros((h // 2) * (w // 2), 3),
            "txt_ids": torch.zeros(tokens, 3),
            "guidance": t if config.get("guidance_embeds") else None,
        }
    if cls == "QwenImageTransformer2DModel":
        return {
            "hidden_states": torch.empty(batch, (h // 2) * (w // 2), config["in_channels"], **meta),
            "encoder_hidden_states": torch.empty(batch, tokens, config["joint_attention_dim"], **meta),
            "encoder_hidden_states_mask": torch.ones(batch, tokens, dtype=torch.long, device="meta"),
            "timestep": t,
            "img_shapes": [[(1, h // 2, w // 2)]] * batch,
        }
    if cls == "WanTransformer3DModel":
        return {
            "hidden_states": torch.empty(batch, config["in_channels"], 1, h, w, **meta),
            "encoder_hidden_states": torch.empty(batch, tokens, config["text_dim"], **meta),
            "timestep": t,
        }
    raise ValueError(f"no meta inputs for a {cls}")


def depth_scaled(
    config: dict[str, Any], depth_keys: tuple[str, ...], measure: Callable[..., Activations]
) -> Activations:
    """A measurement of the full-depth model from reduced-depth ones: `measure(**overrides)` at depth 1 for every
    block kind, then each kind at depth 2; the difference of `kept` is one block, counted `depth - 1` more times,
    and `recomputed` is the largest any run saw (one checkpointed block at a time, whatever the depth).

    Exact when the blocks of a kind are identical. The depth-1 run holds the last block, which may differ (SD3's
    last block is `context_pre_only`); SD3.5-Medium's dual-attention blocks (`dual_attention_layers`) are a kind of
    their own, measured as the first of two blocks.
    """
    if not depth_keys:
        return measure()
    dual = list(config.get("dual_attention_layers") or ())
    plain = {"dual_attention_layers": []} if "dual_attention_layers" in config else {}
    ones = {**dict.fromkeys(depth_keys, 1), **plain}
    base = measure(**ones)
    runs = [
        (measure(**{**ones, key: 2}), config[key] - 1 - (len(dual) if key == "num_layers" else 0))
        for key in depth_keys
    ]
    if dual:
        runs.append((measure(**{**ones, "num_layers": 2, "dual_attention_layers": [0]}), len(dual)))
    kept = base.kept + sum((run.kept - base.kept) * count for run, count in runs)
    return Activations(kept, max([base.recomputed] + [run.recomputed for run, _ in runs]))
