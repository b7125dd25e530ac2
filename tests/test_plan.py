"""`visalign plan`: exact parameter counts from the bundled configs, measured activations, verdicts, nearest fit."""

from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from visalign.cli import main
from visalign.memory import (
    build_model,
    bundled_config,
    count_parameters,
    denoiser_inputs,
    depth_scaled,
    largest_block,
    lora_parameters,
    measure_activations,
    saved_activation_bytes,
)
from visalign.plan import (
    FAMILIES,
    REWARD_BACKBONES,
    Workload,
    infer_method,
    nearest_fit,
    plan_memory,
    usable_bytes,
    workload_from_config,
)

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
# totals published with the checkpoints (model cards, diffusers/transformers loading logs)
PUBLISHED = {
    "sd15_unet": 859_520_964,
    "sdxl_unet": 2_567_463_684,
    "flux1_dev_transformer": 11_901_408_320,
    "t5_v1_1_xxl_encoder": 4_762_310_656,
    "clip_vit_l14_text": 123_060_480,
}
TINY_SD3 = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
    "qk_norm": "rms_norm",
    "dual_attention_layers": [0, 1],
}


def all_bundled() -> list[str]:
    names = {f.denoiser for f in FAMILIES.values()} | set(REWARD_BACKBONES.values())
    return sorted(names | {c for f in FAMILIES.values() for c in f.frozen.values()})


@pytest.mark.parametrize("name", all_bundled())
def test_parameter_counts_are_the_instantiated_models(name):
    model = build_model(bundled_config(name))
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(name) == sum(p.numel() for p in model.parameters()) > 0
    if name in PUBLISHED:
        assert count_parameters(name) == PUBLISHED[name]


def test_lora_count_is_what_peft_adds():
    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_config(TINY_SD3)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"]
    expected = lora_parameters(model, 4, targets)
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    assert expected == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_depth_scaling_equals_the_full_depth_measurement():
    """Depth 1-2 runs scaled to depth 4 (with two dual-attention blocks) equal measuring all four blocks."""
    inputs = denoiser_inputs(TINY_SD3, 2, 64, 64, 10, torch.float32)
    for checkpointing in (False, True):
        full = saved_activation_bytes(build_model(TINY_SD3), inputs, checkpointing=checkpointing)

        def measure(checkpointing=checkpointing, **overrides):
            return measure_activations(build_model(TINY_SD3, **overrides), inputs, checkpointing=checkpointing)

        assert depth_scaled(TINY_SD3, ("num_layers",), measure).total == full
    plain = saved_activation_bytes(build_model(TINY_SD3), inputs)
    assert saved_activation_bytes(build_model(TINY_SD3), inputs, checkpointing=True) < plain


def test_meta_count_equals_the_real_cpu_count_with_fused_attention():
    """The meta device saves what a real CPU forward saves (the same ops, the same shapes)."""
    from visalign.memory import SavedTensors

    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_config(TINY_SD3)
    meta_inputs = denoiser_inputs(TINY_SD3, 2, 64, 64, 10, torch.float32)
    real = {k: torch.randn(v.shape) for k, v in meta_inputs.items()}
    counter = SavedTensors({p.untyped_storage()._cdata for p in model.parameters()})
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION), counter.counting():
        model(**real)
    assert saved_activation_bytes(build_model(TINY_SD3), meta_inputs) == pytest.approx(counter.total, rel=0.02)


def test_activations_grow_linearly_with_tokens_not_quadratically():
    inputs = [denoiser_inputs(TINY_SD3, 1, s, s, 4, torch.float32) for s in (64, 128)]  # 16 -> 64 image tokens
    small, large = (saved_activation_bytes(build_model(TINY_SD3), x) for x in inputs)
    assert 3 < large / small < 4.5


def test_fsdp_unit_excludes_nested_units():
    unet = build_model(bundled_config("sdxl_unet"))
    assert largest_block(unet) < 0.05 * sum(p.numel() for p in unet.parameters())


def test_plan_splits_state_over_processes():
    work = Workload(family="sd35-medium", use_lora=False, gradient_checkpointing=True, micro_batch=2)
    one, eight = plan_memory(work, 1), plan_memory(work, 8)
    trained = one.parameters["transformer"][0]
    assert one.per_strategy["ddp"]["AdamW moments"] == 8 * trained
    assert eight.per_strategy["zero2"]["AdamW moments"] == trained
    assert eight.per_strategy["fsdp"]["reference copy"] == 4 * trained / 8
    assert eight.per_strategy["ddp"]["DDP gradient buckets"] == 4 * trained  # a second copy of the gradients
    assert eight.total("fsdp") < eight.total("zero2") < one.total("ddp") < eight.total("ddp")
    assert one.activations(2) == 2 * one.activation_per_image


def test_largest_micro_batch_fits_and_one_more_does_not():
    plan = plan_memory(Workload(family="sd15", lora_target_modules=["to_q", "to_v"], micro_batch=4), 1)
    micro = plan.largest_micro_batch("ddp", 24)
    assert micro >= 1
    assert plan.total("ddp", micro) <= usable_bytes(24) < plan.total("ddp", micro + 1)


def test_shipped_recipes_resolve_their_architecture_and_method():
    assert infer_method("configs/sd35m_tempflow_grpo.yaml") == "tempflow-grpo"
    assert infer_method("configs/sdxl_dpo.yaml") == "diffusion-dpo"
    with pytest.raises(ValueError, match="--method"):
        infer_method("recipe.yaml")
    values = {
        "pretrained_model_name_or_path": "tiny:sd3",
        "use_lora": True,
        "lora_rank": 4,
        "lora_target_modules": ["to_q"],
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "ema_decay": 0.0,
        "per_device_train_batch_size": 4,
    }
    with pytest.raises(ValueError, match="--model"):
        workload_from_config("flow-grpo", values, 1)
    with pytest.raises(ValueError, match="unknown method"):
        workload_from_config("ddpo", values, 1, "sd15")


def test_cli_prints_a_plan_that_fits(capsys):
    code = main(["plan", "--config", str(ROOT / "configs" / "flux_flow_grpo.yaml"), "--gpus", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "11,901,408,320" in out and "reward pickscore" in out and "assumptions:" in out
    assert "fits: ddp on 8 x 80 GiB" in out


def test_cli_says_why_a_recipe_does_not_fit_and_what_would(capsys):
    recipe = str(ROOT / "configs" / "sdxl_dpo.yaml")
    code = main(
        ["plan", "--config", recipe, "--gpus", "1", "--gpu-memory", "24", "--set", "per_device_train_batch_size=2048"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "does not fit: ddp on 1 x 24 GiB" in out and "largest: activations" in out
    assert "nearest configuration that fits:" in out and "--set" in out


def test_nearest_fit_turns_to_sharding_when_the_state_alone_is_too_big():
    work = Workload(family="flux1-dev", use_lora=False, gradient_checkpointing=True, micro_batch=1)
    values = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}
    strategy, gpus, settings = nearest_fit(work, values, 8, 80, "ddp")
    assert (strategy, gpus) == ("fsdp", 8) and settings == ""
    assert plan_memory(work, 8).total("fsdp") <= usable_bytes(80) < plan_memory(work, 8).total("ddp")
