"""The one run record and the one tensor-to-PIL conversion (`visalign.files`)."""

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.files import input_hash, run_record, to_pil, to_uint8, write_run_record


def test_to_pil_rounds_and_clamps_like_a_saved_png(tmp_path):
    torch.manual_seed(0)
    pixels = torch.rand(3, 5, 7) * 1.2 - 0.1  # some values outside [0, 1]
    image = to_pil(pixels)
    assert image.size == (7, 5) and image.mode == "RGB"
    expected = np.rint(pixels.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64) * 255).astype(np.uint8)
    assert np.abs(np.asarray(image).astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 product
    image.save(tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(image))
    batch = to_uint8(torch.stack([pixels, pixels.flip(-1)]))
    assert batch.shape == (2, 5, 7, 3) and batch.dtype == np.uint8 and np.array_equal(batch[0], np.asarray(image))
    assert to_uint8(torch.tensor([0.5 / 255, 1.5 / 255, 1.0]).view(3, 1, 1)).ravel().tolist() == [0, 2, 255]


@pytest.mark.parametrize("shape", [(5, 7), (1, 5, 7), (2, 3, 5, 7)])
def test_to_pil_names_a_wrong_shape(shape):
    with pytest.raises(ValueError, match="`pixels`"):
        to_pil(torch.rand(shape))


def test_run_record_holds_config_seeds_versions_command_and_input_hashes(tmp_path):
    @dataclass
    class Config:
        learning_rate: float = 1e-4
        prompts: str = ""

    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a cat\n")
    folder = tmp_path / "lora"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01")
    record = run_record(
        config=Config(prompts=str(prompts)),
        seeds={"seed": 3},
        inputs={"prompts": str(prompts), "lora": folder, "model": "org/model", "none": None},
        command="visalign train x",
    )
    assert record["config"] == {"learning_rate": 1e-4, "prompts": str(prompts)} and record["seeds"] == {"seed": 3}
    assert record["inputs"]["prompts"]["sha256"] == hashlib.sha256(b"a cat\n").hexdigest()
    assert record["inputs"]["model"] == {"id": "org/model"} and "none" not in record["inputs"]
    assert record["versions"]["torch"] and record["command"] == "visalign train x" and record["python"]
    # a folder's hash covers its files' names and contents
    before = input_hash(folder)["sha256"]
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x02")
    assert input_hash(folder)["sha256"] != before and input_hash(folder)["bytes"] == 4
    path = write_run_record(tmp_path / "out" / "run.json", record | {"extra": Config})
    assert json.loads(path.read_text())["inputs"] == record["inputs"] and not list(path.parent.glob("*.tmp"))
