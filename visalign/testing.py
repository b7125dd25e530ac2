"""Tiny offline components for tests: real tokenizers and real diffusers pipelines at diffusers' own test sizes.

Nothing here touches the Hub. The CLIP tokenizer is the real OpenAI CLIP BPE, built from the vocabulary file that
open-clip-torch ships in its wheel; the T5 tokenizer (also Wan's UMT5 one) is a real `T5Tokenizer` (a `tokenizers`
Unigram model) over a small vocabulary derived from the same file; Qwen-Image's is a real `Qwen2Tokenizer` whose
byte-level BPE is learned from a few sentences (`visalign.testing_vlm.qwen_tokenizer`). Models are random, built
after `torch.manual_seed(seed)` and put in eval mode (a fresh T5 has dropout on).

Typical use in a test:

    pipe = tiny_pipeline("sd3")
    images = pipe(["a red square"], num_inference_steps=2, height=32, width=32, output_type="pt").images
    folder = save_tiny(pipe, tmp_path / "sd3")    # the official layout: model_index.json, */*.safetensors
    pipe = load_tiny("sd3", folder)               # the real `StableDiffusion3Pipeline.from_pretrained(folder)`

Loaders under test can be pointed at `folder` exactly as users point them at a hub id.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    ModelMixin,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from visalign.testing_vlm import qwen_tokenizer, tiny_qwen_vl

logger = logging.getLogger(__name__)

TINY_VOCAB_SIZE = 1000  # diffusers' test text encoders; 486 CLIP merges + 512 byte symbols + 2 specials
FULL_CLIP_MERGES = 48894  # OpenAI CLIP: 49,408 tokens
# `QwenImagePipeline.prompt_template_encode`, verbatim from diffusers 0.42 (`pipeline_qwenimage.py`, `__init__`).
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    """All merges of the OpenAI CLIP BPE (lines 1.. of open_clip's `bpe_simple_vocab_16e6.txt.gz`)."""
    spec = importlib.util.find_spec("open_clip")  # locate the package without importing it (it imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("visalign.testing needs open-clip-torch, which ships the CLIP BPE vocabulary")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : FULL_CLIP_MERGES + 1])


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols GPT-2/CLIP byte-level BPE uses for bytes 0..255, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_vocab(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = list(_clip_merges()[:num_merges])
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(num_merges: int = 486, model_max_length: int = 77) -> CLIPTokenizer:
    """The OpenAI CLIP BPE tokenizer, built offline; the first `num_merges` merges only.

    The vocabulary has `512 + num_merges + 2` tokens: 486 gives diffusers' 1,000-token test vocabulary, 48,894 the
    real CLIP tokenizer (ids identical to open_clip's on plain text). `<|startoftext|>` and `<|endoftext|>` are
    the last two ids; `<|endoftext|>` also pads.
    """
    if not 0 <= num_merges <= FULL_CLIP_MERGES:
        raise ValueError(f"`num_merges` must be in [0, {FULL_CLIP_MERGES}], got {num_merges}")
    vocab, merges = _clip_vocab(num_merges)
    # Objects, not file keywords: under transformers 5 `vocab_file=`/`merges_file=` are silently ignored.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, model_max_length: int = 512) -> T5Tokenizer:
    """A tiny real T5 tokenizer (SentencePiece-style Unigram over `vocab_size` pieces, no sentinel tokens).

    Ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>` as in T5. The pieces are `▁` (word start), the printable ASCII
    characters with and without `▁`, then the CLIP BPE merges in frequency order: a word-final merge `xy</w>`
    gives the piece `▁xy`, any other merge `xy`. Longer, more frequent pieces score higher, so common words are one
    token. The class is the one FLUX and SD3 checkpoints name, so it survives `save_pretrained`/`from_pretrained`.
    """
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = ["▁"] + chars + ["▁" + c for c in chars]
    if vocab_size < len(pieces) + 3:
        raise ValueError(
            f"`vocab_size` must be at least {len(pieces) + 3} (specials and characters), got {vocab_size}"
        )
    seen = set(pieces)
    for a, b in _clip_merges():
        if len(pieces) >= vocab_size - 3:
            break
        merged = a + b
        piece = "▁" + merged[: -len("</w>")] if merged.endswith("</w>") else merged
        if piece not in seen and piece.lstrip("▁").isascii() and piece.lstrip("▁").isprintable():
            seen.add(piece)
            pieces.append(piece)
    if len(pieces) < vocab_size - 3:
        raise ValueError(f"`vocab_size` must be at most {len(pieces) + 3} (the pieces available), got {vocab_size}")
    n_chars = 1 + 2 * len(chars)
    scores = [-10.0] * n_chars + [-1.0 - i / len(pieces) for i in range(len(pieces) - n_chars)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(zip(pieces, scores))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_text_config(**overrides: Any) -> CLIPTextConfig:
    """diffusers' test CLIP text encoder, with the special ids of `clip_tokenizer()` (EOS pooling needs them)."""
    config = dict(
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=TINY_VOCAB_SIZE - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=TINY_VOCAB_SIZE,
        hidden_act="gelu",
        projection_dim=32,
    )
    return CLIPTextConfig(**{**config, **overrides})


def _t5_encoder() -> T5EncoderModel:
    config = T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=TINY_VOCAB_SIZE)
    return T5EncoderModel(config)


def _sd_components(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    text_encoder = CLIPTextModel(_clip_text_config(intermediate_size=64, num_attention_heads=8, num_hidden_layers=3))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_components(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=scheduler,
        add_watermarker=False,  # the invisible watermark, when installed, would alter pixels
    )


def _sd3_components(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
        text_encoder_3=_t5_encoder(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _flux_components(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 2x2 packed latents of 1 channel
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config()),
        text_encoder_2=_t5_encoder(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _qwen_image_components(seed: int) -> dict[str, Any]:
    """diffusers' `QwenImagePipeline` test components (`tests/pipelines/qwenimage/test_qwenimage.py`), offline.

    The text encoder is a 2-layer `Qwen2_5_VLForConditionalGeneration` over the learned vocabulary of
    `visalign.testing_vlm.qwen_tokenizer` (width 32, so `joint_attention_dim=32`); the tokenizer's corpus holds the
    pipeline's prompt template, so its system prefix is 34 tokens, the `prompt_template_encode_start_idx` the
    pipeline drops, exactly as with the real Qwen2 vocabulary. The VAE's 2 down blocks make `vae_scale_factor` 4;
    latents have 4 channels, packed 2x2 into the transformer's 16. `latents_mean`/`latents_std` are not 0/1 so
    that a missing (de)normalization shows.
    """
    tokenizer = qwen_tokenizer([QWEN_IMAGE_TEMPLATE.format("")])
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=tiny_qwen_vl(tokenizer, "qwen2_5_vl", seed=seed, hidden_size=32),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _wan_components(seed: int) -> dict[str, Any]:
    """diffusers' `WanPipeline` test components (`tests/pipelines/wan/test_wan.py`), offline.

    The text encoder is a 2-layer `UMT5EncoderModel` (width 32 = the transformer's `text_dim`) over the tiny
    Unigram `t5_tokenizer()`. The VAE compresses 8x in space and 4x in time, so 9 frames of 16x16 pixels are
    latents `[B, 16, 3, 2, 2]`; its `latents_mean`/`latents_std` are Wan2.1's defaults. The scheduler is the
    flow-matching Euler one of diffusers' test (`shift=7.0`); the released checkpoints ship
    `UniPCMultistepScheduler` with `flow_shift`, a multistep solver over the same flow.
    """
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed)
    config = UMT5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=TINY_VOCAB_SIZE)
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=UMT5EncoderModel(config),
        tokenizer=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


_BUILDERS = {
    "sd": (StableDiffusionPipeline, _sd_components),
    "sdxl": (StableDiffusionXLPipeline, _sdxl_components),
    "sd3": (StableDiffusion3Pipeline, _sd3_components),
    "flux": (FluxPipeline, _flux_components),
    "qwen-image": (QwenImagePipeline, _qwen_image_components),
    "wan": (WanPipeline, _wan_components),
}
VIDEO_FAMILIES = ("wan",)  # `pipe(...).frames`, `[B, T, 3, H, W]` with `output_type="pt"`
FAMILIES = tuple(f for f in _BUILDERS if f not in VIDEO_FAMILIES)  # image families: `pipe(...).images`


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown `family` {family!r}; tiny pipelines exist for: {', '.join(_BUILDERS)}")


def tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A real diffusers pipeline of `family` with tiny random weights, on CPU.

    Families: "sd", "sdxl", "sd3", "flux", "qwen-image" (`FAMILIES`, images) and "wan" (`VIDEO_FAMILIES`).
    Every component is built after `torch.manual_seed(seed)` and is in eval mode, so equal seeds give equal
    weights. The image families generate 32x32 images: `pipe(prompts, num_inference_steps=2, height=32, width=32,
    output_type="pt").images` is `[B, 3, 32, 32]` in [0, 1]. Wan generates videos: `pipe(prompts,
    num_inference_steps=2, height=16, width=16, num_frames=9, output_type="pt").frames` is `[B, 9, 3, 16, 16]`
    (frames before channels, diffusers' own video layout) in [0, 1], from latents `[B, 16, 3, 2, 2]`.
    """
    _check_family(family)
    pipeline_class, build = _BUILDERS[family]
    components = build(seed)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(
    pipeline_or_model: DiffusionPipeline | ModelMixin | PreTrainedModel | PreTrainedTokenizerBase, folder: str | Path
) -> Path:
    """Write a pipeline, model or tokenizer in the official diffusers/transformers layout (safetensors weights).

    The folder then loads through the same `from_pretrained(folder)` call users make with a hub id; for a whole
    pipeline, `load_tiny(family, folder)` does it. Returns the folder.
    """
    saveable = (DiffusionPipeline, ModelMixin, PreTrainedModel, PreTrainedTokenizerBase)
    if not isinstance(pipeline_or_model, saveable):
        raise ValueError(
            "`pipeline_or_model` must be a diffusers pipeline or model, or a transformers model or tokenizer, "
            f"got {type(pipeline_or_model).__name__}"
        )
    folder = Path(folder)
    pipeline_or_model.save_pretrained(folder)
    logger.info("saved %s to %s", type(pipeline_or_model).__name__, folder)
    return folder


def load_tiny(family: str, folder: str | Path) -> DiffusionPipeline:
    """Load a pipeline written by `save_tiny` with the family's real `from_pretrained`, as users load checkpoints.

    An SD3 folder without T5 (`text_encoder_3` absent from `model_index.json`) needs `text_encoder_3=None,
    tokenizer_3=None` to load; this passes them. Returns the pipeline with its progress bar off.
    """
    _check_family(family)
    pipeline_class = _BUILDERS[family][0]
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    options: dict[str, Any] = {}
    if family == "sd3" and index.get("text_encoder_3", [None])[0] is None:
        options.update(text_encoder_3=None, tokenizer_3=None)
    if family == "sdxl":
        options.update(add_watermarker=False)
    pipe = pipeline_class.from_pretrained(folder, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe
