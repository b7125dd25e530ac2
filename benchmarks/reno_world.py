"""ReNO on the shapes world: held-out verifier accuracy of the base model, best-of-N and ReNO at equal generator calls.

For each held-out prompt (and each of `--images-per-prompt` seeds), with the world generator at a few steps:

- `base`: the base model's sample from the seed's noise (ReNO's first iterate).
- `best_of_n[R]`: the best of N noises by reward R, N = the generator calls of ReNO (candidate 0 is the base noise).
- `reno[R]`: ReNO on reward R (SGD, the reference's defaults unless overridden), the best iterate by R.

R is `world-clip` (or, with `--reward learned`, a reward trained on the world's pairs by `world_reward.py`) alone and
a reward ensemble `R + w * world-defects`. Images are judged by the world verifier (GenEval protocol: an image is
correct when every clause of its prompt holds; a category's accuracy is the mean over its images, `overall` the mean
over categories), which none of the methods sees. CPU minutes are the process's CPU time per method (all threads).

What is compared (`comparison` in the record): `base`, `best_of_n` and `reno` use the same few-step sampler (4 Euler
steps, CFG 3; the paper's one/few-step setting) and the same seeds, and best-of-N gets as many generator calls as
ReNO (a ReNO call also backpropagates, so ReNO costs about 3x the CPU). `base_default` is the base model under the
world protocol (its own defaults: 20 steps, CFG 3) from the same noises, the base of the world's other tables.
`protocol_render` in the `best_of_n` and `reno` rows renders each method's chosen noise with that 20-step sampler
(the reference's `--enable_multi_apply`: optimize on the few-step model, render with the multi-step one). Paired
wins/losses count images one method gets right and the other wrong; `gains_points` are overall differences.

Exploration behind the recipe (SD3-class model of 41% held-out, 18 prompts x 2 images, 4 steps, 50 iterations;
base 33.3% at 4 steps, 38.9% at 20 steps; best-of-50 by world-clip 47.2%, its noises rendered at 20 steps 61.1%):
ReNO on world-clip alone raised the reward past best-of-50's (18.3 vs 17.7) while verifier accuracy fell back to
the base's (33.3%; 30.6% at 20 steps): the gradient finds world-CLIP directions the verifier does not reward (reward
hacking). The ensemble with world-defects (w 10) held it at 41.7% (44.4% at 20 steps); lr 1 instead of 5 gave the
same 41.7%, w 30 gave 38.9%. The best-by-reward iterate's accuracy peaked around iteration 10 and then declined.
No tried setting reached best-of-N, so the reference's defaults stay; the limit is the reward, not the optimizer.
The reward trained on the world's pairs (`--reward learned`) is the better selector (best-of-50 52.8-58.3% against
44.4% by world-clip on the same 36 prompts), but ReNO's gradient hacks it alone too, and in the ensemble ReNO's lead
over best-of-N does not hold from one prompt set to another (results/reno_world_*learned*.json).

    python benchmarks/reno_world.py --family sd     # writes benchmarks/results/reno_world.json
    python benchmarks/reno_world.py --family sd3 --output benchmarks/results/reno_world_sd3.json
    python benchmarks/world_reward.py --threads 1 --set output_dir=runs/w5/reward overwrite_output_dir=true \
        --grpo-set output_dir=runs/w5/grpo_learned overwrite_output_dir=true   # the learned reward (world_reward.json)
    python benchmarks/reno_world.py --family sd --reward learned --reward-path runs/w5/reward \
        --output benchmarks/results/reno_world_learned.json
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
COMPARISON = (
    "base, best_of_n and reno: the same seeds and few-step sampler (num_inference_steps, guidance_scale in config); "
    "best_of_n has ReNO's generator calls. base_default: the same noises under the world protocol (the model's "
    "defaults, `protocol` in the record). protocol_render: a method's chosen noise rendered with those defaults."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd", "sd3"), default="sd")
    parser.add_argument("--model", default=None, help="generator folder (default: the shipped world model)")
    parser.add_argument(
        "--reward",
        choices=("world-clip", "learned"),
        default="world-clip",
        help="R: the world CLIP, or a reward trained on the world's pairs (`learned`, needs --reward-path)",
    )
    parser.add_argument(
        "--reward-path",
        default=None,
        help="R's folder (world-clip: default the shipped one; learned: the output_dir of `python "
        "benchmarks/world_reward.py`)",
    )
    parser.add_argument("--per-category", type=int, default=6, help="held-out prompts per category (spread out)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts optimized together")
    parser.add_argument("--defects-weight", type=float, default=10.0, help="w of world-defects in the composite")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ReNOConfig overrides")
    parser.add_argument("--output", default=str(RESULT))
    args = parser.parse_args(argv)
    if args.reward == "learned" and args.reward_path is None:
        parser.error("--reward learned needs --reward-path (a folder written by `python benchmarks/world_reward.py`)")
    return args


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
    from visalign.loading import check_world_family, load_generator
    from visalign.pipelines.reno import ReNO, ReNOConfig, pipeline_kwargs
    from visalign.reward_models.compose import RewardPart
    from visalign.rewards import load_reward
    from visalign.world.evaluate import accuracy, generate, heldout_prompts
    from visalign.world.verifier import verify

    torch.set_num_threads(args.threads)
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 32, "width": 32}
    config = config_from_dict(ReNOConfig, defaults | parse_overrides(args.set))
    check_world_family(args.model or f"world:{args.family}", args.family)
    pipe, defaults = load_generator(args.model or f"world:{args.family}", device="cpu", dtype=torch.float32)
    call_kwargs = pipeline_kwargs(defaults)
    pipe.set_progress_bar_config(disable=True)
    reward = load_reward(args.reward, args.reward_path)
    defects = load_reward("world-defects")
    objectives = {
        args.reward: [RewardPart(reward, 1.0, name=args.reward)],
        f"{args.reward}+{args.defects_weight:g}*world-defects": [
            RewardPart(reward, 1.0, name=args.reward),
            RewardPart(defects, args.defects_weight, name="world-defects"),
        ],
    }
    prompts = [p for p in spread(heldout_prompts(), args.per_category) for _ in range(args.images_per_prompt)]
    texts = [p.text for p in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    chunks = [range(i, min(i + args.batch_size, len(texts))) for i in range(0, len(texts), args.batch_size)]

    def judged(images: torch.Tensor) -> dict[str, Any]:
        correct = [int(verify(image, p).correct) for image, p in zip(images.numpy(), prompts)]
        return {**accuracy(images, prompts), "image_accuracy": sum(correct) / len(correct), "correct": correct}

    @torch.no_grad()
    def protocol_render(noise: torch.Tensor) -> torch.Tensor:
        """The chosen noise rendered with the model's own sampling defaults (the world protocol, 20 steps, CFG 3)."""
        out = []
        for c in chunks:
            gens = [torch.Generator().manual_seed(seeds[i]) for i in c]
            latents = noise[c.start : c.stop]
            images = pipe([texts[i] for i in c], latents=latents, generator=gens, output_type="pt", **defaults).images
            out.append(images)
        return torch.cat(out).float().clamp(0, 1)

    def measure(name: str, run) -> dict[str, Any]:
        start, cpu = time.time(), time.process_time()
        noises: list[torch.Tensor] = []
        images = torch.cat([run([texts[i] for i in c], [seeds[i] for i in c], noises) for c in chunks])
        with torch.no_grad():
            reward_score = reward.score(images, texts).score.mean().item()
        images_by_method[name] = images
        row = {
            "method": name,
            **judged(images),
            f"mean_{args.reward.replace('-', '_')}": reward_score,
            "cpu_minutes": (time.process_time() - cpu) / 60,
            "wall_minutes": (time.time() - start) / 60,
        }
        if noises:  # the few-step methods: their chosen noise also rendered with the protocol's sampler
            rerendered = judged(protocol_render(torch.cat(noises)))
            row["protocol_render"] = {k: rerendered[k] for k in ("overall", "image_accuracy", "correct")}
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_category", "correct")}), flush=True)
        return row

    images_by_method: dict[str, torch.Tensor] = {}
    rows = [measure("base_default", lambda t, s, _: generate(pipe, t, seed=s[0], batch_size=len(t), progress=False))]
    for label, parts in objectives.items():
        reno = ReNO(pipe, parts, config, call_kwargs)
        if not rows[1:]:  # the few-step base model: one render of each seed's noise

            def render_base(t: list[str], s: list[int], noises: list, reno=reno) -> torch.Tensor:
                noises.append(reno.initial_noise(s))
                with torch.no_grad():
                    return reno.render(noises[-1], t, s)

            rows.append(measure("base", render_base))
        outputs = []

        def optimize(t: list[str], s: list[int], noises: list, reno=reno, outputs=outputs) -> torch.Tensor:
            outputs.append(reno(t, seed=s, progress=True))
            noises.append(outputs[-1].noise)
            return outputs[-1].images

        def select(t: list[str], s: list[int], noises: list, reno=reno, outputs=outputs) -> torch.Tensor:
            out = reno.best_of_n(t, outputs[0].generator_calls, seed=s)
            noises.append(out.noise)
            return out.images

        row = measure(f"reno[{label}]", optimize)
        calls = outputs[0].generator_calls
        row["generator_calls"] = calls
        row["mean_objective_initial"] = torch.cat([o.initial_reward for o in outputs]).mean().item()
        row["mean_objective_best"] = torch.cat([o.reward for o in outputs]).mean().item()
        best = measure(f"best_of_n[{label}]", select)
        best["generator_calls"] = calls
        rows += [best, row]
    by_name = {r["method"]: r for r in rows}
    paired, gains = {}, {}
    for label in objectives:
        ours = by_name[f"reno[{label}]"]
        for other in ("base", "base_default", f"best_of_n[{label}]"):
            wins = sum(a > b for a, b in zip(ours["correct"], by_name[other]["correct"]))
            losses = sum(a < b for a, b in zip(ours["correct"], by_name[other]["correct"]))
            paired[f"reno[{label}] vs {other}"] = {"wins": wins, "losses": losses}
            gains[f"reno[{label}] vs {other}"] = 100 * (ours["overall"] - by_name[other]["overall"])
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
        "protocol": defaults,
        "threads": args.threads,
        "torch": torch.__version__,
        "comparison": COMPARISON,
        "gains_points": gains,
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
