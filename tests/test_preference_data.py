"""Preference data: Pick-a-Pic pairs from parquet, JSONL and manifest folders, bad rows, online pairs, expert sets."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from preference_helpers import hub_snapshot, pickapic_parquet, png

from visalign.pipelines.expert_sets import ExpertSet, load_experts, save_experts, top_k_experts
from visalign.pipelines.pickapic import load_pairs, save_pairs
from visalign.pipelines.preference_data import (
    IndexSampler,
    PreferencePairs,
    build_pairs,
    collate_pairs,
    rank_pairs,
    sample_groups,
)
from visalign.rewards import RewardModel
from visalign.testing import tiny_pipeline


def jpeg(color, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG", quality=100)
    return buffer.getvalue()


RED, BLUE, GREEN = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))


def manifest_folder(root, rows, images=None):
    """A folder with `manifest.jsonl`; `images` maps file names to bytes written under it."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in (images or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


class Redness(RewardModel):
    name = "redness"

    def _score(self, pixels, prompts):
        return pixels[:, 0].mean(dim=(1, 2)) - pixels[:, 2].mean(dim=(1, 2))


# -- reading ----------------------------------------------------------------------------------------------------------


def test_parquet_pairs_follow_pick_a_pic_labels_and_drop_ties(tmp_path):
    path = pickapic_parquet(
        tmp_path / "pairs.parquet",
        [("red wins", RED, BLUE, 1), ("blue wins", RED, BLUE, 0), ("a tie", RED, BLUE, 0.5)],
    )
    pairs = load_pairs(path)
    assert len(pairs) == 2 and pairs.skipped == {"tie": 1} and not pairs.has_ties
    winner, loser = pairs[0].winner_loser()
    assert winner[0].mean() == 1 and loser[2].mean() == 1
    winner, loser = pairs[1].winner_loser()  # label_0 = 0: image 1 is preferred
    assert winner[2].mean() == 1 and loser[0].mean() == 1
    assert pairs[1].caption == "blue wins" and pairs[1].row == 1
    kept = load_pairs(path, ties="keep")
    assert len(kept) == 3 and kept.has_ties and kept[2].label_0 == 0.5
    with pytest.raises(ValueError, match="tie"):
        kept[2].winner_loser()


def test_a_folder_of_parquet_shards_reads_in_name_order_and_names_the_shard_of_a_bad_row(tmp_path):
    (tmp_path / "shards").mkdir()
    pickapic_parquet(tmp_path / "shards" / "train-00000.parquet", [("first", RED, BLUE, 1)])
    pickapic_parquet(tmp_path / "shards" / "train-00001.parquet", [("second", RED, GREEN, 0), ("bad", RED, b"x", 1)])
    with pytest.raises(ValueError, match=r"row 1 of .*train-00001.parquet: jpg_1"):
        load_pairs(tmp_path / "shards")
    pairs = load_pairs(tmp_path / "shards", on_error="skip")
    assert pairs.captions == ["first", "second"] and pairs.rows == [0, 1] and pairs.skipped == {"corrupt": 1}


def test_jsonl_paths_manifest_folders_and_hf_image_structs(tmp_path):
    rows = [{"caption": "c", "jpg_0": "img/a.png", "jpg_1": {"bytes": None, "path": "img/b.png"}, "label_0": 1}]
    folder = manifest_folder(tmp_path / "set", rows, {"img/a.png": RED, "img/b.png": BLUE})
    for source in (folder, folder / "manifest.jsonl"):
        pairs = load_pairs(source)
        assert len(pairs) == 1 and pairs[0].image_0.shape == (3, 8, 8)
    struct = pickapic_parquet(tmp_path / "s.parquet", [("c", RED, BLUE, 1)])
    table = pq.read_table(struct).to_pydict()
    table["jpg_0"] = [{"bytes": RED, "path": None}]
    pq.write_table(pa.table(table), tmp_path / "hf.parquet")
    assert load_pairs(tmp_path / "hf.parquet")[0].image_0[0].mean() == 1


def test_images_are_resized_and_center_cropped_when_asked(tmp_path):
    wide = io.BytesIO()
    array = np.zeros((8, 16, 3), np.uint8)
    array[:, 4:12] = 255  # a white center square, black bands left and right
    Image.fromarray(array).save(wide, format="PNG")
    pairs = load_pairs(pickapic_parquet(tmp_path / "p.parquet", [("c", wide.getvalue(), BLUE, 1)]), resolution=4)
    image = pairs[0].image_0
    assert image.shape == (3, 4, 4)
    assert torch.equal(image[:, :, 1:3], torch.ones(3, 4, 2)) and image.mean() > 0.9  # the black bands are cut


# -- splits, hub ids and lazy reading ---------------------------------------------------------------------------------


def test_a_split_is_read_from_a_snapshot_root_or_its_data_folder_and_splits_never_merge(tmp_path):
    root = hub_snapshot(tmp_path / "pickapic_v2")
    train = load_pairs(root)  # the default split is train
    assert train.captions == ["train 0 0", "train 0 1", "train 1 0", "train 1 1"]
    assert train.skipped == {"tie": 2} and train.rows == [0, 1, 3, 4]  # rows count across the split's shards
    assert load_pairs(root / "data").captions == train.captions
    for split in ("validation", "validation_unique", "test", "test_unique"):
        assert load_pairs(root, split=split).captions == [f"{split} 0 0", f"{split} 0 1"]
    with pytest.raises(ValueError, match=r"no shard of split 'dev'.*'test_unique', 'train', 'validation'"):
        load_pairs(root, split="dev")
    winner, loser = train[1].winner_loser()  # label_0 = 1 for row 1 of each shard: image 0 wins
    assert torch.equal(winner, load_pairs(root)[1].image_0) and not torch.equal(winner, loser)


def test_a_bad_row_of_a_split_names_its_shard_and_its_row_there(tmp_path):
    root = hub_snapshot(tmp_path / "snap")
    shard = root / "data" / "train-00001-of-00002-1a7f3.parquet"
    pickapic_parquet(shard, [("ok", RED, BLUE, 1), ("ok", RED, GREEN, 1), ("bad", RED, b"junk", 0)], 2)
    with pytest.raises(ValueError, match=r"row 2 of .*train-00001-of-00002-1a7f3\.parquet: jpg_1.*cannot be decoded"):
        load_pairs(root)
    lazy = load_pairs(root, check_images=False)  # images are not read now: the bad one fails when its row is read
    assert len(lazy) == 5 and lazy[3].caption == "ok" and lazy.captions[4] == "bad"
    with pytest.raises(ValueError, match=r"row 2 of .*train-00001-of-00002-1a7f3\.parquet: jpg_1.*cannot be decoded"):
        lazy[4]


def test_pairs_read_images_lazily_a_row_group_at_a_time(tmp_path, monkeypatch):
    from visalign.pipelines import row_stores

    root = hub_snapshot(tmp_path / "snap", rows_per_shard=6)
    reads = []
    original = row_stores.ParquetStore._read

    def spy(self, chunk, columns):
        reads.append((chunk, columns))
        return original(self, chunk, columns)

    monkeypatch.setattr(row_stores.ParquetStore, "_read", spy)
    pairs = load_pairs(root, check_images=False)
    assert len(pairs) == 10 and all("jpg_0" not in c for _, c in reads)  # indexing reads no image column
    reads.clear()
    first = [pairs[i] for i in (0, 1, 0, 1)]  # rows 0 and 1 share a row group: one read of both images, then cached
    assert reads == [(0, ["jpg_0", "jpg_1"])]
    for i in range(len(pairs)):
        pairs[i]
    assert [chunk for chunk, _ in reads] == [0, 1, 2, 3, 4, 5]  # 2 shards x 3 row groups, each read once, in order
    reads.clear()
    eager = load_pairs(root)
    assert {len(c) for _, c in reads} == {2, 3}  # checking reads one row group's meta, then its images
    for pair, i in zip(first, (0, 1, 0, 1)):
        assert torch.equal(pair.image_0, eager[i].image_0) and torch.equal(pair.image_1, eager[i].image_1)
    assert pairs.sources.chunks.nbytes + pairs.sources.rows.nbytes == 12 * len(pairs)  # the index, not the images


def test_pairs_load_in_dataloader_workers(tmp_path):
    root = hub_snapshot(tmp_path / "snap", rows_per_shard=4)
    pairs = load_pairs(root, resolution=4, check_images=False)
    loader = torch.utils.data.DataLoader(pairs, batch_size=2, num_workers=2, collate_fn=collate_pairs)
    batches = list(loader)
    assert [c for b in batches for c in b["captions"]] == pairs.captions
    assert batches[0]["images_0"].shape == (2, 3, 4, 4) and batches[0]["labels"].tolist() == [0.0, 1.0]
    assert torch.equal(batches[-1]["images_1"][-1], pairs[len(pairs) - 1].image_1)


def test_a_hub_dataset_id_loads_its_split_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    hub_snapshot(tmp_path / "hub" / "someone" / "pickapic_mini")
    real = datasets.load_dataset
    calls = []

    def offline_hub(name, split=None, **kwargs):  # the hub's files, served from a local snapshot
        calls.append((name, split))
        return real(str(tmp_path / "hub" / name), split=split, cache_dir=str(tmp_path / "cache"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    monkeypatch.chdir(tmp_path)  # "someone/pickapic_mini" is no local path here
    pairs = load_pairs("someone/pickapic_mini", split="validation_unique")
    assert calls == [("someone/pickapic_mini", "validation_unique")]
    assert pairs.captions == ["validation_unique 0 0", "validation_unique 0 1"] and pairs.skipped == {"tie": 1}
    local = load_pairs(tmp_path / "hub" / "someone" / "pickapic_mini", split="validation_unique")
    assert torch.equal(pairs[1].image_0, local[1].image_0) and "[validation_unique]" in pairs.source
    with pytest.raises(FileNotFoundError, match="neither a local file or folder nor a hub dataset"):
        load_pairs("someone/absent")  # a mistyped local path is not sent to the hub silently


# -- bad rows ---------------------------------------------------------------------------------------------------------


def test_corrupt_image_raises_naming_the_row_or_is_skipped_and_counted(tmp_path):
    path = pickapic_parquet(tmp_path / "p.parquet", [("ok", RED, BLUE, 1), ("bad", RED, b"not an image", 1)])
    with pytest.raises(ValueError, match=r"row 1 of .*p\.parquet: jpg_1.*cannot be decoded"):
        load_pairs(path)
    pairs = load_pairs(path, on_error="skip")
    assert len(pairs) == 1 and pairs.skipped == {"corrupt": 1}
    truncated = RED[: len(RED) // 2]
    with pytest.raises(ValueError, match="row 0"):
        load_pairs(pickapic_parquet(tmp_path / "t.parquet", [("trunc", truncated, BLUE, 1)]))


def test_missing_image_file_raises_naming_the_row_or_is_skipped(tmp_path):
    rows = [
        {"caption": "c", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},
        {"caption": "d", "jpg_0": "a.png", "jpg_1": "gone.png", "label_0": 0},
    ]
    folder = manifest_folder(tmp_path / "set", rows, {"a.png": RED, "b.png": BLUE})
    with pytest.raises(ValueError, match=r"row 1 .*jpg_1: image file 'gone.png' is missing"):
        load_pairs(folder)
    assert load_pairs(folder, on_error="skip").skipped == {"missing": 1}


def test_identical_images_are_dropped_and_counted_or_rejected_by_bytes_pixels_and_are_different(tmp_path):
    cases = {
        "bytes": [("c", RED, RED, 1)],
        "pixels": [("c", png((255, 0, 0)), png((255, 0, 0), size=8), 1)],
        "are_different": [("c", RED, BLUE, 1, False)],
    }
    lossless_reencoded = io.BytesIO()
    Image.open(io.BytesIO(RED)).save(lossless_reencoded, format="PNG", compress_level=0)
    cases["pixels"] = [("c", RED, lossless_reencoded.getvalue(), 1)]
    assert lossless_reencoded.getvalue() != RED
    for name, rows in cases.items():
        path = pickapic_parquet(tmp_path / f"{name}.parquet", rows + [("fine", RED, BLUE, 1), ("t", RED, BLUE, 0.5)])
        pairs = load_pairs(path)  # dropped and counted like ties, by default
        assert pairs.captions == ["fine"] and pairs.skipped == {"identical": 1, "tie": 1}
        with pytest.raises(ValueError, match=r"row 0 .*identical"):
            load_pairs(path, identical="error")
        assert load_pairs(path, identical="error", on_error="skip").skipped == {"identical": 1, "tie": 1}
        if name == "are_different":  # the flag is read without reading the images
            assert load_pairs(path, check_images=False).skipped == {"identical": 1, "tie": 1}
    with pytest.raises(ValueError, match="identical"):
        PreferencePairs.from_tensors(["c"], torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_empty_datasets_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="no usable preference pair"):
        load_pairs(pickapic_parquet(tmp_path / "ties.parquet", [("c", RED, BLUE, 0.5)]))
    with pytest.raises(ValueError, match="no usable preference pair"):
        load_pairs(manifest_folder(tmp_path / "empty", []))
    with pytest.raises(ValueError, match="no usable"):
        load_pairs(pickapic_parquet(tmp_path / "bad.parquet", [("c", RED, b"junk", 1)]), on_error="skip")


@pytest.mark.parametrize("bad_path", ["../outside.png", "img/../../outside.png", "/etc/passwd", "link.png"])
def test_paths_cannot_escape_the_dataset_root_even_when_skipping(tmp_path, bad_path):
    (tmp_path / "outside.png").write_bytes(BLUE)
    folder = manifest_folder(
        tmp_path / "set",
        [{"caption": "c", "jpg_0": "a.png", "jpg_1": bad_path, "label_0": 1}],
        {"a.png": RED, "img/x.png": RED},
    )
    os.symlink(tmp_path / "outside.png", folder / "link.png")
    with pytest.raises(ValueError, match="escapes the dataset root|absolute path"):
        load_pairs(folder, on_error="skip")
    (folder / "experts.jsonl").write_text(json.dumps({"caption": "c", "image": bad_path}) + "\n")
    with pytest.raises(ValueError, match="escapes the dataset root|absolute path"):
        load_experts(folder / "experts.jsonl", on_error="skip")


def test_bad_labels_columns_and_files_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"row 0 .*label_0.*0, 0.5 or 1"):
        load_pairs(pickapic_parquet(tmp_path / "l.parquet", [("c", RED, BLUE, 0.3)]))
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [RED]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['jpg_1', 'label_0'\]"):
        load_pairs(tmp_path / "cols.parquet")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without manifest.jsonl or parquet shards"):
        load_pairs(tmp_path / "empty")
    with pytest.raises(ValueError, match="`ties` must be one of"):
        load_pairs(tmp_path / "l.parquet", ties="maybe")


# -- online pairs and writing -----------------------------------------------------------------------------------------


def test_rank_pairs_best_worst_and_all_with_margin():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9])
    assert rank_pairs(scores) == [(1, 0)]
    assert rank_pairs(scores, margin=0.7) == [] and rank_pairs(scores, margin=0.69) == [(1, 0)]
    assert sorted(rank_pairs(scores, mode="all", margin=0.45)) == [(1, 0), (3, 0)]
    assert len(rank_pairs(scores, mode="all")) == 5  # 6 unordered pairs minus the tie (1, 3)
    assert rank_pairs(torch.ones(3)) == []
    with pytest.raises(ValueError, match="NaN"):
        rank_pairs(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="at least 2"):
        rank_pairs(torch.tensor([1.0]))


def test_online_pairs_rank_a_model_sample_group_and_round_trip_to_disk(tmp_path):
    pipe = tiny_pipeline("sd")
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    groups = sample_groups(pipe, ["a red square", "a blue circle"], num_images_per_prompt=3, batch_size=4, **kw)
    assert groups.shape == (2, 3, 3, 32, 32)
    again = sample_groups(pipe, ["a red square", "a blue circle"], num_images_per_prompt=3, batch_size=2, **kw)
    assert torch.allclose(groups, again, atol=1e-5)  # keyed by (seed, prompt, image), not by batch
    reward = Redness()
    pairs = build_pairs(pipe, ["a red square", "a blue circle"], reward, num_images_per_prompt=3, batch_size=4, **kw)
    assert len(pairs) == 2 and all(pairs[i].label_0 == 1 for i in range(2))
    for i, (prompt, group) in enumerate(zip(["a red square", "a blue circle"], groups)):
        scores = reward.score(group, [prompt] * 3).score
        assert pairs.scores[i] == pytest.approx((float(scores.max()), float(scores.min())))
        assert torch.equal(pairs[i].image_0, group[int(scores.argmax())])
    for target in (tmp_path / "folder", tmp_path / "pairs.parquet"):
        back = load_pairs(save_pairs(pairs, target))
        assert len(back) == 2 and back.captions == pairs.captions
        assert (back[0].image_0 - pairs[0].image_0).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
    pairs_all = build_pairs(pipe, ["a red square"], reward, num_images_per_prompt=3, mode="all", **kw)
    assert len(pairs_all) == 3
    with pytest.raises(ValueError, match="no pair"):
        build_pairs(pipe, ["a red square"], reward, num_images_per_prompt=2, margin=10.0, **kw)


class VideoRedness(RewardModel):
    """Mean red minus mean blue over every frame of a video."""

    name = "video-redness"
    modalities = ("video",)

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return pixels[:, :, 0].mean(dim=(1, 2, 3)) - pixels[:, :, 2].mean(dim=(1, 2, 3))


def test_online_pairs_from_a_video_pipeline_are_video_pairs():
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=16, width=16, num_frames=5, max_sequence_length=8)
    pipe = tiny_pipeline("wan")
    groups = sample_groups(pipe, ["a red square"], num_images_per_prompt=2, **kw)
    assert groups.shape == (1, 2, 5, 3, 16, 16)  # the pipeline's `frames`
    pairs = build_pairs(pipe, ["a red square"], VideoRedness(), num_images_per_prompt=2, **kw)
    scores = VideoRedness().score(groups[0], ["a red square"] * 2).score
    assert torch.equal(pairs[0].image_0, groups[0, int(scores.argmax())])
    assert pairs.at_resolution(8)[0].image_1.shape == (5, 3, 8, 8)  # every frame resized and center-cropped


def test_expert_sets_top_k_by_reward_round_trip_and_bad_rows(tmp_path):
    images = torch.zeros(5, 3, 4, 4)
    images[:, 0] = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])[:, None, None]
    experts = top_k_experts(images, [f"p{i}" for i in range(5)], Redness(), 3, batch_size=2)
    assert experts.captions == ["p1", "p3", "p2"] and experts.scores == pytest.approx([0.9, 0.7, 0.5])
    folder = save_experts(experts, tmp_path / "experts")
    back = load_experts(folder)
    assert back.captions == experts.captions and back[0][1].shape == (3, 4, 4)
    assert load_experts(folder, resolution=2)[0][1].shape == (3, 2, 2)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 5\]"):
        top_k_experts(images, [f"p{i}" for i in range(5)], Redness(), 6)
    # a diverse set: at most one image per caption, and only rows at or above the score floor
    same = ["a", "a", "b", "a", "b"]  # scores 0.1 0.9 0.5 0.7 0.3
    diverse = top_k_experts(images, same, Redness(), 4, per_caption=1)
    assert diverse.captions == ["a", "b"] and diverse.scores == pytest.approx([0.9, 0.5])
    floored = top_k_experts(images, same, Redness(), 5, per_caption=2, min_score=0.6)
    assert floored.scores == pytest.approx([0.9, 0.7])
    with pytest.raises(ValueError, match="no image of the pool scores >= `min_score`"):
        top_k_experts(images, same, Redness(), 2, min_score=0.95)
    with pytest.raises(ValueError, match="`per_caption` must be >= 1"):
        top_k_experts(images, same, Redness(), 2, per_caption=0)
    with pytest.raises(ValueError, match="`min_score` must be a finite number"):
        top_k_experts(images, same, Redness(), 2, min_score=float("nan"))
    rows = [{"caption": "x", "image": "images/000000.png"}, {"caption": "y", "image": "nope.png"}]
    manifest_folder(tmp_path / "experts", rows)
    with pytest.raises(ValueError, match=r"row 1 .*'nope.png' is missing"):
        load_experts(tmp_path / "experts")
    assert len(load_experts(tmp_path / "experts", on_error="skip")) == 1
    with pytest.raises(ValueError, match="holds no expert image"):
        ExpertSet([], [])


def test_index_sampler_is_deterministic_resumable_and_covers_each_epoch():
    sampler = IndexSampler(5, seed=3)
    first = sampler.draw(3) + sampler.draw(4)  # crosses into the second epoch
    assert sorted(first[:5]) == list(range(5))
    state = sampler.state_dict()
    rest = sampler.draw(6)
    resumed = IndexSampler(5, seed=0)
    resumed.load_state_dict(state)
    assert resumed.draw(6) == rest
    assert IndexSampler(5, seed=3).draw(7) == first


def test_saved_video_pairs_read_back_frame_for_frame(tmp_path):
    """Online video pairs (Wan) are saved as animated PNGs and read back with every frame, static ones included."""
    from visalign.pipelines.pickapic import load_pairs, save_pairs

    moving = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    static = moving[:1].repeat(5, 1, 1, 1)
    pairs = PreferencePairs(["a red square"], [(moving, static)], [1.0], [0])
    loaded = load_pairs(save_pairs(pairs, tmp_path / "pairs"))[0]
    quantized = (moving * 255).round() / 255
    assert loaded.image_0.shape == loaded.image_1.shape == (5, 3, 8, 8)
    torch.testing.assert_close(loaded.image_0, quantized, rtol=0, atol=0)
    torch.testing.assert_close(loaded.image_1, quantized[:1].repeat(5, 1, 1, 1), rtol=0, atol=0)
