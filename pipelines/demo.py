"""`visalign demo`: train a LoRA on a shipped shapes-world generator on a CPU in a few minutes, and show base,
best-of-N at the same generator calls, and the aligned model side by side.

1. A recipe of `visalign train` (`METHODS`, the one registry; `--method`, default Flow-GRPO on the flow-matching
   `world:sd3`) is cut to `--max-steps` at its constant peak learning rate, with an EMA of the trained weights
   (what is evaluated and exported), and trained with its trainer (`from_config(config).train()`); its in-training
   evaluation on the demo's held-out slice (one image a prompt) gives the held-out accuracy curve.
2. The evaluation slice: the first `--per-category` held-out prompts of each category (never trained on), with
   `--images-per-prompt` = k images each; the world verifier is the judge (never the training reward's selection).
3. Base: k base images per prompt. Aligned: k images of the base plus the trained LoRA, same seeds. Best-of-N with
   N = k: the selection reward (`--reward`, the world's CLIP) picks one of the prompt's k base images. So all three
   spend the same k generator calls per evaluation prompt (best-of-N reuses the base's images).
4. `report.html` (accuracy table, per-category chart, the training reward and held-out accuracy curves, grids with
   verifier marks) and `summary.json` in `--out`.

This module lives in the pipelines layer because it drives trainers; the CLI names it in a string and imports it on
use, so the core never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# method -> its bundled world recipe (`configs/`), which the demo cuts to `--max-steps`
# (default `DEMO_STEPS`: the GRPO recipes' steps are 128 samples each, the others' at most 32)
DEMO_STEPS = {"flow-grpo": 30, "pref-grpo": 30, "tempflow-grpo": 30}
DEFAULT_STEPS = 120
RECIPES = {
    "tempflow-grpo": "world_tempflow_grpo",
    "flow-grpo": "world_flow_grpo",
    "pref-grpo": "world_pref_grpo",
    "diffusion-dpo": "world_dpo_sd3",
    "diffusion-dro": "world_dro",
    "prdp": "world_prdp",
}


def demo_methods() -> list[str]:
    """The methods of `visalign train` that align a generator (the reward trainer does not)."""
    from visalign.pipelines.train import METHODS

    return sorted(m for m in METHODS if m in RECIPES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="flow-grpo", help="the alignment method (a `visalign train` method)")
    parser.add_argument("--config", default=None, help="a recipe (YAML file or bundled name); default: the method's")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="optimizer steps of training (default: "
        + "".join(f"{steps} for {method}, " for method, steps in DEMO_STEPS.items())
        + f"{DEFAULT_STEPS} for the others)",
    )
    parser.add_argument("--out", default="visalign-demo", help="output folder for report.html and summary.json")
    parser.add_argument("--per-category", type=int, default=16, help="held-out prompts per category")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="k: images (generator calls) per prompt")
    parser.add_argument("--reward", default="world-clip", help="the reward that picks best-of-N")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)


def _config(args: argparse.Namespace, slice_file: Path, run_dir: Path) -> tuple[Any, str]:
    """The method's recipe with the demo's length, output folder and held-out slice (then the user's `--set`), and
    the recipe's world family, which a `pretrained_model_name_or_path` override must keep (a `ValueError` else)."""
    import dataclasses

    from visalign.config import config_from_dict, config_to_dict, load_config, parse_overrides
    from visalign.loading import check_world_family
    from visalign.pipelines.train import METHODS, _resolve, find_config

    cls = _resolve(METHODS[args.method][0])
    config = load_config(cls, find_config(args.config or RECIPES[args.method]))
    names = {f.name for f in dataclasses.fields(config)}
    steps = DEMO_STEPS.get(args.method, DEFAULT_STEPS) if args.max_steps is None else args.max_steps
    demo = {
        "output_dir": str(run_dir),
        "max_steps": steps,
        # a few steps at the recipe's peak rate: the GRPO recipes' cosine over 30 steps gained +0.9 on the demo's
        # slice against +7.7 at the constant rate (benchmarks/results/demo.json)
        "lr_scheduler": "constant",
        # evaluate and export the weights' EMA (Flow-GRPO's decay 0.9 with its ramp, updated every step of the short
        # run): +12.3 / +11.8 on the slice against +7.7 / +8.1 for the same run's last weights, though alike on the
        # whole protocol (+9.6 +- 1.1 against +9.9 +- 1.9; benchmarks/results/demo.json)
        "ema_decay": 0.9,
        "ema_update_every": 1,
        "save_steps": 0,
        "report_to": "none",
        "eval_prompts": str(slice_file),
        "eval_images_per_prompt": 1,
        "eval_batch_size": 16,
        "eval_steps": max(1, steps // 2),
        "eval_num_inference_steps": args.steps,
    }
    demo = {k: v for k, v in demo.items() if k in names}
    recipe_model = str(config.pretrained_model_name_or_path)
    kind, _, family = recipe_model.partition(":")
    if kind != "world" or not family:
        raise ValueError(f"the demo runs on a shapes-world model: the recipe's model is {recipe_model!r}")
    config = config_from_dict(cls, config_to_dict(config) | demo | parse_overrides(args.overrides))
    check_world_family(config.pretrained_model_name_or_path, family)
    return config, family


def run(args: argparse.Namespace) -> int:
    methods = demo_methods()
    if args.method not in methods:
        raise ValueError(f"`--method` {args.method!r} is not a method; choose one of: {', '.join(methods)}")
    if args.images_per_prompt < 1 or args.per_category < 1 or (args.max_steps is not None and args.max_steps < 1):
        raise ValueError("`--images-per-prompt`, `--per-category` and `--max-steps` must be at least 1")
    import torch

    from visalign import load_reward
    from visalign.loading import load_generator
    from visalign.pipelines.train import METHODS, _resolve
    from visalign.preflight import check_config
    from visalign.world.evaluate import accuracy, generate, heldout_prompts

    torch.set_num_threads(args.threads)
    start, cpu0 = time.time(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = heldout_prompts(args.per_category)
    slice_file = out / "heldout_slice.txt"
    slice_file.write_text("".join(p.text + "\n" for p in prompts))
    config, family = _config(args, slice_file, out / "run")
    model = str(config.pretrained_model_name_or_path)
    k = args.images_per_prompt
    print(
        f"visalign demo: {args.method} on {model}, {config.max_steps} steps; {len(prompts)} held-out "
        f"prompts x {k} images",
        file=sys.stderr,
    )

    check_config(config)
    trainer = _resolve(METHODS[args.method][1]).from_config(config)
    history = trainer.train() or []
    train_minutes = (time.time() - start) / 60

    slots = [p for p in prompts for _ in range(k)]
    texts = [p.text for p in slots]
    images = {}
    for name, lora in (("base", None), ("aligned", Path(config.output_dir) / "final")):
        pipe = load_generator(model, lora=lora)[0]
        pipe.set_progress_bar_config(disable=True)
        images[name] = generate(pipe, texts, seed=args.seed, num_inference_steps=args.steps, progress=False)
    reward = load_reward(args.reward)
    with torch.no_grad():
        scores = reward(images["base"], texts).score.view(len(prompts), k)
    picks = scores.argmax(1) + torch.arange(len(prompts)) * k
    images["best_of_n"] = images["base"][picks]
    results = {
        "base": accuracy(images["base"], slots),
        "best_of_n": accuracy(images["best_of_n"], prompts),
        "aligned": accuracy(images["aligned"], slots),
    }
    counts = {c: sum(p.category == c for p in prompts) for c in results["base"]["per_category"]}
    summary = {
        "method": args.method,
        "family": family,
        "model": model,
        "max_steps": config.max_steps,
        "selection": {"n": k, "reward": args.reward, "same_calls": f"{k} generator calls per evaluation prompt"},
        "slice": {"prompts": len(prompts), "images_per_prompt": k, "per_category": counts},
        **results,
        "gain": results["aligned"]["overall"] - results["base"]["overall"],
        "reward_curve": _curve(history, eval_=False),
        "heldout_curve": _curve(history, eval_=True),
        "wall_minutes": (time.time() - start) / 60,
        "train_wall_minutes": train_minutes,
        "cpu_minutes": time.process_time() / 60 - cpu0 / 60,
        "torch_threads": args.threads,
        "command": "visalign " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "visalign demo",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from visalign.html import write_html_report

    write_html_report(
        out / "report.html",
        f"visalign demo: {args.method} on a shapes-world generator",
        report_sections(summary, slots, images),
        subtitle=f"base vs best-of-{k} by {args.reward} vs {args.method}; judged by the world verifier",
    )
    print(
        f"held-out overall: base {results['base']['overall']:.3f}, best-of-{k} {results['best_of_n']['overall']:.3f},"
        f" {args.method} {results['aligned']['overall']:.3f} ({summary['wall_minutes']:.1f} min)"
    )
    print(f"report: {out / 'report.html'}\nsummary: {out / 'summary.json'}")
    return 0


def _curve(history: list[dict], eval_: bool) -> list[list[float]]:
    """`[step, value]` pairs from the run's history: the mean training reward (`reward/mean`), or the held-out slice
    accuracy (`eval/<judge>/overall`, GenEval's mean over categories) when `eval_`."""
    points = []
    for i, row in enumerate(history):
        keys = [
            key
            for key in row
            if (
                (key.startswith("eval/") and key.endswith("/overall") and key.count("/") == 2)
                if eval_
                else key in ("reward/mean", "reward")
            )
        ]
        if keys:
            points.append([float(row.get("step", i)), float(row[sorted(keys)[0]])])
    return points


def report_sections(summary: dict, slots: list, images: dict) -> list:
    """The accuracy table and chart, the two curves, and the grids (base, best-of-N, aligned) with verifier marks."""
    from visalign.html import GridCell, GridRow, Mark, Section, bar_plot, line_plot
    from visalign.world.verifier import verify

    names = {"base": "base", "best_of_n": f"best-of-{summary['selection']['n']}", "aligned": summary["method"]}
    counts = summary["slice"]["per_category"]
    rows = [[c, counts[c], *(f"{summary[n]['per_category'][c]:.3f}" for n in names)] for c in counts]
    total = sum(counts.values())
    rows.append(["overall (mean over categories)", total, *(f"{summary[n]['overall']:.3f}" for n in names)])
    table = Section(
        "Held-out verifier accuracy",
        [
            f"{summary['slice']['prompts']} held-out prompts x {summary['slice']['images_per_prompt']} images on "
            f"{summary['model']}; an image is correct when every clause of its prompt holds.",
            f"Same generator calls: each column spends {summary['selection']['same_calls']}; best-of-N picks one of "
            f"the base's images by {summary['selection']['reward']} (not the verifier). Training: {summary['method']}"
            f", {summary['max_steps']} steps, {summary['train_wall_minutes']:.1f} min.",
        ],
        ["category", "prompts", *names.values()],
        rows,
        bar_plot(
            {label: summary[n]["per_category"] for n, label in names.items()},
            title="Accuracy per category",
            ylabel="accuracy",
            ymax=1.0,
        ),
    )
    sections = [table]
    for key, title, ylabel in (
        ("reward_curve", "Training reward", "mean reward"),
        ("heldout_curve", "Held-out accuracy during training (slice, 1 image a prompt)", "accuracy"),
    ):
        if summary[key]:
            sections.append(
                Section(
                    title,
                    columns=["step", ylabel],
                    rows=[[int(s), f"{v:.3f}"] for s, v in summary[key]],
                    plot=line_plot(
                        {ylabel: [tuple(p) for p in summary[key]]}, title=title, xlabel="step", ylabel=ylabel
                    ),
                )
            )
    k = summary["slice"]["images_per_prompt"]

    def cell(name: str, i: int, prompt) -> GridCell:
        verdict = verify(images[name][i].numpy(), prompt)
        return GridCell(images[name][i], [Mark("verifier", verdict.correct, verdict.reason)])

    prompts = slots[::k]
    grid = [
        GridRow(p.text, [cell("base", j * k, p), cell("best_of_n", j, p), cell("aligned", j * k, p)], note=p.category)
        for j, p in enumerate(prompts)
    ]
    sections.append(Section("Before and after", grid=grid, grid_columns=list(names.values())))
    return sections
