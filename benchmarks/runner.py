"""`visalign bench`: generate (or read) the images of a prompt set, judge them, and write the reports.

    visalign bench run --set visalign-core --model PATH_OR_ID --judge openai:QwenVL@http://127.0.0.1:8000/v1 \\
        --out runs/base
    visalign bench run --set world-heldout --images DIR --judge world --out runs/world
    visalign bench compare runs/base runs/aligned --out runs/base-vs-aligned
    visalign bench convert test_prompts_en.csv ugb_en.jsonl

Protocol (UniGenBench's): `images_per_prompt` images per prompt (default 4) named `{prompt_id}_{image_id}.png`;
image j of every prompt is generated from a CPU `torch.Generator` seeded `seed + j` (default seed 3407, as in
UniGenBench's reference script), so an image depends only on its prompt and index, never on batching or on which
images already exist. Images are written under a temporary name and renamed, so an interrupted run leaves only whole
files, and a rerun generates only the missing ones. Judgments are cached the same way in `verdicts.jsonl`, one
line per image, and reused when the image's sha256, the prompt and the judge's fingerprint are unchanged.

Scoring refuses to run when images are missing unless `allow_missing` (`--allow-missing`) is set; the summary then
says how many were missing. The run folder holds `record.json` (prompt-file hash, model, seeds, judge settings,
versions), `images/` (when generated), `verdicts.jsonl`, `summary.json`, `report.md` and `report.html`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
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
    errors: str = field(default="fail", metadata={"help": "judge errors: 'fail' counts them wrong, 'exclude' drops"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap replicates for the 95% intervals (0 = none)"})
    max_grid_prompts: int = field(default=100, metadata={"help": "prompts shown in the HTML image grid"})
    generation: dict = field(default_factory=dict, metadata={"help": "extra pipeline call arguments"})

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
    """An image file as a float tensor `[3, H, W]` in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


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
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + j) for _, j in chunk]
        with torch.no_grad():
            out = pipe(
                prompt=[item.text for item, _ in chunk], generator=generators, output_type="pt", **(generation or {})
            ).images
        for (item, j), pixels in zip(chunk, out):
            save_png(pixels, image_dir / image_name(item.id, j))
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
    """The records of a JSONL file ([] if absent); a line that does not parse is an error, or skipped."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if not skip_broken:
                raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
            logger.warning("%s: dropping line %d, which does not parse (cut short?)", path, n)
    return out


def judge_images(
    judge: Any,
    items: Sequence[Any],
    paths: dict[tuple[str, int], Path],
    verdicts_path: str | Path,
    batch_size: int = 4,
) -> list[dict]:
    """Per-image records for every image in `paths`, reusing valid lines of `verdicts_path` and appending new ones.

    A cached line is valid when the image's sha256, the prompt item (its hash) and the judge's fingerprint are
    unchanged; the file is first rewritten with the valid lines only (a line cut short by a kill is dropped).
    """
    from visalign.benchmarks.judges import Sample

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
            samples = [Sample(item, j, load_pixels(paths[(item.id, j)])) for item, j in chunk]
            for (item, j), result in zip(chunk, judge.judge(samples)):
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
    arguments: dict | None = None,
) -> dict:
    """Generate with `pipe` (into `out_dir/images`) or read `images_dir`, judge, aggregate, write every output.

    Returns the summary. Raises `MissingImagesError` when images are missing and `config.allow_missing` is off.
    """
    from visalign.benchmarks import report

    if (pipe is None) == (images_dir is None):
        raise ValueError("give exactly one of `pipe` (generate) and `images_dir` (existing images)")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = prompt_set.items
    generated = None
    if pipe is not None:
        images_dir = out / "images"
        _check_generation_settings(images_dir, {"model": model_id, "seed": config.seed, "call": config.generation})
        generated = generate_images(
            pipe,
            items,
            images_dir,
            images_per_prompt=config.images_per_prompt,
            seed=config.seed,
            batch_size=config.batch_size,
            generation=config.generation,
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
    records = judge_images(judge, items, paths, out / "verdicts.jsonl", config.batch_size)
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


def compare_runs(
    run_a: str | Path, run_b: str | Path, *, bootstrap: int = 1000, allow_judge_mismatch: bool = False
) -> dict:
    """Per-criterion deltas B - A of two run folders, with paired bootstrap intervals over shared prompts."""
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
    result = report.compare(
        a, b, rec_a["prompt_set"]["primary_criteria"], errors=rec_a["config"]["errors"], bootstrap=bootstrap
    )
    return result | {
        "runs": {"a": str(run_a), "b": str(run_b)},
        "judges_match": rec_a["judge"]["fingerprint"] == rec_b["judge"]["fingerprint"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visalign.benchmarks import reward_eval  # numpy only at import: `--help` stays fast
    from visalign.benchmarks.prompts import FORMATS  # stdlib and numpy only: `--help` stays fast

    sub = parser.add_subparsers(dest="bench_command", metavar="{run,compare,convert,reward}", required=True)
    r = sub.add_parser("run", help="generate or read images, judge them, write the reports")
    r.add_argument("--set", required=True, help="visalign-core, world-heldout, or a prompt file")
    r.add_argument("--set-format", choices=FORMATS, default=None, help="prompt file format (default: guessed)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers pipeline folder or hub id to generate with")
    src.add_argument("--images", help="folder of existing images named {prompt_id}_{image_id}.png")
    r.add_argument(
        "--judge",
        action="append",
        required=True,
        metavar="SPEC",
        help="world | rules:world | reward:NAME@THRESHOLD | vlm:PATH | openai:MODEL@URL | replay:FILE; "
        "repeat to route: the first judge that does not abstain decides each test point",
    )
    r.add_argument("--out", required=True, help="run folder")
    r.add_argument("--images-per-prompt", type=int, default=4)
    r.add_argument("--seed", type=int, default=3407, help="image j of every prompt uses seed + j")
    r.add_argument("--batch-size", type=int, default=4, help="images per generation and judging batch")
    r.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    r.add_argument("--allow-missing", action="store_true", help="score the images present when some are missing")
    r.add_argument("--errors", choices=("fail", "exclude"), default="fail", help="how judge errors count")
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0 = no intervals)")
    r.add_argument("--grid-prompts", type=int, default=100, help="prompts shown in the HTML image grid")
    r.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    r.add_argument("--num-inference-steps", type=int, default=None)
    r.add_argument("--guidance-scale", type=float, default=None)
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--max-new-tokens", type=int, default=1024, help="VLM judge answer limit")
    r.add_argument("--judge-retries", type=int, default=0, help="VLM judge: extra attempts after a bad answer")
    r.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="VLM judge: image encoding")
    r.add_argument("--judge-workers", type=int, default=1, help="server VLM judge: requests in flight at once")
    r.add_argument("--api-key-env", default=None, help="openai judge: environment variable holding the API key")
    c = sub.add_parser("compare", help="per-criterion deltas between two runs (B - A) with paired intervals")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", default=None, help="folder for compare.json, compare.md and compare.html")
    c.add_argument("--bootstrap", type=int, default=1000)
    c.add_argument("--allow-judge-mismatch", action="store_true", help="compare runs scored by different judges")
    v = sub.add_parser("convert", help="write a prompt set in visalign's JSONL format")
    v.add_argument("source", help="a built-in set name or a prompt file")
    v.add_argument("output")
    v.add_argument("--set-format", choices=FORMATS, default=None, help="prompt file format (default: guessed)")
    reward_eval.add_arguments(sub.add_parser("reward", help="pairwise accuracy and calibration of a reward model"))


def _load_generator(model: str, device: str | None, dtype: str | None) -> tuple[Any, dict]:
    """A diffusers pipeline and its generation defaults (`visalign_world.json` beside a world model)."""
    import torch
    from diffusers import DiffusionPipeline

    options: dict[str, Any] = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    folder = Path(model)
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    if index.get("text_encoder_3", [None])[0] is None and index.get("_class_name") == "StableDiffusion3Pipeline":
        options.update(text_encoder_3=None, tokenizer_3=None)  # an SD3 folder saved without T5
    pipe = DiffusionPipeline.from_pretrained(model, **options)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    meta = folder / "visalign_world.json"
    return pipe, (json.loads(meta.read_text())["generation"] if meta.is_file() else {})


def _run(args: argparse.Namespace) -> int:
    from visalign.benchmarks.judges import CompositeJudge, build_judge
    from visalign.benchmarks.prompts import load_prompt_set

    prompt_set = load_prompt_set(args.set, args.set_format).limit(args.limit)
    if prompt_set.issues:
        print(f"{len(prompt_set.issues)} rows of {prompt_set.source} were skipped or changed; see record.json")
    vlm_options = {
        "max_new_tokens": args.max_new_tokens,
        "max_retries": args.judge_retries,
        "image_format": args.image_format,
        "max_workers": args.judge_workers,
    }
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    judges = [build_judge(s, device=args.device, api_key=api_key, **vlm_options) for s in args.judge]
    judge = judges[0] if len(judges) == 1 else CompositeJudge(judges)
    pipe, generation = None, {}
    if args.model:
        pipe, generation = _load_generator(args.model, args.device, args.dtype)
    overrides = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
    }
    generation |= {k: v for k, v in overrides.items() if v is not None}
    config = BenchConfig(
        args.out,
        args.images_per_prompt,
        args.seed,
        args.batch_size,
        args.allow_missing,
        args.errors,
        args.bootstrap,
        args.grid_prompts,
        generation,
    )
    try:
        summary = run_bench(
            prompt_set,
            judge,
            config,
            pipe=pipe,
            images_dir=args.images,
            model_id=args.model or "",
            arguments=vars(args),
        )
    except BenchError as e:
        print(f"visalign bench run: {e}", file=sys.stderr)
        return 2
    from visalign.benchmarks.report import overall_line

    print(overall_line(summary["overall"]))
    if summary["images"]["missing"]:
        print(f"{summary['images']['missing']} images were missing and are not scored")
    print(f"reports: {Path(args.out) / 'report.md'}, {Path(args.out) / 'report.html'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from visalign.benchmarks import report

    try:
        result = compare_runs(
            args.run_a, args.run_b, bootstrap=args.bootstrap, allow_judge_mismatch=args.allow_judge_mismatch
        )
    except ValueError as e:
        print(f"visalign bench compare: {e}", file=sys.stderr)
        return 2
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
        sections = [
            report.Section(
                heading,
                (),
                report.COMPARE_HEADER,
                report.compare_rows(result[kind]),
                plot if kind == "primary" else None,
            )
            for kind, heading in (("primary", "Primary criteria"), ("sub", "Sub-criteria"), ("theme", "Themes"))
            if result[kind]
        ]
        report.write_html_report(
            out / "compare.html", f"{args.run_b} vs {args.run_a}", sections, subtitle=md.splitlines()[2]
        )
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
