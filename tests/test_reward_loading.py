"""The shared checkpoint helpers of `visalign.reward_models.loading`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visalign.reward_models.loading import (
    cast_backbone,
    key_mismatch_error,
    load_checkpoint,
    load_mapped_state_dict,
    resolve_file,
    resolve_folder,
)


def test_paths_that_are_neither_local_nor_hub_ids(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing local file or folder nor a Hub repo id"):
        resolve_file(str(tmp_path / "missing" / "dir"), "model.pt", what="X")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="must be a folder or a Hub repo id, got the file"):
        resolve_folder(str(tmp_path / "model.pt"), ["*.json"], required=[], what="X")
    with pytest.raises(FileNotFoundError, match="X: could not get a.json, b.txt from the Hub repo 'org/repo'"):
        resolve_folder("org/repo", ["a.json", "b.txt"], required=[], what="X")


def test_checkpoint_formats_and_content(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "a.safetensors", what="X")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        load_checkpoint(tmp_path / "b.pt", what="X")
    torch.save(torch.ones(2), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="has no 'state_dict' entry"):
        load_checkpoint(tmp_path / "c.pt", key="state_dict", what="X")


def test_key_map_and_mismatch_message() -> None:
    module = nn.Sequential(nn.Linear(2, 3))
    load_mapped_state_dict(
        module, {"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3), "unused": torch.ones(1)},
        lambda k: None if k == "unused" else k.replace("fc.", "0."), what="X", source="s",
    )  # fmt: skip
    assert torch.equal(module[0].weight, torch.ones(3, 2))
    message = str(key_mismatch_error("X", "s", [f"k{i:02d}" for i in range(12)], []))
    assert message.endswith("missing (12): k00, k01, k02, k03, k04, k05, k06, k07, ... (4 more)")


def test_cast_backbone_keeps_named_parameters_exact() -> None:
    model = nn.Linear(2, 2)
    model.scale = nn.Parameter(torch.tensor(4.6052))
    cast_backbone(model, torch.bfloat16, keep_float32=["scale"])
    assert model.weight.dtype == torch.bfloat16 and model.scale.dtype == torch.float32
    assert model.scale.item() == torch.tensor(4.6052).item()
    with pytest.raises(ValueError, match="`dtype` must be a floating point dtype"):
        cast_backbone(model, torch.int8)
