"""HPSv2 / HPSv2.1: key compatibility with the released ViT-H-14 checkpoints, safe and strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reward_helpers import PROMPTS, TINY_OPEN_CLIP, save_hps

from visalign.reward_models.clip import build_open_clip
from visalign.reward_models.hps import HPSv2
from visalign.reward_models.preprocess import ImageTransform


def hps_reference_keys(vision_layers: int = 32, text_layers: int = 24) -> set[str]:
    """The state-dict keys of HPSv2's open_clip fork (`hpsv2/src/open_clip/model.py`, `transformer.py`) for a
    standard CLIP: `VisionTransformer` (class/positional embeddings, conv1, ln_pre, resblocks, ln_post, proj), the
    text `Transformer` with token/positional embeddings, ln_final, text_projection, logit_scale."""
    block = ["ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj"]
    blocks = [f"{b}.{p}" for b in block for p in ("weight", "bias")] + ["attn.in_proj_weight", "attn.in_proj_bias"]
    keys = {"visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight"}
    keys |= {f"visual.{n}.{p}" for n in ("ln_pre", "ln_post") for p in ("weight", "bias")}
    keys |= {f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in blocks}
    keys |= {f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in blocks}
    keys |= {"token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"}
    return keys | {"ln_final.weight", "ln_final.bias"}


def test_vit_h_14_has_the_released_checkpoint_keys() -> None:
    """Built on the meta device: no memory, same module tree as the 1B-parameter model."""
    with torch.device("meta"):
        model = build_open_clip("ViT-H-14")
    state = model.state_dict()
    assert set(state) == hps_reference_keys()
    assert state["visual.conv1.weight"].shape == (1280, 3, 14, 14)
    assert state["visual.positional_embedding"].shape == (257, 1280)
    assert state["token_embedding.weight"].shape == (49408, 1024)
    assert state["text_projection"].shape == (1024, 1024) and state["visual.proj"].shape == (1280, 1024)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hps")
    save_hps(folder, "v2.0", seed=0)
    save_hps(folder, "v2.1", seed=1)
    return folder


def test_versions_and_layouts(folder: Path) -> None:
    v20 = HPSv2.from_pretrained(str(folder), version="v2.0", architecture=TINY_OPEN_CLIP)
    v21 = HPSv2.from_pretrained(str(folder / "HPS_v2.1_compressed.pt"), architecture=TINY_OPEN_CLIP)
    assert (v20.name, v21.name) == ("hpsv2", "hpsv2.1")
    assert v21.transform == ImageTransform(32, "hpsv2") and v21.scale == 1.0
    pixels = torch.rand(2, 3, 48, 32)
    with torch.no_grad():
        a, b = v20(pixels, PROMPTS[:2]).score, v21(pixels, PROMPTS[:2]).score
    assert not torch.allclose(a, b) and a.abs().max() <= 1.0


def test_a_prefixed_state_dict_fails_naming_keys(folder: Path, tmp_path: Path) -> None:
    state = torch.load(folder / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match=r"missing \(\d+\): ln_final.bias.*unexpected \(\d+\): module\."):
        HPSv2.from_pretrained(str(tmp_path), version="v2.0", architecture=TINY_OPEN_CLIP)


def test_wrong_architecture_names_the_shapes(folder: Path) -> None:
    wider = {**TINY_OPEN_CLIP, "embed_dim": 8}
    with pytest.raises(ValueError, match=r"wrong shape \(\d+\): text_projection \(32, 16\) vs \(32, 8\)"):
        HPSv2.from_pretrained(str(folder), architecture=wider)


def test_without_state_dict_entry(folder: Path, tmp_path: Path) -> None:
    state = torch.load(folder / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="has no 'state_dict' entry"):
        HPSv2.from_pretrained(str(tmp_path), version="v2.0", architecture=TINY_OPEN_CLIP)


class Payload:
    """An object a malicious pickle could carry; `weights_only=True` refuses to rebuild it."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="is not a readable checkpoint.*UnpicklingError"):
        HPSv2.from_pretrained(str(tmp_path), version="v2.0", architecture=TINY_OPEN_CLIP)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="HPSv2.1: .*HPS_v2.1_compressed.pt is not a readable checkpoint"):
        HPSv2.from_pretrained(str(tmp_path), architecture=TINY_OPEN_CLIP)
    with pytest.raises(FileNotFoundError, match="has no HPS_v2_compressed.pt"):
        HPSv2.from_pretrained(str(tmp_path), version="v2.0", architecture=TINY_OPEN_CLIP)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2.1_compressed.pt from the Hub repo 'xswu/HPSv2'"):
        HPSv2.from_pretrained()
    with pytest.raises(ValueError, match="`version`"):
        HPSv2.from_pretrained(str(tmp_path), version="v3")
