"""ReNO speed and memory on CPU: seconds per iteration and peak memory, with and without gradient checkpointing.

Two one-step generators with random weights (seeded), both real `StableDiffusionPipeline`s with an SD-Turbo-style
scheduler (`EulerDiscreteScheduler`, trailing spacing, one step, no guidance):

- `tiny`: `visalign.testing.tiny_pipeline("sd")` at 32x32 (UNet 4/8 channels).
- `50m`: a UNet of 40 M parameters (blocks 96/192/384, two layers each, cross-attention in the two upper blocks),
  a 3-block VAE (64/128/256 channels, factor 4: 128x128 images from 32x32x4 latents) and a 2-layer CLIP text
  encoder: 53 M parameters in all, 47 M of them in the differentiated path (UNet + VAE decoder).

The reward is `world-defects` (no weights), so the numbers are the generator's; one torch thread, batch 1.
Seconds per iteration is `(t_7 - t_2) / 5` for ReNO runs of 7 and 2 iterations (five stepped iterations: render,
reward, backward, clip, SGD step), the median of `--rounds` rounds that alternate the two settings in one process
(the machine is shared, so alternating keeps both settings under the same load). Peak memory is measured in a
fresh process per setting: the peak resident set size (`ru_maxrss`) of a 3-iteration run minus the resident size
after the model was built, i.e. what ReNO adds.

    python benchmarks/perf/reno.py                 # writes benchmarks/results/reno_perf.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import rss_mb

MODELS = ("tiny", "50m")
RESULT = Path(__file__).resolve().parents[1] / "results" / "reno_perf.json"
PROMPT = "two red squares"


def build(model: str):
    """The one-step pipeline `model` with seeded random weights, eval mode, progress bar off; and its image side."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from visalign.testing import TINY_VOCAB_SIZE, clip_tokenizer, tiny_pipeline

    turbo = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    if model == "tiny":
        pipe = tiny_pipeline("sd")
        pipe.scheduler = turbo
        return pipe, 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(96, 192, 384),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 256),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=TINY_VOCAB_SIZE,
            bos_token_id=TINY_VOCAB_SIZE - 2,
            eos_token_id=TINY_VOCAB_SIZE - 1,
            pad_token_id=TINY_VOCAB_SIZE - 1,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=turbo,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, 128


def params(pipe) -> dict[str, int]:
    """Parameter counts; `differentiated` is what the noise's gradient passes through (UNet and VAE decoder)."""
    counts = {name: sum(p.numel() for p in pipe.components[name].parameters()) for name in ("unet", "text_encoder")}
    decoder = (pipe.vae.post_quant_conv, pipe.vae.decoder)
    counts["vae_decoder"] = sum(p.numel() for m in decoder for p in m.parameters())
    counts["differentiated"] = counts["unet"] + counts["vae_decoder"]
    return counts


def run_reno(pipe, side: int, iterations: int, checkpointing: bool) -> float:
    """Seconds of one ReNO run of `iterations` on `PROMPT` with the `world-defects` reward."""
    from visalign.pipelines.reno import ReNO, ReNOConfig
    from visalign.world.rewards import WorldDefectsReward

    config = ReNOConfig(num_iterations=iterations, height=side, width=side, gradient_checkpointing=checkpointing)
    start = time.perf_counter()
    ReNO(pipe, WorldDefectsReward(), config)([PROMPT])
    return time.perf_counter() - start


def memory_worker(model: str, checkpointing: bool) -> dict[str, Any]:
    """Peak resident memory a 3-iteration ReNO run adds to the process (a fresh one per setting)."""
    import torch

    torch.set_num_threads(1)
    pipe, side = build(model)
    base = rss_mb()
    run_reno(pipe, side, 3, checkpointing)
    return {"peak_added_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, "rss_mb": base}


def timing_worker(model: str, rounds: int) -> dict[str, Any]:
    """Seconds per stepped iteration, `(t_7 - t_2) / 5`, alternating the two settings `rounds` times."""
    import torch

    torch.set_num_threads(1)
    pipe, side = build(model)
    run_reno(pipe, side, 2, False)  # warm-up
    times: dict[str, list[float]] = {"0": [], "1": []}
    for _ in range(rounds):
        for checkpointing in (False, True):
            t2, t7 = (run_reno(pipe, side, n, checkpointing) for n in (2, 7))
            times[str(int(checkpointing))].append((t7 - t2) / 5)
    return {"image_size": side, "params": params(pipe), "seconds": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (each runs both settings)")
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "MODEL", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, model, arg = args.worker
        out = memory_worker(model, arg == "1") if kind == "memory" else timing_worker(model, int(arg))
        print(json.dumps(out))
        return 0
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def worker(*worker_args: str) -> dict[str, Any]:
        command = [sys.executable, __file__, "--worker", *worker_args]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    for model in args.models.split(","):
        timing = worker("timing", model, str(args.rounds))
        for checkpointing in (False, True):
            memory = worker("memory", model, str(int(checkpointing)))
            seconds = timing["seconds"][str(int(checkpointing))]
            row = {
                "model": model,
                "gradient_checkpointing": checkpointing,
                "image_size": timing["image_size"],
                "params": timing["params"],
                "seconds_per_iteration": round(statistics.median(seconds), 4),
                "seconds_per_iteration_rounds": [round(t, 4) for t in seconds],
                "peak_added_mb": round(memory["peak_added_mb"], 1),
                "rss_after_build_mb": round(memory["rss_mb"], 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "benchmark": "ReNO seconds per iteration and peak added memory, CPU, one torch thread, batch 1, one step",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "torch": torch.__version__,
        "note": "the machine was shared with other jobs; peak memory is ru_maxrss minus RSS after building the model",
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
