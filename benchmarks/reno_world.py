"""ReNO on the shapes world: held-out verifier accuracy of the base model, best-of-N and ReNO at equal generator calls.

For each held-out prompt (and each of `--images-per-prompt` seeds), with the world generator at a few steps:

- `base`: the base model's sample from the seed's noise (ReNO's first iterate).
- `best_of_n[R]`: the best of N noises by reward R, N = the generator calls of ReNO (candidate 0 is the base noise).
- `reno[R]`: ReNO on reward R (SGD, the reference's defaults unless overridden), the best iterate by R.

R is `world-clip` alone and a composite `world-clip + w * world-defects`. Images are judged by the world verifier
(GenEval protocol: an image is correct when every clause of its prompt holds; a category's accuracy is the mean
over its images, `overall` the mean over categories), which none of the methods sees. `base_default` is the base
model with its own sampling defaults (20 steps) on the same seeds, for reference. CPU minutes are the process's CPU
time per method (all threads).

    python benchmarks/reno_world.py --family sd     # writes benchmarks/results/reno_world.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

RESULT = Path(__file__).resolve().parent / "results" / "reno_world.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd", "sd3"), default="sd")
    parser.add_argument("--model", default=None, help="generator folder (default: the shipped world model)")
    parser.add_argument("--clip", default=None, help="world CLIP folder (default: the shipped one)")
    parser.add_argument("--per-category", type=int, default=6, help="held-out prompts per category (spread out)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts optimized together")
    parser.add_argument("--defects-weight", type=float, default=10.0, help="w of world-defects in the composite")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ReNOConfig overrides")
    parser.add_argument("--output", default=str(RESULT))
    return parser.parse_args(argv)


def spread(prompts: list, per_category: int) -> list:
    """`per_category` prompts of each category, evenly spaced through the held-out file (which lists similar
    prompts together, so its first few of a category are all about one shape)."""
    out = []
    for category in dict.fromkeys(p.category for p in prompts):
        pool = [p for p in prompts if p.category == category]
        k = min(per_category, len(pool))
        out += [pool[i * len(pool) // k] for i in range(k)]
    return out


def save_grid(images_by_method: dict, texts: list[str], path: Path, columns: int) -> None:
    """A PNG grid: one row per method, `columns` samples spread over the prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [i * len(texts) // columns for i in range(columns)]
    rows = len(images_by_method)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.7 * rows + 0.6), squeeze=False)
    for r, (name, images) in enumerate(images_by_method.items()):
        for c, i in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(texts[i], fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from visalign.config import config_from_dict, parse_overrides
    from visalign.loading import load_generator
    from visalign.pipelines.reno import ReNO, ReNOConfig, pipeline_kwargs
    from visalign.reward_models.compose import RewardPart
    from visalign.rewards import load_reward
    from visalign.world.evaluate import accuracy, generate, heldout_prompts
    from visalign.world.verifier import verify

    torch.set_num_threads(args.threads)
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 32, "width": 32}
    config = config_from_dict(ReNOConfig, defaults | parse_overrides(args.set))
    pipe, defaults = load_generator(args.model or f"world:{args.family}", device="cpu", dtype=torch.float32)
    call_kwargs = pipeline_kwargs(defaults)
    pipe.set_progress_bar_config(disable=True)
    clip = load_reward("world-clip", args.clip)
    defects = load_reward("world-defects")
    objectives = {
        "world-clip": [RewardPart(clip, 1.0, name="world-clip")],
        f"world-clip+{args.defects_weight:g}*world-defects": [
            RewardPart(clip, 1.0, name="world-clip"),
            RewardPart(defects, args.defects_weight, name="world-defects"),
        ],
    }
    prompts = [p for p in spread(heldout_prompts(), args.per_category) for _ in range(args.images_per_prompt)]
    texts = [p.text for p in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    chunks = [range(i, min(i + args.batch_size, len(texts))) for i in range(0, len(texts), args.batch_size)]

    def measure(name: str, run) -> dict[str, Any]:
        start, cpu = time.time(), time.process_time()
        images = torch.cat([run([texts[i] for i in c], [seeds[i] for i in c]) for c in chunks])
        with torch.no_grad():
            clip_score = clip.score(images, texts).score.mean().item()
        images_by_method[name] = images
        correct = [int(verify(image, p).correct) for image, p in zip(images.numpy(), prompts)]
        row = {
            "method": name,
            **accuracy(images, prompts),
            "image_accuracy": sum(correct) / len(correct),
            "correct": correct,
            "mean_world_clip": clip_score,
            "cpu_minutes": (time.process_time() - cpu) / 60,
            "wall_minutes": (time.time() - start) / 60,
        }
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_category", "correct")}), flush=True)
        return row

    images_by_method: dict[str, torch.Tensor] = {}
    rows = [measure("base_default", lambda t, s: generate(pipe, t, seed=s[0], batch_size=len(t), progress=False))]
    for label, parts in objectives.items():
        reno = ReNO(pipe, parts, config, call_kwargs)
        if not rows[1:]:  # the few-step base model: one render of each seed's noise
            with torch.no_grad():
                rows.append(measure("base", lambda t, s, reno=reno: reno.render(reno.initial_noise(s), t, s)))
        outputs = []

        def optimize(t: list[str], s: list[int], reno=reno, outputs=outputs) -> torch.Tensor:
            outputs.append(reno(t, seed=s, progress=True))
            return outputs[-1].images

        row = measure(f"reno[{label}]", optimize)
        calls = outputs[0].generator_calls
        row["generator_calls"] = calls
        row["mean_objective_initial"] = torch.cat([o.initial_reward for o in outputs]).mean().item()
        row["mean_objective_best"] = torch.cat([o.reward for o in outputs]).mean().item()
        best = measure(f"best_of_n[{label}]", lambda t, s, reno=reno, n=calls: reno.best_of_n(t, n, seed=s).images)
        best["generator_calls"] = calls
        rows += [best, row]
    by_name = {r["method"]: r["correct"] for r in rows}
    paired = {}
    for label in objectives:
        ours = by_name[f"reno[{label}]"]
        for other in ("base", f"best_of_n[{label}]"):
            wins = sum(a > b for a, b in zip(ours, by_name[other]))
            losses = sum(a < b for a, b in zip(ours, by_name[other]))
            paired[f"reno[{label}] vs {other}"] = {"wins": wins, "losses": losses}
    figure = Path(args.output).with_suffix(".png")
    save_grid(images_by_method, texts, figure, columns=min(8, len(texts)))
    result = {
        "benchmark": "ReNO on the shapes world: held-out verifier accuracy (GenEval protocol)",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "family": args.family,
        "model": args.model or "shipped",
        "prompts": len(prompts) // args.images_per_prompt,
        "images_per_prompt": args.images_per_prompt,
        "config": dataclasses.asdict(config),
        "pipeline_kwargs": call_kwargs,
        "threads": args.threads,
        "torch": torch.__version__,
        "paired_images": paired,
        "figure": figure.name,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
