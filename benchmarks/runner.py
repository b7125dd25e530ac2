"""`visalign bench`: generate (or read) the images of a prompt set, judge them, and write the reports.

    visalign bench run --set visalign-core --model PATH_OR_ID --judge openai:QwenVL@http://127.0.0.1:8000/v1 \\
        --out runs/base
    visalign bench run --set world-heldout --images DIR --judge world --out runs/world
    visalign bench run --set world-heldout --model world:sd --lora runs/dpo/final --judge world --out runs/dpo
    visalign bench compare runs/base runs/aligned --out runs/base-vs-aligned   # refuses different settings
    visalign bench convert test_prompts_en.csv ugb_en.jsonl

Protocol (UniGenBench's): `images_per_prompt` images per prompt (default 4) named `{prompt_id}_{image_id}.png`;
image j of every prompt is generated from a CPU `torch.Generator` seeded `seed + j` (default seed 3407, as in
UniGenBench's reference script), so an image depends only on its prompt and index, never on batching or on which
images already exist. Images are written under a temporary name and renamed, so an interrupted run leaves only whole
files, and a rerun generates only the missing ones. Judgments are cached the same way in `verdicts.jsonl`, one
line per image, and reused when the image's sha256, the prompt and the judge's fingerprint are unchanged.

Scoring refuses to run when images are missing unless `allow_missing` (`--allow-missing`) is set; the summary then
says how many were missing. The run folder holds `record.json` (prompt-file hash, model and LoRA, the exact
generation settings: call arguments, scheduler, dtype, seeds; judge settings, versions), `images/` (when
generated), `verdicts.jsonl`, `summary.json`, `report.md` and `report.html`. `compare` refuses two runs whose
generation settings differ unless told `allow_different_settings`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    out_dir: str = field(default="runs/bench", metadata={"help": "the run folder"})
    images_per_prompt: int = field(default=4, metadata={"help": "images per prompt (UniGenBench and GenEval: 4)"})
    seed: int = field(default=3407, metadata={"help": "image j of every prompt uses seed + j"})
    batch_size: int = field(default=4, metadata={"help": "prompts per generation and judging batch"})
    allow_missing: bool = field(default=False, metadata={"help": "score the images that exist when some are missing"})
    errors: str = field(
        default="exclude",
        metadata={
            "help": "failed judgments: 'exclude' leaves them out of the denominators (UniGenBench's official "
            "calculate_scores), 'fail' counts them wrong; the report shows their number and the strict Overall"
        },
    )
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap replicates for the 95% intervals (0 = none)"})
    max_grid_prompts: int = field(default=100, metadata={"help": "prompts shown in the HTML image grid"})
    generation: dict = field(default_factory=dict, metadata={"help": "extra pipeline call arguments"})
    abort_on_error: bool = field(
        default=False, metadata={"help": "stop at the first error verdict (unreadable image, failed judgment)"}
    )

    def __post_init__(self):
        for name in ("images_per_prompt", "batch_size", "max_grid_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.errors not in ("fail", "exclude"):
            raise ValueError(f"`errors` must be 'fail' or 'exclude', got {self.errors!r}")
        if self.bootstrap < 0:
            raise ValueError(f"`bootstrap` must be >= 0, got {self.bootstrap}")


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
    from visalign.benchmarks.report import to_pil

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


def _read_jsonl(path: Path, skip_broken: bool = False) -> list[dict]:
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
    for r in _read_jsonl(verdicts_path, skip_broken=True):
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


def _environment() -> dict:
    import diffusers
    import numpy
    import torch
    import transformers

    from visalign import __version__

    return {
        "visalign": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def _check_generation_settings(images_dir: Path, settings: dict) -> None:
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


def run_bench(
    prompt_set: Any,
    judge: Any,
    config: BenchConfig,
    *,
    pipe: Any = None,
    images_dir: str | Path | None = None,
    model_id: str = "",
    lora: str | None = None,
    lora_scale: float = 1.0,
    arguments: dict | None = None,
) -> dict:
    """Generate with `pipe` (into `out_dir/images`) or read `images_dir`, judge, aggregate, write every output.

    With `pipe`, the call arguments are resolved once (`visalign.loading.resolve_settings`: `config.generation`
    over the pipeline's defaults, sizes as numbers), passed explicitly, and recorded with the scheduler, dtype,
    seeds and the LoRA (`lora`, `lora_scale`: what was loaded into `pipe`) as the run's `settings`.
    Returns the summary. Raises `MissingImagesError` when images are missing and `config.allow_missing` is off.
    """
    from visalign.benchmarks import report

    if (pipe is None) == (images_dir is None):
        raise ValueError("give exactly one of `pipe` (generate) and `images_dir` (existing images)")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = prompt_set.items
    generated, settings = None, None
    if pipe is not None:
        from visalign.loading import resolve_settings, scheduler_record

        call = resolve_settings(pipe, config.generation)
        settings = {
            "call": call,
            "scheduler": scheduler_record(pipe),
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "seed": config.seed,
            "images_per_prompt": config.images_per_prompt,
        }
        images_dir = out / "images"
        _check_generation_settings(images_dir, {"model": model_id, "lora": lora, "lora_scale": lora_scale} | settings)
        generated = generate_images(
            pipe,
            items,
            images_dir,
            images_per_prompt=config.images_per_prompt,
            seed=config.seed,
            batch_size=config.batch_size,
            generation=call,
        )
    paths, missing = collect_images(images_dir, items, config.images_per_prompt)
    if missing and not config.allow_missing:
        raise MissingImagesError(
            f"{len(missing)} of {len(items) * config.images_per_prompt} images are missing in {images_dir} "
            f"(e.g. {', '.join(missing[:3])}); pass allow_missing=True (--allow-missing) to score the rest"
        )
    if missing:
        logger.warning("%d images missing in %s; scoring the %d present", len(missing), images_dir, len(paths))
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arguments": arguments,
        "prompt_set": prompt_set.record(),
        "model": model_id,
        "lora": {"path": lora, "scale": lora_scale} if lora else None,
        "settings": settings,
        "images_dir": str(images_dir),
        "images_per_prompt": config.images_per_prompt,
        "seeds": [config.seed + j for j in range(config.images_per_prompt)] if pipe is not None else None,
        "seed_rule": "image j of every prompt: torch.Generator('cpu').manual_seed(seed + j)"
        if pipe is not None
        else "unknown (existing images)",
        "generation": config.generation,
        "generated": generated,
        "missing_images": {"count": len(missing), "names": missing[:100]},
        "judge": {"name": judge.name, "fingerprint": judge.fingerprint(), "settings": judge.settings()},
        "config": asdict(config),
        "environment": _environment(),
    }
    (out / "record.json").write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str))
    records = judge_images(
        judge, items, paths, out / "verdicts.jsonl", config.batch_size, abort_on_error=config.abort_on_error
    )
    summary = report.aggregate(
        records,
        prompt_set.primary_criteria,
        errors=config.errors,
        bootstrap=config.bootstrap,
        missing_images=len(missing),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    title = f"{prompt_set.name}: {model_id or images_dir}"
    (out / "report.md").write_text(report.summary_markdown(summary, title, record))
    report.write_html_report(
        out / "report.html",
        title,
        report.bench_sections(summary, record, records, items, paths, max_prompts=config.max_grid_prompts),
        max_side=160,  # the grid shows thumbnails at this size; larger embeds only make the file heavy
    )
    return summary


def _flat(settings: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_differences(settings_a: dict | None, settings_b: dict | None) -> list[str]:
    """`"name: A vs B"` for every generation setting (call argument, scheduler, dtype, seed, images per prompt)
    that differs between two runs' recorded `settings`; [] when equal or when either run did not generate."""
    if settings_a is None or settings_b is None:
        return []
    a, b = _flat(settings_a), _flat(settings_b)
    return [
        f"{name}: {a.get(name, 'unset')} vs {b.get(name, 'unset')}"
        for name in sorted(set(a) | set(b))
        if a.get(name, "unset") != b.get(name, "unset")
    ]


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    bootstrap: int = 1000,
    allow_judge_mismatch: bool = False,
    allow_different_settings: bool = False,
    changed: int = 8,
) -> dict:
    """Per-criterion deltas B - A of two run folders, with paired bootstrap intervals over shared prompts.

    Runs whose generation settings differ (steps, guidance, size, sequence length, scheduler, dtype, seeds: what
    `run_bench` records; the model and its LoRA are what is compared) are refused, as runs judged differently are,
    unless `allow_different_settings`; the differences are then in `settings_differences`. `changed_prompts` lists
    the `changed` prompts whose share of passed test points moved most.
    """
    from visalign.benchmarks import report

    runs = []
    for run in (Path(run_a), Path(run_b)):
        if not (run / "record.json").is_file() or not (run / "verdicts.jsonl").is_file():
            raise FileNotFoundError(f"{run} is not a bench run folder (record.json and verdicts.jsonl expected)")
        runs.append((json.loads((run / "record.json").read_text()), _read_jsonl(run / "verdicts.jsonl")))
    (rec_a, a), (rec_b, b) = runs
    if rec_a["judge"]["fingerprint"] != rec_b["judge"]["fingerprint"] and not allow_judge_mismatch:
        raise ValueError(
            f"the runs were judged differently ({rec_a['judge']['name']} {rec_a['judge']['fingerprint']} vs "
            f"{rec_b['judge']['name']} {rec_b['judge']['fingerprint']}); their numbers are not comparable. "
            f"Pass allow_judge_mismatch=True (--allow-judge-mismatch) to compare anyway"
        )
    if rec_a["prompt_set"]["sha256"] != rec_b["prompt_set"]["sha256"]:
        logger.warning(
            "the runs used different prompt files (sha256 %s vs %s)",
            rec_a["prompt_set"]["sha256"][:12],
            rec_b["prompt_set"]["sha256"][:12],
        )
    differences = settings_differences(rec_a.get("settings"), rec_b.get("settings"))
    if differences and not allow_different_settings:
        raise ValueError(
            f"the runs sampled with different generation settings ({'; '.join(differences)}); a difference in "
            f"score would mix the model with its sampler. Rerun one with the other's settings (bench run "
            f"--num-inference-steps/--guidance-scale/--height/--width/--max-sequence-length), or pass "
            f"--allow-different-settings (allow_different_settings=True) to compare anyway"
        )
    unknown = [name for name, rec in (("A", rec_a), ("B", rec_b)) if rec.get("settings") is None]
    result = report.compare(
        a, b, rec_a["prompt_set"]["primary_criteria"], errors=rec_a["config"]["errors"], bootstrap=bootstrap
    )
    return result | {
        "runs": {"a": str(run_a), "b": str(run_b)},
        "models": {
            name: {"model": rec.get("model") or rec.get("images_dir"), "lora": rec.get("lora")}
            for name, rec in (("a", rec_a), ("b", rec_b))
        },
        "judges_match": rec_a["judge"]["fingerprint"] == rec_b["judge"]["fingerprint"],
        "settings": {"a": rec_a.get("settings"), "b": rec_b.get("settings")},
        "settings_differences": differences,
        "settings_unknown": unknown,
        "changed_prompts": report.changed_prompts(a, b, changed, errors=rec_a["config"]["errors"]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visalign.benchmarks import reward_eval  # numpy only at import: `--help` stays fast
    from visalign.benchmarks.prompts import FORMATS  # stdlib and numpy only: `--help` stays fast

    sub = parser.add_subparsers(dest="bench_command", metavar="{run,compare,convert,reward}", required=True)
    r = sub.add_parser("run", help="generate or read images, judge them, write the reports")
    r.add_argument("--set", required=True, help="visalign-core, world-heldout, geneval, or a prompt file")
    r.add_argument("--set-format", choices=FORMATS, default=None, help="prompt file format (default: guessed)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="world:sd, world:sd3, a diffusers pipeline folder or a hub id to generate with")
    src.add_argument("--images", help="folder of existing images named {prompt_id}_{image_id}.png")
    r.add_argument(
        "--judge",
        action="append",
        required=True,
        metavar="SPEC",
        help="world | rules:world | geneval[:DETECTOR[@CLIP]] | reward:NAME@THRESHOLD | vlm:PATH | openai:MODEL@URL | "
        "replay:FILE; "
        "repeat to route: the first judge that does not abstain decides each test point",
    )
    r.add_argument("--lora", default=None, help="a trained LoRA folder (a run's output_dir/final) loaded into --model")
    r.add_argument("--lora-scale", type=float, default=1.0, help="weight of the --lora adapter")
    r.add_argument("--out", required=True, help="run folder")
    r.add_argument("--images-per-prompt", type=int, default=4)
    r.add_argument("--seed", type=int, default=3407, help="image j of every prompt uses seed + j")
    r.add_argument("--batch-size", type=int, default=4, help="images per generation and judging batch")
    r.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    r.add_argument(
        "--limit-per-category",
        type=int,
        default=None,
        metavar="N",
        help="the first N prompts testing each primary criterion (a small run that still reports Overall)",
    )
    r.add_argument("--allow-missing", action="store_true", help="score the images present when some are missing")
    r.add_argument(
        "--errors",
        choices=("exclude", "fail", "abort"),
        default="exclude",
        help="failed judgments (a judge error, an unreadable image): left out as the official scorer does "
        "(default), counted wrong, or 'abort' the run at the first one",
    )
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0 = no intervals)")
    r.add_argument("--grid-prompts", type=int, default=100, help="prompts shown in the HTML image grid")
    r.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    r.add_argument("--num-inference-steps", type=int, default=None)
    r.add_argument("--guidance-scale", type=float, default=None)
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--max-sequence-length", type=int, default=None, help="text tokens of SD3/FLUX-class models")
    r.add_argument("--max-new-tokens", type=int, default=1024, help="VLM judge answer limit")
    r.add_argument(
        "--judge-retries",
        type=int,
        default=0,
        help="VLM judge: extra attempts after a failed request or a bad answer (waiting 1 s, then 2 s, 4 s, ...)",
    )
    r.add_argument(
        "--judge-timeout",
        type=float,
        default=300.0,
        help="server VLM judge: seconds one request may take in all (connect + answer); then it counts as failed",
    )
    r.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="VLM judge: image encoding")
    r.add_argument("--judge-workers", type=int, default=1, help="server VLM judge: requests in flight at once")
    r.add_argument("--api-key-env", default=None, help="openai judge: environment variable holding the API key")
    c = sub.add_parser("compare", help="per-criterion deltas between two runs (B - A) with paired intervals")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", default=None, help="folder for compare.json, compare.md and compare.html")
    c.add_argument("--bootstrap", type=int, default=1000)
    c.add_argument("--allow-judge-mismatch", action="store_true", help="compare runs scored by different judges")
    c.add_argument(
        "--allow-different-settings",
        action="store_true",
        help="compare runs sampled with different generation settings (the differences head the report)",
    )
    c.add_argument("--changed", type=int, default=8, help="prompts shown side by side: those that changed most")
    v = sub.add_parser("convert", help="write a prompt set in visalign's JSONL format")
    v.add_argument("source", help="a built-in set name or a prompt file")
    v.add_argument("output")
    v.add_argument("--set-format", choices=FORMATS, default=None, help="prompt file format (default: guessed)")
    reward_eval.add_arguments(sub.add_parser("reward", help="pairwise accuracy and calibration of a reward model"))


def limit_per_category(prompt_set: Any, n: int | None) -> Any:
    """The first `n` prompts testing each primary criterion (their union, in file order), same metadata."""
    import dataclasses

    from visalign.benchmarks.taxonomy import primary_of

    if n is None:
        return prompt_set
    if n < 1:
        raise ValueError(f"`--limit-per-category` must be positive, got {n}")
    taken: dict[str, int] = {}
    items = []
    for item in prompt_set.items:
        primaries = {primary_of(tp.criterion) for tp in item.test_points}
        if any(taken.get(p, 0) < n for p in primaries):
            items.append(item)
            for p in primaries:
                taken[p] = taken.get(p, 0) + 1
    return dataclasses.replace(prompt_set, items=items)


def _run(args: argparse.Namespace) -> int:
    from visalign.benchmarks.judges import CompositeJudge, build_judge
    from visalign.benchmarks.prompts import load_prompt_set
    from visalign.preflight import check_bench

    check_bench(args)
    prompt_set = limit_per_category(load_prompt_set(args.set, args.set_format), args.limit_per_category)
    prompt_set = prompt_set.limit(args.limit)
    if prompt_set.issues:
        print(f"{len(prompt_set.issues)} rows of {prompt_set.source} were skipped or changed; see record.json")
    vlm_options = {
        "max_new_tokens": args.max_new_tokens,
        "max_retries": args.judge_retries,
        "image_format": args.image_format,
        "max_workers": args.judge_workers,
    }
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    judges = [
        build_judge(s, device=args.device, api_key=api_key, timeout=args.judge_timeout, **vlm_options)
        for s in args.judge
    ]
    judge = judges[0] if len(judges) == 1 else CompositeJudge(judges)
    pipe, generation = None, {}
    if args.model:
        from visalign.loading import load_generator

        pipe, generation = load_generator(
            args.model, lora=args.lora, lora_scale=args.lora_scale, device=args.device, dtype=args.dtype
        )
    elif args.lora:
        raise ValueError("--lora needs --model (the base the adapter was trained on); --images scores existing images")
    overrides = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "max_sequence_length": args.max_sequence_length,
    }
    generation |= {k: v for k, v in overrides.items() if v is not None}
    config = BenchConfig(
        args.out,
        args.images_per_prompt,
        args.seed,
        args.batch_size,
        args.allow_missing,
        "exclude" if args.errors == "abort" else args.errors,  # under abort no error verdict is ever counted
        args.bootstrap,
        args.grid_prompts,
        generation,
        abort_on_error=args.errors == "abort",
    )
    summary = run_bench(
        prompt_set,
        judge,
        config,
        pipe=pipe,
        images_dir=args.images,
        model_id=args.model or "",
        lora=args.lora,
        lora_scale=args.lora_scale,
        arguments=vars(args),
    )
    from visalign.benchmarks.report import overall_line

    coverage = summary["coverage"]
    if coverage["test_points"] and not coverage["judged"] and not coverage["errors"]:
        raise BenchError(
            f"every one of the {coverage['test_points']} test points was abstained by {judge.name}: nothing was "
            f"judged (reports in {args.out}). Use a judge that covers this prompt set's criteria (e.g. a VLM judge, "
            f"--judge openai:MODEL@URL), or add one after it: the first judge that does not abstain decides"
        )
    print(overall_line(summary["overall"]))
    if not summary["overall"]["complete"] and args.limit:
        print("--limit keeps the first prompts; --limit-per-category N keeps N per criterion, so Overall is reported")
    if summary["images"]["missing"]:
        print(f"{summary['images']['missing']} images were missing and are not scored")
    print(f"reports: {Path(args.out) / 'report.md'}, {Path(args.out) / 'report.html'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from visalign.benchmarks import report

    result = compare_runs(
        args.run_a,
        args.run_b,
        bootstrap=args.bootstrap,
        allow_judge_mismatch=args.allow_judge_mismatch,
        allow_different_settings=args.allow_different_settings,
        changed=args.changed,
    )
    md = report.compare_markdown(result, args.run_a, args.run_b)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        (out / "compare.md").write_text(md)
        primary = result["primary"]
        plot = (
            report.bar_plot(
                {"A": {k: c["a"] for k, c in primary.items()}, "B": {k: c["b"] for k, c in primary.items()}},
                title="Primary criteria, A vs B",
                ylabel="accuracy",
                ymax=1.0,
            )
            if primary
            else None
        )
        runs = [Path(args.run_a), Path(args.run_b)]
        records = [json.loads((run / "record.json").read_text()) for run in runs]
        sections = report.compare_sections(
            result,
            *[_read_jsonl(run / "verdicts.jsonl") for run in runs],
            *[rec["images_dir"] for rec in records],
            plot,
        )
        overall = next((line for line in md.splitlines() if line.startswith("Overall")), "")
        report.write_html_report(out / "compare.html", f"{args.run_b} vs {args.run_a}", sections, subtitle=overall)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from visalign.benchmarks.prompts import load_prompt_set, write_prompt_set

    prompt_set = load_prompt_set(args.source, args.set_format)
    write_prompt_set(prompt_set, args.output)
    print(f"wrote {len(prompt_set)} prompts to {args.output} ({len(prompt_set.issues)} rows skipped or changed)")
    return 0


def run(args: argparse.Namespace) -> int:
    from visalign.benchmarks import reward_eval

    commands = {"run": _run, "compare": _compare, "convert": _convert, "reward": reward_eval.run}
    return commands[args.bench_command](args)
