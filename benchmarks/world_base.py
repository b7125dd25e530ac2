"""Held-out verifier accuracy of the shipped shapes-world base models (GenEval protocol: 4 images per prompt).

    python benchmarks/world_base.py [--images-per-prompt 4] [--out benchmarks/results/world_base.json]
    python benchmarks/world_base.py --families sd3 --model runs/X/sd3 --out benchmarks/results/world_base_flow.json

Writes per-category accuracy for both generators, with their training record (steps, CPU minutes, learning curve)
and the command that produced the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from visalign.loading import check_world_family, load_generator
from visalign.world.evaluate import evaluate, heldout_prompts
from visalign.world.models import default_model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--families", default="sd,sd3")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--model", default=None, help="a candidate pipeline folder to evaluate instead of the shipped one (one family)"
    )
    parser.add_argument("--out", default="benchmarks/results/world_base.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    families = args.families.split(",")
    if args.model is not None and len(families) != 1:
        raise ValueError(f"`--model` evaluates one family; got --families {args.families!r}")
    prompts = heldout_prompts()
    root = Path(args.model).parent if args.model is not None else default_model_dir("sd").parent
    record_path = root / "training_record.json"
    result = {
        "command": "python benchmarks/world_base.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "protocol": f"{len(prompts)} held-out prompts x {args.images_per_prompt} images, seeds 0.., 20 steps, CFG 3",
        "training_record": json.loads(record_path.read_text()) if record_path.exists() else None,
        "models": {},
    }
    out = Path(args.out)
    if out.exists():  # evaluating one family keeps the other's figures
        result["models"] = json.loads(out.read_text())["models"]
    for family in families:
        check_world_family(args.model or f"world:{family}", family)
        pipe = load_generator(args.model or f"world:{family}")[0]
        pipe.set_progress_bar_config(disable=True)
        start = time.time()
        acc = evaluate(pipe, prompts, images_per_prompt=args.images_per_prompt)
        result["models"][family] = acc | {
            "eval_seconds": time.time() - start,
            "command": result["command"],
            "model": args.model or f"world:{family}",
        }
        print(family, json.dumps(acc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
