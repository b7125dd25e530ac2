"""`visalign plan`: what one process of a training recipe holds in memory, before the run, under DDP, FSDP, ZeRO-2.

    visalign plan --config configs/flux_flow_grpo.yaml --gpus 8
    visalign plan --config configs/sdxl_dpo.yaml --set use_lora=true --gpu-memory 24 80

Parameter counts are exact: the architectures' published `config.json` files (bundled in `visalign/assets/configs/`,
configs only, no weights) are instantiated on the meta device and `p.numel()` is summed. Activations are measured,
not guessed: the real denoiser runs on the meta device (shapes only, no memory, no arithmetic) at the recipe's
resolution with a counting `saved_tensors_hooks`, which adds up the distinct storages autograd keeps for backward
(parameters excluded). Attention is counted as a fused kernel keeps it (q, k, v, output and the row log-sum-exp, as
flash / memory-efficient SDPA on GPUs and the flash kernel on CPUs), not as the math path's S x S matrix. The
transformers run at reduced depth (each block kind at depth 1 and 2) and are scaled linearly by their real depth,
which is exact for identical blocks; UNets run whole (their depth is not one number, and on meta it costs nothing).
With gradient checkpointing the count is what stays saved (everything outside the checkpointed calls plus their
inputs) plus one recomputed call's activations during backward.

Bytes per process (P_t trained, P_b frozen base under LoRA; w the mixed-precision width; N processes):
- weights: trained float32 (4 P_t), frozen denoiser base, text encoders in w, the VAE in float32 (the engine's
  placement); rewards in float32; a full fine-tuning reference is a float32 copy (`keep_reference`).
- gradients 4 P_t, AdamW moments 8 P_t, EMA 4 P_t when `ema_decay > 0`.
- DDP: all of it replicated, plus its gradient buckets (4 P_t) on several processes. ZeRO-2: gradients and
  AdamW moments / N. FSDP (full shard): the trained component (trained and frozen base), its gradients, moments,
  EMA and the reference / N, plus two gathered blocks in w (the one computing and the one prefetched). Text
  encoders, VAE and rewards stay replicated.
- full fine-tuning under autocast without checkpointing also keeps the w-copies of the float32 weights (2 P_t).
A GPU of `G` GiB fits when the total is below `G - 1 GiB` (CUDA context) `- 5%` (allocator fragmentation).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visalign.memory import (
    Activations,
    build_model,
    bundled_config,
    count_parameters,
    denoiser_inputs,
    depth_scaled,
    largest_block,
    lora_parameters,
    measure_activations,
)

GiB = 2**30
GPU_SIZES = (24.0, 40.0, 80.0, 141.0)
CONTEXT_GIB, FRAGMENTATION = 1.0, 0.05
WIDTH = {"no": 4, "fp16": 2, "bf16": 2}
COMPUTE_DTYPE = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STRATEGIES = ("ddp", "zero2", "fsdp")


@dataclass(frozen=True)
class Family:
    """A generator family: its bundled configs and the shapes its denoiser sees."""

    denoiser: str  # bundled config name of the trained component
    component: str  # "unet" or "transformer"
    frozen: dict[str, str]  # the other components: pipeline name -> bundled config
    text_tokens: int  # encoder tokens besides `max_sequence_length` (CLIP's 77 for SD3), or all of them for UNets
    uses_max_sequence_length: bool = False
    guidance_embedded: bool = False  # FLUX.1-dev: guidance is an input, CFG needs no second batch half
    depth_keys: tuple[str, ...] = ()  # config keys of the block counts (empty: measure whole)


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15_unet", "unet", {"text_encoder": "clip_vit_l14_text", "vae": "sd_vae"}, 77),
    "sd21": Family("sd21_unet", "unet", {"text_encoder": "openclip_vit_h14_text", "vae": "sd_vae"}, 77),
    "sdxl": Family(
        "sdxl_unet",
        "unet",
        {
            "text_encoder": "clip_vit_l14_text",
            "text_encoder_2": "openclip_vit_bigg14_text_projection",
            "vae": "sd_vae",
        },
        77,
    ),
    **{
        name: Family(
            f"{name.replace('-', '_')}_transformer",
            "transformer",
            {
                "text_encoder": "clip_vit_l14_text_projection",
                "text_encoder_2": "openclip_vit_bigg14_text_projection",
                "text_encoder_3": "t5_v1_1_xxl_encoder",
                "vae": "sd3_vae",
            },
            77,
            uses_max_sequence_length=True,
            depth_keys=("num_layers",),
        )
        for name in ("sd35-medium", "sd35-large")
    },
    "flux1-dev": Family(
        "flux1_dev_transformer",
        "transformer",
        {"text_encoder": "clip_vit_l14_text", "text_encoder_2": "t5_v1_1_xxl_encoder", "vae": "sd3_vae"},
        0,
        uses_max_sequence_length=True,
        guidance_embedded=True,
        depth_keys=("num_layers", "num_single_layers"),
    ),
    "qwen-image": Family(
        "qwen_image_transformer",
        "transformer",
        {"text_encoder": "qwen2_5_vl_7b", "vae": "qwen_image_vae"},
        0,
        uses_max_sequence_length=True,
        depth_keys=("num_layers",),
    ),
    **{
        f"wan21-{size}": Family(
            f"wan21_{size}_transformer",
            "transformer",
            {"text_encoder": "umt5_xxl_encoder", "vae": "wan21_vae"},
            0,
            uses_max_sequence_length=True,
            depth_keys=("num_layers",),
        )
        for size in ("1.3b", "14b")
    },
}
# The VAE shares the SD3 architecture with FLUX.1's (their scaling constants differ, not their parameters).
HUB_IDS = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/sd-turbo": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/sdxl-turbo": "sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "sd35-medium",
    "stabilityai/stable-diffusion-3.5-large": "sd35-large",
    "black-forest-labs/FLUX.1-dev": "flux1-dev",
    "Qwen/Qwen-Image": "qwen-image",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan21-1.3b",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan21-14b",
}
REWARD_BACKBONES = {
    "pickscore": "clip_vit_h14",
    "hpsv2": "clip_vit_h14",
    "hpsv2.1": "clip_vit_h14",
    "clipscore": "clip_vit_l14",
    "aesthetic": "clip_vit_l14",
}
# The methods whose recipes the planner reads (`workload_from_config` turns their batch fields into images).
METHODS = ("flow-grpo", "pref-grpo", "tempflow-grpo", "diffusion-dpo", "diffusion-dro", "prdp")


def activation_bytes_per_sample(
    family: Family, height: int, width: int, max_sequence_length: int, dtype: torch.dtype, checkpointing: bool
) -> int:
    """Activation bytes of one sample (batch 2 measured, halved), the depth scaled from reduced-depth runs."""
    config = bundled_config(family.denoiser)
    tokens = family.text_tokens + (max_sequence_length if family.uses_max_sequence_length else 0)
    inputs = denoiser_inputs(config, 2, height, width, tokens, dtype)

    def measure(**depth: int) -> Activations:
        return measure_activations(build_model(config, dtype, **depth), inputs, checkpointing=checkpointing)

    return depth_scaled(config, family.depth_keys, measure).total // 2


# -- the memory model -------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What one training process runs: the model, how it is trained, and the images of one forward."""

    family: str
    method: str = "flow-grpo"
    use_lora: bool = True
    lora_rank: int = 32
    lora_target_modules: list[str] = field(default_factory=list)
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    ema: bool = False
    rewards: list[str] = field(default_factory=list)
    height: int = 512
    width: int = 512
    max_sequence_length: int = 256
    micro_batch: int = 1  # in the method's unit: samples (GRPO, PRDP) or pairs (DPO, DRO) per forward and process
    images_per_unit: int = 1  # images per unit in one forward: 2 for pairs and for a CFG batch


@dataclass
class Plan:
    """Bytes per process of one workload under each strategy, and the parameter counts they come from."""

    workload: Workload
    gpus: int
    parameters: dict[str, tuple[int, str]]  # component -> (count, how it is held)
    activation_per_image: int
    per_strategy: dict[str, dict[str, float]]  # strategy -> item -> bytes (static items; activations separate)

    def static(self, strategy: str) -> float:
        return sum(self.per_strategy[strategy].values())

    def activations(self, micro_batch: int) -> float:
        return micro_batch * self.workload.images_per_unit * self.activation_per_image

    def total(self, strategy: str, micro_batch: int | None = None) -> float:
        mb = self.workload.micro_batch if micro_batch is None else micro_batch
        return self.static(strategy) + self.activations(mb)

    def largest_micro_batch(self, strategy: str, gpu_gib: float) -> int:
        """The largest micro-batch (the method's unit) whose total fits a GPU of `gpu_gib` GiB (0: none)."""
        room = usable_bytes(gpu_gib) - self.static(strategy)
        per_unit = self.workload.images_per_unit * self.activation_per_image
        return max(0, int(room // per_unit)) if per_unit > 0 else (10**6 if room >= 0 else 0)


def usable_bytes(gpu_gib: float) -> float:
    """What allocations may use on a GPU of `gpu_gib` GiB: less the CUDA context and the allocator's fragmentation."""
    return (gpu_gib - CONTEXT_GIB) * (1 - FRAGMENTATION) * GiB


def plan_memory(workload: Workload, gpus: int = 1) -> Plan:
    """Per-process bytes of `workload` on `gpus` processes under DDP, ZeRO-2 and FSDP (see the module docstring)."""
    if workload.family not in FAMILIES:
        raise ValueError(f"unknown model family {workload.family!r}; known: {', '.join(FAMILIES)}")
    if gpus < 1:
        raise ValueError(f"`gpus` must be >= 1, got {gpus}")
    family = FAMILIES[workload.family]
    w = WIDTH[workload.mixed_precision]
    denoiser = build_model(bundled_config(family.denoiser))
    total = sum(p.numel() for p in denoiser.parameters())
    parameters: dict[str, tuple[int, str]] = {}
    if workload.use_lora:
        trained = lora_parameters(denoiser, workload.lora_rank, workload.lora_target_modules)
        if trained == 0:
            raise ValueError(f"`lora_target_modules` {workload.lora_target_modules} match no linear layer")
        base = total
        parameters[family.component] = (total, f"frozen, {w} bytes")
        parameters[f"{family.component} LoRA"] = (trained, "trained, float32")
    else:
        trained, base = total, 0
        parameters[family.component] = (total, "trained, float32")
    frozen_other = 0.0
    for name, config_name in family.frozen.items():
        count = count_parameters(config_name)
        width = 4 if name == "vae" else w
        parameters[name] = (count, f"frozen, {width} bytes")
        frozen_other += count * width
    reward_bytes = 0.0
    for reward in workload.rewards:
        if reward in REWARD_BACKBONES:
            count = count_parameters(REWARD_BACKBONES[reward])
            parameters[f"reward {reward}"] = (count, "frozen, 4 bytes")
            reward_bytes += 4 * count
        else:  # the shapes world's rewards are tiny; VLM judges usually run in a server of their own
            parameters[f"reward {reward}"] = (0, "not counted: no bundled backbone")
    reference = 4 * total if not workload.use_lora else 0  # the engine's keep_reference copy of full fine-tuning
    autocast_copies = 2 * trained if not workload.use_lora and w == 2 and not workload.gradient_checkpointing else 0
    items = {
        "trained weights": 4.0 * trained,
        "frozen denoiser base": float(w * base),
        "text encoders + VAE": frozen_other,
        "reward models": reward_bytes,
        "reference copy": float(reference),
        "gradients": 4.0 * trained,
        "AdamW moments": 8.0 * trained,
        "EMA": 4.0 * trained if workload.ema else 0.0,
        "autocast weight copies": float(autocast_copies),
        "gathered blocks": 0.0,
        "DDP gradient buckets": 0.0,
    }
    per_strategy = {"ddp": {**items, "DDP gradient buckets": 4.0 * trained if gpus > 1 else 0.0}}
    zero2 = dict(items)
    zero2["gradients"] /= gpus
    zero2["AdamW moments"] /= gpus
    per_strategy["zero2"] = zero2
    fsdp = dict(items)
    for key in ("trained weights", "frozen denoiser base", "reference copy", "gradients", "AdamW moments", "EMA"):
        fsdp[key] /= gpus
    fsdp["autocast weight copies"] = 0.0  # blocks are gathered in the compute dtype and freed after use
    fsdp["gathered blocks"] = 2.0 * w * largest_block(denoiser) if gpus > 1 else 0.0
    per_strategy["fsdp"] = fsdp
    activation = activation_bytes_per_sample(
        family,
        workload.height,
        workload.width,
        workload.max_sequence_length,
        COMPUTE_DTYPE[workload.mixed_precision],
        workload.gradient_checkpointing,
    )
    return Plan(workload, gpus, parameters, activation, per_strategy)


ASSUMPTIONS = (
    "bytes per process; GiB = 2^30; a GPU of G GiB offers (G - 1 GiB CUDA context) x 0.95 (fragmentation)",
    "weights as the engine places them: trained float32, frozen denoiser and text encoders in the mixed-precision "
    "dtype, the VAE and the reward models in float32; AdamW (two float32 moments); EMA float32",
    "activations measured on the meta device at the recipe's resolution with fused attention (flash / memory-"
    "efficient SDPA), transformers at depth 1-2 scaled to their depth; LoRA's rank-r intermediates not counted",
    "peaks outside the training forward/backward (sampling, VAE decoding, reward scoring, all without gradients) "
    "are assumed below it; DDP's gradient buckets (a second copy of the gradients) are counted, ZeRO-2's "
    "communication buckets are not",
    "FSDP shards the trained component, its gradients, moments, EMA and the full-fine-tuning reference; two blocks "
    "are gathered at a time; text encoders, VAE and rewards stay whole on every process",
)


# -- the command ------------------------------------------------------------------------------------------------------

METHOD_TOKENS = {
    "tempflow_grpo": "tempflow-grpo",
    "pref_grpo": "pref-grpo",
    "flow_grpo": "flow-grpo",
    "dpo": "diffusion-dpo",
    "dro": "diffusion-dro",
    "prdp": "prdp",
}


def infer_method(path: str | Path) -> str:
    """The method a recipe file is for, from its name (`sdxl_dpo.yaml` -> diffusion-dpo)."""
    stem = Path(path).stem
    for token, method in METHOD_TOKENS.items():
        if token in stem:
            return method
    raise ValueError(f"cannot tell the method from the file name {Path(path).name!r}: pass --method")


def workload_from_config(method: str, values: dict[str, Any], gpus: int, family: str | None = None) -> Workload:
    """The workload a method's resolved config (`dataclasses.asdict`) describes on `gpus` processes."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if family is None:
        family = HUB_IDS.get(values["pretrained_model_name_or_path"])
        if family is None:
            raise ValueError(
                f"`pretrained_model_name_or_path` {values['pretrained_model_name_or_path']!r} is not a known "
                "architecture: pass --model with one of "
                f"{', '.join(FAMILIES)}"
            )
    rewards = [r for r in (values.get("reward"), values.get("external_reward")) if r]
    micro = values["per_device_train_batch_size"]
    if method in ("diffusion-dpo", "diffusion-dro"):
        per_unit = 2
        if values.get("dataset"):
            rewards = []  # offline pairs: no reward model in the run
    else:
        cfg = values.get("guidance_scale", 1.0) > 1 and not FAMILIES[family].guidance_embedded and method != "prdp"
        per_unit = 2 if cfg else 1
    return Workload(
        family=family,
        method=method,
        use_lora=values["use_lora"],
        lora_rank=values["lora_rank"],
        lora_target_modules=list(values["lora_target_modules"]),
        mixed_precision=values["mixed_precision"],
        gradient_checkpointing=values["gradient_checkpointing"],
        ema=values["ema_decay"] > 0,
        rewards=rewards,
        height=values.get("height", 512),
        width=values.get("width", 512),
        max_sequence_length=values.get("max_sequence_length") or 256,
        micro_batch=micro,
        images_per_unit=per_unit,
    )


def micro_batch_setting(workload: Workload, micro: int, values: dict[str, Any], gpus: int) -> str:
    """The `--set` that gives a micro-batch of `micro` (the method's unit) per process, with the same examples per
    optimizer step (more accumulation; PRDP accumulates within its step by itself)."""
    if workload.method == "prdp":
        return f"per_device_train_batch_size={micro}"
    per_step = values["per_device_train_batch_size"] * values["gradient_accumulation_steps"]
    return f"per_device_train_batch_size={micro} gradient_accumulation_steps={per_step // micro}"


def feasible_micro_batch(plan: Plan, strategy: str, gpu_gib: float, values: dict[str, Any]) -> int:
    """The largest micro-batch <= the recipe's that fits and that the method's batch arithmetic allows."""
    micro = min(plan.largest_micro_batch(strategy, gpu_gib), plan.workload.micro_batch)
    if plan.workload.method != "prdp":
        per_process = values["per_device_train_batch_size"] * values["gradient_accumulation_steps"]  # per step
        while micro > 0 and per_process % micro:
            micro -= 1
    return micro


def nearest_fit(
    workload: Workload, values: dict[str, Any], gpus: int, gpu_gib: float, strategy: str
) -> tuple[str, int, str] | None:
    """The nearest configuration that fits `gpu_gib`, tried in this order: a smaller micro-batch; gradient
    checkpointing; ZeRO-2 or FSDP on the same GPUs; FSDP on more GPUs; LoRA. Returns (strategy, gpus, settings)."""
    ckpt = dataclasses.replace(workload, gradient_checkpointing=True)
    lora = dataclasses.replace(ckpt, use_lora=True)
    candidates = [(workload, gpus, (strategy,)), (ckpt, gpus, (strategy,)), (ckpt, gpus, ("zero2", "fsdp"))]
    candidates += [(ckpt, n, ("fsdp",)) for n in (8, 16, 32, 64) if n > gpus]
    candidates += [(lora, gpus, (strategy, "fsdp"))]
    for candidate, n, strategies in candidates:
        plan = plan_memory(candidate, n)
        for s in strategies:
            if n > 1 or s == "ddp":
                micro = feasible_micro_batch(plan, s, gpu_gib, values)
                if micro >= 1:
                    sets = [
                        f"{k}=true"
                        for k in ("gradient_checkpointing", "use_lora")
                        if getattr(candidate, k) and not getattr(workload, k)
                    ]
                    if micro < candidate.micro_batch:
                        sets.append(micro_batch_setting(candidate, micro, values, n))
                    return s, n, " ".join(sets)
    return None


def format_plan(plan: Plan, gpu_sizes: list[float]) -> str:
    """The plan as a text report: parameters, bytes per process per strategy, verdicts per GPU size, assumptions."""
    w = plan.workload
    lines = [f"model {w.family} ({FAMILIES[w.family].denoiser}), {w.method}, {plan.gpus} process(es)", "parameters:"]
    lines += [f"  {name:<24} {count:>16,}  {how}" for name, (count, how) in plan.parameters.items()]
    lines.append(
        f"micro-batch: {w.micro_batch} x {w.images_per_unit} image(s) of {w.height}x{w.width} per forward, "
        f"gradient checkpointing {'on' if w.gradient_checkpointing else 'off'}, {w.mixed_precision}; activations "
        f"{plan.activation_per_image / GiB:.3f} GiB per image"
    )
    strategies = STRATEGIES if plan.gpus > 1 else ("ddp",)
    lines.append(f"GiB per process  {'':<14}" + "".join(f"{s:>10}" for s in strategies))
    for item in plan.per_strategy["ddp"]:
        values = [plan.per_strategy[s][item] for s in strategies]
        if any(values):
            lines.append(f"  {item:<28}" + "".join(f"{v / GiB:>10.2f}" for v in values))
    lines.append(
        f"  {'activations':<28}" + "".join(f"{plan.activations(w.micro_batch) / GiB:>10.2f}" for _ in strategies)
    )
    lines.append(f"  {'total':<28}" + "".join(f"{plan.total(s) / GiB:>10.2f}" for s in strategies))
    lines.append("verdict per GPU (largest micro-batch that fits, in the method's unit):")
    for size in gpu_sizes:
        cells = []
        for s in strategies:
            fits = plan.total(s) <= usable_bytes(size)
            cells.append(f"{s} {'fits' if fits else 'no'} (max {plan.largest_micro_batch(s, size)})")
        lines.append(f"  {size:>5g} GiB: " + ", ".join(cells))
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the training recipe (YAML), as for `visalign train`")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="override values"
    )
    parser.add_argument("--method", default=None, help="the method (default: from the file name)")
    parser.add_argument(
        "--model",
        default=None,
        choices=sorted(FAMILIES),
        help="the architecture (default: from `pretrained_model_name_or_path`)",
    )
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run uses")
    parser.add_argument(
        "--gpu-memory",
        type=float,
        nargs="+",
        default=None,
        metavar="GB",
        help=f"GPU sizes in GiB (default {GPU_SIZES}); the verdict is for the largest (default 80)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="the strategy to judge (default: ddp, or fsdp when the recipe says fsdp)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the plan; exit code 1 when the recipe does not fit the (largest) GPU size asked for."""
    from visalign.config import load_config

    method = args.method or infer_method(args.config)
    # recipes are read through `visalign train`'s registry, so defaults and validation are the run's own
    registry = importlib.import_module("visalign.pipelines.train").METHODS
    if method not in registry:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(registry))}")
    module, _, name = registry[method][0].partition(":")
    config = load_config(getattr(importlib.import_module(module), name), args.config, args.overrides)
    values = dataclasses.asdict(config)
    workload = workload_from_config(method, values, args.gpus, args.model)
    sizes = list(args.gpu_memory or GPU_SIZES)
    plan = plan_memory(workload, args.gpus)
    print(f"visalign plan: {args.config}")
    print(format_plan(plan, sizes))
    strategy = args.strategy or ("fsdp" if values.get("fsdp") and args.gpus > 1 else "ddp")
    target = max(sizes) if args.gpu_memory else 80.0
    if plan.total(strategy) <= usable_bytes(target):
        print(f"fits: {strategy} on {args.gpus} x {target:g} GiB ({plan.total(strategy) / GiB:.1f} GiB per process)")
        return 0
    items = {**plan.per_strategy[strategy], "activations": plan.activations(workload.micro_batch)}
    biggest = sorted(items.items(), key=lambda kv: -kv[1])[:3]
    print(
        f"does not fit: {strategy} on {args.gpus} x {target:g} GiB needs {plan.total(strategy) / GiB:.1f} GiB per "
        f"process, {usable_bytes(target) / GiB:.1f} usable; largest: "
        + ", ".join(f"{k} {v / GiB:.1f}" for k, v in biggest)
    )
    nearest = nearest_fit(workload, values, args.gpus, target, strategy)
    if nearest is None:
        print("nearest configuration that fits: none found (up to 64 GPUs with FSDP, checkpointing and LoRA)")
    else:
        s, n, sets = nearest
        print(
            f"nearest configuration that fits: {s} on {n} x {target:g} GiB" + (f" with --set {sets}" if sets else "")
        )
    return 1
