"""A learned reward on the shapes world, end to end: noisy verifier preferences -> reward model -> Flow-GRPO, watched
by the reward-hacking monitor.

    python benchmarks/world_reward.py                  # writes benchmarks/results/world_reward.json and the plot
    python benchmarks/world_reward.py --skip-grpo --set max_steps=200

1. Reward model: `configs/world_reward.yaml` (what `visalign train reward --config configs/world_reward.yaml` runs):
   the world CLIP fine-tuned on verifier-labelled pairs with a fraction of the labels flipped, evaluated on clean
   held-out pairs of test-split prompts (accuracy with and without ties, per kind: rendered or generated), beside
   the untrained world CLIP on the same pairs, and both on 2,000 of their own training pairs with the verifier's
   clean labels (how well the reward fits what it trains on) and on 1,000 clean pairs of training prompts from new
   samples and renders (whether it learned the verifier's verdict or its training images). The held-out pairs are saved
   (`<output_dir>/heldout_pairs`) and `visalign bench reward` evaluates the learned reward on those files (the
   report and the reliability plot in `<output>_eval/` beside `--output`: `results/world_reward_eval/`).
2. Alignment: Flow-GRPO on the SD3-class world model (`configs/world_flow_grpo.yaml` cut to 40 steps at a constant
   learning rate, the budget of the recorded runs) with the learned reward as the training reward and the verifier
   as the gold reward, which the policy never optimizes: the held-out verifier
   accuracy before and after (GenEval protocol, as `benchmarks/world_alignment.py`), and the trainer's
   `RewardMonitor` over every rollout (learned vs gold, the summary and plot). `--reward-dir DIR` skips stage 1,
   keeping the stage-1 record already in `--output`; `--untrained-reward` skips it and aligns against the untrained
   world CLIP instead, the comparison the learned reward must beat (same recipe and budget):

    python benchmarks/world_reward.py --untrained-reward --output benchmarks/results/world_reward_untrained.json

CPU minutes are this process's CPU time (all threads) per stage; wall minutes beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_minutes() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) / 60


class Clock:
    """CPU and wall minutes since construction."""

    def __init__(self) -> None:
        self.cpu, self.wall = cpu_minutes(), time.time()

    def read(self) -> dict[str, float]:
        return {
            "cpu_minutes": round(cpu_minutes() - self.cpu, 2),
            "wall_minutes": round((time.time() - self.wall) / 60, 2),
        }


def clean_training_pairs(train: Any, limit: int = 2000) -> Any:
    """The first `limit` training pairs with a decided verifier label, labelled by the verifier (no flips): how well
    a reward fits the pairs it trains on, beside how well it generalizes (the held-out pairs)."""
    from visalign.pipelines.preference_data import PreferencePairs
    from visalign.pipelines.reward_data import RewardPairs

    pairs = train.pairs
    keep = [i for i, (a, b) in enumerate(pairs.scores) if a != b][:limit]
    clean = PreferencePairs(
        [pairs.captions[i] for i in keep],
        [pairs.sources[i] for i in keep],
        [1.0 if pairs.scores[i][0] > pairs.scores[i][1] else 0.0 for i in keep],
        [pairs.rows[i] for i in keep],
        resolution=pairs.resolution,
        scores=[pairs.scores[i] for i in keep],
    )
    return RewardPairs(clean, kinds=[train.kinds[i] for i in keep])


def fresh_training_prompt_pairs(config: Any) -> Any:
    """Clean pairs of training-split prompts from new samples and renders (seed `config.seed + 2`), built as the
    held-out pairs are: beside the training pairs' fit and the held-out prompts, whether a reward learned the
    verifier's verdict on images or the images it trained on."""
    from visalign.loading import load_generator
    from visalign.pipelines.reward_data import world_config_pairs

    pipe = load_generator(config.world_generator)[0]
    pipe.set_progress_bar_config(disable=True)
    return world_config_pairs(config, split="train", clean=True, seed=config.seed + 2, pipe=pipe)


def train_reward(config_path: str, overrides: list[str], bench_out: Path) -> tuple[dict[str, Any], str]:
    """Stage 1; returns its record and the trained reward's folder. `visalign bench reward` writes to `bench_out`."""
    import torch

    from visalign.benchmarks.reward_eval import evaluate_reward
    from visalign.cli import main as visalign_main
    from visalign.config import config_to_dict, load_config
    from visalign.pipelines.pickapic import save_pairs
    from visalign.pipelines.reward_training import RewardConfig, RewardTrainer
    from visalign.rewards import load_reward
    from visalign.world.models import default_model_dir

    config = load_config(RewardConfig, config_path, overrides)
    if config.world_generator == "world:sd3" and not (default_model_dir("sd3") / "model_index.json").exists():
        raise FileNotFoundError("the SD3 world model (assets/world/sd3) is not there yet; `visalign world train-base`")
    clock = Clock()
    trainer = RewardTrainer.from_config(config)
    data_time = clock.read()
    train, heldout = trainer.train_data, trainer.eval_data
    gold = torch.tensor([1.0 if a > b else 0.0 if a < b else 0.5 for a, b in train.pairs.scores])
    decided = gold != 0.5
    fit = clean_training_pairs(train)
    checks = {"heldout": heldout, "fit": fit}
    if config.world_generator is not None:
        checks["fresh"] = fresh_training_prompt_pairs(config)
    untrained = load_reward("world-clip")
    base = {name: evaluate_reward(untrained, data)["metrics"] for name, data in checks.items()}
    history = trainer.train()
    trained = load_reward("learned", pretrained=config.output_dir)
    learned = {name: evaluate_reward(trained, data)["metrics"] for name, data in checks.items()}
    pairs = save_pairs(heldout.pairs, Path(config.output_dir) / "heldout_pairs")  # 8-bit PNGs: the CLI reads files
    bench = ["bench", "reward", "--model", "learned", "--pretrained", config.output_dir, "--pairs", str(pairs)]
    bench += ["--out", os.path.relpath(bench_out)]
    if visalign_main(bench) != 0:
        raise RuntimeError(f"`visalign {shlex.join(bench)}` failed")
    record = {
        "command": f"visalign train reward --config {config_path}" + "".join(f" --set {o}" for o in overrides),
        "config": config_to_dict(config),
        "train_pairs": {
            "pairs": len(train),
            "ties": int((~decided).sum()),
            "by_kind": {k: train.kinds.count(k) for k in sorted(set(train.kinds))},
            "labels_agreeing_with_the_verifier": float((train.labels[decided] == gold[decided]).float().mean()),
        },
        "heldout_pairs": {
            "pairs": len(heldout),
            "by_kind": {k: heldout.kinds.count(k) for k in sorted(set(heldout.kinds))},
        },
        "tie_policy": "held-out pairs have no tie labels; accuracy_without_ties counts equal scores 1/2",
        "untrained_world_clip": base["heldout"],
        "learned_reward": learned["heldout"],
        "training_pairs_clean_labels": {
            "pairs": f"the first {len(fit)} decided training pairs, labelled by the verifier (no flips)",
            "untrained_world_clip": base["fit"],
            "learned_reward": learned["fit"],
        },
        "bench_command": f"visalign {shlex.join(bench)}",
        "learning_curve": [
            {"step": h["step"], "accuracy_without_ties": h["eval/accuracy_without_ties"]}
            for h in history
            if "eval/accuracy_without_ties" in h
        ],
        "data_minutes": data_time,
        "minutes": clock.read(),
    }
    if "fresh" in checks:
        record["fresh_training_prompt_pairs"] = {
            "pairs": f"{len(checks['fresh'])} clean pairs of training prompts from new samples and renders (seed + 2)",
            "untrained_world_clip": base["fresh"],
            "learned_reward": learned["fresh"],
        }
    return record, config.output_dir


def align(config_path: str, overrides: list[str], reward_dir: str | None, plot: Path) -> dict[str, Any]:
    """Stage 2: Flow-GRPO against the learned reward (the untrained world CLIP when `reward_dir` is None) with the
    verifier as the monitored gold reward."""
    from visalign.config import config_to_dict, load_config
    from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer

    fixed = ["reward=world-clip", "external_reward=world-verifier", "report_to=none"]
    fixed += ["max_steps=40", "lr_scheduler=constant"]  # the recorded runs' budget (the recipe before its cosine)
    if reward_dir is not None:  # the learned reward's own loader serves whatever head it was trained with
        fixed[:1] = ["reward=learned", f"reward_pretrained={reward_dir}"]
    config = load_config(FlowGRPOConfig, config_path, fixed + overrides)
    clock = Clock()
    trainer = FlowGRPOTrainer.from_config(config)  # the external reward is the monitor's gold reward
    history = trainer.train()
    trained = "the learned world reward" if reward_dir is not None else "the untrained world CLIP"
    plot.write_text(trainer.monitor.plot(f"Flow-GRPO on {trained}: its reward vs the verifier").svg)
    from visalign.benchmarks.world_alignment import before_after
    from visalign.world.evaluate import heldout_prompts

    family = str(config.pretrained_model_name_or_path).removeprefix("world:")
    geneval = before_after(family, Path(config.output_dir) / "final", heldout_prompts(), images_per_prompt=4)
    evals = [h for h in history if "eval/world-verifier/correct" in h]
    keys = ["eval/world-verifier/correct", "eval/world-verifier", "eval/world-clip", "eval/learned"]
    return {
        "command": f"visalign train flow-grpo --config {config_path}"
        + "".join(f" --set {o}" for o in fixed + overrides),
        "config": config_to_dict(config),
        "heldout_accuracy_geneval": {k: geneval[k]["overall"] for k in ("base", "aligned")},
        "heldout_geneval": geneval | {"protocol": "202 held-out prompts x 4 images, 20 steps, CFG 3"},
        "heldout_verifier_accuracy_1_image": {
            "before": evals[0]["eval/world-verifier/correct"],
            "after": evals[-1]["eval/world-verifier/correct"],
        },
        "evaluations": [{"step": h["step"]} | {k: h[k] for k in keys if k in h} for h in evals],
        "monitor": trainer.monitor.summary(),
        "monitor_curve": [
            {"step": r.step, "learned": r.train, "verifier": r.gold, "agreement": r.agreement}
            for r in trainer.monitor.records
        ],
        "monitor_plot": plot.name,  # beside this file
        "minutes": clock.read(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/world_reward.yaml", help="the reward recipe")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="reward config overrides")
    parser.add_argument("--grpo-config", default="configs/world_flow_grpo.yaml")
    parser.add_argument("--grpo-set", nargs="*", default=[], metavar="KEY=VALUE", help="Flow-GRPO config overrides")
    parser.add_argument("--skip-grpo", action="store_true", help="stage 1 only")
    parser.add_argument("--reward-dir", default=None, help="skip stage 1: align with this trained reward")
    parser.add_argument(
        "--untrained-reward", action="store_true", help="skip stage 1: align with the untrained world CLIP"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS / "world_reward.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    result: dict[str, Any] = {
        "command": "python benchmarks/world_reward.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
    }
    if args.untrained_reward and (args.reward_dir or args.skip_grpo):
        parser.error("--untrained-reward aligns against the untrained world CLIP: drop --reward-dir and --skip-grpo")
    if args.untrained_reward:
        result["reward_model"], reward_dir = {"reward": "world-clip, untrained (no stage 1)"}, None
    elif args.reward_dir is None:
        result["reward_model"], reward_dir = train_reward(
            args.config, args.set, output.with_name(output.stem + "_eval")
        )
    else:
        result["reward_model"], reward_dir = json.loads(output.read_text())["reward_model"], args.reward_dir
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    if not args.skip_grpo:
        result["alignment"] = align(
            args.grpo_config, args.grpo_set, reward_dir, output.with_name(output.stem + "_monitor.svg")
        )
        output.write_text(json.dumps(result, indent=2))
    stage = result["reward_model"]
    if "learned_reward" in stage:
        print("held-out pairs, untrained world CLIP:", json.dumps(stage["untrained_world_clip"]))
        print("held-out pairs, learned reward:", json.dumps(stage["learned_reward"]))
    if "alignment" in result:
        print(
            "Flow-GRPO:", json.dumps(result["alignment"]["heldout_accuracy_geneval"]), result["alignment"]["minutes"]
        )
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
