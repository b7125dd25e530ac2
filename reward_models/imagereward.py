"""ImageReward v1.0 (Xu et al., NeurIPS 2023): BLIP ViT-L/16 + BERT-base with cross-attention + MLP head.

    h = BERT(tokens(p), cross-attending to ViT(x))[CLS]          (hidden 768)
    r = (MLP(h) - 0.16717362830052426) / 1.0333394966054072      (~N(0, 1) on the authors' prompt set)

Reference (THUDM/ImageReward `ImageReward/ImageReward.py`, `models/BLIP/*`): `BLIP_Pretrain(image_size=224,
vit='large', med_config)` whose `visual_encoder` is BLIP's timm-style ViT-L/16 (24 blocks, width 1024, LayerNorm
eps 1e-6) and `text_encoder` BLIP's `med.py` `BertModel` (no token-type embeddings, cross-attention to width 1024,
no pooler); `bert-base-uncased` tokenizer plus `[DEC]` (bos) and `[ENC]` (vocabulary 30524), `padding='max_length',
truncation=True, max_length=35`; preprocessing `Resize(224, bicubic) -> CenterCrop(224)` on PIL, OpenAI
normalization; the same MLP as the LAION aesthetic head. `ImageReward.pt` + `med_config.json` from the Hub repo
`THUDM/ImageReward`; the reference loads it with `strict=False`.

Here, without the `image-reward` package (it pins an old timm and downloads its tokenizer at run time): the ViT is
transformers' `BlipVisionModel` and the text encoder transformers' `BlipTextModel` (the port of `med.py`), loaded
with `strict=True` through `IMAGEREWARD_KEY_MAP`. The checkpoint's `blip.vision_proj` and `blip.text_proj` (BLIP's
contrastive projections, unused by the score) and the `position_ids` buffer are dropped by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from visalign.reward_models.aesthetic import AestheticMLP
from visalign.reward_models.loading import (
    cast_backbone,
    load_checkpoint,
    load_mapped_state_dict,
    load_tokenizer,
    read_json,
    resolve_file,
)
from visalign.reward_models.preprocess import ImageTransform, PixelValuesReward
from visalign.types import RewardOutput

IMAGEREWARD_REPO = "THUDM/ImageReward"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
# BLIP's create_vit('large', 224): VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
BLIP_VIT_LARGE: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
# ImageReward.pt key (regex) -> key of `ImageReward` (None: present in the reference, unused by the score).
IMAGEREWARD_KEY_MAP: list[tuple[str, str | None]] = [
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision.encoder.layers.\1.layer_norm\2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.fc([12])\.", r"vision.encoder.layers.\1.mlp.fc\2."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.embeddings\.position_ids$", None),
    (r"^blip\.text_encoder\.", "text."),
    (r"^blip\.(vision|text)_proj\.", None),
    (r"^mlp\.layers\.", "head.layers."),
]


def imagereward_key(key: str) -> str | None:
    """Map one `ImageReward.pt` key to ours with the first matching rule of `IMAGEREWARD_KEY_MAP` (else unchanged)."""
    for pattern, replacement in IMAGEREWARD_KEY_MAP:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    return key


def blip_text_config(med_config: Mapping[str, Any], encoder_width: int) -> BlipTextConfig:
    """transformers' config for BLIP's `med.py` BERT from `med_config.json`, cross-attending to `encoder_width`."""
    if not med_config.get("add_cross_attention", False):
        raise ValueError("`med_config` must have `add_cross_attention: true` (ImageReward's text encoder needs it)")
    keys = [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "hidden_act",
        "pad_token_id",
    ]
    missing = [k for k in keys if k not in med_config]
    if missing:
        raise ValueError(f"`med_config` lacks {', '.join(missing)}")
    return BlipTextConfig(
        **{k: med_config[k] for k in keys},
        encoder_hidden_size=encoder_width,
        is_decoder=True,  # builds the cross-attention layers; the forward pass runs bidirectionally
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


class ImageReward(PixelValuesReward):
    """ImageReward v1.0: BLIP ViT + cross-attending BERT + MLP, normalized to about N(0, 1).

    Args:
        vision: transformers `BlipVisionModel` (BLIP ViT-L/16 for the release).
        text: transformers `BlipTextModel` with cross-attention layers (`is_decoder=True` config, no pooler).
        head: the `AestheticMLP(768)` over the `[CLS]` hidden state.
        tokenizer: the BERT tokenizer (prompts are cut at 35 tokens, as in the reference).
        transform: default: the ViT's image size with torchvision geometry (Resize + CenterCrop, OpenAI norm).
    """

    name = "imagereward"

    def __init__(
        self,
        vision: BlipVisionModel,
        text: BlipTextModel,
        head: AestheticMLP,
        tokenizer: Any,
        *,
        transform: ImageTransform | None = None,
    ) -> None:
        super().__init__()
        if text.config.encoder_hidden_size != vision.config.hidden_size:
            raise ValueError(
                f"`text` cross-attends to width {text.config.encoder_hidden_size} but `vision` has width "
                f"{vision.config.hidden_size}"
            )
        if len(tokenizer) > text.config.vocab_size:
            raise ValueError(f"`tokenizer` has {len(tokenizer)} tokens, more than `text`'s {text.config.vocab_size}")
        self.vision = vision
        self.text = text
        self.head = head
        self.tokenizer = tokenizer
        self.transform = (
            transform if transform is not None else ImageTransform(vision.config.image_size, "torchvision")
        )

    def score_pixel_values(self, pixel_values: Tensor, prompts: list[str]) -> RewardOutput:
        prompts = self.check_pixel_values(pixel_values, prompts)
        x = pixel_values.to(self.vision.embeddings.patch_embedding.weight.dtype)
        image_embeds = self.vision(pixel_values=x).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        hidden = self.text(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
        ).last_hidden_state[:, 0]
        raw = self.head(hidden.float()).float()
        return RewardOutput((raw - REWARD_MEAN) / REWARD_STD)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        tokenizer: str = BERT_TOKENIZER,
        vision_config: Mapping[str, Any] | None = None,
    ) -> ImageReward:
        """Load `ImageReward.pt` and `med_config.json`.

        Args:
            pretrained: a folder holding both files, or a Hub repo id (default `THUDM/ImageReward`).
            dtype: precision of the ViT and BERT (the head and the normalization stay float32).
            tokenizer: folder or Hub repo of the `bert-base-uncased` tokenizer (`vocab.txt` or `tokenizer.json`);
                `[DEC]` and `[ENC]` are added as in the reference.
            vision_config: `BlipVisionConfig` fields of the ViT (default `BLIP_VIT_LARGE`; tests use tiny ones).
        """
        source = pretrained or IMAGEREWARD_REPO
        weights = resolve_file(source, "ImageReward.pt", what="ImageReward")
        med_config = read_json(resolve_file(source, "med_config.json", what="ImageReward"), what="ImageReward")
        vision = BlipVisionModel(BlipVisionConfig(**(vision_config or BLIP_VIT_LARGE)))
        text = BlipTextModel(blip_text_config(med_config, vision.config.hidden_size), add_pooling_layer=False)
        head = AestheticMLP(text.config.hidden_size)
        bert = load_tokenizer(BertTokenizer, tokenizer, [("tokenizer.json",), ("vocab.txt",)], what="ImageReward")
        bert.add_special_tokens({"bos_token": "[DEC]"})
        bert.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        model = cls(vision, text, head, bert)
        state = load_checkpoint(weights, what="ImageReward")
        load_mapped_state_dict(model, state, imagereward_key, what="ImageReward", source=str(weights))
        cast_backbone(model.vision, dtype)
        cast_backbone(model.text, dtype)
        return model.requires_grad_(False).eval()
