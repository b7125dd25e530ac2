"""ImageReward: the key map against the released module tree (BLIP ViT-L/16 + med.py BERT-base), loading failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reward_helpers import TINY_BLIP_VIT, TINY_MED_CONFIG, bert_tokenizer, save_bert_tokenizer, save_imagereward
from timm.models.vision_transformer import VisionTransformer
from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

from visalign.reward_models.aesthetic import AestheticMLP
from visalign.reward_models.imagereward import BLIP_VIT_LARGE, ImageReward, blip_text_config, imagereward_key
from visalign.reward_models.loading import load_mapped_state_dict

# BLIP's configs/med_config.json, as published with ImageReward (encoder_width is replaced by the ViT's width)
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


def med_bert_reference(config: dict, encoder_width: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of med.py's `BertModel(config, add_pooling_layer=False)`: embeddings without token types, a
    persistent `position_ids` buffer, and per layer `attention`, `crossattention` (keys/values from the ViT width),
    `intermediate`, `output`."""
    h, n = config["hidden_size"], config["max_position_embeddings"]
    shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], h),
        "embeddings.position_embeddings.weight": (n, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "embeddings.position_ids": (1, n),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        for attention, width in (("attention", h), ("crossattention", encoder_width)):
            for name, fan_in in (("query", h), ("key", width), ("value", width)):
                shapes |= {
                    f"{layer}.{attention}.self.{name}.weight": (h, fan_in),
                    f"{layer}.{attention}.self.{name}.bias": (h,),
                }
            shapes |= {
                f"{layer}.{attention}.output.dense.weight": (h, h),
                f"{layer}.{attention}.output.dense.bias": (h,),
            }
            shapes |= {f"{layer}.{attention}.output.LayerNorm.{p}": (h,) for p in ("weight", "bias")}
        inner = config["intermediate_size"]
        shapes |= {f"{layer}.intermediate.dense.weight": (inner, h), f"{layer}.intermediate.dense.bias": (inner,)}
        shapes |= {f"{layer}.output.dense.weight": (h, inner), f"{layer}.output.dense.bias": (h,)}
        shapes |= {f"{layer}.output.LayerNorm.{p}": (h,) for p in ("weight", "bias")}
    return shapes


def test_key_map_covers_the_released_checkpoint(tmp_path: Path) -> None:
    """`ImageReward.pt`'s keys at full size (timm ViT-L/16 = BLIP's ViT, med.py BERT-base, ITC projections, MLP) map
    one-to-one, with equal shapes, onto our module, built on the meta device."""
    with torch.device("meta"):
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_classes=0)
        vision = BlipVisionModel(BlipVisionConfig(**BLIP_VIT_LARGE))
        text = BlipTextModel(blip_text_config(MED_CONFIG, 1024), add_pooling_layer=False)
        head = AestheticMLP(768)
    ours = ImageReward(vision, text, head, bert_tokenizer(tmp_path)).state_dict()
    reference = {f"blip.visual_encoder.{k}": tuple(v.shape) for k, v in vit.state_dict().items()}
    reference |= {f"blip.text_encoder.{k}": s for k, s in med_bert_reference(MED_CONFIG, 1024).items()}
    reference |= {"blip.vision_proj.weight": (256, 1024), "blip.vision_proj.bias": (256,)}
    reference |= {"blip.text_proj.weight": (256, 768), "blip.text_proj.bias": (256,)}
    reference |= {f"mlp.layers.{k}": tuple(v.shape) for k, v in head.layers.state_dict().items()}
    mapped = {imagereward_key(k): s for k, s in reference.items() if imagereward_key(k) is not None}
    assert len(mapped) == len(reference) - 5  # position_ids and the two projections are dropped
    assert mapped == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("imagereward")
    save_imagereward(root / "model")
    return root / "model", save_bert_tokenizer(root / "bert")


def load(model: Path, bert: Path) -> ImageReward:
    return ImageReward.from_pretrained(str(model), tokenizer=str(bert), vision_config=TINY_BLIP_VIT)


def copy_with(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of the ImageReward folder with `edit(state)` applied to `ImageReward.pt`."""
    (tmp_path / "med_config.json").write_text((folder / "med_config.json").read_text())
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    torch.save(edit(state), tmp_path / "ImageReward.pt")
    return tmp_path


def test_missing_and_unexpected_keys_are_named(folders: tuple[Path, Path], tmp_path: Path) -> None:
    def edit(state: dict) -> dict:
        del state["blip.visual_encoder.blocks.1.attn.qkv.weight"]
        state["blip.text_decoder.cls.predictions.bias"] = torch.zeros(3)
        return state

    message = r"missing \(1\): vision.encoder.layers.1.self_attn.qkv.weight; unexpected \(1\): blip.text_decoder"
    with pytest.raises(ValueError, match=message):
        load(copy_with(folders[0], tmp_path, edit), folders[1])


def test_med_config_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    copy_with(folders[0], tmp_path, lambda s: s)
    (tmp_path / "med_config.json").write_text(json.dumps({**TINY_MED_CONFIG, "add_cross_attention": False}))
    with pytest.raises(ValueError, match="add_cross_attention"):
        load(tmp_path, folders[1])
    (tmp_path / "med_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="med_config.json is not valid JSON"):
        load(tmp_path, folders[1])
    config = {k: v for k, v in TINY_MED_CONFIG.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="`med_config` lacks hidden_size"):
        blip_text_config(config, 32)


def test_tokenizer_errors(folders: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(tokenizer.json or vocab.txt\)"):
        load(folders[0], tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(60)))
    with pytest.raises(ValueError, match=r"`tokenizer` has \d+ tokens, more than `text`'s 40"):
        load(folders[0], tmp_path)


def test_corrupt_checkpoint(folders: tuple[Path, Path], tmp_path: Path) -> None:
    copy_with(folders[0], tmp_path, lambda s: s)
    (tmp_path / "ImageReward.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match="ImageReward: .*ImageReward.pt is not a readable checkpoint"):
        load(tmp_path, folders[1])


def test_offline_default_names_the_files() -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageReward.pt from the Hub repo 'THUDM/ImageReward'"):
        ImageReward.from_pretrained()


def test_key_map_drops_only_what_the_score_does_not_use() -> None:
    assert imagereward_key("blip.vision_proj.weight") is None and imagereward_key("blip.text_proj.bias") is None
    assert imagereward_key("blip.text_encoder.embeddings.position_ids") is None
    assert imagereward_key("blip.visual_encoder.blocks.3.norm2.bias") == "vision.encoder.layers.3.layer_norm2.bias"
    assert imagereward_key("something.else") == "something.else"  # reported as unexpected, never dropped


def test_strict_loader_rejects_width_mismatch(folders: tuple[Path, Path], tmp_path: Path) -> None:
    state = torch.load(folders[0] / "ImageReward.pt", weights_only=True)
    wider = BlipVisionModel(BlipVisionConfig(**{**TINY_BLIP_VIT, "hidden_size": 64, "intermediate_size": 128}))
    module = torch.nn.Module()
    module.vision = wider
    vision_only = {k: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    with pytest.raises(ValueError, match=r"wrong shape \(\d+\): blip.visual_encoder"):
        load_mapped_state_dict(module, vision_only, imagereward_key, what="ImageReward", source="test")
