"""`visalign bench`: the command line of the evaluation (run, compare, convert, reward).

    visalign bench run --set visalign-core --model PATH_OR_ID --judge openai:QwenVL@http://127.0.0.1:8000/v1 \\
        --out runs/base
    visalign bench run --set world:heldout --images DIR --judge world --out runs/world
    visalign bench run --set world:heldout --model world:sd --lora runs/dpo/final --judge world --out runs/dpo
    visalign bench compare runs/base runs/aligned --out runs/base-vs-aligned   # refuses different settings
    visalign bench convert test_prompts_en.csv ugb_en.jsonl

`run` generates (`--model`) or reads (`--images`) the images of a prompt set, judges them and writes the reports
(`visalign.benchmarks.runner.run_bench`; the protocol is in `visalign.benchmarks.run_folder`); `compare` reports
run B against run A (`compare_runs`); `convert` writes a prompt set in visalign's JSONL format; `reward` measures a
reward model's pairwise accuracy and calibration (`visalign.benchmarks.reward_eval`). Model and judge libraries are
imported inside the handlers, so `visalign bench --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from visalign.benchmarks.run_folder import BenchError, read_jsonl
from visalign.benchmarks.runner import BenchConfig, compare_runs, run_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visalign.benchmarks import reward_eval  # numpy only at import: `--help` stays fast
    from visalign.benchmarks.prompts import FORMATS  # stdlib and numpy only: `--help` stays fast

    sub = parser.add_subparsers(dest="bench_command", metavar="{run,compare,convert,reward}", required=True)
    r = sub.add_parser("run", help="generate or read images, judge them, write the reports")
    r.add_argument(
        "--set", required=True, help="a built-in set (visalign-core, geneval, world:heldout, ...) or a prompt file"
    )
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
    r.add_argument(
        "--lora",
        default=None,
        help="a run's output_dir/final (its LoRA or its fully fine-tuned denoiser) loaded into --model",
    )
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
    from visalign.html import bar_plot, write_html_report

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
            bar_plot(
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
            *[read_jsonl(run / "verdicts.jsonl") for run in runs],
            *[rec["images_dir"] for rec in records],
            plot,
        )
        overall = next((line for line in md.splitlines() if line.startswith("Overall")), "")
        write_html_report(out / "compare.html", f"{args.run_b} vs {args.run_a}", sections, subtitle=overall)
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
