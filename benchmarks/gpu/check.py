"""The GPU check: four real-size steps with random weights, their peak memory and speed beside the planner's figures.

    python benchmarks/gpu/check.py            # on a CUDA machine, about 3-5 minutes on one H100
    python benchmarks/gpu/check.py --tiny --device cpu --out /tmp/check.json   # the same code on tiny models

Without CUDA (and without `--device cpu`) it prints why and exits 0 without writing anything. Each check builds its
models from the bundled architecture configs (`visalign/assets/configs/`) with random weights, so the sizes are the
real ones and nothing is downloaded; text encoders are not loaded (their embeddings are random tensors of the real
shapes), so the planner's figure beside each peak leaves them out too.

- `flow_grpo_sd35m`: one Flow-GRPO iteration with LoRA (r32 on the attention projections) on an SD3.5-Medium-size
  transformer at 512x512, bf16, gradient checkpointing: a group of 8 sampled with the SDE in 10 steps with CFG 4.5
  (batch 16), then the clipped policy-gradient loss on the 9 trained steps, one backward each, one AdamW step.
- `diffusion_dpo_sdxl`: Diffusion-DPO steps with full fine-tuning of an SDXL-size UNet at 1024x1024 (one pair,
  float32 weights, bf16 autocast, gradient checkpointing, a frozen float32 reference copy), AdamW.
- `pickscore_vit_h`: PickScore-size (CLIP ViT-H/14) scoring of batches of 32 images of 512x512 through
  `CLIPScorer` (resize, normalize, both towers), float32, without gradients; images/s.
- `reno_sd_turbo`: ReNO iterations (`visalign.pipelines.reno.ReNO`) on an SD-Turbo-size one-step pipeline (SD2.1
  UNet, VAE, OpenCLIP-H text encoder, bf16) with the PickScore-size reward at 512x512, without checkpointing.

Peak memory is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` per check (models included).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULT = Path(__file__).resolve().parents[1] / "results" / "gpu_check.json"
GiB = 2**30
# tiny stand-ins (same classes, same code) for running the script on a CPU in tests
TINY = {
    "sd35_medium_transformer": dict(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        dual_attention_layers=[0],
        pos_embed_max_size=32,
    ),
    "sdxl_unet": dict(
        block_out_channels=[32, 64, 64],
        transformer_layers_per_block=[1, 1, 1],
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=32,
        projection_class_embeddings_input_dim=1280 + 6 * 8,
        addition_time_embed_dim=8,
        layers_per_block=1,
    ),
    "sd21_unet": dict(
        block_out_channels=[32, 32, 64, 64],
        attention_head_dim=[2, 2, 4, 4],
        cross_attention_dim=32,
        layers_per_block=1,
    ),
    "sd_vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1),
    "openclip_vit_h14_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "clip_vit_h14": dict(
        projection_dim=16,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
}


def build(name: str, device: str, dtype: torch.dtype, tiny: bool) -> nn.Module:
    """A bundled architecture with random weights (seeded), on `device`; `tiny` shrinks it for CPU runs."""
    from visalign.memory import build_model, bundled_config

    config = bundled_config(name)
    overrides = {}
    for key, value in TINY[name].items() if tiny else ():
        overrides[key] = {**config[key], **value} if isinstance(value, dict) else value
    torch.manual_seed(0)
    return build_model(config, dtype, device=device, **overrides)


class Meter:
    """Peak CUDA memory of one check (reset at the start), wall time, and the record line."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Meter:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.peak = torch.cuda.max_memory_allocated() / GiB if self.cuda else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flow_grpo_sd35m(device: str, tiny: bool) -> dict[str, Any]:
    """One Flow-GRPO LoRA iteration: sample a group of 8 (SDE, 10 steps, CFG 4.5), train on 9 steps, one update."""
    from peft import LoraConfig

    from visalign.config import ATTENTION_PROJECTIONS
    from visalign.plan import Workload
    from visalign.sampling import sde_step

    size, group, steps, guidance, tokens = (64, 2, 3, 4.5, 8) if tiny else (512, 8, 10, 4.5, 77 + 128)
    dtype = torch.bfloat16
    with Meter(device) as meter:
        model = build("sd35_medium_transformer", device, dtype, tiny)
        model.add_adapter(
            LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=ATTENTION_PROJECTIONS)
        )
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.data = p.data.float()
        model.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(trained, lr=3e-4, weight_decay=1e-4)
        cfg = model.config
        g = torch.Generator(device).manual_seed(0)
        embeds = torch.randn(2 * group, tokens, cfg.joint_attention_dim, device=device, dtype=dtype, generator=g)
        pooled = torch.randn(2 * group, cfg.pooled_projection_dim, device=device, dtype=dtype, generator=g)
        sigmas = torch.linspace(1, 0, steps + 1, device=device)
        latents = torch.randn(group, cfg.in_channels, size // 8, size // 8, device=device, generator=g)

        def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
            with torch.autocast(device.split(":")[0], dtype=dtype):
                out = model(
                    hidden_states=torch.cat([x, x]).to(dtype),
                    timestep=(sigmas[i] * 1000).expand(2 * group),
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    return_dict=False,
                )[0].float()
            uncond, text = out.chunk(2)
            return uncond.detach() + guidance * (text - uncond.detach())

        path, old = [latents], []
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(steps):
                step = sde_step(velocity(path[-1], i), path[-1], sigmas, i, 0.7, generator=g)
                path.append(step.prev_sample)
                old.append(step.log_prob)
        sync(device)
        sampling = time.perf_counter() - start
        advantages = torch.randn(group, device=device, generator=g)
        start = time.perf_counter()
        for i in range(steps - 1):
            step = sde_step(velocity(path[i], i), path[i], sigmas, i, 0.7, prev_sample=path[i + 1])
            ratio = torch.exp(step.log_prob - old[i])
            loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
            (loss / (steps - 1)).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        sync(device)
        training = time.perf_counter() - start
    work = Workload(
        family="sd35-medium",
        method="flow-grpo",
        use_lora=True,
        lora_rank=32,
        lora_target_modules=list(ATTENTION_PROJECTIONS),
        mixed_precision="bf16",
        gradient_checkpointing=True,
        height=512,
        width=512,
        max_sequence_length=128,
        micro_batch=group,
        images_per_unit=2,
    )
    return {
        **record(meter, work, ["text encoders + VAE", "reward models"], tiny),
        "images_per_s_sampling": group * steps / sampling,
        "images_per_s_training": group * (steps - 1) / training,
        "trained_parameters": sum(p.numel() for p in trained),
    }


def diffusion_dpo_sdxl(device: str, tiny: bool) -> dict[str, Any]:
    """Diffusion-DPO steps (one pair) with full fine-tuning of an SDXL-size UNet at 1024x1024."""
    from visalign.pipelines.dpo import dpo_loss
    from visalign.plan import Workload

    size, steps = (64, 2) if tiny else (1024, 3)
    with Meter(device) as meter:
        model = build("sdxl_unet", device, torch.float32, tiny)
        model.enable_gradient_checkpointing()
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2.048e-5, weight_decay=1e-2)
        cfg = model.config
        g = torch.Generator(device).manual_seed(0)
        x0 = torch.randn(2, cfg.in_channels, size // 8, size // 8, device=device, generator=g)
        embeds = torch.randn(2, 77, cfg.cross_attention_dim, device=device, generator=g)
        time_ids = (cfg.projection_class_embeddings_input_dim - 1280) // cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, 1280, device=device, generator=g),
            "time_ids": torch.randn(2, time_ids, device=device, generator=g),
        }
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            noise = torch.randn(1, *x0.shape[1:], device=device, generator=g).expand(2, -1, -1, -1)
            t = torch.randint(0, 1000, (1,), device=device, generator=g).expand(2)
            alpha = (1 - t.float() / 1000).view(-1, 1, 1, 1)
            noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                with torch.no_grad():
                    ref = reference(noisy, t, embeds, added_cond_kwargs=added).sample.float()
                pred = model(noisy, t, embeds, added_cond_kwargs=added).sample.float()
            errors = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            ref_errors = ((ref - noise) ** 2).mean(dim=(1, 2, 3))
            loss, _ = dpo_loss(errors[:1], errors[1:], ref_errors[:1], ref_errors[1:], beta=5000.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
    work = Workload(
        family="sdxl",
        method="diffusion-dpo",
        use_lora=False,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        height=1024,
        width=1024,
        micro_batch=1,
        images_per_unit=2,
    )
    steady = times[1:] or times
    return {**record(meter, work, ["text encoders + VAE"], tiny), "images_per_s": 2 / (sum(steady) / len(steady))}


def pickscore_scorer(device: str, tiny: bool):
    """A PickScore-size `CLIPScorer` (CLIP ViT-H/14, float32, random weights, the real CLIP tokenizer)."""
    from visalign.reward_models.clip import CLIPScorer
    from visalign.testing import FULL_CLIP_MERGES, clip_tokenizer

    model = build("clip_vit_h14", device, torch.float32, tiny).eval()
    return CLIPScorer(model, clip_tokenizer(486 if tiny else FULL_CLIP_MERGES), name="pickscore-size").to(device)


def pickscore_vit_h(device: str, tiny: bool) -> dict[str, Any]:
    """Scoring throughput of a PickScore-size reward at batch 32 (images 512x512), without gradients."""
    from visalign.memory import count_parameters
    from visalign.plan import REWARD_BACKBONES

    batch, size, rounds = (4, 64, 2) if tiny else (32, 512, 10)
    with Meter(device) as meter:
        scorer = pickscore_scorer(device, tiny)
        pixels = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
        prompts = ["a photo of a red fox in the snow"] * batch
        with torch.no_grad():
            scorer.score(pixels, prompts)  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(rounds):
                scorer.score(pixels, prompts)
            sync(device)
            seconds = time.perf_counter() - start
    predicted = 4 * count_parameters(REWARD_BACKBONES["pickscore"]) / GiB
    return {
        "peak_gib": meter.peak,
        "predicted_gib": None if tiny else predicted,
        "predicted_note": "weights only: the planner does not model inference activations of scoring",
        "images_per_s": batch * rounds / seconds,
        "seconds": meter.seconds,
    }


def reno_sd_turbo(device: str, tiny: bool) -> dict[str, Any]:
    """ReNO iterations on an SD-Turbo-size one-step pipeline with the PickScore-size reward."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from visalign.pipelines.reno import ReNO, ReNOConfig
    from visalign.testing import FULL_CLIP_MERGES, clip_tokenizer

    size, iterations = (64, 3) if tiny else (512, 10)
    dtype = torch.bfloat16
    with Meter(device) as meter:
        pipe = StableDiffusionPipeline(
            vae=build("sd_vae", device, dtype, tiny).eval(),
            text_encoder=build("openclip_vit_h14_text", device, dtype, tiny).eval(),
            tokenizer=clip_tokenizer(486 if tiny else FULL_CLIP_MERGES),
            unet=build("sd21_unet", device, dtype, tiny).eval(),
            scheduler=EulerDiscreteScheduler(  # stabilityai/sd-turbo scheduler_config.json
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                steps_offset=1,
                timestep_spacing="trailing",
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        reward = pickscore_scorer(device, tiny)
        config = ReNOConfig(num_iterations=iterations, height=size, width=size, gradient_checkpointing=False)
        start = time.perf_counter()
        ReNO(pipe, reward, config)(["a photo of a red fox in the snow"], seed=0)
        sync(device)
        seconds = time.perf_counter() - start
    return {
        "peak_gib": meter.peak,
        "predicted_gib": None if tiny else reno_prediction(),
        "iterations_per_s": iterations / seconds,
        "seconds": meter.seconds,
    }


def reno_prediction() -> float:
    """Weights (SD2.1 UNet, OpenCLIP-H text encoder and VAE in bf16, the ViT-H reward in float32) plus the
    activations of one image through the UNet, the VAE decoder and the reward's vision tower, measured on meta."""
    from visalign.memory import build_model, bundled_config, count_parameters, denoiser_inputs, measure_activations
    from visalign.plan import REWARD_BACKBONES

    weights = 2 * sum(count_parameters(n) for n in ("sd21_unet", "openclip_vit_h14_text", "sd_vae"))
    weights += 4 * count_parameters(REWARD_BACKBONES["pickscore"])
    unet_config = bundled_config("sd21_unet")
    unet = build_model(unet_config, torch.bfloat16)
    acts = measure_activations(unet, denoiser_inputs(unet_config, 1, 512, 512, 77, torch.bfloat16)).total

    class Decode(nn.Module):
        def __init__(self, vae: nn.Module):
            super().__init__()
            self.vae = vae

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latents).sample

    class Vision(nn.Module):
        def __init__(self, clip: nn.Module):
            super().__init__()
            self.clip = clip

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.clip.get_image_features(pixel_values=pixel_values)

    vae = build_model(bundled_config("sd_vae"), torch.bfloat16)
    acts += measure_activations(
        Decode(vae), {"latents": torch.empty(1, 4, 64, 64, device="meta", dtype=torch.bfloat16)}
    ).total
    clip = build_model(bundled_config(REWARD_BACKBONES["pickscore"]))
    acts += measure_activations(Vision(clip), {"pixel_values": torch.empty(1, 3, 224, 224, device="meta")}).total
    return (weights + acts) / GiB


def record(meter: Meter, work: Any, absent: list[str], tiny: bool) -> dict[str, Any]:
    """The measured peak beside the planner's (DDP, one process), less the items the check does not load."""
    from visalign.plan import plan_memory

    out = {"peak_gib": meter.peak, "seconds": meter.seconds, "predicted_gib": None}
    if not tiny:
        plan = plan_memory(work, 1)
        predicted = plan.total("ddp") - sum(plan.per_strategy["ddp"][item] for item in absent)
        out["predicted_gib"] = predicted / GiB
        out["predicted_items_gib"] = {k: v / GiB for k, v in plan.per_strategy["ddp"].items() if v and k not in absent}
        out["predicted_items_gib"]["activations"] = plan.activations(work.micro_batch) / GiB
    return out


CHECKS = {
    "flow_grpo_sd35m": flow_grpo_sd35m,
    "diffusion_dpo_sdxl": diffusion_dpo_sdxl,
    "pickscore_vit_h": pickscore_vit_h,
    "reno_sd_turbo": reno_sd_turbo,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available; `cpu` only with --tiny")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same classes (tests the script)")
    parser.add_argument("--only", choices=sorted(CHECKS), nargs="+", default=None, help="run these checks only")
    parser.add_argument("--out", default=str(RESULT), help="where the record goes")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("gpu check skipped: no CUDA device here (it needs one GPU; `--tiny --device cpu` runs the code on CPU)")
        return 0
    if device == "cpu" and not args.tiny:
        print("gpu check: real sizes need a CUDA device; pass --tiny to run on the CPU", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    for name in args.only or list(CHECKS):
        results[name] = CHECKS[name](device, args.tiny)
        print(name, json.dumps(results[name]), flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    record_ = {
        "command": "python benchmarks/gpu/check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": gpu,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tiny": args.tiny,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record_, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
