"""Reward-training data: Pick-a-Pic pairs with per-aspect labels, HPDv2 rankings expanded to pairs, labelled images
with heatmaps, verifier-labelled world pairs, and every kind of bad row."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from preference_helpers import hub_snapshot

from visalign.pipelines.reward_data import (
    RewardPairs,
    load_hpdv2,
    load_pickapic,
    load_reward_data,
    load_scored_images,
    world_config_pairs,
)
from visalign.pipelines.world_pairs import near_miss, world_pairs
from visalign.testing import tiny_pipeline
from visalign.world.scenes import parse_prompt
from visalign.world.verifier import verify


def _png(path, color, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.name


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pick_folder(tmp_path):
    """A Pick-a-Pic manifest folder: 4 pairs, one a tie, with label_1 and per-aspect labels on some rows."""
    folder = tmp_path / "pick"
    rows = []
    for i, label in enumerate([1, 0, 0.5, 1]):
        a = _png(folder / f"{i}_0.png", (200, 10 * i, 0))
        b = _png(folder / f"{i}_1.png", (0, 10 * i, 200))
        rows.append({"caption": f"prompt {i}", "jpg_0": a, "jpg_1": b, "label_0": label, "label_1": 1 - label})
    rows[0]["aspect_labels"] = {"alignment": 1, "aesthetic": 0.5}
    rows[1]["aspect_labels"] = {"alignment": 0}
    _write_jsonl(folder / "manifest.jsonl", rows)
    return folder


def test_pickapic_pairs_keep_ties_and_read_aspect_labels(pick_folder):
    data = load_pickapic(pick_folder, aspects=["alignment", "aesthetic"])
    assert isinstance(data, RewardPairs) and len(data) == 4
    assert data.labels.tolist() == [1, 0, 0.5, 1]
    labels = data.aspect_labels
    assert labels[0].tolist() == [1.0, 0.5]
    assert labels[1, 0] == 0 and torch.isnan(labels[1, 1]) and torch.isnan(labels[2:]).all()
    batch = data.batch([0, 2])
    assert batch["images_0"].shape == (2, 3, 32, 32) and batch["label_0"].tolist() == [1, 0.5]
    assert batch["aspect_labels"].shape == (2, 2)
    dropped = load_pickapic(pick_folder, ties="drop")
    assert len(dropped) == 3 and dropped.pairs.skipped == {"tie": 1} and dropped.aspect_labels is None


def test_one_sided_ties_and_bad_aspect_labels_are_bad_rows(pick_folder):
    rows = [json.loads(line) for line in (pick_folder / "manifest.jsonl").read_text().splitlines()]
    rows[2]["label_1"] = 1  # label_0 = 0.5 on one side only
    rows[3]["aspect_labels"] = {"alignment": 2}
    _write_jsonl(pick_folder / "manifest.jsonl", rows)
    with pytest.raises(ValueError, match="row 2 .*one-sided tie"):
        load_pickapic(pick_folder)
    data = load_pickapic(pick_folder, aspects=["alignment"], on_error="skip")
    assert len(data) == 2 and data.pairs.rows == [0, 1] and data.pairs.skipped == {"label": 2}
    dropped = load_pickapic(pick_folder, aspects=["alignment"], ties="drop", on_error="skip")
    assert dropped.pairs.skipped == {"label": 2}  # the one-sided tie is a bad row, not a dropped tie


def test_pickapic_reads_one_split_of_parquet_shards_with_its_labels_and_aspects(tmp_path):
    root = hub_snapshot(tmp_path / "pickapic")  # data/{split}-NNNNN-of-MMMMM-*.parquet, rows "{split} {shard} {row}"
    shards = sorted((root / "data").glob("train-*.parquet"))
    for k, shard in enumerate(shards):  # aspect labels that tell the rows apart, across the two shards
        table = pq.read_table(shard).to_pydict()
        table["aspect_labels"] = [{"alignment": (3 * k + r) / 10} for r in range(3)]
        if k == 1:
            table["label_1"][1] = 1.0  # row 1 of shard 1 (label_0 = 1): inconsistent labels
        pq.write_table(pa.table(table), shard, row_group_size=2)
    with pytest.raises(ValueError, match=r"row 1 of .*train-00001-of-00002-1a7f3\.parquet: inconsistent labels"):
        load_pickapic(root)
    data = load_pickapic(root, aspects=["alignment"], on_error="skip")
    assert data.captions == ["train 0 0", "train 0 1", "train 0 tie", "train 1 0", "train 1 tie"]
    assert data.pairs.rows == [0, 1, 2, 3, 5] and data.pairs.skipped == {"label": 1}
    assert data.aspect_labels[:, 0].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.5])
    assert data.labels.tolist() == [0, 1, 0.5, 0, 0.5]
    validation = load_pickapic(root / "data", split="validation", ties="drop")  # the data/ folder itself
    assert validation.captions == ["validation 0 0", "validation 0 1"] and validation.pairs.skipped == {"tie": 1}


def test_missing_images_and_empty_files(pick_folder, tmp_path):
    (pick_folder / "1_1.png").unlink()
    with pytest.raises(ValueError, match="row 1 .*jpg_1.*missing"):
        load_pickapic(pick_folder)
    data = load_pickapic(pick_folder, on_error="skip")
    assert len(data) == 3 and data.pairs.skipped == {"missing": 1}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable preference pair"):
        load_pickapic(empty)
    with pytest.raises(ValueError, match="no usable labelled image"):
        load_scored_images(empty)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_hpdv2(tmp_path / "empty.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hpdv2(tmp_path / "broken.json")


@pytest.fixture
def hpd(tmp_path):
    """HPDv2 files: train.json (pairs with `human_preference`) and test.json (a ranking of 3 images)."""
    images = tmp_path / "hpd" / "images"
    names = [_png(images / f"{i}.png", (40 * i, 100, 255 - 40 * i)) for i in range(5)]
    train = [
        {"prompt": "a cat", "file_path": [f"images/{names[0]}", f"images/{names[1]}"], "human_preference": [1, 0]},
        {"prompt": "a dog", "file_path": [f"images/{names[2]}", f"images/{names[3]}"], "human_preference": [0, 1]},
    ]
    test = [{"prompt": "a bird", "image_path": [f"images/{n}" for n in names[:3]], "rank": [1, 2, 2]}]
    (tmp_path / "hpd" / "train.json").write_text(json.dumps(train))
    (tmp_path / "hpd" / "test.json").write_text(json.dumps(test))
    return tmp_path / "hpd"


def test_hpdv2_rankings_expand_to_pairs(hpd):
    train = load_hpdv2(hpd / "train.json")
    assert train.labels.tolist() == [1.0, 0.0] and train.captions == ["a cat", "a dog"]
    test = load_hpdv2(hpd / "test.json")
    assert len(test) == 3 and test.labels.tolist() == [1.0, 1.0, 0.5]  # (0,1), (0,2), (1,2) with ranks 1, 2, 2
    assert test.pairs.rows == [0, 0, 0]
    dropped = load_hpdv2(hpd / "test.json", ties="drop")
    assert len(dropped) == 2 and dropped.pairs.skipped == {"tie": 1}
    batch = test.batch([2])
    assert batch["images_0"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "entry, match, reason",
    [
        (
            {"prompt": "x", "file_path": ["images/0.png", "images/nope.png"], "human_preference": [1, 0]},
            "missing",
            "missing",
        ),
        (
            {"prompt": "x", "file_path": ["images/0.png", "images/1.png"], "human_preference": [0, 0]},
            "at least one 1",
            "label",
        ),
        ({"prompt": "x", "image_path": ["images/0.png", "images/1.png"], "rank": [1]}, "one value per image", "label"),
        ({"prompt": "x", "image_path": ["images/0.png", "images/0.png"], "rank": [1, 2]}, "identical", "identical"),
        ({"file_path": ["images/0.png", "images/1.png"], "human_preference": [1, 0]}, "prompt", "caption"),
    ],
)
def test_hpdv2_bad_entries(hpd, entry, match, reason):
    good = {"prompt": "ok", "file_path": ["images/2.png", "images/3.png"], "human_preference": [1, 0]}
    path = hpd / "bad.json"
    path.write_text(json.dumps([good, entry]))
    with pytest.raises(ValueError, match=f"entry 1 .*{match}"):
        load_hpdv2(path)
    data = load_hpdv2(path, on_error="skip")
    assert len(data) == 1 and data.pairs.skipped == {reason: 1}


def test_hpdv2_paths_may_not_leave_the_image_root(hpd):
    entry = {"prompt": "x", "file_path": ["../outside.png", "images/0.png"], "human_preference": [1, 0]}
    (hpd / "escape.json").write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="escapes the dataset root"):
        load_hpdv2(hpd / "escape.json", on_error="skip")


@pytest.fixture
def scored(tmp_path):
    folder = tmp_path / "scored"
    rows = []
    for i in range(3):
        image = _png(folder / f"{i}.png", (80 * i, 50, 50))
        heat = np.zeros((32, 32), np.uint8)
        heat[i:, :] = 255
        Image.fromarray(heat, mode="L").save(folder / f"{i}_map.png")
        rows.append({"caption": "a red square", "image": image, "heatmaps": {"artifact": f"{i}_map.png"}})
    rows[0] |= {"score": 0.9, "aspects": {"alignment": 1.0}}
    rows[1] |= {"aspects": {"alignment": 0.2, "aesthetic": 0.4}}
    np.save(folder / "2_map.npy", np.full((32, 32), 0.25, np.float32))
    rows[2]["heatmaps"]["artifact"] = "2_map.npy"
    _write_jsonl(folder / "manifest.jsonl", rows)
    return folder


def test_scored_images_read_scores_aspects_and_heatmaps(scored):
    data = load_scored_images(scored, aspects=["alignment", "aesthetic"], heatmaps=["artifact"])
    assert len(data) == 3 and data.has_overall
    assert data.scores[0] == pytest.approx(0.9) and torch.isnan(data.scores[1:]).all()
    assert data.aspects[1].tolist() == pytest.approx([0.2, 0.4]) and torch.isnan(data.aspects[2]).all()
    batch = data.batch([0, 1, 2])
    maps = batch["heatmaps"]["artifact"]
    assert maps.shape == (3, 32, 32) and maps[0].min() == 1 and maps[1, 0].max() == 0 and maps[2].max() == 0.25
    small = load_scored_images(scored, heatmaps=["artifact"], resolution=16)
    assert small.batch([1])["heatmaps"]["artifact"].shape == (1, 16, 16)


def test_scored_images_bad_rows(scored):
    rows = [json.loads(line) for line in (scored / "manifest.jsonl").read_text().splitlines()]
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(scored / "small.png")
    rows[1]["heatmaps"]["artifact"] = "small.png"
    rows[2] = {"caption": "a red square", "image": "2.png"}  # no label at all
    _write_jsonl(scored / "manifest.jsonl", rows)
    with pytest.raises(ValueError, match=r"row 1 .*heatmap 'artifact' is \(16, 16\)"):
        load_scored_images(scored, heatmaps=["artifact"])
    with pytest.raises(ValueError, match="row 2 .*no label"):
        load_scored_images(scored, aspects=["alignment"])
    data = load_scored_images(scored, heatmaps=["artifact"], on_error="skip")
    assert len(data) == 1 and data.skipped == {"label": 1, "missing": 1}


def test_world_pairs_are_labelled_by_the_verifier():
    clean = world_pairs(60, label_noise=0.0, seed=1)
    assert len(clean) == 60 and clean.kinds == ["rendered"] * 60
    for i in range(len(clean)):
        pair = clean.pairs[i]
        prompt = parse_prompt(pair.caption)
        s0, s1 = (verify(x.numpy(), prompt).fraction for x in (pair.image_0, pair.image_1))
        assert (s0, s1) == clean.pairs.scores[i]
        assert pair.label_0 == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
    again = world_pairs(60, label_noise=0.0, seed=1)
    assert again.captions == clean.captions and torch.equal(again.pairs[5].image_0, clean.pairs[5].image_0)
    no_ties = world_pairs(40, label_noise=0.0, ties="drop", seed=2)
    assert not no_ties.pairs.has_ties


def test_world_pairs_label_noise_flips_decided_labels_at_the_rate():
    noisy = world_pairs(300, label_noise=0.3, ties="drop", seed=3)
    gold = torch.tensor([1.0 if s0 > s1 else 0.0 for s0, s1 in noisy.pairs.scores])
    flipped = float((noisy.labels != gold).float().mean())
    assert 0.22 < flipped < 0.38  # 300 Bernoulli(0.3) draws: mean 0.3, std 0.026


def test_world_pairs_with_a_generator_pair_its_samples():
    pipe = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    data = world_pairs(
        20,
        label_noise=0.0,
        ties="drop",
        pipe=pipe,
        generated_fraction=0.5,
        images_per_prompt=3,
        pairs_per_prompt=2,
        seed=0,
        num_inference_steps=2,
        height=32,
        width=32,
    )
    assert data.kinds.count("generated") == 10 and data.kinds.count("rendered") == 10
    assert not data.pairs.has_ties


def test_world_config_pairs_clean_ones_are_held_out_pairs_of_any_split():
    from visalign.pipelines.reward_training import RewardConfig
    from visalign.world.scenes import split_of

    config = RewardConfig(world_pairs=48, world_eval_pairs=24, label_noise=0.3, output_dir="unused")
    heldout = load_reward_data("world:heldout-pairs", config)
    same = world_config_pairs(config, split="test", clean=True, seed=config.seed + 1)
    assert same.captions == heldout.captions and torch.equal(same.pairs[3].image_1, heldout.pairs[3].image_1)
    fresh = world_config_pairs(config, split="train", clean=True, seed=config.seed + 2)
    assert len(fresh) == 24 and not fresh.pairs.has_ties
    assert {split_of(c) for c in fresh.captions} == {"train"}
    gold = [1.0 if s0 > s1 else 0.0 for s0, s1 in fresh.pairs.scores]
    assert fresh.pairs.labels == gold  # clean: no flips, though the config's training pairs flip 30%
    training = load_reward_data("world:pairs", config)
    assert len(training) == 48 and {split_of(c) for c in training.captions} == {"train"}


def test_near_miss_changes_one_thing():
    rng = np.random.default_rng(0)
    prompt = parse_prompt("a red circle to the left of a blue square")
    for _ in range(20):
        miss = near_miss(prompt, rng)
        changed = sum(a != b for a, b in zip(miss.objects, prompt.objects)) + (miss.relation != prompt.relation)
        assert changed == 1
