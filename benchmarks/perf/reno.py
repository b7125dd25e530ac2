"""ReNO speed and memory on CPU: seconds per iteration and peak memory, with and without gradient checkpointing.

Two one-step generators with random weights (seeded), both real `StableDiffusionPipeline`s with an SD-Turbo-style
scheduler (`EulerDiscreteScheduler`, trailing spacing, one step, no guidance):

- `tiny`: `visalign.testing.tiny_pipeline("sd")` at 32x32 (UNet 4/8 channels).
- `50m`: a UNet of 40 M parameters (blocks 96/192/384, two layers each, cross-attention in the two upper blocks),
  a 3-block VAE (64/128/256 channels, factor 4: 128x128 images from 32x32x4 latents) and a 2-layer CLIP text
  encoder: 53 M parameters in all, 47 M of them in the differentiated path (UNet + VAE decoder).

The reward is `world-defects` (no weights), so the numbers are the generator's. Each (model, checkpointing) pair
runs in a fresh process with one torch thread: ReNO with 2 and with 7 iterations; seconds per iteration is
`(t_7 - t_2) / 5` (five stepped iterations: render, reward, backward, clip, SGD step); peak memory is the process's
peak resident set size (`ru_maxrss`) minus the resident size after the model was built, i.e. what ReNO adds.

    python benchmarks/perf/reno.py                 # writes benchmarks/results/reno_perf.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(model: str, checkpointing: bool) -> dict[str, Any]:
    import torch

    from visalign.pipelines.reno import ReNO, ReNOConfig
    from visalign.world.rewards import WorldDefectsReward

    torch.set_num_threads(1)
    pipe, side = build(model)
    params = {name: sum(p.numel() for p in pipe.components[name].parameters()) for name in ("unet", "text_encoder")}
    params["vae_decoder"] = sum(p.numel() for p in pipe.vae.decoder.parameters())
    params["vae_decoder"] += sum(p.numel() for p in pipe.vae.post_quant_conv.parameters())
    params["differentiated"] = params["unet"] + params["vae_decoder"]
    base = rss_mb()
    seconds = {}
    for n in (2, 7):
        config = ReNOConfig(num_iterations=n, height=side, width=side, gradient_checkpointing=checkpointing)
        start = time.perf_counter()
        ReNO(pipe, WorldDefectsReward(), config)([PROMPT])
        seconds[n] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "model": model,
        "gradient_checkpointing": checkpointing,
        "image_size": side,
        "params": params,
        "seconds_per_iteration": (seconds[7] - seconds[2]) / 5,
        "peak_added_mb": peak - base,
        "rss_after_build_mb": base,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1] == "1")))
        return 0
    import torch

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for model in args.models.split(","):
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--worker", model, str(int(checkpointing))]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row))
            rows.append(row)
    for row in rows:
        row["seconds_per_iteration"] = round(row["seconds_per_iteration"], 4)
        row["peak_added_mb"] = round(row["peak_added_mb"], 1)
        row["rss_after_build_mb"] = round(row["rss_after_build_mb"], 1)
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
