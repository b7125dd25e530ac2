"""GRPO step benchmark: samples per second, peak memory and the time of each phase of a full Flow-GRPO iteration
(sampling with the SDE and log-probs, reward, update), for two SD3 sizes.

- `tiny`: `visalign.testing.tiny_pipeline("sd3")` as is (a 1-block transformer of 0.04 M parameters with patch 1,
  T5 included), 16x16 images (256 image tokens), 10 steps with CFG 4.5 in the graph, 16 samples (2 prompts x 8),
  all 9 trainable steps trained, KL on (beta 0.04: one reference pass per trained step), LoRA r4.
- `sd3-50m`: the same pipeline with its transformer replaced by an `SD3Transformer2DModel` of 54.6 M parameters
  (6 joint blocks, 8 heads x 64, patch 2: 256 image tokens at 32x32), 4 steps with CFG 4.5, 4 samples (1 prompt x 4),
  LoRA r32/a64 on the attention projections, no KL. Kept small so that it runs in about a minute on a CPU.

The reward is the mean brightness (negligible cost, so the reward phase measures the trainer's overhead). Each
config runs in a fresh process (`--only NAME`): one warm-up iteration, then `--iterations` timed ones; times are
medians. Transformer forward calls are counted per phase with a forward hook: sampling calls the transformer once
per step and batch (the CFG pair is one doubled call); the update calls it once per (micro-batch, trained step), plus
once more per unit for the KL reference. No stored latent is recomputed: the update's calls are exactly those units.
Memory: on CUDA the peak allocated by torch; on CPU the process's peak resident set (`ru_maxrss`, model loading
included) and its rise over the resident set before the first iteration.

    python benchmarks/perf/grpo_step.py                 # writes benchmarks/results/grpo_step.json
    python benchmarks/perf/grpo_step.py --only tiny --iterations 5
    # the same configs on another checkout of the project, alternating, with the speed ratio per config:
    python benchmarks/perf/grpo_step.py --baseline ../old --baseline-python ../old-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import rss_mb, run_each, write_record

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        height=16,
        width=16,
        num_inference_steps=10,
        guidance_scale=4.5,
        group_size=8,
        sample_batch_size=16,
        per_device_train_batch_size=16,
        beta=0.04,
        lora_rank=4,
        lora_alpha=4,
    ),
    "sd3-50m": dict(
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=4.5,
        group_size=4,
        sample_batch_size=4,
        per_device_train_batch_size=4,
        beta=0.0,
        lora_rank=32,
        lora_alpha=64,
    ),
}
RESULT = Path(__file__).resolve().parents[1] / "results" / "grpo_step.json"
PROMPTS = ["a red square", "two blue circles", "a green triangle above a white circle", "three yellow squares"]


def build_pipeline(name: str):
    import torch
    from diffusers import SD3Transformer2DModel

    from visalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    if name == "sd3-50m":
        torch.manual_seed(0)
        pipe.transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=6,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=32,
            caption_projection_dim=512,
            pooled_projection_dim=64,
            pos_embed_max_size=32,
        ).eval()
    return pipe


def run_one(name: str, iterations: int) -> dict[str, Any]:
    import resource

    import torch

    from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer
    from visalign.rewards import RewardModel

    class Brightness(RewardModel):
        name = "brightness"

        def _score(self, pixels, prompts):
            return pixels.mean(dim=(1, 2, 3))

    pipe = build_pipeline(name)
    options = CONFIGS[name]
    config = FlowGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_step_"),
        report_to="none",
        max_sequence_length=16,
        num_batches_per_iteration=1,
        gradient_accumulation_steps=1,
        max_steps=1000,
        **options,
    )
    trainer = FlowGRPOTrainer(pipe, Brightness(), config, PROMPTS)
    trainer.engine.progress.disable = True
    calls = {"n": 0}
    pipe.transformer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    device = trainer.engine.device
    rss_before = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    records = []
    for i in range(iterations + 1):
        iteration = trainer.prompt_sampler.iteration
        start_calls = calls["n"]
        rollout, rewards, metrics = trainer.rollout()
        sampling_calls = calls["n"] - start_calls
        advantages, _ = trainer.advantages(rollout, rewards)
        tick = time.perf_counter()
        trainer.update(rollout, advantages, iteration)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        update_seconds = time.perf_counter() - tick
        update_calls = calls["n"] - start_calls - sampling_calls
        trained = int(trainer.trained_steps(rollout, iteration).sum())
        units = trained * -(-len(rollout) // config.per_device_train_batch_size)
        if i == 0:
            continue  # warm-up
        total = metrics["time/sampling"] + metrics["time/reward"] + update_seconds
        records.append(
            dict(
                sampling=metrics["time/sampling"],
                reward=metrics["time/reward"],
                update=update_seconds,
                total=total,
                sampling_calls=sampling_calls,
                update_calls=update_calls,
                expected_update_calls=units * (2 if config.beta > 0 else 1),
                samples=len(rollout),
            )
        )

    median = {k: statistics.median(r[k] for r in records) for k in ("sampling", "reward", "update", "total")}
    last = records[-1]
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before}
    if device.type == "cuda":
        memory = {"peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {
        "config": options,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "trained_parameters": sum(p.numel() for p in trainer.engine.parameters),
        "device": str(device),
        "samples_per_iteration": last["samples"],
        "samples_per_second": last["samples"] / median["total"],
        "seconds_per_iteration": median,
        "phase_share": {k: median[k] / median["total"] for k in ("sampling", "reward", "update")},
        "transformer_calls": {
            "sampling": last["sampling_calls"],
            "update": last["update_calls"],
            "update_expected_without_recomputation": last["expected_update_calls"],
        },
        "memory": memory,
        "iterations_timed": iterations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None, help="run one config in this process")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--baseline", default=None, help="another checkout to time alongside (its own script)")
    parser.add_argument("--baseline-python", default=None, help="the interpreter that imports that checkout")
    args = parser.parse_args()
    if args.only:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.only, args.iterations)))
        return
    flags = ["--iterations", str(args.iterations)]
    if args.baseline:
        results: dict[str, Any] = {}
        baseline_script = str(Path(args.baseline) / "benchmarks" / "perf" / Path(__file__).name)
        for name in CONFIGS:  # alternate, so that machine load affects both alike
            ours = run_each(__file__, [name], flags, args.threads)[name]
            theirs = run_each(
                baseline_script, [name], flags, args.threads, python=args.baseline_python, cwd=args.baseline
            )[name]
            ratio = ours["samples_per_second"] / theirs["samples_per_second"]
            results[name] = {**ours, "baseline": theirs, "speed_ratio_vs_baseline": ratio}
            ours_s, theirs_s = ours["samples_per_second"], theirs["samples_per_second"]
            print(name, f"{ours_s:.2f} vs baseline {theirs_s:.2f} samples/s: x{ratio:.3f}")
    else:
        results = run_each(__file__, list(CONFIGS), flags, args.threads)
    for name in results:
        print(name, json.dumps(results[name]["seconds_per_iteration"]))
    write_record(args.out, __file__, args.threads, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
