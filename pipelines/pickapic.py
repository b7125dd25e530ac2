"""Pick-a-Pic-schema pair datasets on disk and on the hub: `load_pairs` reads them lazily, `save_pairs` writes them.

Pairs follow the Pick-a-Pic schema (Kirstain et al. 2023, arXiv 2305.01569; `yuvalkirstain/pickapic_v2`): one row
per comparison with `caption` (str), `jpg_0` and `jpg_1` (the two images) and `label_0` (1: image 0 preferred,
0: image 1 preferred, 0.5: a tie). `load_pairs` reads
- a `.parquet` file (needs `pyarrow`), whose image columns hold bytes (Pick-a-Pic's `binary`), paths, or the
  `{"bytes", "path"}` structs Hugging Face `datasets` writes for its `Image` feature;
- one split of a folder of `.parquet` shards or of a hub snapshot root (its `data/` folder): Pick-a-Pic v2's
  `{split}-NNNNN-of-MMMMM-{hash}.parquet`, `split="train"` by default; splits are never merged (`row_stores`);
- a hub dataset id (`"yuvalkirstain/pickapic_v2"`), through `datasets.load_dataset` (memory-mapped Arrow);
- a `.jsonl` file, one JSON object a line, whose image fields are paths (or such structs with a path);
- a folder holding `manifest.jsonl` (an image folder with a manifest).
Parquet and hub rows are read lazily (`open_store`, `row_stores`): loading passes over the rows one row group at a
time and keeps each kept row's caption, label and position (about 100 bytes a pair plus its caption); images are
read, a row group at a time with a small per-process cache, and decoded when a pair is asked for, in `DataLoader`
workers too (`preference_data.collate_pairs` makes the batches). Memory does not grow with the number of shards
(`benchmarks/perf/pickapic_memory.py`). Random access reads a whole row group per pair: a shuffled order that keeps
a row group's pairs together reads each once.
Paths are relative to the dataset root (the folder of the file, or the folder itself) and may not leave it: an
absolute path or one that resolves outside the root (`..`, a symlink) is an error, always.

Bad rows: a missing or undecodable image and an invalid label raise a `ValueError` naming the row and the column,
or, with `on_error="skip"`, are skipped and counted in `PreferencePairs.skipped`. Ties are dropped and counted
(`ties="drop"`, what Diffusion-DPO's `train.py` does) or kept (`ties="keep"`, for reward-model training). Pairs whose
two images are identical (Pick-a-Pic's `are_different == False`, equal bytes, equal pixels) are dropped and counted
like ties (`identical="drop"`), or are bad rows (`identical="error"`). A dataset left with no pair is an error.

`read_columns` reads further columns of the same rows, numbered as `load_pairs` numbers them (reward training's
`label_1` and `aspect_labels`). `save_pairs` writes any pair set (online pairs from `preference_data.build_pairs`
too) as a manifest folder or a Pick-a-Pic parquet file that `load_pairs` reads back.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visalign.pipelines.preference_data import (
    MANIFEST,
    ON_ERROR,
    PICKAPIC_IMAGE_COLUMNS,
    BadRow,
    PreferencePairs,
    _check_label,
    _open,
    _png,
    _raise_or_count,
    _read_rows,
    _source,
)
from visalign.pipelines.row_stores import (
    ParquetStore,
    RowStore,
    StoredPairs,
    find_shards,
    is_hub_id,
    load_hub_split,
)

logger = logging.getLogger(__name__)

TIES = ("drop", "keep")
IDENTICAL = ("drop", "error")


def load_pairs(
    path: str | Path,
    *,
    split: str = "train",
    ties: str = "drop",
    identical: str = "drop",
    on_error: str = "raise",
    resolution: int | None = None,
    caption_column: str = "caption",
    image_columns: tuple[str, str] = PICKAPIC_IMAGE_COLUMNS,
    label_column: str = "label_0",
    check_images: bool = True,
    cache_chunks: int = 2,
) -> PreferencePairs:
    """Read Pick-a-Pic-schema pairs from a `.parquet` file, a folder of parquet shards (or a snapshot root with
    `data/`), a hub dataset id, a `.jsonl` file or a folder with `manifest.jsonl`.

    Parquet and hub rows are read lazily: loading streams one chunk (a row group) at a time and keeps each kept row's
    caption, label and position; images are read, a chunk at a time, when a pair is asked for.

    Args:
        path: the file or folder (relative image paths resolve against it and may not leave it), or a hub dataset
            id (`"yuvalkirstain/pickapic_v2"`, through `datasets.load_dataset`, which downloads the split).
        split (`str`): the split of a sharded folder or hub dataset (`train`, `validation`, `test`,
            `validation_unique`, `test_unique` for Pick-a-Pic); splits are never merged.
        ties (`str`): `"drop"` (count them in `skipped["tie"]`) or `"keep"`.
        identical (`str`): pairs whose two images are the same (Pick-a-Pic's `are_different == False`, equal bytes,
            equal pixels): `"drop"` and count them in `skipped["identical"]`, like ties, or `"error"`: a bad row.
        on_error (`str`): `"raise"` a `ValueError` naming the first bad row, or `"skip"` bad rows and count them.
        resolution (`int`, *optional*): resize and center-crop images to this square size when read.
        caption_column, image_columns, label_column: the schema's names (Pick-a-Pic's by default).
        check_images (`bool`): decode every image now (finds corrupt and identical images before training; a pass
            over the whole dataset, one chunk in memory at a time). With False, parquet and hub images are not read
            now (only captions, labels and `are_different`: a full-size dataset indexes quickly), and a JSONL or
            manifest set checks only that files exist and differ in bytes; a bad image then raises when its row is
            read, naming it.
        cache_chunks (`int`): chunks (row groups) of images each process keeps read.
    """
    if ties not in TIES:
        raise ValueError(f"`ties` must be one of {TIES}, got {ties!r}")
    if identical not in IDENTICAL:
        raise ValueError(f"`identical` must be one of {IDENTICAL}, got {identical!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")
    rules = _Rules(caption_column, tuple(image_columns), label_column, ties, identical, on_error, check_images)
    stored = open_store(path, split, cache_chunks)
    if stored is not None:
        return _load_stored(*stored, rules, resolution)
    path = Path(path)
    root, records = _read_rows(path, [caption_column, *image_columns, label_column])
    counts: Counter = Counter()
    kept = ([], [], [], [])
    for i, (where, record) in enumerate(records):
        try:
            caption, label = rules.caption_label(record, where)
            if label == 0.5 and ties == "drop":
                counts["tie"] += 1
                continue
            pair = tuple(_source(record.get(c), root, f"{where}: {c}") for c in image_columns)
            _check_distinct(pair, record, where, check_images)
        except BadRow as e:
            rules.count(e, counts)
            continue
        for store, value in zip(kept, (caption, pair, label, i)):
            store.append(value)
    if counts:
        logger.info("%s: kept %d of %d rows, skipped %s", path, len(kept[0]), len(records), dict(counts))
    return PreferencePairs(*kept, resolution=resolution, skipped=dict(counts), source=str(path))


def open_store(path: str | Path, split: str = "train", cache_chunks: int = 2) -> tuple[RowStore, Path, str] | None:
    """The lazy rows of a hub dataset id's `split`, of `split`'s shards in a folder or snapshot root, or of one
    `.parquet` file, as `(store, root, name)`: `root` resolves relative image paths, `name` is for messages.
    None for the sources read whole (a `.jsonl` file, a folder with `manifest.jsonl`, a path that is absent)."""
    if is_hub_id(path):
        return load_hub_split(str(path), split), Path.cwd().resolve(), f"{path} [{split}]"
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists():
        shards = find_shards(path, split)
        if shards:
            return ParquetStore(shards, cache_chunks), path.resolve(), str(path)
    if path.suffix == ".parquet" and path.is_file():
        return ParquetStore([path], cache_chunks), path.parent.resolve(), str(path)
    return None


def read_columns(
    path: str | Path, columns: Sequence[str], *, split: str = "train"
) -> list[tuple[str, dict[str, Any]]]:
    """`(where, row)` for every row of a pair dataset that `load_pairs(path, split=split)` reads, in the order it
    numbers its rows (`PreferencePairs.rows`): `row` holds those of `columns` the row has, `where` names the row and
    its file for messages. Parquet and hub rows are read one chunk at a time, these columns only; a parquet or hub
    dataset with none of the columns gives `[]`."""
    stored = open_store(path, split)
    if stored is None:
        return [(where, {c: r[c] for c in columns if c in r}) for where, r in _read_rows(Path(path), [])[1]]
    store = stored[0]
    names = [c for c in columns if c in store.columns()]
    if not names:
        return []
    return [
        (f"row {store.first_row(chunk) + r} of {store.names[chunk]}", row)
        for chunk in range(len(store.sizes))
        for r, row in enumerate(store.read(chunk, names))
    ]


def save_pairs(pairs: PreferencePairs, path: str | Path) -> Path:
    """Write `pairs` as a Pick-a-Pic dataset: a folder with PNGs and `manifest.jsonl`, or (a `.parquet` path) one
    parquet file with PNG bytes in `jpg_0`/`jpg_1`. Online scores, when known, go to `score_0`/`score_1`. Returns
    `path`; `load_pairs(path)` reads it back."""
    path = Path(path)
    rows = []
    for i in range(len(pairs)):
        pair = pairs[i]
        row: dict[str, Any] = {"caption": pair.caption, "label_0": pair.label_0}
        if pairs.scores is not None:
            row["score_0"], row["score_1"] = pairs.scores[i]
        rows.append((row, pair.image_0, pair.image_1))
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = [{**row, "jpg_0": _png(a), "jpg_1": _png(b)} for row, a, b in rows]
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    (path / "images").mkdir(parents=True, exist_ok=True)
    with open(path / MANIFEST, "w") as f:
        for i, (row, a, b) in enumerate(rows):
            for column, image in zip(PICKAPIC_IMAGE_COLUMNS, (a, b)):
                name = f"images/{i:06d}_{column[-1]}.png"
                (path / name).write_bytes(_png(image))
                row[column] = name
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rules:
    """How `load_pairs` reads and judges a row."""

    caption_column: str
    image_columns: tuple[str, str]
    label_column: str
    ties: str
    identical: str
    on_error: str
    check_images: bool

    def caption_label(self, record: dict, where: str) -> tuple[str, float]:
        caption = record.get(self.caption_column)
        if not isinstance(caption, str):
            raise BadRow(f"{where}: `{self.caption_column}` must be a string, got {caption!r}", "caption")
        return caption, _check_label(record.get(self.label_column), where, self.label_column)

    def count(self, error: BadRow, counts: Counter) -> None:
        """Count a dropped identical pair, or raise or count a bad row as `on_error` says."""
        if error.reason == "identical" and self.identical == "drop":
            counts["identical"] += 1
        else:
            _raise_or_count(error, self.on_error, counts)


def _load_stored(store: RowStore, root: Path, source: str, rules: _Rules, resolution: int | None) -> PreferencePairs:
    """Pairs indexed from a store, one chunk at a time; images stay in the store until a pair is read."""
    have = store.columns()
    missing = [c for c in (rules.caption_column, *rules.image_columns, rules.label_column) if c not in have]
    if missing:
        raise ValueError(f"{source} lacks the column(s) {missing}; it has {have}")
    meta_columns = [rules.caption_column, rules.label_column] + (["are_different"] if "are_different" in have else [])
    captions, labels, rows, chunks, offsets = [], [], [], [], []
    counts: Counter = Counter()
    index = 0
    for chunk in range(len(store.sizes)):
        meta = store._read(chunk, meta_columns)  # one pass: not worth caching
        images = store._read(chunk, list(rules.image_columns)) if rules.check_images else None
        first = store.first_row(chunk)
        for r, record in enumerate(meta):
            index += 1
            where = f"row {first + r} of {store.names[chunk]}"
            try:
                caption, label = rules.caption_label(record, where)
                if label == 0.5 and rules.ties == "drop":
                    counts["tie"] += 1
                    continue
                if images is not None:
                    pair = tuple(_source(images[r].get(c), root, f"{where}: {c}") for c in rules.image_columns)
                    _check_distinct(pair, record, where, decode=True)
                elif record.get("are_different") is False:
                    raise BadRow(f"{where}: the two images are identical (are_different is false)", "identical")
            except BadRow as e:
                rules.count(e, counts)
                continue
            captions.append(caption)
            labels.append(label)
            rows.append(index - 1)
            chunks.append(chunk)
            offsets.append(r)
        del meta, images
    if counts:
        logger.info("%s: kept %d of %d rows, skipped %s", source, len(captions), index, dict(counts))
    sources = StoredPairs(store, root, rules.image_columns, chunks, offsets)
    return PreferencePairs(captions, sources, labels, rows, resolution=resolution, skipped=dict(counts), source=source)


def _check_distinct(pair: tuple[bytes | Path, bytes | Path], record: dict, where: str, decode: bool) -> None:
    if record.get("are_different") is False:
        raise BadRow(f"{where}: the two images are identical (are_different is false)", "identical")
    data = [s.read_bytes() if isinstance(s, Path) else s for s in pair]
    if data[0] == data[1]:
        raise BadRow(f"{where}: the two images are identical (equal bytes)", "identical")
    if decode:
        a, b = (np.asarray(_open(s, f"{where}: {c}")) for s, c in zip(pair, PICKAPIC_IMAGE_COLUMNS))
        if a.shape == b.shape and np.array_equal(a, b):
            raise BadRow(f"{where}: the two images are identical (equal pixels)", "identical")
