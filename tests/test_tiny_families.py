"""The tiny Qwen-Image and Wan pipelines: offline, deterministic, reloadable through `load_generator`, LoRA-able."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from visalign.loading import LORA_FILE, load_generator, resolve_settings
from visalign.testing import FAMILIES, QWEN_IMAGE_TEMPLATE, VIDEO_FAMILIES, load_tiny, save_tiny, tiny_pipeline

NEW_FAMILIES = ("qwen-image", "wan")
# diffusers' own test calls (tests/pipelines/{qwenimage,wan}), with CFG on: Qwen-Image's true CFG needs a negative
# prompt and `true_cfg_scale > 1`, Wan's CFG needs `guidance_scale > 1`.
CALLS = {
    "qwen-image": dict(height=32, width=32, negative_prompt=" ", true_cfg_scale=2.0),
    "wan": dict(height=16, width=16, num_frames=9, guidance_scale=6.0),
}
SHAPES = {"qwen-image": (2, 3, 32, 32), "wan": (2, 9, 3, 16, 16)}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def generate(pipe, family: str, prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Images `[B, 3, H, W]` or videos `[B, T, 3, H, W]` in [0, 1] from a seeded generator."""
    out = pipe(
        prompts,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="pt",
        **CALLS[family],
    )
    return out.frames if family in VIDEO_FAMILIES else out.images


def test_families_are_registered():
    assert "qwen-image" in FAMILIES and VIDEO_FAMILIES == ("wan",)
    with pytest.raises(ValueError, match="qwen-image, wan"):
        tiny_pipeline("hunyuan-video")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_call_is_deterministic_in_the_pipelines_layout(family, prompts):
    pipe = tiny_pipeline(family, seed=0)
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    out = generate(pipe, family, prompts)
    assert out.shape == SHAPES[family] and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0.01, "a constant output would hide a broken pipeline"
    assert torch.equal(out, generate(pipe, family, prompts))
    assert not torch.allclose(out, generate(pipe, family, prompts, seed=1), atol=1e-4), "the noise must matter"
    assert not torch.allclose(out[0], out[1], atol=1e-4), "the prompt must reach the transformer"
    other = tiny_pipeline(family, seed=1)
    assert not torch.equal(other.transformer.proj_out.weight, pipe.transformer.proj_out.weight)
    assert not torch.allclose(out, generate(other, family, prompts), atol=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_save_and_reload_through_the_loader_gives_the_same_output(family, prompts, tmp_path):
    pipe = tiny_pipeline(family)
    out = generate(pipe, family, prompts)
    folder = save_tiny(pipe, tmp_path / family)
    assert not list(folder.rglob("*.bin"))
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    for reloaded in (load_generator(folder)[0], load_tiny(family, folder), load_generator(f"tiny:{family}")[0]):
        assert type(reloaded) is type(pipe)
        assert type(reloaded.tokenizer) is type(pipe.tokenizer)
        assert (generate(reloaded, family, prompts) - out).abs().max() <= 1e-5


def test_qwen_image_tokenizer_splits_the_template_where_the_pipeline_drops_it():
    """`_get_qwen_prompt_embeds` drops the first `prompt_template_encode_start_idx` (34) hidden states: with the
    real vocabulary those are exactly the system turn and `<|im_start|>user\\n`; the tiny tokenizer must agree."""
    pipe = tiny_pipeline("qwen-image")
    assert pipe.prompt_template_encode == QWEN_IMAGE_TEMPLATE
    drop = pipe.prompt_template_encode_start_idx
    prefix, suffix = QWEN_IMAGE_TEMPLATE.split("{}")
    ids = pipe.tokenizer(QWEN_IMAGE_TEMPLATE.format("a red square"))["input_ids"]
    assert len(pipe.tokenizer(prefix)["input_ids"]) == drop
    assert pipe.tokenizer.decode(ids[:drop]) == prefix
    assert pipe.tokenizer.decode(ids[drop:]) == "a red square" + suffix
    assert pipe.tokenizer.unk_token_id not in ids
    embeds, mask = pipe.encode_prompt(["a red square", "two blue circles on the left"], max_sequence_length=16)
    assert embeds.shape[-1] == pipe.transformer.config.joint_attention_dim
    assert mask[0].sum() == len(ids) - drop < mask[1].sum() == embeds.shape[1]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_saved_lora_loads_through_the_loader_and_changes_the_output(family, prompts, tmp_path):
    pipe = tiny_pipeline(family)
    base = generate(pipe, family, prompts)
    pipe_folder = save_tiny(pipe, tmp_path / "pipe")
    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    tuned = generate(pipe, family, prompts)
    assert (tuned - base).abs().max() > 1e-3
    adapter = get_peft_model_state_dict(pipe.transformer)
    type(pipe).save_lora_weights(tmp_path / "lora", transformer_lora_layers=adapter)
    assert (tmp_path / "lora" / LORA_FILE).is_file()

    reloaded, _ = load_generator(pipe_folder, lora=tmp_path / "lora")
    assert (generate(reloaded, family, prompts) - tuned).abs().max() <= 1e-5
    off, _ = load_generator(pipe_folder, lora=tmp_path / "lora", lora_scale=0.0)
    assert (generate(off, family, prompts) - base).abs().max() <= 1e-5


def test_settings_record_the_families_own_arguments():
    qwen, _ = load_generator("tiny:qwen-image")
    settings = resolve_settings(qwen, {}, {"num_inference_steps": 2})
    assert settings["true_cfg_scale"] == 4.0 and settings["height"] == settings["width"] == 128 * 4
    assert "num_frames" not in settings
    wan, _ = load_generator("tiny:wan")
    settings = resolve_settings(wan, {"num_frames": 9}, {"height": 16})
    assert settings["num_frames"] == 9 and settings["height"] == 16 and settings["width"] == 832
    assert "true_cfg_scale" not in settings
