"""`visalign demo`: align the shipped shapes-world generator on a CPU in a few minutes and show before/after.

1. Load the shipped base generator (the epsilon-prediction `StableDiffusionPipeline` by default).
2. Generate `images_per_prompt` images for a slice of the held-out prompts; the verifier scores them ("before").
3. Align with best-of-N reranking: N candidates per slot from consecutive seeds, the training reward (the world's
   CLIP by default, not the verifier, which stays the held-out judge) picks one.
4. Score the picks ("after"), and record the reward curve: reward and accuracy of best-of-n for n = 1..N.
5. Write `report.html` (before/after grids with prompts and verdicts, per-category table, the curve) and
   `summary.json` into `--out`.

Best-of-N is the method every later one must beat at equal generator calls; as trainers land, `--method` grows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("sd", "sd3"), default="sd", help="which shipped world generator")
    parser.add_argument("--model", default=None, help="a world pipeline folder instead of the shipped one")
    parser.add_argument("--lora", default=None, help="a trained LoRA folder (a run's output_dir/final) for the model")
    parser.add_argument("--out", default="visalign-demo", help="output folder for report.html and summary.json")
    parser.add_argument("--per-category", type=int, default=6, help="held-out prompts per category")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--n", type=int, default=4, help="candidates per image for best-of-N")
    parser.add_argument("--reward", default="world-clip", help="the reward that picks among candidates")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from visalign import load_reward
    from visalign.html import write_html_report
    from visalign.world.evaluate import accuracy, generate, heldout_prompts
    from visalign.world.models import load_pipeline
    from visalign.world.verifier import verify

    if args.n < 1 or args.images_per_prompt < 1 or args.per_category < 1:
        raise ValueError("`--n`, `--images-per-prompt` and `--per-category` must be at least 1")
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.family, args.model, lora=args.lora)
    reward = load_reward(args.reward)
    prompts = heldout_prompts(args.per_category)
    slots = [p for p in prompts for _ in range(args.images_per_prompt)]
    texts = [p.text for p in slots]
    print(
        f"visalign demo: {len(prompts)} held-out prompts x {args.images_per_prompt} images, best-of-{args.n} "
        f"by {args.reward}",
        file=sys.stderr,
    )

    # candidates[k] is the k-th candidate of every slot; candidate 0 is the base model's own sample ("before")
    candidates, rewards = [], []
    for k in range(args.n):
        images = generate(pipe, texts, seed=args.seed + k * len(slots), num_inference_steps=args.steps)
        candidates.append(images)
        with torch.no_grad():
            rewards.append(reward(images, texts).score)
    rewards_t = torch.stack(rewards)  # [N, S]
    curve = []
    for n in range(1, args.n + 1):
        best = rewards_t[:n].argmax(0)
        picks = torch.stack([candidates[b][i] for i, b in enumerate(best.tolist())])
        curve.append(
            {
                "n": n,
                "generator_calls_per_image": n,
                "reward": float(rewards_t[:n].max(0).values.mean()),
                **accuracy(picks, slots),
            }
        )
    before, after = candidates[0], picks
    summary = {
        "method": f"best-of-{args.n}",
        "reward": args.reward,
        "family": args.family,
        "model": args.model or "shipped",
        "lora": args.lora,
        "prompts": len(prompts),
        "images_per_prompt": args.images_per_prompt,
        "before": curve[0],
        "after": curve[-1],
        "curve": curve,
        "seconds": time.time() - start,
        "command": "visalign " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "visalign demo",
    }
    verdicts = {
        name: [verify(img.numpy(), p) for img, p in zip(images, slots)]
        for name, images in (("before", before), ("after", after))
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_html_report(
        out / "report.html",
        "visalign demo: aligning a shapes-world generator",
        report_sections(summary, slots, before, after, verdicts),
        subtitle=f"{summary['method']} by {args.reward}; judged by the world verifier",
    )
    print(
        f"overall (mean over categories) before {curve[0]['overall']:.3f} -> after {curve[-1]['overall']:.3f}; "
        f"image_accuracy {curve[0]['image_accuracy']:.3f} -> {curve[-1]['image_accuracy']:.3f} "
        f"({summary['seconds']:.0f} s)"
    )
    print(f"report: {out / 'report.html'}\nsummary: {out / 'summary.json'}")
    return 0


def report_sections(summary: dict, slots: list, before, after, verdicts: dict) -> list:
    """The demo report: the per-category table, the best-of-n curve, and before/after grids with verdicts."""
    from visalign.html import GridCell, GridRow, Mark, Section, bar_plot, line_plot

    b, a = summary["before"], summary["after"]
    cats = list(b["per_category"])
    rows = [[c, f"{b['per_category'][c]:.3f}", f"{a['per_category'][c]:.3f}"] for c in cats]
    rows.append(["overall", f"{b['overall']:.3f}", f"{a['overall']:.3f}"])
    table = Section(
        "Held-out verifier accuracy",
        [
            f"{summary['prompts']} held-out prompts x {summary['images_per_prompt']} images, "
            f"{summary['family']} model; an image is correct when every clause of its prompt holds."
        ],
        ["category", "before", "after"],
        rows,
        bar_plot(
            {"before": b["per_category"], "after": a["per_category"]},
            title="Accuracy per category",
            ylabel="accuracy",
            ymax=1.0,
        ),
    )
    curve = Section(
        "Reward curve",
        ["Best-of-n for n = 1..N: the training reward of the pick, and the verifier accuracy it brings."],
        ["n", summary["reward"], "accuracy"],
        [[c["n"], f"{c['reward']:.3f}", f"{c['overall']:.3f}"] for c in summary["curve"]],
        line_plot(
            {summary["reward"]: [(c["n"], c["reward"]) for c in summary["curve"]]},
            title="Training reward of best-of-n",
            xlabel="n (generator calls per image)",
            ylabel="reward",
        ),
    )

    def cell(image, verdict):
        return GridCell(image, [Mark("verifier", verdict.correct, verdict.reason)])

    grid = [
        GridRow(
            p.text, [cell(before[i], verdicts["before"][i]), cell(after[i], verdicts["after"][i])], note=p.category
        )
        for i, p in enumerate(slots)
    ]
    images = Section("Before and after", grid=grid, grid_columns=["before", "after"])
    return [table, curve, images]
