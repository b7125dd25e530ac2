"""`visalign score` in-process on tiny checkpoints and PNG files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reward_helpers import PROMPTS, TINY_OPEN_CLIP, save_clip_folder, save_hps

from visalign.cli import main
from visalign.reward_models.compose import prompt_zscore
from visalign.reward_models.score import load_pixels
from visalign.rewards import load_reward


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score")
    save_clip_folder(root / "clip")
    save_hps(root / "hps", "v2.1")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 32), (40, 48), (32, 32), (32, 32), (40, 48)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    (root / "prompts.txt").write_text("\n".join([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0]]) + "\n")
    return {"root": root, "images": images, "prompts": root / "prompts.txt"}


def args(setup: dict[str, Path], *extra: str) -> list[str]:
    clip, hps = setup["root"] / "clip", setup["root"] / "hps"
    return [
        "score",
        "--images",
        str(setup["images"]),
        "--prompts",
        str(setup["prompts"]),
        "--pretrained",
        f"pickscore={clip}",
        "--option",
        f"pickscore.processor={clip}",
        "--pretrained",
        f"hpsv2.1={hps}",
        "--option",
        f"hpsv2.1.architecture={json.dumps(TINY_OPEN_CLIP)}",
        "--batch-size",
        "2",
        *extra,
    ]


def test_scores_table_json_and_csv(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json, out_csv = tmp_path / "s.json", tmp_path / "s.csv"
    argv = args(setup, "--reward", "pickscore=0.5", "--reward", "hpsv2.1", "--output", str(out_json))
    assert main([*argv, "--output", str(out_csv), "--mode", "weighted_advantage"]) == 0
    report = json.loads(out_json.read_text())
    files = sorted(setup["images"].iterdir())
    prompts = setup["prompts"].read_text().splitlines()
    pick = load_reward("pickscore", str(setup["root"] / "clip"), processor=str(setup["root"] / "clip"))
    with torch.no_grad():
        expected = torch.tensor([pick(load_pixels(f)[None], [p]).score.item() for f, p in zip(files, prompts)])
    got = {k: torch.tensor([r[k] for r in report["results"]]) for k in ("pickscore", "hpsv2.1", "total")}
    torch.testing.assert_close(got["pickscore"], expected, rtol=1e-5, atol=1e-5)
    # the z-score runs over all images of a prompt, across batches of 2
    total = 0.5 * prompt_zscore(got["pickscore"], prompts) + prompt_zscore(got["hpsv2.1"], prompts)
    torch.testing.assert_close(got["total"], total, rtol=1e-5, atol=1e-5)
    assert [r["image"] for r in report["results"]] == [str(f) for f in files] and report[
        "mode"
    ] == "weighted_advantage"
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == [str(f) for f in files]
    assert abs(float(rows[3]["total"]) - float(total[3])) < 1e-4
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["image", "pickscore", "hpsv2.1", "total"] and len(table) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward", "pickscore=x"], "the weight must be a number"),
        (["--reward", "pickscore", "--reward", "pickscore"], "is given twice"),
        (["--reward", "pickscore", "--reward", "hpsv2.1", "--output", "a.txt"], "must end in .json or .csv"),
        (["--reward", "clipscore"], "--pretrained 'pickscore="),
    ],
)
def test_usage_errors(setup: dict[str, Path], capsys: pytest.CaptureFixture, extra: list[str], message: str) -> None:
    assert main(args(setup, *extra)) == 2
    assert message in capsys.readouterr().err


def test_prompt_count_must_match(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "p.txt").write_text("one prompt\n")
    argv = ["score", "--reward", "pickscore", "--images", str(setup["images"]), "--prompts", str(tmp_path / "p.txt")]
    assert main(argv) == 2
    assert "has 1 prompts for 5 images" in capsys.readouterr().err
