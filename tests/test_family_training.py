"""Every family trains through the one generator layer: one GRPO iteration (Flow-GRPO's SDE on flow families,
DDPO's DDIM step on SD/SDXL) changes the LoRA, and the saved LoRA loads with `pipe.load_lora_weights` and gives the
trained pipeline's output; a video family is rewarded on videos `[B, T, 3, H, W]`."""

from pathlib import Path

import pytest
import torch
from preference_helpers import Brightness

from visalign.generators import ADAPTERS
from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer
from visalign.reward_models.video import FrameAggregate
from visalign.testing import VIDEO_FAMILIES, tiny_pipeline

PROMPTS = ["a red square", "two blue circles"]
# family -> (image size, guidance scale of the rollouts and of the comparison)
SETUPS = {
    "sd": (32, 2.0),
    "sdxl": (32, 2.0),
    "sd3": (16, 2.0),
    "flux": (16, 3.5),
    "qwen-image": (16, 2.0),
    "wan": (16, 2.0),
}


def generate(pipe, family: str, size: int, guidance: float) -> torch.Tensor:
    kw = dict(height=size, width=size, num_inference_steps=2, guidance_scale=guidance, output_type="pt")
    kw["generator"] = [torch.Generator().manual_seed(0)]
    if family == "wan":
        return pipe(PROMPTS[:1], num_frames=5, **kw).frames
    if family == "qwen-image":
        kw = {**kw, "true_cfg_scale": guidance, "negative_prompt": " ", "guidance_scale": 1.0}
    return pipe(PROMPTS[:1], **kw).images


@pytest.mark.parametrize("family", list(SETUPS))
def test_one_grpo_iteration_trains_every_family_and_the_lora_loads(tmp_path, family):
    if family not in {f for f, _ in ADAPTERS.values()}:
        pytest.fail(f"no adapter registered for {family}")
    size, guidance = SETUPS[family]
    config = FlowGRPOConfig(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        height=size,
        width=size,
        max_sequence_length=8,
        num_inference_steps=3,
        guidance_scale=guidance,
        group_size=2,
        sample_batch_size=4,
        per_device_train_batch_size=4,
        num_batches_per_iteration=1,
        gradient_accumulation_steps=1,
        max_steps=1,
        beta=0.0,
        learning_rate=3e-2,
        lora_rank=4,
        lora_alpha=4,
        clip_range=1e-2,
        noise_level=1.0,
        **({"num_frames": 5} if family in VIDEO_FAMILIES else {}),
    )
    reward = FrameAggregate(Brightness(), num_frames=None) if family in VIDEO_FAMILIES else Brightness()
    pipe = tiny_pipeline(family)
    trainer = FlowGRPOTrainer(pipe, reward, config, PROMPTS)
    assert trainer.adapter.family == family
    assert trainer.kind == ("ddim" if family in ("sd", "sdxl") else "sde")
    before = {n: p.detach().clone() for n, p in trainer.engine.named_parameters}
    trainer.train()
    after = dict(trainer.engine.named_parameters)
    assert any(not torch.equal(before[n], p) for n, p in after.items()), "the LoRA did not change"

    trained = generate(trainer.adapter.pipe, family, size, guidance)
    fresh = tiny_pipeline(family)
    base = generate(fresh, family, size, guidance)
    fresh.load_lora_weights(Path(config.output_dir) / "final")
    loaded = generate(fresh, family, size, guidance)
    assert (trained - base).abs().max() > 1e-6
    assert (loaded - trained).abs().max() <= 1e-5
