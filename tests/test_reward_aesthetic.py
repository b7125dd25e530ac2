"""LAION aesthetic predictor: the head's released key names and shapes, loading failures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from reward_helpers import save_aesthetic, tiny_clip
from transformers import CLIPVisionModelWithProjection

from visalign.reward_models.aesthetic import AESTHETIC_FILE, AestheticMLP, LAIONAesthetic


def test_head_has_the_released_keys_and_shapes() -> None:
    """`sac+logos+ava1-l14-linearMSE.pth` holds `layers.{0,2,4,6,7}.{weight,bias}` of 768-1024-128-64-16-1."""
    sizes = {0: (768, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}
    expected = {f"layers.{i}.weight": (o, n) for i, (n, o) in sizes.items()}
    expected |= {f"layers.{i}.bias": (o,) for i, (_, o) in sizes.items()}
    assert {k: tuple(v.shape) for k, v in AestheticMLP(768).state_dict().items()} == expected


def test_head_is_affine_and_float32() -> None:
    """No activations: the head of a mix is the mix of the heads' outputs."""
    head = AestheticMLP(16).eval()
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    torch.testing.assert_close(head(0.3 * a + 0.7 * b), 0.3 * head(a) + 0.7 * head(b), rtol=1e-5, atol=1e-5)
    assert head(a.bfloat16()).dtype == torch.float32


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("aesthetic")
    save_aesthetic(folder)
    return folder


def test_loads_from_file_or_folder(folder: Path) -> None:
    by_folder = LAIONAesthetic.from_pretrained(str(folder), clip=str(folder / "clip"))
    by_file = LAIONAesthetic.from_pretrained(str(folder / AESTHETIC_FILE), clip=str(folder / "clip"))
    pixels = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(by_folder(pixels, ["a", "b"]).score, by_file(pixels, ["c", "d"]).score)


def test_head_saved_without_the_layers_prefix_fails_naming_keys(folder: Path, tmp_path: Path) -> None:
    state = torch.load(folder / AESTHETIC_FILE, weights_only=True)
    torch.save({k.removeprefix("layers."): v for k, v in state.items()}, tmp_path / AESTHETIC_FILE)
    with pytest.raises(ValueError, match=r"missing \(10\): layers.0.bias.*unexpected \(10\): 0.bias"):
        LAIONAesthetic.from_pretrained(str(tmp_path), clip=str(folder / "clip"))


def test_corrupt_head(folder: Path, tmp_path: Path) -> None:
    (tmp_path / AESTHETIC_FILE).write_text("<html>404: Not Found</html>")  # a failed download saved as the file
    with pytest.raises(ValueError, match="LAION aesthetic: .* is not a readable checkpoint"):
        LAIONAesthetic.from_pretrained(str(tmp_path), clip=str(folder / "clip"))


def test_file_and_backbone_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="github.com/christophschuhmann/improved-aesthetic-predictor"):
        LAIONAesthetic.from_pretrained()
    with pytest.raises(FileNotFoundError, match=f"has no {re.escape(AESTHETIC_FILE)}"):
        LAIONAesthetic.from_pretrained(str(tmp_path), clip=str(folder / "clip"))
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        LAIONAesthetic.from_pretrained(str(folder), clip=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        LAIONAesthetic.from_pretrained(str(folder))
    vision_only = tmp_path / "vision"
    CLIPVisionModelWithProjection(tiny_clip().config.vision_config).save_pretrained(vision_only)
    with pytest.raises(ValueError, match="is not a transformers CLIPModel folder"):
        LAIONAesthetic.from_pretrained(str(folder), clip=str(vision_only))


def test_head_width_must_match_the_projection() -> None:
    config = tiny_clip().config
    config.vision_config.projection_dim = config.projection_dim
    vision = CLIPVisionModelWithProjection(config.vision_config)
    with pytest.raises(ValueError, match="`head` takes 768 features but `vision` projects to 16"):
        LAIONAesthetic(vision, AestheticMLP(768))
