"""The shapes world's model components and where the shipped ones live.

Every component is a real library class at a tiny size: a `CLIPTokenizer` whose BPE merges are the subset of
OpenAI CLIP's merges that spell the world's words (each world word is one token), a transformers `CLIPModel`
trained contrastively on world captions (its text tower conditions the generators; the whole model is the
`world-clip` reward), an `AutoencoderKL` (32x32x3 <-> 16x16x4), a `UNet2DConditionModel` for the epsilon-prediction
`StableDiffusionPipeline` and an `SD3Transformer2DModel` for the flow-matching `StableDiffusion3Pipeline`.

The SD3-class model has no T5: its pipeline pads the prompt with `max_sequence_length` zero tokens in T5's place.
The world model was trained with `MAX_SEQUENCE_LENGTH` of them; pass `max_sequence_length=MAX_SEQUENCE_LENGTH`
when calling it (visalign's samplers read it from `visalign_world.json` in the model folder).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from visalign.testing import _bytes_to_unicode, _clip_merges
from visalign.world.scenes import _TEMPLATES, COLORS, NUMBERS, RELATIONS, SHAPES, SIZE

TOKENS = 16  # tokenizer model_max_length: the longest caption is 13 tokens with its start and end tokens
MAX_SEQUENCE_LENGTH = 16  # zero "T5" tokens the SD3-class world model was trained with
LATENT = 16  # latent side (the VAE halves 32x32)
FAMILIES = ("sd", "sd3")


def world_words() -> set[str]:
    words = set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(NUMBERS.values())
    for rel in RELATIONS:
        words |= set(rel.split())
    for templates in _TEMPLATES.values():
        for t in templates:
            words |= {w for w in t.split() if "{" not in w}
    return words


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges byte-level BPE applies to spell `word` (CLIP marks the last symbol with `</w>`)."""
    parts = list(word)  # world words are printable ASCII, whose byte symbols are the characters themselves
    parts[-1] += "</w>"
    used = []
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        used.append((parts[i], parts[i + 1]))
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return used


def world_tokenizer() -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over the world's words: byte symbols plus the CLIP merges that spell them.

    Keeping, in their original order, only the merges BPE applies to the world's words tokenizes those words
    exactly as OpenAI CLIP does (BPE always applies the lowest-ranked available merge, and every merge it
    applies is kept), with a vocabulary of about 580 tokens instead of 49,408.
    """
    merges = _clip_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    keep = {m for w in world_words() for m in _bpe_merges_used(w, ranks)}
    kept = [m for m in merges if m in keep]
    symbols = _bytes_to_unicode()
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in kept] + ["<|startoftext|>", "<|endoftext|>"]
    )
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=TOKENS)


def clip_config(vocab_size: int) -> CLIPConfig:
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=64,
    )
    vision = dict(
        image_size=SIZE,
        patch_size=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_channels=3,
        projection_dim=64,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def build_clip(vocab_size: int) -> CLIPModel:
    return CLIPModel(clip_config(vocab_size))


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        shift_factor=0.0,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_transformer(num_layers: int = 6, num_heads: int = 6) -> SD3Transformer2DModel:
    """The world's SD3 transformer on 16x16x4 latents (2x2 patches: 64 image tokens), width `16 * num_heads`."""
    return SD3Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=num_heads,
        joint_attention_dim=128,
        caption_projection_dim=16 * num_heads,
        pooled_projection_dim=128,
        pos_embed_max_size=LATENT // 2,
    )


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble(family: str, clip: CLIPModel, tokenizer: CLIPTokenizer, vae: AutoencoderKL, denoiser):
    """A real diffusers pipeline from world components (`denoiser` = UNet for "sd", transformer for "sd3")."""
    if family == "sd":
        text = CLIPTextModel(clip.config.text_config)
        text.load_state_dict(clip.text_model.state_dict())
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text.eval(),
            tokenizer=tokenizer,
            unet=denoiser,
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sd3":
        text = CLIPTextModelWithProjection(clip.config.text_config)
        text.text_model.load_state_dict(clip.text_model.state_dict())
        text.text_projection.load_state_dict(clip.text_projection.state_dict())
        return StableDiffusion3Pipeline(
            transformer=denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text.eval(),
            tokenizer=tokenizer,
            text_encoder_2=text,
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}")


def default_model_dir(family: str) -> Path:
    """The shipped model folder of a family inside `visalign/assets/world/`."""
    if family not in (*FAMILIES, "clip"):
        raise ValueError(f"`family` must be one of {(*FAMILIES, 'clip')}, got {family!r}")
    return Path(str(resources.files("visalign.assets"))) / "world" / family


def generation_kwargs(folder: str | Path) -> dict:
    """Sampling defaults stored beside a world model (`visalign_world.json`)."""
    meta = Path(folder) / "visalign_world.json"
    return json.loads(meta.read_text())["generation"] if meta.exists() else {}
