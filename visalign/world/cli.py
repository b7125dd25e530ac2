"""`visalign world ...`: train the world's base models and evaluate world generators.

visalign world train-base [--out assets/world] [--stages vae,clip,sd,sd3] [--set key=value ...]
visalign world eval [--family sd|sd3] [--model NAME] [--lora DIR [--lora-scale S]] [--images-per-prompt 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    tb = sub.add_parser("train-base", help="train the VAE, CLIP and both generators of the world from scratch")
    tb.add_argument("--out", default=None, help="output folder (default: the package's assets/world)")
    tb.add_argument("--stages", default="vae,clip,sd,sd3", help="comma-separated subset of vae,clip,sd,sd3")
    tb.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tb.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override TrainBaseConfig fields (booleans: true/false, yes/no, 1/0)",
    )
    ev = sub.add_parser("eval", help="held-out verifier accuracy of a world generator (GenEval protocol)")
    ev.add_argument(
        "--family",
        choices=("sd", "sd3"),
        default=None,
        help="the world family: its shipped model, or the family --model must be (default: sd without --model)",
    )
    ev.add_argument(
        "--model", default=None, help="world:sd, world:sd3 or a pipeline folder (default: world:FAMILY, shipped)"
    )
    ev.add_argument(
        "--lora", default=None, help="a run's output_dir/final for --model (its LoRA or its fully fine-tuned denoiser)"
    )
    ev.add_argument("--lora-scale", type=float, default=1.0, help="weight of the --lora adapter")
    ev.add_argument("--images-per-prompt", type=int, default=4)
    ev.add_argument("--limit-per-category", type=int, default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None, help="write the result here (JSON, with the command)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.world_command == "train-base":
        from visalign.config import config_from_dict, parse_overrides
        from visalign.world.models import default_model_dir
        from visalign.world.train import TrainBaseConfig, train_base

        if args.threads:
            torch.set_num_threads(args.threads)
        out = args.out or str(default_model_dir("sd").parent)
        cfg = config_from_dict(TrainBaseConfig, {"out": out} | parse_overrides(args.set))
        results = train_base(cfg, tuple(s for s in args.stages.split(",") if s))
        for stage, info in results.items():
            print(stage, json.dumps({k: v for k, v in info.items() if k not in ("curve", "run")}))
        return 0
    from visalign.files import run_record, write_run_record
    from visalign.loading import check_world_family, load_generator
    from visalign.world.evaluate import evaluate, heldout_prompts

    family = args.family or (None if args.model else "sd")
    model = args.model or f"world:{family}"
    if family is not None:
        check_world_family(model, family)
    pipe, defaults = load_generator(model, lora=args.lora, lora_scale=args.lora_scale)
    start = time.time()
    result = evaluate(
        pipe,
        heldout_prompts(args.limit_per_category),
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        **defaults,
    )
    result |= {
        "family": family,
        "model": model,
        "lora": args.lora,
        "lora_scale": args.lora_scale if args.lora else None,
        "seconds": time.time() - start,
    }
    settings = {
        "family": family,
        "images_per_prompt": args.images_per_prompt,
        "limit_per_category": args.limit_per_category,
        "lora_scale": args.lora_scale,
    }
    result |= run_record(config=settings, seeds={"seed": args.seed}, inputs={"model": model, "lora": args.lora})
    print(json.dumps(result, indent=2))
    if args.json:
        write_run_record(args.json, result)
    return 0
