"""Reward-model training data: preference pairs, ranked images expanded to pairs, labelled images, world pairs.

Pairs (`RewardPairs`: a `PreferencePairs` plus optional per-aspect labels):
- Pick-a-Pic (Kirstain et al. 2023): `load_pickapic` reads the schema through `pickapic.load_pairs` (parquet, one
  split of a folder of shards or a hub dataset, jsonl, or a folder with `manifest.jsonl`; `caption`, `jpg_0`, `jpg_1`,
  `label_0`), ties kept by default. When a row has `label_1`, `label_0 + label_1` must be 1: a one-sided tie
  (`label_0 = 0.5, label_1 = 1`) is a bad row.
  Per-aspect preferences are an optional `aspect_labels` object per row, `{"alignment": 1, "aesthetic": 0.5}`
  (the probability that image 0 is preferred on that aspect; an absent aspect is unlabelled).
- HPDv2 (Wu et al. 2023, `xswu/HPDv2`): `load_hpdv2` reads the json list of the release: `train.json` entries
  `{"prompt", "file_path": [a, b], "human_preference": [1, 0]}` (1 marks the preferred image) and `test.json`
  entries `{"prompt", "image_path": [...], "rank": [...]}` (lower rank is better). Every entry becomes all its
  image pairs, `label_0` from the ranks (equal ranks: a tie). Paths are relative to `image_root` (default: the json's
  folder) and may not leave it.

Labelled images (`ScoredImages`, `load_scored_images`): a jsonl file or a folder with `manifest.jsonl`, one image a
row, every label optional:

    {"caption": "a red circle", "image": "images/0.png", "score": 0.8,
     "aspects": {"alignment": 1.0, "aesthetic": 0.4}, "heatmaps": {"artifact": "maps/0_artifact.png"}}

`score` and the aspects are numbers (their scale is the caller's; RichHF and ImageDoctor use [0, 1]); a heatmap is an
8-bit grayscale PNG (0 -> 0, 255 -> 1) or a `.npy` float array in [0, 1], of the image's height and width, higher =
more defective (the `RewardOutput.heatmaps` convention).

Bad rows (missing or corrupt images and maps, invalid labels, one-sided ties, identical pairs) raise a `ValueError`
naming the row, or with `on_error="skip"` are skipped and counted in `skipped`; an empty file or one left with no row
is an error.

World pairs (`world:pairs`, `world:heldout-pairs`): synthetic preferences on the shapes world, built by
`visalign.pipelines.world_pairs.world_pairs`; `load_reward_data` dispatches every source by name.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from visalign.pipelines.pickapic import TIES, load_pairs, read_columns
from visalign.pipelines.preference_data import (
    ON_ERROR,
    BadRow,
    PreferencePairs,
    _open,
    _raise_or_count,
    _read_records,
    _resize_center_crop,
    _source,
    _to_tensor,
)

FORMATS = ("auto", "pickapic", "hpdv2", "scores")
WORLD_TRAIN, WORLD_HELDOUT = "world:pairs", "world:heldout-pairs"


@dataclass
class RewardPairs:
    """Preference pairs for reward training.

    Args:
        pairs (`PreferencePairs`): images, captions and `label_0` (ties are 0.5).
        aspect_names (`tuple[str, ...]`): the aspects with pairwise labels.
        aspect_labels (`Tensor` `[N, K]`, *optional*): per-aspect `label_0`, NaN where unlabelled.
        kinds (`list[str]`, *optional*): where each pair comes from (world pairs: `"rendered"`, `"generated"`).
    """

    pairs: PreferencePairs
    aspect_names: tuple[str, ...] = ()
    aspect_labels: Tensor | None = None
    kinds: list[str] | None = None
    has_overall = True
    heatmap_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.aspect_names and (
            self.aspect_labels is None or self.aspect_labels.shape != (len(self), len(self.aspect_names))
        ):
            raise ValueError(f"`aspect_labels` must be [{len(self)}, {len(self.aspect_names)}] for the aspects")
        if self.kinds is not None and len(self.kinds) != len(self):
            raise ValueError(f"`kinds` has {len(self.kinds)} entries for {len(self)} pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def captions(self) -> list[str]:
        return self.pairs.captions

    @property
    def labels(self) -> Tensor:
        return torch.tensor(self.pairs.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """`images_0`, `images_1` (`[n, 3, H, W]`), `captions`, `label_0` `[n]` and `aspect_labels` `[n, K]`."""
        items = [self.pairs[i] for i in indices]
        batch = {
            "images_0": _stack([p.image_0 for p in items], "images"),
            "images_1": _stack([p.image_1 for p in items], "images"),
            "captions": [p.caption for p in items],
            "label_0": torch.tensor([p.label_0 for p in items]),
        }
        if self.aspect_labels is not None:
            batch["aspect_labels"] = self.aspect_labels[list(indices)]
        return batch


class ScoredImages(Dataset):
    """Images with optional labels: `score` `[N]`, `aspects` `[N, K]` (NaN = unlabelled) and heatmap files.

    Args:
        captions (`list[str]`), sources (`list[bytes | Path]`): one entry per image.
        scores (`Tensor` `[N]`): the overall labels (NaN where absent).
        aspect_names, aspects: the aspect labels.
        heatmap_names, heatmap_sources (`list[dict[str, Path]]`): every image's map files.
        resolution (`int`, *optional*): resize and center-crop images and maps to this square size.
        skipped (`dict[str, int]`): bad rows left out, by reason.
        source (`str`): where the data came from, for messages.
    """

    def __init__(
        self,
        captions: list[str],
        sources: list[bytes | Path],
        scores: Tensor,
        aspect_names: tuple[str, ...],
        aspects: Tensor,
        heatmap_names: tuple[str, ...],
        heatmap_sources: list[dict[str, Path]],
        *,
        resolution: int | None = None,
        skipped: dict[str, int] | None = None,
        source: str = "<memory>",
    ) -> None:
        self.skipped = dict(skipped or {})
        if not captions:
            raise ValueError(f"{source} has no usable labelled image (skipped: {self.skipped or 'none'})")
        n = len(captions)
        if not (len(sources) == len(heatmap_sources) == n and scores.shape == (n,)):
            raise ValueError("`captions`, `sources`, `scores` and `heatmap_sources` must have one entry per image")
        if aspects.shape != (n, len(aspect_names)):
            raise ValueError(f"`aspects` must be [{n}, {len(aspect_names)}], got {tuple(aspects.shape)}")
        self.captions, self.sources, self.scores = captions, sources, scores
        self.aspect_names, self.aspects = tuple(aspect_names), aspects
        self.heatmap_names, self.heatmap_sources = tuple(heatmap_names), heatmap_sources
        self.resolution, self.source = resolution, source

    @property
    def has_overall(self) -> bool:
        return bool(torch.isfinite(self.scores).any())

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, Tensor, dict[str, Tensor]]:
        """`(caption, image [3, H, W], {name: map [H, W]})`."""
        where = f"row {index} of {self.source}"
        source = self.sources[index]
        image = _to_tensor(_open(source, f"{where}: image"))
        maps = {n: _read_map(p, f"{where}: heatmap {n!r}") for n, p in self.heatmap_sources[index].items()}
        if self.resolution is not None:
            image = _resize_center_crop(image, self.resolution)
            maps = {n: _resize_center_crop(m[None], self.resolution)[0] for n, m in maps.items()}
        return self.captions[index], image, maps

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """`images` `[n, 3, H, W]`, `captions`, `score` `[n]`, `aspects` `[n, K]`, `heatmaps` `{name: [n, H, W]}`."""
        items = [self[i] for i in indices]
        index = list(indices)
        return {
            "images": _stack([image for _, image, _ in items], "images"),
            "captions": [caption for caption, _, _ in items],
            "score": self.scores[index],
            "aspects": self.aspects[index],
            "heatmaps": {n: _stack([maps[n] for _, _, maps in items], "heatmaps") for n in self.heatmap_names},
        }


def _stack(tensors: list[Tensor], what: str) -> Tensor:
    if len({tuple(t.shape) for t in tensors}) > 1:
        raise ValueError(f"{what} of different sizes in one batch: set `resolution` to resize them to one square")
    return torch.stack(tensors)


def _read_map(path: Path, where: str) -> Tensor:
    """A heatmap file as `[H, W]` float32 in [0, 1]: an 8-bit grayscale PNG or a `.npy` array."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                if image.mode != "L":
                    raise ValueError(f"expected an 8-bit grayscale (mode L) image, got mode {image.mode}")
                array = np.asarray(image, dtype=np.float32) / 255
    except (OSError, ValueError) as e:
        raise BadRow(f"{where}: the map cannot be read ({type(e).__name__}: {e})", "corrupt") from None
    if array.ndim != 2 or not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise BadRow(f"{where}: a map must be a finite [H, W] array in [0, 1], got shape {array.shape}", "label")
    return torch.from_numpy(array)


def _label(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise BadRow(f"{where} must be a number in [0, 1], got {value!r}", "label")
    return float(value)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow(f"{where} must be a finite number, got {value!r}", "label")
    return float(value)


def load_pickapic(
    path: str | Path,
    *,
    split: str = "train",
    aspects: Sequence[str] = (),
    ties: str = "keep",
    on_error: str = "raise",
    resolution: int | None = None,
) -> RewardPairs:
    """Pick-a-Pic-schema pairs (see the module docstring) of `split` (of parquet shards or a hub dataset) with the
    per-aspect labels of `aspects`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    extra = read_columns(path, ["label_0", "label_1", "aspect_labels"], split=split)
    counts: Counter = Counter()
    bad: set[int] = set()
    aspect_rows: dict[int, list[float]] = {}
    for i, (where, row) in enumerate(extra):
        try:
            if row.get("label_1") is not None and row.get("label_0") is not None:
                l0, l1 = row["label_0"], _label(row["label_1"], f"{where}: `label_1`")
                if isinstance(l0, (int, float)) and l0 + l1 != 1:
                    kind = "a one-sided tie" if 0.5 in (l0, l1) else "inconsistent labels"
                    raise BadRow(f"{where}: {kind}: label_0={l0} and label_1={l1} must sum to 1", "label")
            labels = row.get("aspect_labels") or {}
            if not isinstance(labels, dict):
                raise BadRow(f"{where}: `aspect_labels` must be an object, got {labels!r}", "label")
            aspect_rows[i] = [
                _label(labels[a], f"{where}: aspect_labels[{a!r}]") if labels.get(a) is not None else math.nan
                for a in aspects
            ]
        except BadRow as e:
            _raise_or_count(e, on_error, counts)
            bad.add(i)
            if ties == "drop" and row.get("label_0") == 0.5:
                counts["tie"] -= 1  # load_pairs counts this row as a dropped tie; it is counted as bad instead
    pairs = load_pairs(path, split=split, ties=ties, on_error=on_error, resolution=resolution)
    keep = [k for k, row in enumerate(pairs.rows) if row not in bad]
    skipped = Counter(pairs.skipped) + counts
    pairs = PreferencePairs(
        [pairs.captions[k] for k in keep],
        [pairs.sources[k] for k in keep],
        [pairs.labels[k] for k in keep],
        [pairs.rows[k] for k in keep],
        resolution=resolution,
        skipped={k: v for k, v in skipped.items() if v},
        source=str(path),
    )
    if not aspects:
        return RewardPairs(pairs)
    labels = torch.tensor([aspect_rows.get(r, [math.nan] * len(aspects)) for r in pairs.rows])
    return RewardPairs(pairs, tuple(aspects), labels)


def load_hpdv2(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    ties: str = "keep",
    on_error: str = "raise",
    resolution: int | None = None,
) -> RewardPairs:
    """HPDv2's json (see the module docstring), every entry expanded to all its image pairs."""
    if ties not in TIES:
        raise ValueError(f"`ties` must be one of {TIES}, got {ties!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no HPDv2 file at {path}")
    try:
        entries = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} must hold a non-empty JSON list of HPDv2 entries")
    root = Path(image_root if image_root is not None else path.parent).resolve()
    counts: Counter = Counter()
    captions, sources, labels, rows = [], [], [], []
    for i, entry in enumerate(entries):
        where = f"entry {i} of {path}"
        try:
            ranks, files = _hpd_ranks(entry, where)
            images = [_source(f, root, f"{where}: image {j}") for j, f in enumerate(files)]
            data = [s.read_bytes() if isinstance(s, Path) else s for s in images]
            for j, source in enumerate(images):
                _open(source, f"{where}: image {j}")
            found = []
            for a in range(len(images)):
                for b in range(a + 1, len(images)):
                    label = 1.0 if ranks[a] < ranks[b] else 0.0 if ranks[a] > ranks[b] else 0.5
                    if data[a] == data[b]:
                        raise BadRow(f"{where}: images {a} and {b} are identical (equal bytes)", "identical")
                    found.append((label, images[a], images[b]))
        except BadRow as e:
            _raise_or_count(e, on_error, counts)
            continue
        for label, a, b in found:
            if label == 0.5 and ties == "drop":
                counts["tie"] += 1
                continue
            captions.append(entry["prompt"])
            sources.append((a, b))
            labels.append(label)
            rows.append(i)
    pairs = PreferencePairs(
        captions, sources, labels, rows, resolution=resolution, skipped=dict(counts), source=str(path)
    )
    return RewardPairs(pairs)


def _hpd_ranks(entry: Any, where: str) -> tuple[list[float], list[str]]:
    """`(ranks, image paths)` of an HPDv2 entry; lower rank = better."""
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise BadRow(f"{where}: an entry must be an object with a string `prompt`", "caption")
    files = entry.get("image_path", entry.get("file_path"))
    if not isinstance(files, list) or len(files) < 2:
        raise BadRow(f"{where}: `image_path` (or `file_path`) must list at least 2 images, got {files!r}", "missing")
    if "rank" in entry:
        ranks, key = entry["rank"], "rank"
    elif "human_preference" in entry:
        prefs, key = entry["human_preference"], "human_preference"
        if not isinstance(prefs, list) or any(p not in (0, 1) or isinstance(p, bool) for p in prefs) or 1 not in prefs:
            raise BadRow(f"{where}: `human_preference` must be 0/1 flags with at least one 1, got {prefs!r}", "label")
        ranks = [1 - p for p in prefs]
    else:
        raise BadRow(f"{where}: neither `rank` nor `human_preference` is given", "label")
    if not isinstance(ranks, list) or len(ranks) != len(files):
        raise BadRow(f"{where}: `{key}` must have one value per image ({len(files)}), got {ranks!r}", "label")
    return [_number(r, f"{where}: `{key}`") for r in ranks], files


def load_scored_images(
    path: str | Path,
    *,
    aspects: Sequence[str] = (),
    heatmaps: Sequence[str] = (),
    on_error: str = "raise",
    resolution: int | None = None,
) -> ScoredImages:
    """Labelled images (see the module docstring); every row must have each map of `heatmaps`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    root, records = _read_records(path, ["caption", "image"])
    counts: Counter = Counter()
    captions, sources, scores, aspect_rows, map_rows = [], [], [], [], []
    for i, record in enumerate(records):
        where = f"row {i} of {path}"
        try:
            if not isinstance(record.get("caption"), str):
                raise BadRow(f"{where}: `caption` must be a string, got {record.get('caption')!r}", "caption")
            source = _source(record.get("image"), root, f"{where}: image")
            width, height = _open(source, f"{where}: image").size
            score = _number(record["score"], f"{where}: `score`") if record.get("score") is not None else math.nan
            labels = record.get("aspects") or {}
            maps = record.get("heatmaps") or {}
            if not isinstance(labels, dict) or not isinstance(maps, dict):
                raise BadRow(f"{where}: `aspects` and `heatmaps` must be objects", "label")
            values = [
                _number(labels[a], f"{where}: aspects[{a!r}]") if labels.get(a) is not None else math.nan
                for a in aspects
            ]
            files = {}
            for name in heatmaps:
                if not maps.get(name):
                    raise BadRow(f"{where}: heatmap {name!r} is missing", "missing")
                files[name] = _source(maps[name], root, f"{where}: heatmap {name!r}")
                shape = tuple(_read_map(files[name], f"{where}: heatmap {name!r}").shape)
                if shape != (height, width):
                    raise BadRow(f"{where}: heatmap {name!r} is {shape}, the image is {(height, width)}", "label")
            if math.isnan(score) and all(math.isnan(v) for v in values) and not heatmaps:
                raise BadRow(f"{where}: no label (`score`, an aspect of {list(aspects)}, or a heatmap)", "label")
        except BadRow as e:
            _raise_or_count(e, on_error, counts)
            continue
        captions.append(record["caption"])
        sources.append(source)
        scores.append(score)
        aspect_rows.append(values)
        map_rows.append(files)
    return ScoredImages(
        captions,
        sources,
        torch.tensor(scores, dtype=torch.float32),
        tuple(aspects),
        torch.tensor(aspect_rows, dtype=torch.float32).reshape(len(captions), len(aspects)),
        tuple(heatmaps),
        map_rows,
        resolution=resolution,
        skipped=dict(counts),
        source=str(path),
    )


def world_config_pairs(config: Any, *, split: str, clean: bool, seed: int, pipe: Any = None) -> RewardPairs:
    """World pairs of `split`'s prompts at a `RewardConfig`'s sizes: `clean` ones as held-out pairs are
    (`world_eval_pairs` of them, no label noise, no ties, 4 pairs a prompt) or training ones (`world_pairs`, the
    config's `label_noise` and `ties`, 12 a prompt). `pipe` samples the generated share as the world protocol does
    (`default_generation`) at `world_num_inference_steps`."""
    from visalign.pipelines.world_pairs import world_pairs
    from visalign.world.evaluate import default_generation

    generation = {}
    if pipe is not None:
        generation = default_generation(pipe) | {"num_inference_steps": config.world_num_inference_steps}
        del generation["output_type"]  # sample_groups asks for tensors itself
    return world_pairs(
        config.world_eval_pairs if clean else config.world_pairs,
        split=split,
        label_noise=0.0 if clean else config.label_noise,
        ties="drop" if clean else config.ties,
        pipe=pipe,
        generated_fraction=config.world_generated_fraction,
        pairs_per_prompt=4 if clean else 12,  # held out: more prompts, fewer correlated pairs each
        seed=seed,
        **generation,
    )


def load_reward_data(spec: str, config: Any, *, split: str = "train", pipe: Any = None) -> RewardPairs | ScoredImages:
    """The data a `RewardConfig` names: `world:pairs` (noisy, the train split), `world:heldout-pairs` (clean, no
    ties, the test split), a `.json` HPDv2 file, labelled images (`data_format: scores`) or Pick-a-Pic pairs (of
    `split`, for parquet shards and hub datasets)."""
    if spec in (WORLD_TRAIN, WORLD_HELDOUT):
        heldout = spec == WORLD_HELDOUT
        return world_config_pairs(
            config, split="test" if heldout else "train", clean=heldout, seed=config.seed + heldout, pipe=pipe
        )
    fmt = config.data_format
    if fmt not in FORMATS:
        raise ValueError(f"`data_format` must be one of {FORMATS}, got {fmt!r}")
    if fmt == "hpdv2" or (fmt == "auto" and Path(spec).suffix == ".json"):
        return load_hpdv2(
            spec,
            image_root=config.image_root,
            ties=config.ties,
            on_error=config.on_error,
            resolution=config.resolution,
        )
    if fmt == "scores":
        return load_scored_images(
            spec,
            aspects=config.aspects,
            heatmaps=config.heatmaps,
            on_error=config.on_error,
            resolution=config.resolution,
        )
    return load_pickapic(
        spec,
        split=split,
        aspects=config.aspects,
        ties=config.ties,
        on_error=config.on_error,
        resolution=config.resolution,
    )
