r"""Efficacy per CPU-minute: held-out accuracy of the world GRPO recipes against the CPU minutes spent training.

    python benchmarks/world_efficacy.py --run flow-grpo=runs/world_flow_grpo \
        --run tempflow-grpo=runs/world_tempflow_grpo [--train] [--set key=value ...]

Reads each run folder's `metrics.jsonl`: every evaluation row the run loop logs (`visalign.lifecycle`) carries the
held-out verifier accuracy on the world protocol (`eval/world-verifier/overall`, GenEval's mean over its six
categories, and `.../overall/<category>`) and the CPU and wall minutes spent in training steps so far
(`time/train_cpu_minutes`, `time/train_wall_minutes`; evaluations excluded). The step-0 row is the base. With
`--train` each method is first trained with its world recipe (`RECIPES`, `visalign train` in-process) into its
folder. Writes `benchmarks/results/world_efficacy.json` (per method: the curve, base, best and final gain in points,
the CPU minutes at which the gain first reaches the goal's points, whether the goal is met, the run's command) and
`world_efficacy.html` beside it (the curves against CPU minutes with the goal marked, and the tables).

The issue's goal: +15 points within 15 CPU minutes. The first crossing is read at the evaluations, so it is an upper
bound: the model may have crossed between two of them. CPU minutes count every thread of the process
(`time.process_time`), so they compare across thread counts; wall minutes do not.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

GOAL_POINTS = 15.0
GOAL_CPU_MINUTES = 15.0
GOAL = f"+{GOAL_POINTS:g} points within {GOAL_CPU_MINUTES:g} CPU minutes"
OVERALL = "eval/world-verifier/overall"  # the world verifier's GenEval overall (mean over categories), in [0, 1]
CPU, WALL = "time/train_cpu_minutes", "time/train_wall_minutes"
# the verifier's score of an iteration's samples (training prompts): Pref-GRPO logs it as its external reward (its
# own, a win rate, has mean 0.5 by construction); the other recipes train on it
REWARDS = ("external/world-verifier", "reward/mean")
RECIPES = {"flow-grpo": "configs/world_flow_grpo.yaml", "tempflow-grpo": "configs/world_tempflow_grpo.yaml"}
SETTINGS = (
    "pretrained_model_name_or_path",
    "seed",
    "max_steps",
    "eval_steps",
    "learning_rate",
    "eval_prompts",
    "eval_images_per_prompt",
    "eval_num_inference_steps",
    "eval_guidance_scale",
)  # the last four are the evaluation protocol, which runs must share to be compared
RESULTS = Path(__file__).resolve().parent / "results"


def read_curve(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluation rows of `run_dir/metrics.jsonl` as `[{step, train_cpu_minutes, train_wall_minutes, overall,
    per_category, train_reward}]` in step order (`overall` and categories in [0, 1]; a step logged twice keeps its
    last row). `train_reward` is the mean training reward of the steps since the previous evaluation, the verifier's
    score of the samples (`REWARDS`; None at step 0 and where none was logged): a flat one beside a flat held-out
    accuracy says the policy did not learn, a rising one beside a flat accuracy that it learned the training prompts
    only.

    Raises `ValueError` naming the folder when `metrics.jsonl` is missing or unreadable, has no evaluation row with
    `eval/world-verifier/overall`, lacks the training-time keys on an evaluation row, or has no step-0 (base) row.
    """
    from visalign.benchmarks.run_folder import read_jsonl

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run folder {run_dir}: no metrics.jsonl (not a training run's folder, or not started)")
    logged = read_jsonl(path)
    rows = {int(row["step"]): row for row in logged if OVERALL in row}
    if not rows:
        raise ValueError(
            f"run folder {run_dir}: metrics.jsonl has no evaluation row with `{OVERALL}`; train with "
            "eval_prompts=world:heldout and reward or eval_reward world-verifier"
        )
    untimed = [step for step, row in rows.items() if CPU not in row or WALL not in row]
    if untimed:
        raise ValueError(
            f"run folder {run_dir}: the evaluation rows at steps {sorted(untimed)} of metrics.jsonl lack `{CPU}` and "
            f"`{WALL}` (a run made before the run loop recorded training time); train it again, e.g. with --train"
        )
    if 0 not in rows:
        raise ValueError(f"run folder {run_dir}: metrics.jsonl has no step-0 evaluation, the base to gain over")
    prefix = OVERALL + "/"
    key = next((k for k in REWARDS if any(k in row for row in logged)), None)
    trained = {int(row["step"]): float(row[key]) for row in logged if key in row}
    curve, previous = [], None
    for step, row in sorted(rows.items()):
        window = [r for s, r in trained.items() if previous is not None and previous < s <= step]
        previous = step
        curve.append(
            {
                "step": step,
                "train_cpu_minutes": float(row[CPU]),
                "train_wall_minutes": float(row[WALL]),
                "overall": float(row[OVERALL]),
                "per_category": {k.removeprefix(prefix): float(v) for k, v in row.items() if k.startswith(prefix)},
                "train_reward": sum(window) / len(window) if window else None,
            }
        )
    return curve


def efficacy(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """Base, best and final gain in points (100 x accuracy difference from step 0), and the train CPU minutes of the
    first evaluation whose gain reaches `GOAL_POINTS` (None if none does); the goal is met when that is at most
    `GOAL_CPU_MINUTES`."""
    if len(curve) < 2:
        raise ValueError(
            f"`curve` needs the base and at least one later evaluation, got steps {[p['step'] for p in curve]}"
        )
    base, later = curve[0], curve[1:]
    gain = lambda p: round(100 * (p["overall"] - base["overall"]), 6)  # noqa: E731  (rounded: 0.45-0.30 is 15)
    best = max(later, key=gain)
    crossing = next((p for p in later if gain(p) >= GOAL_POINTS), None)
    minutes = None if crossing is None else crossing["train_cpu_minutes"]
    return {
        "base": {"overall": base["overall"], "per_category": base["per_category"]},
        "best_gain_points": gain(best),
        "best_step": best["step"],
        "best_train_cpu_minutes": best["train_cpu_minutes"],
        "final_gain_points": gain(later[-1]),
        "final_step": later[-1]["step"],
        "final_train_cpu_minutes": later[-1]["train_cpu_minutes"],
        "final_train_wall_minutes": later[-1]["train_wall_minutes"],
        "goal_cpu_minutes": minutes,
        "goal_step": None if crossing is None else crossing["step"],
        "goal": GOAL,
        "goal_met": minutes is not None and minutes <= GOAL_CPU_MINUTES,
    }


def method_record(run_dir: str | Path) -> dict[str, Any]:
    """One method's entry of the results: its run folder's curve and `efficacy`, with the command that made the run
    and its settings from `run.json`."""
    run_dir = Path(run_dir)
    curve = read_curve(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise ValueError(f"run folder {run_dir}: no run.json (the command and settings of the run)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    try:
        settings = {k: record["config"][k] for k in SETTINGS}
        head = {"run_dir": str(run_dir), "command": record["command"], "status": record["status"]}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{record_path}: not a training run's record (no {error})") from None
    if len(curve) < 2:
        raise ValueError(
            f"run folder {run_dir}: only the step-0 evaluation so far; the next comes at step {settings['eval_steps']}"
        )
    return head | {"settings": settings, **efficacy(curve), "curve": curve}


def train(method: str, run_dir: str, overrides: list[str]) -> str:
    """Train `method` with its world recipe into `run_dir` through `visalign train` (in-process, as
    `benchmarks/world_alignment.py` does) and return that command; a failure raises naming the method."""
    from visalign.cli import main as visalign_main

    argv = ["train", method, "--config", RECIPES[method], "--set", f"output_dir={run_dir}", *overrides]
    command = f"visalign {shlex.join(argv)}"
    if visalign_main(argv):
        raise RuntimeError(f"{method}: `{command}` failed (see its error above)")
    return command


def report_sections(result: dict[str, Any]) -> list:
    """The summary table, the curves against train CPU minutes with the goal marked, every evaluation, the
    commands (`visalign.html` escapes every string)."""
    from visalign.html import Section, line_plot

    methods = result["methods"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    minutes = lambda v: "not reached" if v is None else f"{v:.1f}"  # noqa: E731
    summary = Section(
        "Summary",
        [
            f"Goal: {GOAL} over the base (step 0). Held-out accuracy: {result['protocol']}. Train minutes exclude "
            "evaluations; the first crossing is read at the evaluations, so it is an upper bound.",
        ],
        [
            "method",
            "base",
            "best gain (points)",
            "at step",
            "final gain (points)",
            "train CPU-min",
            "train wall-min",
            f"CPU-min to +{GOAL_POINTS:g}",
            "goal met",
            "run",
        ],
        [
            [
                name,
                pct(m["base"]["overall"]),
                f"{m['best_gain_points']:+.1f}",
                m["best_step"],
                f"{m['final_gain_points']:+.1f}",
                f"{m['final_train_cpu_minutes']:.1f}",
                f"{m['final_train_wall_minutes']:.1f}",
                minutes(m["goal_cpu_minutes"]),
                "yes" if m["goal_met"] else "no",
                m["status"] or "",
            ]
            for name, m in methods.items()
        ],
    )
    bases = sorted({round(100 * m["base"]["overall"], 1) for m in methods.values()})
    goal_markers = [
        (GOAL_CPU_MINUTES, b + GOAL_POINTS, f"goal: {b + GOAL_POINTS:.1f}% at {GOAL_CPU_MINUTES:g} CPU-min")
        for b in bases
    ]
    plot = Section(
        "Held-out accuracy against training CPU minutes",
        [
            "One line per method through its evaluations; the diamond marks the goal (base + "
            f"{GOAL_POINTS:g} points at {GOAL_CPU_MINUTES:g} CPU minutes): a line above and left of it meets the goal."
        ],
        plot=line_plot(
            {name: [(p["train_cpu_minutes"], 100 * p["overall"]) for p in m["curve"]] for name, m in methods.items()},
            title="World held-out accuracy vs training CPU minutes",
            xlabel="training CPU minutes",
            ylabel="held-out overall (%)",
            markers=goal_markers,
        ),
    )
    categories = list(dict.fromkeys(c for m in methods.values() for p in m["curve"] for c in p["per_category"]))
    evaluations = Section(
        "Every evaluation",
        columns=[
            "method",
            "step",
            "train CPU-min",
            "train wall-min",
            "training reward",
            "overall",
            "gain (points)",
            *categories,
        ],
        rows=[
            [
                name,
                p["step"],
                f"{p['train_cpu_minutes']:.2f}",
                f"{p['train_wall_minutes']:.2f}",
                "" if p["train_reward"] is None else f"{p['train_reward']:.3f}",
                pct(p["overall"]),
                f"{100 * (p['overall'] - m['base']['overall']):+.1f}",
                *(pct(p["per_category"][c]) if c in p["per_category"] else "" for c in categories),
            ]
            for name, m in methods.items()
            for p in m["curve"]
        ],
    )
    commands = Section(
        "Commands",
        [f"this report: {result['command']}"]
        + [f"{name} run ({m['run_dir']}): {m['train_command'] or m['command']}" for name, m in methods.items()],
    )
    return [summary, plot, evaluations, commands]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="METHOD=DIR", help="a method's run folder")
    parser.add_argument("--train", action="store_true", help="train each method with its world recipe first")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for --train"
    )
    parser.add_argument("--out", default=str(RESULTS / "world_efficacy.json"), help="the JSON; the HTML goes beside")
    args = parser.parse_args(argv)
    runs: dict[str, str] = {}
    for item in args.run:
        method, sep, folder = item.partition("=")
        if not sep or not method or not folder or method in runs:
            parser.error(f"--run {item!r}: expected a new METHOD=DIR")
        if args.train and method not in RECIPES:
            parser.error(f"--run {item!r}: --train knows the world recipes of {sorted(RECIPES)}")
        runs[method] = folder
    if args.overrides and not args.train:
        parser.error("--set overrides the recipes of --train; without --train the runs are read as they are")
    trained = {method: train(method, folder, args.overrides) for method, folder in runs.items() if args.train}
    methods = {
        method: method_record(folder) | {"train_command": trained.get(method)} for method, folder in runs.items()
    }
    protocol = {name: tuple(m["settings"][k] for k in SETTINGS[-4:]) for name, m in methods.items()}
    if len(set(protocol.values())) > 1:
        raise ValueError(f"the runs were evaluated differently, so their curves do not compare: {protocol}")
    settings = next(iter(methods.values()))["settings"]
    images = settings["eval_images_per_prompt"]
    result = {
        "command": "python benchmarks/world_efficacy.py " + shlex.join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "goal": GOAL,
        "protocol": (
            f"{settings['eval_prompts']}, {images} image{'s' * (images != 1)} per prompt, "
            f"{settings['eval_num_inference_steps']} steps, CFG {settings['eval_guidance_scale']:g}; overall is the "
            "verifier's mean over the six categories, in [0, 1]; gains in points (100 x difference from step 0)"
        ),
        "methods": methods,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    from visalign.html import write_html_report

    page = write_html_report(
        out.with_suffix(".html"),
        "Efficacy per CPU-minute on the shapes world",
        report_sections(result),
        subtitle=f"held-out verifier accuracy against training CPU minutes; goal {GOAL}",
    )
    for name, m in methods.items():
        reached = "not reached" if m["goal_cpu_minutes"] is None else f"{m['goal_cpu_minutes']:.1f} CPU-min"
        print(
            f"{name}: base {100 * m['base']['overall']:.1f}%, best {m['best_gain_points']:+.1f} points, final "
            f"{m['final_gain_points']:+.1f} after {m['final_train_cpu_minutes']:.1f} CPU-min; +{GOAL_POINTS:g} "
            f"{reached}; goal {'met' if m['goal_met'] else 'not met'} ({m['status']})"
        )
    print(f"wrote {out} and {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
