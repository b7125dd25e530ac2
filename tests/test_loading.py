"""The one pipeline loader (`visalign.loading`), generation settings, and the preflight (`visalign.preflight`)."""

import json

import pytest
import torch

from visalign.loading import CONFIG_KEY, generation_defaults, load_generator, resolve_settings, scheduler_record
from visalign.preflight import PreflightError, check_config, model_problem, prompts_problem, reward_problem

WORLD_SD3 = {"num_inference_steps": 20, "guidance_scale": 3.0, "height": 32, "width": 32, "max_sequence_length": 16}


def _images(pipe, settings, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(["two red circles"], generator=generator, output_type="pt", **settings).images


def test_world_names_load_with_their_defaults_and_a_saved_copy_keeps_them(tmp_path):
    pipe, defaults = load_generator("world:sd3")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and defaults == WORLD_SD3
    pipe.save_pretrained(tmp_path / "saved")  # no visalign_world.json travels with it
    assert not (tmp_path / "saved" / "visalign_world.json").exists()
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())[CONFIG_KEY] == WORLD_SD3
    again, again_defaults = load_generator(tmp_path / "saved")
    assert again_defaults == WORLD_SD3
    assert resolve_settings(again, again_defaults) == resolve_settings(pipe, defaults) == WORLD_SD3
    assert scheduler_record(again) == scheduler_record(pipe)


def test_a_trainer_samples_the_world_flow_model_with_its_own_text_length(tmp_path):
    """A config that leaves `max_sequence_length` unset trains the world flow model with the 16 zero "T5" tokens it
    was trained with (its recorded default, a saved copy's too), not the SD3 family's 256; an explicit value wins."""
    from visalign.generators import adapter_for

    pipe = load_generator("world:sd3")[0]
    pipe.save_pretrained(tmp_path / "saved")
    saved = load_generator(tmp_path / "saved")[0]
    assert adapter_for(pipe).max_sequence_length == adapter_for(saved).max_sequence_length == 16
    assert adapter_for(pipe, max_sequence_length=8).max_sequence_length == 8
    assert adapter_for(load_generator("tiny:sd3")[0]).max_sequence_length == 256  # nothing recorded: the family's


def test_a_fused_lora_keeps_the_defaults_and_scale_zero_is_the_base(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    trained, _ = load_generator("world:sd")
    torch.manual_seed(0)
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    type(trained).save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(trained.unet))

    base, defaults = load_generator("world:sd")
    settings = resolve_settings(base, defaults, {"num_inference_steps": 2})
    reference = _images(base, settings)
    off, _ = load_generator("world:sd", lora=tmp_path / "lora", lora_scale=0.0)
    on, _ = load_generator("world:sd", lora=tmp_path / "lora")
    torch.testing.assert_close(_images(off, settings), reference)
    assert (_images(on, settings) - reference).abs().max() > 1e-3

    on.fuse_lora()
    on.unload_lora_weights()
    on.save_pretrained(tmp_path / "fused")
    fused, fused_defaults = load_generator(tmp_path / "fused")
    assert fused_defaults == defaults and generation_defaults(folder=tmp_path / "fused") == defaults


def test_resolve_settings_fills_the_pipelines_own_defaults():
    pipe, _ = load_generator("tiny:sd3")
    settings = resolve_settings(pipe, {}, {"num_inference_steps": 3, "guidance_scale": None})
    assert settings["num_inference_steps"] == 3  # an override
    assert settings["guidance_scale"] == 7.0  # the diffusers call default (None = unset)
    assert settings["max_sequence_length"] == 256 and settings["height"] == settings["width"] == 32
    sd, _ = load_generator("tiny:sd")
    assert "max_sequence_length" not in resolve_settings(sd, {}, {"max_sequence_length": 16})


def test_wrong_model_names_say_what_to_pass(tmp_path):
    lora = tmp_path / "run" / "final"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "run" / "config.yaml").write_text("pretrained_model_name_or_path: world:sd3\n")
    with pytest.raises(FileNotFoundError, match=f"--model world:sd3 --lora {lora}"):
        load_generator(lora)
    with pytest.raises(FileNotFoundError, match="its trained weights are in"):
        load_generator(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="its trained weights are in"):
        load_generator("world:sd", lora=tmp_path / "run")
    with pytest.raises(ValueError, match="world:sd and world:sd3"):
        load_generator("world:sdxl")
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        load_generator("no/such/folder")


def test_preflight_lists_everything_missing_at_once(tmp_path, monkeypatch):
    from visalign.pipelines.grpo import FlowGRPOConfig

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    config = FlowGRPOConfig(
        pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-medium",
        prompts=str(tmp_path / "train.txt"),
        reward="hpsv2",
        external_reward="nope",
        eval_prompts="world:heldout",
    )
    with pytest.raises(PreflightError) as info:
        check_config(config)
    message = str(info.value)
    assert "4 things this run needs are missing or unusable" in message
    assert "gated" in message and "hf auth login" in message
    assert "hf download xswu/HPSv2" in message and "train.txt" in message and "unknown reward" in message
    assert "world:heldout" not in message  # what exists is not listed

    # a repo in the cache passes, offline
    snapshot = tmp_path / "cache" / "models--xswu--HPSv2" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "HPS_v2_compressed.pt").write_bytes(b"")
    assert reward_problem("hpsv2") is None
    assert model_problem("world:sd3") is None and model_problem("tiny:sd") is None
    assert model_problem("world:clip", pipeline=False) is None and "world:sd3" in model_problem("world:clip")
    assert prompts_problem("world:train") is None and "world:heldout" in prompts_problem("world:nope")


def test_limit_per_category_keeps_every_primary_criterion():
    from visalign.benchmarks.cli import limit_per_category
    from visalign.benchmarks.prompts import load_prompt_set

    full = load_prompt_set("world:heldout")
    small = limit_per_category(full, 2)
    assert len(small) == 12 and small.primary_criteria == full.primary_criteria
    counts = {p: sum(tp.criterion == p for it in small.items for tp in it.test_points) for p in full.primary_criteria}
    assert set(counts.values()) == {2}
    assert limit_per_category(full, None) is full
    with pytest.raises(ValueError, match="--limit-per-category"):
        limit_per_category(full, 0)


def test_settings_differences_name_each_setting():
    from visalign.benchmarks.report import compare_markdown
    from visalign.benchmarks.runner import settings_differences

    a = {
        "call": {"num_inference_steps": 20, "guidance_scale": 3.0},
        "scheduler": {"class": "DDIMScheduler"},
        "seed": 1,
    }
    b = {
        "call": {"num_inference_steps": 20, "guidance_scale": 4.5},
        "scheduler": {"class": "PNDMScheduler"},
        "seed": 1,
    }
    assert settings_differences(a, a) == [] and settings_differences(a, None) == []
    assert settings_differences(a, b) == [
        "call.guidance_scale: 3.0 vs 4.5",
        "scheduler.class: DDIMScheduler vs PNDMScheduler",
    ]
    assert settings_differences(a, {**a, "dtype": "float16"}) == ["dtype: unset vs float16"]
    empty = {"overall": {"complete": False}, "prompts": {"shared": 1, "only_a": 0, "only_b": 0}}
    empty |= {"primary": {}, "sub": {}, "theme": {}, "settings_unknown": ["B"]}
    assert "Run B scored existing images" in compare_markdown(empty)


def test_reno_preflight_lists_model_lora_and_rewards(tmp_path):
    from types import SimpleNamespace

    from visalign.preflight import check_reno

    args = SimpleNamespace(model=str(tmp_path / "no_model"), lora=str(tmp_path / "no_lora"))
    with pytest.raises(PreflightError) as info:
        check_reno(args, {"world-clip": {}, "pikscore": {}, "hpsv2": {"pretrained": str(tmp_path / "hps.pt")}})
    message = str(info.value)
    assert message.startswith("4 things this run needs are missing or unusable")
    assert "no_model" in message and "no_lora" in message and "pikscore" in message and "hps.pt" in message
    assert "reward world-clip" not in message
    check_reno(SimpleNamespace(model="world:sd", lora=None), {"world-clip": {}})  # nothing missing: no error


def test_world_evaluations_name_their_levels():
    from visalign.world.evaluate import add_levels, category_sums

    texts = ["a circle", "a circle", "two red circles", "a red circle above a red square"]
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    metrics = {"eval/v/correct": 0.75}  # a mean over images
    metrics |= {f"eval/v/correct@{c}": v / len(texts) for c, v in category_sums(texts, correct).items()}
    out = add_levels(metrics, "eval/v", texts)
    assert out["eval/v/image_accuracy"] == 0.75
    assert out["eval/v/overall"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)  # the mean over categories
    assert out["eval/v/overall/single_object"] == 0.5 and not any("@" in k for k in out)
    assert category_sums(["a purple hexagon"], torch.ones(1)) is None
    assert add_levels({"eval/v/correct": 0.5}, "eval/v", ["x"]) == {"eval/v/correct": 0.5}
