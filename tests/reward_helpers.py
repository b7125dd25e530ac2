"""Tiny reward models written in their official file layouts, and independent float64 references of their scores.

Each `save_*` builds a random model of the reference architecture at a tiny size (`torch.manual_seed(seed)`), writes
it exactly as the released checkpoint is laid out and returns what `from_pretrained` needs. Each `reference_*`
recomputes the published score formula in float64 through the reference modules' own forward passes (not through
`visalign.reward_models`), from already preprocessed `pixel_values`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import BertTokenizer, BlipTextModel, CLIPConfig, CLIPModel

from visalign.reward_models.aesthetic import AESTHETIC_FILE
from visalign.reward_models.hps import HPS_FILES
from visalign.reward_models.imagereward import MAX_LENGTH, REWARD_MEAN, REWARD_STD, blip_text_config
from visalign.testing import clip_tokenizer

PROMPTS = ["a red square", "two blue circles on the left", "a green triangle", "three yellow stars"]
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_BLIP_VIT = {
    "image_size": 32,
    "patch_size": 16,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}
# BLIP's med_config.json with BERT-base replaced by a tiny BERT (same keys as the released file)
TINY_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 40,
    "encoder_width": 768,
    "add_cross_attention": True,
}
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "two", "blue", "circle", "##s"]
BERT_WORDS += ["on", "the", "left", "green", "triangle", "three", "yellow", "star", "big", "small"]


def tiny_clip(seed: int = 0, image_size: int = 32) -> CLIPModel:
    """A transformers `CLIPModel` for the 1,000-token CLIP tokenizer of `visalign.testing`, in eval mode."""
    torch.manual_seed(seed)
    text = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 2}  # PickScore's legacy eos
    vision = {"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 2}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def save_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIP folder (PickScore / openai CLIP layout): config, safetensors, tokenizer."""
    tiny_clip(seed).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def save_hps(folder: Path, version: str = "v2.1", seed: int = 0) -> open_clip.CLIP:
    """`HPS_v2*_compressed.pt` in `folder`: `{"state_dict": ...}` of an open_clip CLIP (tiny config, not ViT-H-14)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, folder / HPS_FILES[version])
    return model


def save_aesthetic(folder: Path, seed: int = 0) -> nn.Sequential:
    """`folder/clip` (a CLIP folder for the image tower) and `folder/sac+logos+ava1-l14-linearMSE.pth` (the head's
    state dict, keys `layers.N.*`); returns the head."""
    save_clip_folder(folder / "clip", seed)
    torch.manual_seed(seed + 1)
    head = reference_mlp(16)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, folder / AESTHETIC_FILE)  # MLP.layers
    return head


def reference_mlp(input_size: int) -> nn.Sequential:
    """The improved-aesthetic-predictor / ImageReward `MLP.layers` (`nn.Sequential` with commented-out ReLUs).

    Weights are drawn with variance 1 / fan_in so that the tiny models' scores spread over O(1), not O(1e-3).
    """
    layers = nn.Sequential(
        nn.Linear(input_size, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.normal_(layer.bias, std=0.1)
    return layers.eval()


def blip_reference(seed: int = 0) -> dict[str, nn.Module]:
    """ImageReward's modules at tiny size: the timm ViT BLIP derives from, med.py's BERT, ITC projections, MLP."""
    torch.manual_seed(seed)
    vit = TINY_BLIP_VIT
    visual = VisionTransformer(
        img_size=vit["image_size"],
        patch_size=vit["patch_size"],
        embed_dim=vit["hidden_size"],
        depth=vit["num_hidden_layers"],
        num_heads=vit["num_attention_heads"],
        num_classes=0,
        global_pool="",
    )
    text = BlipTextModel(blip_text_config(TINY_MED_CONFIG, vit["hidden_size"]), add_pooling_layer=False)
    for module in text.modules():  # transformers initializes LayerNorms to (1, 0): randomize them as well
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, 0.1)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return {
        "visual_encoder": visual.eval(),
        "text_encoder": text.eval(),
        "vision_proj": nn.Linear(vit["hidden_size"], 8),
        "text_proj": nn.Linear(TINY_MED_CONFIG["hidden_size"], 8),
        "mlp": reference_mlp(TINY_MED_CONFIG["hidden_size"]),
    }


def imagereward_state_dict(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """The state dict of the reference `ImageReward` module tree (`blip.*`, `mlp.layers.*`)."""
    state = {}
    for name in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
        state |= {f"blip.{name}.{k}": v for k, v in modules[name].state_dict().items()}
    n = TINY_MED_CONFIG["max_position_embeddings"]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(n).expand(1, -1)  # med.py: persistent buffer
    state |= {f"mlp.layers.{k}": v for k, v in modules["mlp"].state_dict().items()}
    return state


def save_bert_tokenizer(folder: Path) -> Path:
    """A tiny `bert-base-uncased`-style tokenizer folder (`vocab.txt`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return folder


def save_imagereward(folder: Path, seed: int = 0) -> dict[str, nn.Module]:
    """`ImageReward.pt` and `med_config.json` in `folder`; returns the reference modules."""
    modules = blip_reference(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(imagereward_state_dict(modules), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(TINY_MED_CONFIG, indent=2))
    return modules


@torch.no_grad()
def reference_cosine(model: CLIPModel | open_clip.CLIP, tokenizer, pixel_values: Tensor, prompts: list[str]) -> Tensor:
    """`cos(image, text)` per pair from the model's own float64 forward (`logits_per_image` / its scale)."""
    m = copy.deepcopy(model).double()
    if isinstance(model, CLIPModel):
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = m(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixel_values.double()
        )
        return out.logits_per_image.diagonal() / m.logit_scale.exp()
    image, text, _ = m(pixel_values.double(), tokenizer(prompts))
    return (image @ text.T).diagonal()


@torch.no_grad()
def reference_clip_embeds(model: CLIPModel, pixel_values: Tensor) -> Tensor:
    """CLIP's normalized image embeddings from `CLIPModel.forward` in float64 (`image_embeds`)."""
    m = copy.deepcopy(model).double()
    ids = torch.tensor([[998, 999]])
    return m(input_ids=ids, pixel_values=pixel_values.double()).image_embeds


@torch.no_grad()
def reference_imagereward(
    modules: dict[str, nn.Module], pixel_values: Tensor, prompts: list[str], tokenizer
) -> Tensor:
    """`(MLP(BERT(p | ViT(x))[CLS]) - mean) / std` in float64 through the reference modules."""
    m = {k: copy.deepcopy(v).double().eval() for k, v in modules.items()}
    image_embeds = m["visual_encoder"].forward_features(pixel_values.double())
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = m["text_encoder"](
        input_ids=tokens["input_ids"],
        attention_mask=tokens["attention_mask"],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
    ).last_hidden_state[:, 0]
    return ((m["mlp"](hidden) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def bert_tokenizer(folder: Path) -> BertTokenizer:
    """The tiny BERT tokenizer with ImageReward's `[DEC]` / `[ENC]` additions."""
    tokenizer = BertTokenizer.from_pretrained(save_bert_tokenizer(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer
