"""The planner's activation estimate against the memory a real CPU forward keeps for backward (not a timed test).

For each config, a tiny model of a real architecture runs one float32 forward with gradients on the CPU; the rise of
the process's resident set from just before the forward to just after it (the output and everything autograd saved
for backward) is compared with `visalign.memory.saved_activation_bytes`, measured on a meta-device copy of the same
config, plus the output. The transformers are estimated the planner's way: at depth 1 and 2, scaled to their depth.
Each config runs in a fresh process (`--only NAME`) so that freed memory of one does not hide the next; tensors are
large enough (>= 1 MiB) for the allocator to map and unmap them directly, so the resident set follows them.

    python benchmarks/perf/plan_activations.py             # writes benchmarks/results/plan_activations.json
    python benchmarks/perf/plan_activations.py --only sd3 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from harness import rss_mb, run_each, write_record

# tiny configs of real classes; `depth` names the block-count key scaled from depth 1 and 2 (None: measured whole)
CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": dict(
        config={
            "_class_name": "SD3Transformer2DModel",
            "sample_size": 64,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 6,
            "attention_head_dim": 32,
            "num_attention_heads": 8,
            "joint_attention_dim": 256,
            "caption_projection_dim": 256,
            "pooled_projection_dim": 128,
            "pos_embed_max_size": 96,
            "qk_norm": "rms_norm",
            "dual_attention_layers": [0, 1],
        },
        depth="num_layers",
        batch=4,
        size=512,
        tokens=128,
    ),
    "unet": dict(
        config={
            "_class_name": "UNet2DConditionModel",
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [64, 128, 256],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 128,
            "attention_head_dim": 8,
        },
        depth=None,
        batch=4,
        size=512,
        tokens=77,
    ),
}
RESULT = Path(__file__).resolve().parents[1] / "results" / "plan_activations.json"


def estimate(spec: dict[str, Any], checkpointing: bool) -> int:
    """The planner's estimate in bytes: saved tensors on meta (depth-scaled) plus the output."""
    import torch

    from visalign.memory import Activations, build_model, denoiser_inputs, depth_scaled, measure_activations

    config = spec["config"]

    def measure(**depth: int) -> Activations:
        model = build_model(config, **depth)
        inputs = denoiser_inputs(config, spec["batch"], spec["size"], spec["size"], spec["tokens"], torch.float32)
        return measure_activations(model, inputs, checkpointing=checkpointing)

    saved = depth_scaled(config, (spec["depth"],) if spec["depth"] else (), measure).total
    latent = spec["size"] // 8
    output = spec["batch"] * config["out_channels"] * latent * latent * 4
    return saved + output


def measure_cpu(spec: dict[str, Any], checkpointing: bool) -> dict[str, float]:
    """Resident-set rise over one real CPU forward with gradients (float32, torch's own SDPA)."""
    import diffusers
    import torch

    from visalign.memory import denoiser_inputs

    torch.manual_seed(0)
    config = spec["config"]
    model = getattr(diffusers, config["_class_name"]).from_config(config).train()
    if checkpointing:
        model.enable_gradient_checkpointing()

    def real(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.randn(value.shape) if value.is_floating_point() else torch.zeros(value.shape)
        if isinstance(value, dict):
            return {k: real(v) for k, v in value.items()}
        return value

    inputs = real(denoiser_inputs(config, spec["batch"], spec["size"], spec["size"], spec["tokens"], torch.float32))
    inputs["timestep"] = torch.full((spec["batch"],), 500.0)
    with torch.no_grad():
        model(**inputs)  # warm-up: one-time buffers and kernels' workspaces
    peak, done = [0.0], threading.Event()

    def poll() -> None:  # the resident set's peak over forward and backward, sampled every millisecond
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    before = rss_mb()
    poller = threading.Thread(target=poll)
    poller.start()
    out = model(**inputs)
    after = rss_mb()
    out = out[0] if isinstance(out, tuple) else out.sample
    out.float().mean().backward()
    done.set()
    poller.join()
    return {"rss_before_mb": before, "rss_rise_forward_mb": after - before, "rss_rise_peak_mb": peak[0] - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(CONFIGS), default=None, help="one config, in this process")
    parser.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    if args.only is not None:
        import torch

        torch.set_num_threads(args.threads)
        spec = CONFIGS[args.only]
        measured = measure_cpu(spec, args.checkpointing)
        predicted = estimate(spec, args.checkpointing) / 2**20
        # without checkpointing, what the forward keeps is what the estimate counts; with it, the estimate adds one
        # block recomputed in backward, so it is compared with the peak over forward and backward
        measured_mb = measured["rss_rise_peak_mb" if args.checkpointing else "rss_rise_forward_mb"]
        print(json.dumps({**measured, "predicted_mb": predicted, "predicted_over_measured": predicted / measured_mb}))
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # glibc: tensors >= 1 MiB mapped (and unmapped) directly
    results = {}
    for checkpointing in (False, True):
        flags = ["--checkpointing"] if checkpointing else []
        for name, result in run_each(__file__, sorted(CONFIGS), flags, args.threads).items():
            results[f"{name}{'+checkpointing' if checkpointing else ''}"] = result
    write_record(args.out, __file__, args.threads, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
