"""Align a shipped shapes-world model with a recipe, then score it on the held-out set (GenEval protocol).

    python benchmarks/world_alignment.py flow-grpo --config configs/world_flow_grpo.yaml [--set key=value ...]

Runs `visalign train METHOD` in-process (its wall and CPU minutes are recorded), loads the final LoRA into the base
pipeline, and evaluates base and aligned models on the same held-out prompts with the same seeds. `--adapter DIR`
skips training and evaluates that LoRA (e.g. one trained by `benchmarks/world_reward.py`). Writes
`benchmarks/results/world_<method>.json` with per-category accuracy before and after and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def before_after(family: str, adapter: Path, prompts: list, images_per_prompt: int) -> dict:
    """`{"base": ..., "aligned": ...}`: the world model of `family` without and with the LoRA in `adapter`, on the
    same prompts and seeds (`visalign.world.evaluate.evaluate`)."""
    from visalign.loading import load_generator
    from visalign.world.evaluate import evaluate

    result = {}
    for name, lora in (("base", None), ("aligned", adapter)):
        pipe = load_generator(f"world:{family}", lora=lora)[0]
        pipe.set_progress_bar_config(disable=True)
        result[name] = evaluate(pipe, prompts, images_per_prompt=images_per_prompt)
        print(name, json.dumps(result[name]))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/world_<method>.json")
    parser.add_argument("--adapter", default=None, help="skip training: evaluate this trained LoRA folder instead")
    args = parser.parse_args(argv)

    from visalign.cli import main as visalign_main
    from visalign.config import load_config
    from visalign.pipelines.train import METHODS, _resolve
    from visalign.world.evaluate import heldout_prompts

    config = load_config(_resolve(METHODS[args.method][0]), args.config, args.overrides)
    family = str(config.pretrained_model_name_or_path).removeprefix("world:")
    start, cpu0 = time.time(), time.process_time()
    if args.adapter is None:
        code = visalign_main(
            ["train", args.method, "--config", args.config, *(["--set", *args.overrides] * bool(args.overrides))]
        )
        if code:
            return code
    train_minutes = (
        {"wall_minutes": (time.time() - start) / 60, "cpu_minutes": (time.process_time() - cpu0) / 60}
        if args.adapter is None
        else "not run here: --adapter"
    )

    prompts = heldout_prompts()
    result = {
        "command": "python benchmarks/world_alignment.py " + " ".join(argv),
        "method": args.method,
        "family": family,
        "training": train_minutes,
        "max_steps": config.max_steps,
        "protocol": f"{len(prompts)} held-out prompts x {args.images_per_prompt} images, 20 steps, CFG 3",
    }
    adapter = Path(args.adapter) if args.adapter else Path(config.output_dir) / "final"
    result |= before_after(family, adapter, prompts, args.images_per_prompt)
    result["delta_overall"] = result["aligned"]["overall"] - result["base"]["overall"]
    out = Path(args.out or f"benchmarks/results/world_{args.method}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.method}: held-out accuracy {result['base']['overall']:.3f} -> {result['aligned']['overall']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
