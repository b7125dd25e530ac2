"""A bench run and a comparison of two: generate (or read) the images, judge them, score them, write the reports.

`run_bench(prompt_set, judge, config, pipe=... | images_dir=...)` fills a run folder (`visalign.benchmarks.run_folder`:
images by the seed protocol, cached verdicts), scores it (`visalign.benchmarks.scoring`) and writes the reports
(`visalign.benchmarks.report`); `compare_runs(run_a, run_b)` compares two run folders. The command line
(`visalign bench run|compare|convert|reward`) is `visalign.benchmarks.cli`.

Scoring refuses to run when images are missing unless `allow_missing` (`--allow-missing`) is set; the summary then
says how many were missing. The run folder holds `record.json` (prompt-file hash, model and LoRA, the exact
generation settings: call arguments, scheduler, dtype, seeds; judge settings, versions), `images/` (when
generated), `verdicts.jsonl`, `summary.json`, `report.md` and `report.html`. `compare` refuses two runs whose
generation settings differ unless told `allow_different_settings`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visalign.benchmarks.run_folder import (
    MissingImagesError,
    check_generation_settings,
    collect_images,
    generate_images,
    judge_images,
    read_jsonl,
)

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
    from visalign.benchmarks import report, scoring
    from visalign.files import run_record, write_run_record
    from visalign.html import write_html_report

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
        check_generation_settings(images_dir, {"model": model_id, "lora": lora, "lora_scale": lora_scale} | settings)
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
    seeds = [config.seed + j for j in range(config.images_per_prompt)] if pipe is not None else None
    inputs = {"prompt_set": prompt_set.source, "model": model_id or None, "lora": lora}
    inputs["images"] = str(images_dir) if pipe is None else None  # judged, not generated: an input
    record = run_record(config=asdict(config), seeds=seeds, inputs=inputs) | {
        "arguments": arguments,
        "prompt_set": prompt_set.record(),
        "model": model_id,
        "lora": {"path": lora, "scale": lora_scale} if lora else None,
        "settings": settings,
        "images_dir": str(images_dir),
        "images_per_prompt": config.images_per_prompt,
        "seed_rule": "image j of every prompt: torch.Generator('cpu').manual_seed(seed + j)"
        if pipe is not None
        else "unknown (existing images)",
        "generation": config.generation,
        "generated": generated,
        "missing_images": {"count": len(missing), "names": missing[:100]},
        "judge": {"name": judge.name, "fingerprint": judge.fingerprint(), "settings": judge.settings()},
    }
    write_run_record(out / "record.json", record)
    records = judge_images(
        judge, items, paths, out / "verdicts.jsonl", config.batch_size, abort_on_error=config.abort_on_error
    )
    summary = scoring.aggregate(
        records,
        prompt_set.primary_criteria,
        errors=config.errors,
        bootstrap=config.bootstrap,
        missing_images=len(missing),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    title = f"{prompt_set.name}: {model_id or images_dir}"
    (out / "report.md").write_text(report.summary_markdown(summary, title, record))
    write_html_report(
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
    from visalign.benchmarks import scoring

    runs = []
    for run in (Path(run_a), Path(run_b)):
        if not (run / "record.json").is_file() or not (run / "verdicts.jsonl").is_file():
            raise FileNotFoundError(f"{run} is not a bench run folder (record.json and verdicts.jsonl expected)")
        runs.append((json.loads((run / "record.json").read_text()), read_jsonl(run / "verdicts.jsonl")))
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
    result = scoring.compare(
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
        "changed_prompts": scoring.changed_prompts(a, b, changed, errors=rec_a["config"]["errors"]),
    }
