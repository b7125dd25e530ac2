"""What a bench run folder holds and how it fills: the images, the verdict cache, the settings guard.

Protocol (UniGenBench's): `images_per_prompt` images per prompt (default 4) named `{prompt_id}_{image_id}.png`;
image j of every prompt is generated from a CPU `torch.Generator` seeded `seed + j` (default seed 3407, as in
UniGenBench's reference script), so an image depends only on its prompt and index, never on batching or on which
images already exist. Images are written under a temporary name and renamed, so an interrupted run leaves only
whole files, and a rerun generates only the missing ones. Judgments are cached the same way in `verdicts.jsonl`, one
line per image, and reused when the image's sha256, the prompt and the judge's fingerprint are unchanged.
`images/generation.json` records what made the images, and adding to images made otherwise is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class BenchError(ValueError):
    """A run that cannot be scored as asked: missing images, or cached images made with other settings."""


class MissingImagesError(BenchError):
    """Images the protocol expects are absent and `allow_missing` is off."""


def image_name(prompt_id: str, image_id: int) -> str:
    return f"{prompt_id}_{image_id}.png"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_png(pixels: Any, path: Path) -> None:
    """Write `[3, H, W]` float pixels in [0, 1] as an 8-bit PNG, atomically (temporary name, then rename)."""
    from visalign.files import to_pil

    tmp = path.with_name(path.name + ".tmp")
    to_pil(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def load_pixels(path: Path) -> Any:
    """An image file as a float tensor `[3, H, W]` in [0, 1]; `visalign.files.BadFileError` naming the file when it
    cannot be decoded (truncated, damaged)."""
    from visalign.files import load_image

    return load_image(path)


def generate_images(
    pipe: Any,
    items: Sequence[Any],
    image_dir: str | Path,
    *,
    images_per_prompt: int = 4,
    seed: int = 3407,
    batch_size: int = 4,
    generation: dict | None = None,
) -> dict[str, int]:
    """Generate the images of `items` that `image_dir` lacks; returns `{"generated": n, "cached": m}`.

    `pipe` is a diffusers pipeline called as `pipe(prompt=texts, generator=generators, output_type="pt",
    **generation)`; each image gets its own CPU generator seeded `seed + image_id`.
    """
    import torch
    from tqdm.auto import tqdm

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        (item, j)
        for j in range(images_per_prompt)
        for item in items
        if not (image_dir / image_name(item.id, j)).exists()
    ]
    cached = len(items) * images_per_prompt - len(todo)
    logger.info("generating %d images (%d already in %s)", len(todo), cached, image_dir)
    bar = tqdm(total=len(todo), desc="sampling", unit="image", disable=not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + j) for _, j in chunk]
        with torch.no_grad():
            out = pipe(
                prompt=[item.text for item, _ in chunk], generator=generators, output_type="pt", **(generation or {})
            ).images
        for (item, j), pixels in zip(chunk, out):
            save_png(pixels, image_dir / image_name(item.id, j))
        bar.update(len(chunk))
    bar.close()
    return {"generated": len(todo), "cached": cached}


def collect_images(
    image_dir: str | Path, items: Sequence[Any], images_per_prompt: int
) -> tuple[dict[tuple[str, int], Path], list[str]]:
    """The expected images that exist, by (prompt id, image id), and the names of those that do not."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    present, missing = {}, []
    for item in items:
        for j in range(images_per_prompt):
            path = image_dir / image_name(item.id, j)
            if path.is_file():
                present[(item.id, j)] = path
            else:
                missing.append(path.name)
    return present, missing


def read_jsonl(path: Path, skip_broken: bool = False) -> list[dict]:
    """The records (JSON objects) of a JSONL file ([] if absent); a line that does not parse or is not an object is
    an error naming the file and line, or skipped."""
    from visalign.files import read_text

    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(read_text(path, "JSONL file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a JSON object")
            out.append(record)
        except ValueError as e:  # JSONDecodeError too
            if not skip_broken:
                raise ValueError(f"{path}: line {n} is not a record ({e})") from None
            logger.warning("%s: dropping line %d, which is not a record (cut short?)", path, n)
    return out


def judge_images(
    judge: Any,
    items: Sequence[Any],
    paths: dict[tuple[str, int], Path],
    verdicts_path: str | Path,
    batch_size: int = 4,
    abort_on_error: bool = False,
) -> list[dict]:
    """Per-image records for every image in `paths`, reusing valid lines of `verdicts_path` and appending new ones.

    A cached line is valid when the image's sha256, the prompt item (its hash) and the judge's fingerprint are
    unchanged and none of its verdicts is an error (failed judgments are retried); the file is first rewritten with
    the valid lines only (a line cut short by a kill is dropped). An image file that cannot be decoded gets an error
    verdict per test point naming the file, and the others are judged; `abort_on_error` raises `BenchError` at the
    first error verdict instead.
    """
    from visalign.benchmarks.judges import JudgeResult, Sample, Verdict
    from visalign.files import BadFileError

    verdicts_path = Path(verdicts_path)
    fingerprint = judge.fingerprint()
    by_id = {item.id: item for item in items}
    order = {item.id: k for k, item in enumerate(items)}
    wanted = sorted(paths, key=lambda key: (order[key[0]], key[1]))
    hashes = {key: _sha256(paths[key]) for key in wanted}
    item_hashes = {
        item.id: hashlib.sha256(json.dumps(item.to_dict(), sort_keys=True).encode()).hexdigest()[:16] for item in items
    }
    cached = {}
    for r in read_jsonl(verdicts_path, skip_broken=True):
        key = (r.get("prompt_id"), r.get("image_id"))
        if (
            key in hashes
            and r.get("sha256") == hashes[key]
            and r.get("prompt") == item_hashes[key[0]]
            and r.get("judge") == fingerprint
            and not any(isinstance(tp, dict) and tp.get("status") == "error" for tp in r.get("test_points") or [])
        ):
            cached[key] = r
    tmp = verdicts_path.with_name(verdicts_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cached.values()))
    os.replace(tmp, verdicts_path)
    todo = [(by_id[pid], j) for pid, j in wanted if (pid, j) not in cached]
    logger.info("judging %d images with %s (%d cached)", len(todo), judge.name, len(cached))
    with verdicts_path.open("a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            results, samples = {}, []
            for item, j in chunk:
                try:
                    samples.append(Sample(item, j, load_pixels(paths[(item.id, j)])))
                except BadFileError as e:  # one unreadable image is that image's error, not the run's
                    logger.warning("%s", e)
                    results[(item.id, j)] = JudgeResult([Verdict.error(str(e), judge.name) for _ in item.test_points])
            for sample, result in zip(samples, judge.judge(samples) if samples else []):
                results[(sample.item.id, sample.image_id)] = result
            for item, j in chunk:
                result = results[(item.id, j)]
                failed = [v.reason for v in result.verdicts if v.status == "error"]
                if abort_on_error and failed:
                    raise BenchError(f"image {paths[(item.id, j)]}: {failed[0]} (--errors abort stops at the first)")
                if len(result.verdicts) != len(item.test_points):
                    raise RuntimeError(
                        f"{judge.name} gave {len(result.verdicts)} verdicts for {len(item.test_points)} "
                        f"test points of prompt {item.id}"
                    )
                record = {
                    "prompt_id": item.id,
                    "image_id": j,
                    "file": paths[(item.id, j)].name,
                    "sha256": hashes[(item.id, j)],
                    "prompt": item_hashes[item.id],
                    "text": item.text,
                    "judge": fingerprint,
                    "theme": item.theme,
                    "subtheme": item.subtheme,
                    "test_points": [
                        {"criterion": tp.criterion, "span": tp.span} | v.to_dict()
                        for tp, v in zip(item.test_points, result.verdicts)
                    ],
                    "raw": result.raw,
                }
                cached[(item.id, j)] = record
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    return [cached[key] for key in wanted]


def check_generation_settings(images_dir: Path, settings: dict) -> None:
    """Record what made the images in `images_dir` (`generation.json`); refuse to add to images made otherwise."""
    settings = json.loads(json.dumps(settings, default=str))
    meta = images_dir / "generation.json"
    if meta.is_file():
        before = json.loads(meta.read_text())
        if before != settings:
            raise BenchError(
                f"the images in {images_dir} were generated with {before}, not {settings}; "
                f"use another run folder (`out_dir`, --out) or delete those images"
            )
    images_dir.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(settings, indent=2))
