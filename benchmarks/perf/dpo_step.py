"""Diffusion-DPO step benchmark: preference pairs per second and peak memory of one optimizer step, for two UNet sizes.

- `tiny`: `visalign.testing.tiny_pipeline("sd")` as is (a UNet of 0.02 M parameters, blocks 4/8), 32x32 images
  (16x16 latents), 8 pairs per step, LoRA r4 on the attention projections.
- `unet-50m`: the same pipeline with its UNet replaced by an SD1.5-shaped `UNet2DConditionModel` of 49.4 M parameters
  (blocks 64/128/320/320, two layers each, cross-attention in the first three), 64x64 images (32x32 latents),
  2 pairs per step, LoRA r8/a8 (diffusers' DPO script). Kept small so that it runs in about a minute on a CPU.

A step is what `DPOTrainer.train_step` does: VAE-encode both images of each pair, encode the captions, one reference
forward without gradient (adapters disabled) and one trained forward and backward on the `[winners; losers]` batch,
then the optimizer step. Each config runs in a fresh process (`--only NAME`): one warm-up step, then `--steps` timed
ones; times are medians, CPU time is the process's. UNet forward calls are counted with a hook (2 per micro-batch:
reference and model). Memory: on CUDA the peak allocated by torch; on CPU the process's peak resident set
(`ru_maxrss`, model loading included) and its rise over the resident set before the first step.

    python benchmarks/perf/dpo_step.py                  # writes benchmarks/results/dpo_step.json
    python benchmarks/perf/dpo_step.py --only tiny --steps 5
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
    "tiny": dict(height=32, width=32, per_device_train_batch_size=8, lora_rank=4, lora_alpha=4),
    "unet-50m": dict(height=64, width=64, per_device_train_batch_size=2, lora_rank=8, lora_alpha=8),
}
RESULT = Path(__file__).resolve().parents[1] / "results" / "dpo_step.json"


def build_pipeline(name: str):
    import torch
    from diffusers import UNet2DConditionModel

    from visalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    if name == "unet-50m":
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 320, 320),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ).eval()
    return pipe


def run_one(name: str, steps: int) -> dict[str, Any]:
    import resource

    import torch

    from visalign.pipelines.dpo import DPOConfig, DPOTrainer
    from visalign.pipelines.preference_data import PreferencePairs

    options = CONFIGS[name]
    size, batch = options["height"], options["per_device_train_batch_size"]
    g = torch.Generator().manual_seed(0)
    red, blue = torch.rand(2, 4 * batch, 3, size, size, generator=g) * 0.5
    red[:, 0] += 0.5
    pairs = PreferencePairs.from_tensors(["a red square"] * (4 * batch), red, blue)
    pipe = build_pipeline(name)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo_step_"),
        report_to="none",
        pretrained_model_name_or_path="in-memory",
        max_steps=1000,
        beta=5000.0,
        lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        **options,
    )
    trainer = DPOTrainer(pipe, config, pairs=pairs)
    trainer.engine.progress.disable = True
    calls = {"n": 0}
    pipe.unet.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    device = trainer.engine.device
    rss_before = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu, unet_calls = [], [], []
    for i in range(steps + 1):
        start_calls, tick, cpu_tick = calls["n"], time.perf_counter(), time.process_time()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i == 0:
            continue  # warm-up
        wall.append(time.perf_counter() - tick)
        cpu.append(time.process_time() - cpu_tick)
        unet_calls.append(calls["n"] - start_calls)
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss_before}
    if device.type == "cuda":
        memory = {"peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    seconds = statistics.median(wall)
    return {
        "config": options,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "trained_parameters": sum(p.numel() for p in trainer.engine.parameters),
        "device": str(device),
        "pairs_per_step": batch,
        "pairs_per_second": batch / seconds,
        "seconds_per_step": seconds,
        "cpu_seconds_per_step": statistics.median(cpu),
        "unet_forward_calls_per_step": unet_calls[-1],
        "memory": memory,
        "steps_timed": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None, help="run one config in this process")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    if args.only:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.only, args.steps)))
        return
    results = run_each(__file__, list(CONFIGS), ["--steps", str(args.steps)], args.threads)
    for name in results:
        print(name, json.dumps({k: results[name][k] for k in ("pairs_per_second", "seconds_per_step", "memory")}))
    write_record(args.out, __file__, args.threads, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
