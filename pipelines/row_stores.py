"""Rows read lazily from parquet shards or a Hugging Face dataset: split discovery, chunks, a per-process cache.

Pick-a-Pic v2 (`yuvalkirstain/pickapic_v2`) is about 335 GB of JPEG bytes in ~650 parquet shards; nothing that holds
its images in memory can train on it. A store hands out rows one chunk at a time (a parquet row group, or 1,000 rows
of a `datasets.Dataset`), so a pass over the data holds one chunk, and a pair set built on a store keeps only each kept
row's chunk and position (`pickapic.load_pairs`). Reading a cell reads its chunk's columns once and keeps the
last `cache_chunks` chunks; the cache is per process (a DataLoader worker starts with an empty one, and a store
pickles without it), so workers never share file handles.

Shard names follow the Hugging Face hub's layout, `data/{split}-NNNNN-of-MMMMM-{hash}.parquet` (Pick-a-Pic's splits
are `train`, `validation`, `test`, `validation_unique` and `test_unique`): `find_shards` picks one split's shards from
a snapshot root (its `data/` folder) or from a folder, never mixing splits (`validation_unique` is not `validation`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# `{split}-00000-of-00645-b66ac786bf6fb553.parquet`, `{split}-00000-of-00001.parquet`, `{split}-00000.parquet`
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}(?:-of-\d{5})?(?:-[A-Za-z0-9_.-]*)?\.parquet$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(path: str | Path) -> bool:
    """Whether `path` names a hub dataset (`owner/name`) rather than a local file or folder (which must not exist)."""
    return bool(_HUB_ID.match(str(path))) and not Path(path).exists()


def find_shards(folder: str | Path, split: str) -> list[Path]:
    """The parquet shards of `split` in `folder`, or in its `data/` folder when `folder` holds none (a snapshot root).

    When the shard names carry splits (`train-00000-of-00002-x.parquet`), only `split`'s are returned, sorted by name;
    asking for a split that is absent raises, listing those present. A folder whose shard names carry no split is one
    dataset: all its shards are returned. Returns [] when there is no parquet file at all.
    """
    folder = Path(folder)
    shards = sorted(folder.glob("*.parquet"))
    if not shards and (folder / "data").is_dir():
        folder = folder / "data"
        shards = sorted(folder.glob("*.parquet"))
    splits = {path: m["split"] for path in shards if (m := _SHARD.match(path.name))}
    if not splits:
        return shards
    chosen = [path for path in shards if splits.get(path) == split]
    if not chosen:
        raise ValueError(
            f"{folder} has no shard of split {split!r} (shards named {{split}}-NNNNN-of-MMMMM-*.parquet); "
            f"its splits: {sorted(set(splits.values()))}"
        )
    others = [path.name for path in shards if path not in splits]
    if others:
        logger.warning("%s: ignoring parquet files not named as split shards: %s", folder, others[:5])
    return chosen


class RowStore:
    """Rows in chunks. Subclasses give `names` (one per chunk, for messages), `sizes` (rows per chunk) and
    `_read(chunk, columns) -> list[dict]`; `read` caches the last `cache_chunks` chunks read in this process."""

    names: list[str]
    sizes: list[int]

    def __init__(self, cache_chunks: int = 2):
        if cache_chunks < 1:
            raise ValueError(f"`cache_chunks` must be >= 1, got {cache_chunks}")
        self.cache_chunks = cache_chunks
        self._cache: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def read(self, chunk: int, columns: Sequence[str]) -> list[dict[str, Any]]:
        """The rows of `chunk` with `columns` only."""
        if self._pid != os.getpid():  # a forked worker: start its own cache
            self._cache, self._pid = OrderedDict(), os.getpid()
        key = (chunk, tuple(columns))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        rows = self._read(chunk, list(columns))
        self._cache[key] = rows
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return rows

    def _read(self, chunk: int, columns: list[str]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def columns(self) -> list[str]:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_cache": OrderedDict()}


class ParquetStore(RowStore):
    """The row groups of parquet `shards`, in order, as chunks."""

    def __init__(self, shards: Sequence[str | Path], cache_chunks: int = 2):
        super().__init__(cache_chunks)
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from e
        if not shards:
            raise ValueError("`shards` is empty")
        self.shards = [Path(s) for s in shards]
        self.names, self.sizes, self._where, self._first = [], [], [], []
        for s, shard in enumerate(self.shards):
            meta = pq.ParquetFile(shard).metadata
            first = 0
            for g in range(meta.num_row_groups):
                self.names.append(str(shard))
                self.sizes.append(meta.row_group(g).num_rows)
                self._where.append((s, g))
                self._first.append(first)
                first += meta.row_group(g).num_rows
        self._files: dict = {}

    def columns(self) -> list[str]:
        import pyarrow.parquet as pq

        names = [set(pq.read_schema(shard).names) for shard in self.shards]
        return sorted(set.intersection(*names))

    def first_row(self, chunk: int) -> int:
        """The row number, within its shard, of `chunk`'s first row."""
        return self._first[chunk]

    def _read(self, chunk: int, columns: list[str]) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        s, g = self._where[chunk]
        if self._files.get("pid") != os.getpid() or s not in self._files:  # one open shard per process
            for handle in self._files.values():
                if isinstance(handle, pq.ParquetFile):
                    handle.close()
            self._files = {"pid": os.getpid(), s: pq.ParquetFile(self.shards[s])}
        return self._files[s].read_row_group(g, columns=columns).to_pylist()

    def __getstate__(self) -> dict:
        return super().__getstate__() | {"_files": {}}


class HubStore(RowStore):
    """A Hugging Face `datasets.Dataset` (memory-mapped Arrow) in chunks of `chunk_rows` rows. Image features are
    read undecoded (`{"bytes", "path"}`), like the parquet files' image structs."""

    def __init__(self, dataset: Any, name: str, chunk_rows: int = 1000, cache_chunks: int = 2):
        super().__init__(cache_chunks)
        import datasets

        for column, feature in dataset.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.chunk_rows = dataset, chunk_rows
        n = len(dataset)
        self.sizes = [min(chunk_rows, n - start) for start in range(0, n, chunk_rows)]
        self.names = [name] * len(self.sizes)

    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def first_row(self, chunk: int) -> int:
        return chunk * self.chunk_rows

    def _read(self, chunk: int, columns: list[str]) -> list[dict[str, Any]]:
        start = chunk * self.chunk_rows
        batch = self.dataset.select_columns(columns)[start : start + self.sizes[chunk]]
        return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def load_hub_split(dataset_id: str, split: str, **kwargs: Any) -> HubStore:
    """`datasets.load_dataset(dataset_id, split=split, **kwargs)` as a store (the split is downloaded to the
    `datasets` cache and memory-mapped; rows are read when used)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading the hub dataset {dataset_id!r} needs `datasets`: pip install datasets") from e
    try:
        dataset = datasets.load_dataset(dataset_id, split=split, **kwargs)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:  # includes the hub's "not found" errors
        raise FileNotFoundError(
            f"{dataset_id!r} is neither a local file or folder nor a hub dataset with split {split!r} that could be "
            f"loaded ({type(e).__name__}: {e})"
        ) from e
    return HubStore(dataset, f"{dataset_id} [{split}]")


@dataclass(frozen=True)
class StoredCell:
    """One value of a store, read when asked: row `row` of chunk `chunk`, column `column` (read together with
    `read_columns`, so a pair's two images cost one read); `root` resolves relative paths."""

    store: RowStore
    chunk: int
    row: int
    column: str
    read_columns: tuple[str, ...]
    root: Path

    def value(self) -> Any:
        return self.store.read(self.chunk, self.read_columns)[self.row][self.column]

    def where(self) -> str:
        return f"row {self.store.first_row(self.chunk) + self.row} of {self.store.names[self.chunk]}: {self.column}"


class StoredPairs(Sequence):
    """The two image cells of each kept row, as compact arrays (`chunk`, `row` within it): item `i` is a tuple of two
    `StoredCell`s built when asked, so the index costs a few bytes a pair whatever the images weigh."""

    def __init__(
        self, store: RowStore, root: Path, columns: tuple[str, str], chunks: Sequence[int], rows: Sequence[int]
    ):
        import numpy as np

        self.store, self.root, self.image_columns = store, root, columns
        self.chunks, self.rows = np.asarray(chunks, dtype=np.int64), np.asarray(rows, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> tuple[StoredCell, StoredCell]:  # type: ignore[override]
        chunk, row = int(self.chunks[index]), int(self.rows[index])
        a, b = (StoredCell(self.store, chunk, row, c, self.image_columns, self.root) for c in self.image_columns)
        return a, b
