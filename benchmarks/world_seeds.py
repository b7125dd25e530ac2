r"""Held-out accuracy of a shapes-world base model and its trained LoRAs over several evaluation seed sets.

    python benchmarks/world_seeds.py --family sd --seeds 0 1000 2000 3000 \
        --adapter dpo=runs/world_dpo/final --adapter dro=runs/world_dro/final \
        --out benchmarks/results/world_seeds_sd.json

One seed set (the protocol's: image i uses seed i) moves `overall` by several points between seed sets, because the
six categories are averaged whatever their size (the single-object category has 32 held-out images). This script
evaluates every model on the same held-out prompts with each seed set (image i of a set uses `seed + i`, so keep the
seeds at least the image count apart) and writes, per model, each set's `overall` and `image_accuracy`, their means,
and the paired gains over the base (the same seeds for both): a method's gain is real when its mean paired gain is
large against their spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from visalign.loading import load_generator
from visalign.world.evaluate import evaluate, heldout_prompts


def summary(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and standard error of `values`."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(t) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "sem": std / len(t) ** 0.5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd", "sd3"), default="sd")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000, 3000])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a run's final folder")
    parser.add_argument("--base-from", default=None, help="reuse the base model's runs from an earlier output file")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = heldout_prompts()
    images = len(prompts) * args.images_per_prompt
    if any(b - a < images for a, b in zip(sorted(args.seeds), sorted(args.seeds)[1:])):
        parser.error(f"--seeds must be at least {images} apart (one seed per image)")
    adapters = {"base": None}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or name in adapters or not Path(folder).is_dir():
            parser.error(f"--adapter {item!r}: expected a new NAME=DIR with an existing folder")
        adapters[name] = folder
    result = {
        "command": "python benchmarks/world_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": f"{len(prompts)} held-out prompts x {args.images_per_prompt} images, 20 steps, CFG 3 per seed",
        "family": args.family,
        "seeds": args.seeds,
        "models": {},
    }
    if args.base_from:
        earlier = json.loads(Path(args.base_from).read_text())
        if (earlier["family"], earlier["seeds"]) != (args.family, args.seeds):
            parser.error(f"--base-from {args.base_from}: another family or other seeds")
        result["models"]["base"] = earlier["models"]["base"]
        del adapters["base"]
    for name, folder in adapters.items():
        pipe = load_generator(f"world:{args.family}", lora=folder)[0]
        pipe.set_progress_bar_config(disable=True)
        runs = []
        for seed in args.seeds:
            start = time.process_time()
            acc = evaluate(pipe, prompts, images_per_prompt=args.images_per_prompt, seed=seed, progress=False)
            runs.append(acc | {"seed": seed, "cpu_minutes": (time.process_time() - start) / 60})
            print(name, seed, f"overall {acc['overall']:.3f} image {acc['image_accuracy']:.3f}", flush=True)
        record = {
            "adapter": folder,
            "runs": runs,
            "overall": summary([r["overall"] for r in runs]),
            "image_accuracy": summary([r["image_accuracy"] for r in runs]),
        }
        if folder is not None:
            base = result["models"]["base"]["runs"]
            record["paired_gain"] = summary([r["overall"] - b["overall"] for r, b in zip(runs, base)])
            gains = [r["image_accuracy"] - b["image_accuracy"] for r, b in zip(runs, base)]
            record["paired_image_gain"] = summary(gains)
        result["models"][name] = record
        out = Path(args.out)  # written after every model: a long run keeps what it has
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    for name, record in result["models"].items():
        gain = record.get("paired_gain")
        extra = f", paired gain {gain['mean']:+.3f} +- {gain['sem']:.3f}" if gain else ""
        print(f"{name}: overall {record['overall']['mean']:.3f} +- {record['overall']['sem']:.3f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
