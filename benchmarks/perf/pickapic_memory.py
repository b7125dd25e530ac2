"""Pick-a-Pic memory benchmark: resident memory while iterating 20 synthetic shards vs 2, lazy vs whole-table reads.

The data are synthetic Pick-a-Pic v2 shards named as on the hub (`data/train-NNNNN-of-MMMMM-{hash}.parquet`, the
`caption, jpg_0, jpg_1, label_0, label_1, are_different` columns), `--rows` pairs per shard in row groups of
`--row-group` rows, each image a `--size`-pixel noise JPEG (so its bytes do not compress). Every config runs in a
fresh process (`harness.run_each`), so its peak is its own:

- `lazy-N`: `load_pairs(root, check_images=False, resolution=64)` (the index only), then every pair through a
  `DataLoader` (`batch_size` 16, `collate_pairs`): images are read a row group at a time and decoded per batch.
- `eager-N`: what `load_pairs` did before: the whole split read into memory (`pyarrow.parquet.read_table(...)
  .to_pylist()`), then the same pass over it.

Reported: the dataset's bytes on disk, the process's peak resident set (`ru_maxrss`) above the resident set after the
imports, and the time of the pass. The claim under test: the lazy peak does not grow with the number of shards.

    python benchmarks/perf/pickapic_memory.py          # writes benchmarks/results/pickapic_memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import rss_mb, run_each, write_record  # noqa: E402

RESULT = Path(__file__).resolve().parents[1] / "results" / "pickapic_memory.json"
SHARDS = (2, 20)


def write_shards(root: Path, shards: int, rows: int, row_group: int, size: int) -> None:
    """`shards` synthetic Pick-a-Pic train shards under `root/data` (a few distinct noise JPEGs, reused)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    (root / "data").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        n = range(k * rows, (k + 1) * rows)
        table = {
            "caption": [f"synthetic prompt {i}" for i in n],
            "jpg_0": [jpegs[i % 16] for i in n],
            "jpg_1": [jpegs[(i + 1) % 16] for i in n],
            "label_0": [float(i % 2) for i in n],
            "label_1": [float(1 - i % 2) for i in n],
            "are_different": [True for _ in n],
        }
        name = f"train-{k:05d}-of-{shards:05d}-{k:04x}synthetic.parquet"
        pq.write_table(pa.table(table), root / "data" / name, row_group_size=row_group)


def measure(name: str, data: Path) -> dict:
    """Run one config in this process and return its numbers."""
    import pyarrow.parquet as pq
    import torch

    from visalign.pipelines.pickapic import load_pairs
    from visalign.pipelines.preference_data import _to_tensor, collate_pairs

    torch.set_num_threads(1)
    kind, shards = name.split("-")
    root = data / f"shards{shards}"
    start_rss = rss_mb()
    start = time.perf_counter()
    seen = 0
    if kind == "lazy":
        pairs = load_pairs(root, check_images=False, resolution=64)
        index_rss = rss_mb()
        loader = torch.utils.data.DataLoader(pairs, batch_size=16, collate_fn=collate_pairs)
        for batch in loader:
            seen += len(batch["captions"])
    else:
        from PIL import Image

        rows = pq.read_table(sorted((root / "data").glob("*.parquet"))).to_pylist()
        index_rss = rss_mb()
        for row in rows:
            for column in ("jpg_0", "jpg_1"):
                with Image.open(io.BytesIO(row[column])) as image:
                    _to_tensor(image.convert("RGB"))
            seen += 1
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    disk = sum(p.stat().st_size for p in (root / "data").glob("*.parquet"))
    return {
        "pairs": seen,
        "shards": int(shards),
        "dataset_mb": round(disk / 2**20, 1),
        "rss_after_imports_mb": round(start_rss, 1),
        "rss_after_loading_mb": round(index_rss, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_above_imports_mb": round(peak - start_rss, 1),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run one config in this process (used by the fresh processes)")
    parser.add_argument("--data", default=None, help="folder of the synthetic shards (default: a temporary one)")
    parser.add_argument("--rows", type=int, default=200, help="pairs per shard")
    parser.add_argument("--row-group", type=int, default=50, help="rows per parquet row group")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, Path(args.data))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or tmp)
        for n in SHARDS:
            if not (data / f"shards{n}" / "data").is_dir():
                write_shards(data / f"shards{n}", n, args.rows, args.row_group, args.size)
        flags = ["--data", str(data), "--rows", str(args.rows), "--row-group", str(args.row_group)]
        names = [f"{kind}-{n}" for kind in ("lazy", "eager") for n in SHARDS]
        results = run_each(__file__, names, flags, args.threads)
    lazy = [results[f"lazy-{n}"]["peak_above_imports_mb"] for n in SHARDS]
    eager = [results[f"eager-{n}"]["peak_above_imports_mb"] for n in SHARDS]
    results["summary"] = {
        "lazy_peak_growth_20_vs_2_mb": round(lazy[1] - lazy[0], 1),
        "eager_peak_growth_20_vs_2_mb": round(eager[1] - eager[0], 1),
        "dataset_growth_20_vs_2_mb": round(results["lazy-20"]["dataset_mb"] - results["lazy-2"]["dataset_mb"], 1),
    }
    write_record(args.out, __file__, args.threads, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
