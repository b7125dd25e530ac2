"""The `visalign reno` command: optimize one prompt's initial noise with ReNO (`visalign.pipelines.reno`), and the
figures it writes (the before/after comparison and the per-call history).

    visalign reno --model world:sd --prompt "two red squares" --reward world-clip --out runs/reno \\
        --num-inference-steps 4 --guidance-scale 3
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from visalign.files import to_pil
from visalign.loading import load_generator
from visalign.pipelines.reno import (
    OPTIMIZERS,
    REFERENCE_REWARD_OPTIONS,
    REFERENCE_REWARDS,
    ReNO,
    ReNOConfig,
    pipeline_kwargs,
)
from visalign.reward_models.compose import RewardPart

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`visalign reno --model NAME [--lora DIR] --prompt TEXT [--reward NAME=WEIGHT ...] --out DIR [ReNOConfig
    flags]`; NAME is `world:sd`, `world:sd3`, a pipeline folder or a hub id (`visalign.loading.load_generator`)."""
    parser.add_argument(
        "--model",
        required=True,
        help="a diffusers pipeline folder or hub id, or world:sd / world:sd3 for the shipped shapes-world models "
        "(not distilled: use them with --num-inference-steps 4 --guidance-scale 3)",
    )
    parser.add_argument(
        "--lora",
        default=None,
        help="a run's output_dir/final (its LoRA or its fully fine-tuned denoiser) loaded into --model",
    )
    parser.add_argument("--lora-scale", type=float, default=1.0, help="weight of the --lora adapter")
    parser.add_argument("--prompt", required=True, help="the prompt whose image is optimized")
    parser.add_argument(
        "--reward",
        action="append",
        default=None,
        metavar="NAME[=WEIGHT]",
        help="a registered differentiable reward, optionally weighted; repeatable (default: the reference's "
        + ", ".join(f"{k}={v}" for k, v in REFERENCE_REWARDS.items())
        + ")",
    )
    parser.add_argument("--pretrained", action="append", default=[], metavar="NAME=PATH", help="weights of a reward")
    parser.add_argument(
        "--option", action="append", default=[], metavar="NAME.KEY=VALUE", help="a loading option of a reward"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--best-of-n", action="store_true", help="also run the best-of-N baseline (same calls)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="generator and reward precision")
    for f in dataclasses.fields(ReNOConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"]
            )
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}[f.type]
            choices = OPTIMIZERS if f.name == "optimizer" else None
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=f.metadata["help"])


def run(args: argparse.Namespace) -> int:
    """Optimize one prompt's noise; write `image.png`, `comparison.png`, `history.png` and `reno.json`."""
    import time
    from pathlib import Path

    from visalign.files import run_record, write_run_record
    from visalign.preflight import check_reno
    from visalign.reward_models.score import parse_options, parse_rewards
    from visalign.rewards import load_reward

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = ReNOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReNOConfig)})
    if args.reward is None:
        weights, options = dict(REFERENCE_REWARDS), {k: dict(v) for k, v in REFERENCE_REWARD_OPTIONS.items()}
        for name, extra in parse_options(args.pretrained, args.option, set(weights)).items():
            options.setdefault(name, {}).update(extra)
    else:
        weights = parse_rewards(args.reward)
        options = parse_options(args.pretrained, args.option, set(weights))
    check_reno(args, {name: options.get(name, {}) for name in weights})
    parts = []
    for name, weight in weights.items():
        opts = dict(options.get(name, {}))
        reward = load_reward(name, opts.pop("pretrained", None), device=device, dtype=dtype, **opts)
        parts.append(RewardPart(reward, weight, name=name))
    pipe, defaults = load_generator(args.model, device=device, dtype=dtype, lora=args.lora, lora_scale=args.lora_scale)
    reno = ReNO(pipe, parts, config, pipeline_kwargs(defaults))

    start = time.time()
    out = reno([args.prompt], seed=args.seed, progress=True)
    seconds = time.time() - start
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    save_image(out.images[0], folder / "image.png")
    save_image(out.initial_images[0], folder / "initial.png")
    panels = [
        (out.initial_images[0], f"initial: reward {float(out.initial_reward[0]):.4g}"),
        (out.images[0], f"ReNO (call {out.best_iteration[0]}): reward {float(out.reward[0]):.4g}"),
    ]
    inputs = {"model": args.model, "lora": args.lora}
    result: dict[str, Any] = run_record(config=config, seeds={"seed": args.seed}, inputs=inputs) | {
        "model": args.model,
        "lora": args.lora,
        "lora_scale": args.lora_scale if args.lora else None,
        "prompt": args.prompt,
        "seed": args.seed,
        "pipeline_kwargs": pipeline_kwargs,
        "rewards": {name: {"weight": w, **options.get(name, {})} for name, w in weights.items()},
        "device": device,
        "dtype": args.dtype,
        "seconds": seconds,
        "initial_reward": float(out.initial_reward[0]),
        "reward": float(out.reward[0]),
        "best_call": out.best_iteration[0],
        "generator_calls": out.generator_calls,
        "history": out.history,
    }
    if args.best_of_n:
        baseline = reno.best_of_n([args.prompt], out.generator_calls, seed=args.seed)
        save_image(baseline.images[0], folder / "best_of_n.png")
        panels.append(
            (baseline.images[0], f"best of {baseline.generator_calls}: reward {float(baseline.reward[0]):.4g}")
        )
        result["best_of_n"] = {"reward": float(baseline.reward[0]), "index": baseline.best_index[0]}
    save_comparison(panels, folder / "comparison.png", title=args.prompt)
    save_history_plot(out.history, folder / "history.png", reg_weight=config.reg_weight)
    write_run_record(folder / "reno.json", result)
    print(f"reward {result['initial_reward']:.4g} -> {result['reward']:.4g} in {seconds:.1f} s; wrote {folder}")
    return 0


def save_image(image: Tensor, path: Any) -> None:
    """Write `image` (`[3, H, W]` in [0, 1]) as an 8-bit PNG."""
    to_pil(image).save(path)


def save_comparison(panels: Sequence[tuple[Tensor, str]], path: Any, title: str = "") -> None:
    """Images side by side (`[3, H, W]` each), each under its caption, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (image, caption) in zip(axes[0], panels):
        ax.imshow(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_history_plot(history: list[dict[str, Any]], path: Any, *, reg_weight: float) -> None:
    """Per generator call: the weighted reward, each reward, the regularizer and the total objective (sample 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {"weighted reward": [h["reward"][0] for h in history]}
    curves |= {name: [h["rewards"][name][0] for h in history] for name in history[0]["rewards"]}
    curves |= {
        f"regularizer R(z) (lambda = {reg_weight:g})": [h["regularizer"][0] for h in history],
        "total: -reward + lambda R": [h["total"][0] for h in history],
    }
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, curves.items()):
        ax.plot(range(len(values)), values, marker=".")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("generator call")
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
