"""Held-out verifiable accuracy of the shapes-world models before and after Diffusion-DPO, Diffusion-DRO and PRDP.

    python benchmarks/world_preference.py --method dpo                  # writes benchmarks/results/world_dpo_sd.json
    python benchmarks/world_preference.py --method dpo --family sd3     # the flow model
    python benchmarks/world_preference.py --method dro
    python benchmarks/world_preference.py --method prdp

Each run:
1. evaluates the base model (`visalign.world.evaluate.evaluate`: GenEval protocol, fixed seeds, 20 steps, CFG 3) on
   `--eval-per-category` held-out prompts per category (test-split prompts, never trained on), `--images-per-prompt`
   images each, or reuses that figure from an earlier result file (`--before-from`, same base and protocol);
2. builds the method's data from the base model where the method needs it: DRO's expert set is, per category, the
   best base samples (20 steps, CFG 3) of train prompts by the world verifier (`top_k_experts`: perfect scores only,
   at most 2 per prompt), written under the run folder (or an earlier run's, `--experts-from`); DPO's pairs (best vs
   worst of a group by the verifier) are built by the trainer from its config (`rebuild_every: 0`: once, from the
   base model); PRDP samples online;
3. trains with the recipe `configs/world_<method>[_sd3].yaml` (plus `--set key=value` overrides) through the
   method's trainer, exactly as `visalign train` does;
4. evaluates the trained model with the same prompts and seeds.
CPU minutes are the process's CPU time (all threads) of each phase; the JSON holds the command, the config, the
accuracies (overall = mean over the six categories; and per category) and the training curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from visalign.config import config_to_dict, load_config
from visalign.world.evaluate import default_generation, evaluate, heldout_prompts

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "dpo": ("visalign.pipelines.dpo", "DPOConfig", "DPOTrainer"),
    "dro": ("visalign.pipelines.dro", "DROConfig", "DROTrainer"),
    "prdp": ("visalign.pipelines.prdp", "PRDPConfig", "PRDPTrainer"),
}


class Clock:
    """Wall and CPU minutes of named phases."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        clock = self

        class Phase:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.phases[name] = {
                    "wall_minutes": (time.perf_counter() - self.wall) / 60,
                    "cpu_minutes": (time.process_time() - self.cpu) / 60,
                }

        return Phase()


def build_world_experts(
    pipe,
    folder: Path,
    *,
    source: str,
    prompts_per_category: int,
    images_per_prompt: int,
    k: int,
    per_caption: int | None,
    min_score: float | None,
    seed: int,
    steps: int = 20,
) -> dict[str, Any]:
    """DRO's expert set on the world, saved to `folder`: for each of the six categories, the `k / 6` best images of its
    train prompts by the verifier (at most `per_caption` per prompt, none below `min_score`) from a pool of base
    samples (`source="samples"`) or of the world's own renders (`"renders"`: images better than the policy's, as the
    paper's experts are the best Pick-a-Pic images of stronger generators). Samples follow the world protocol
    (`default_generation`: CFG 3, and the flow model's 16 text tokens) at `steps` sampling steps."""
    import numpy as np

    from visalign.pipelines.expert_sets import ExpertSet, save_experts, top_k_experts
    from visalign.pipelines.preference_data import sample_groups
    from visalign.rewards import load_reward
    from visalign.world.scenes import prompt_split, render_prompt

    verifier = load_reward("world-verifier")
    generation = {**default_generation(pipe), "num_inference_steps": steps}
    generation.pop("output_type")
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    captions, sources, scores, per_category, pool_size = [], [], [], {}, 0
    for category, group in prompt_split("train").items():
        chosen = [group[i] for i in torch.randperm(len(group), generator=generator)[:prompts_per_category].tolist()]
        pool = [p.text for p in chosen for _ in range(images_per_prompt)]
        if source == "renders":
            renders = [render_prompt(p, rng) for p in chosen for _ in range(images_per_prompt)]
            images = torch.from_numpy(np.stack(renders))
        else:
            texts = [p.text for p in chosen]
            images = sample_groups(
                pipe, texts, num_images_per_prompt=images_per_prompt, seed=seed, progress=category, **generation
            )
            images = images.flatten(0, 1)
        pool_size += len(pool)
        kept = top_k_experts(
            images, pool, verifier, min(k // 6, len(pool)), per_caption=per_caption, min_score=min_score
        )
        captions += kept.captions
        sources += kept.sources
        scores += kept.scores
        per_category[category] = len(kept)
    experts = ExpertSet(captions, sources, scores=scores)
    save_experts(experts, folder)
    return {
        "source": source,
        "pool": pool_size,
        "experts": len(experts),
        "per_category": per_category,
        "mean_expert_score": sum(scores) / len(scores),
        "generation": generation if source == "samples" else None,
        "folder": str(folder),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--family", choices=("sd", "sd3"), default="sd")
    parser.add_argument("--config", default=None, help="recipe (default: configs/world_<method>[_sd3].yaml)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--eval-per-category", type=int, default=16, help="held-out prompts per category")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument(
        "--expert-source", choices=("samples", "renders"), default="samples", help="DRO: the pool's images"
    )
    parser.add_argument("--expert-prompts-per-category", type=int, default=32, help="DRO: pool prompts per category")
    parser.add_argument("--expert-images-per-prompt", type=int, default=8, help="DRO: pool images per prompt")
    parser.add_argument("--experts", type=int, default=192, help="DRO: the top-k kept (k / 6 per category)")
    parser.add_argument("--expert-per-caption", type=int, default=2, help="DRO: at most this many per prompt")
    parser.add_argument("--expert-min-score", type=float, default=1.0, help="DRO: the verifier score floor")
    parser.add_argument("--expert-steps", type=int, default=20, help="DRO: sampling steps of the pool")
    parser.add_argument("--experts-from", default=None, help="DRO: an expert folder built by an earlier run")
    parser.add_argument(
        "--before-from", default=None, help="reuse the base accuracy of an earlier result file with the same protocol"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/world_<method>_<family>.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import importlib

    module_name, config_name, trainer_name = METHODS[args.method]
    module = importlib.import_module(module_name)
    suffix = "_sd3" if args.family == "sd3" else ""
    config_path = Path(args.config or ROOT / "configs" / f"world_{args.method}{suffix}.yaml")
    overrides = ["eval_prompts=null", "report_to=none", *args.overrides]
    config = load_config(getattr(module, config_name), config_path, overrides)
    clock = Clock()
    prompts = heldout_prompts(args.eval_per_category)
    command = "python benchmarks/world_preference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"command": command, "config_file": str(config_path.relative_to(ROOT))}

    from visalign.loading import check_world_family, load_generator

    check_world_family(config.pretrained_model_name_or_path, args.family)
    pipe = load_generator(config.pretrained_model_name_or_path)[0]
    pipe.set_progress_bar_config(disable=True)
    protocol = dict(images_per_prompt=args.images_per_prompt, progress=False)
    earlier = json.loads(Path(args.before_from).read_text()) if args.before_from else None
    if earlier is not None:
        before = earlier["accuracy_before"]
        same = (before["prompts"], before["images_per_prompt"]) == (len(prompts), args.images_per_prompt)
        base = earlier["config"].get("pretrained_model_name_or_path", earlier["config"].get("pretrained"))
        if not same or base != config.pretrained_model_name_or_path:
            parser.error(f"--before-from {args.before_from}: another base model or protocol")
    else:
        with clock("eval_before"):
            before = evaluate(pipe, prompts, **protocol)
    print("before", json.dumps(before))
    if args.method == "dro" and args.experts_from:
        result["experts"] = {"folder": args.experts_from}
        config = load_config(type(config), config_path, overrides + [f"experts={args.experts_from}"])
    elif args.method == "dro":
        with clock("experts"):
            result["experts"] = build_world_experts(
                pipe,
                Path(config.output_dir) / "experts",
                source=args.expert_source,
                prompts_per_category=args.expert_prompts_per_category,
                images_per_prompt=args.expert_images_per_prompt,
                k=args.experts,
                per_caption=args.expert_per_caption,
                min_score=args.expert_min_score,
                seed=config.seed,
                steps=args.expert_steps,
            )
        config = load_config(type(config), config_path, overrides + [f"experts={result['experts']['folder']}"])

    with clock("train"):
        trainer = getattr(module, trainer_name).from_config(config)  # what `visalign train` runs
        history = trainer.train()
    with clock("eval_after"):
        trained = trainer.adapter.pipe  # the trained weights, adapters enabled (no EMA in the world recipes)
        trained.set_progress_bar_config(disable=True)
        trainer.adapter.model.eval()
        after = evaluate(trained, prompts, **protocol)
    print("after", json.dumps(after))
    cpu = sum(p["cpu_minutes"] for p in clock.phases.values())
    result |= {
        "family": args.family,
        "method": args.method,
        "protocol": f"{len(prompts)} held-out prompts x {args.images_per_prompt} images (seeds 0..), 20 steps, CFG 3",
        "accuracy_before": before,
        "accuracy_after": after,
        "gain": after["overall"] - before["overall"],
        "cpu_minutes": {**{k: v["cpu_minutes"] for k, v in clock.phases.items()}, "total": cpu},
        "wall_minutes": {k: v["wall_minutes"] for k, v in clock.phases.items()},
        "torch_threads": torch.get_num_threads(),
        "config": config_to_dict(config),
        "history": history,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"world_{args.method}_{args.family}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.method} on world:{args.family}: {before['overall']:.3f} -> {after['overall']:.3f} "
        f"({cpu:.1f} CPU minutes); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
