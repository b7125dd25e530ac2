"""The training engine and configs: YAML coercion, LoRA and its reference, EMA, atomic checkpoints, exact resume,
and the diffusers-format adapter that `pipe.load_lora_weights` reads."""

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from visalign.config import TrainConfig, config_from_dict, load_config, parse_overrides
from visalign.engine import EMA, Engine
from visalign.generators import adapter_for, seeded_generators
from visalign.loading import load_generator
from visalign.prompts import PromptSampler, load_prompts
from visalign.rundir import checkpoints, latest_checkpoint
from visalign.testing import tiny_pipeline


@dataclass
class ExampleConfig(TrainConfig):
    beta: float = field(default=0.1, metadata={"help": "a float"})
    steps: tuple[int, int] | None = field(default=None, metadata={"help": "an optional pair"})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "a mapping"})


def test_yaml_values_are_coerced_to_the_annotated_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nmax_steps: 1e3\nbeta: 2\nuse_lora: false\nsteps: [1, 2]\nweights: {a: 1}\n")
    config = load_config(ExampleConfig, path, ["lora_target_modules=[to_q, to_k]", "resume_from=latest", "beta=3e-2"])
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)  # PyYAML read '1e-5' as a str
    assert config.max_steps == 1000 and isinstance(config.max_steps, int)
    assert config.beta == 0.03 and config.use_lora is False and config.steps == (1, 2)
    assert config.weights == {"a": 1.0} and config.lora_target_modules == ["to_q", "to_k"]
    assert config.resume_from == "latest"
    assert load_config(ExampleConfig, None, ["steps=null"]).steps is None


@pytest.mark.parametrize(
    "values,match",
    [
        ({"learning_rat": 1e-4}, "unknown ExampleConfig key.*learning_rat.*valid keys"),
        ({"max_steps": 1.5}, "`max_steps` must be an integer"),
        ({"max_steps": "many"}, "`max_steps` must be a number"),
        ({"use_lora": "maybe"}, "`use_lora` must be a boolean .*got 'maybe'"),
        ({"mixed_precision": "fp8"}, "`mixed_precision` must be one of"),
        ({"steps": [1, 2, 3]}, "`steps`"),
        ({"learning_rate": 0}, "`learning_rate` must be > 0"),
        ({"ema_decay": 1.0}, "`ema_decay` must be in"),
    ],
)
def test_bad_config_values_raise_naming_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(ExampleConfig, values)


def test_overrides_must_be_key_value():
    assert parse_overrides(["a=1", "b=x=y", "c="]) == {"a": 1, "b": "x=y", "c": ""}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["learning_rate"])


@pytest.mark.parametrize(
    "text,value", [("true", True), ("False", False), ("yes", True), ("NO", False), ("1", True), ("0", False)]
)
def test_booleans_read_strictly_in_files_and_overrides(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"use_lora: {text}\n")
    assert load_config(ExampleConfig, path).use_lora is value
    assert load_config(ExampleConfig, None, [f"use_lora={text}"]).use_lora is value


@pytest.mark.parametrize("text", ["flase", "on", "off", "2", "1.0", "y", ""])
def test_a_boolean_that_is_not_one_is_an_error_naming_key_and_value(tmp_path, text):
    with pytest.raises(ValueError, match=rf"`use_lora` must be a boolean .*got '?{text}"):
        load_config(ExampleConfig, None, [f"use_lora={text}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"use_lora: '{text}'\n" if text else "use_lora: ''\n")
    with pytest.raises(ValueError, match="`use_lora` must be a boolean"):
        load_config(ExampleConfig, path)


def test_run_json_records_config_seeds_versions_and_input_hashes(tmp_path):
    import hashlib
    import json

    @dataclass
    class WithPrompts(TrainConfig):
        prompts: str = field(default="world:train", metadata={"help": "a prompt file"})

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    config = WithPrompts(output_dir=str(tmp_path / "run"), report_to="none", lora_rank=4, prompts=str(prompts), seed=7)
    Engine(config, tiny_pipeline("sd3"))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "running" and record["seeds"] == {"seed": 7}
    assert record["config"]["prompts"] == str(prompts) and record["config"]["lora_rank"] == 4
    assert record["inputs"] == {
        "prompts": {"path": str(prompts), "sha256": hashlib.sha256(b"a cat\n").hexdigest(), "bytes": 6}
    }
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] and record["command"]


def test_prompt_sampler_is_deterministic_and_resumable():
    first = PromptSampler(["a", "b", "c"], seed=0)
    draws = [first.draw(5) for _ in range(3)]
    assert all(len(d) == 5 for d in draws) and sorted(draws[0][:3]) == ["a", "b", "c"]
    resumed = PromptSampler(["a", "b", "c"], seed=0)
    resumed.load_state_dict({"iteration": 2})
    assert resumed.draw(5) == draws[2]
    with pytest.raises(ValueError, match="non-empty"):
        PromptSampler([], seed=0)


def test_load_prompts(tmp_path):
    assert len(load_prompts("world:train")) > 50 and len(load_prompts("world:heldout")) == 202
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))


def engine_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), report_to="none", lora_rank=4, lora_alpha=8, learning_rate=1e-2)
    return TrainConfig(**{**base, **kw})


def velocity(pipe, model=None):
    """The transformer's guided velocity on a fixed input (what the sampler trains and samples with)."""
    sampler = adapter_for(pipe, height=8, width=8, max_sequence_length=8)
    latents = sampler.initial_latents(seeded_generators([(0, 0), (0, 1)]))
    conditioning = sampler.encode_prompts(["a red square", "a circle"], 4.5)
    with torch.no_grad():
        return sampler.guided(latents, torch.tensor(500.0), conditioning, 4.5, model)


def train_steps(engine, pipe, n):
    """`n` optimizer steps of a toy objective (push the velocity up) through the engine, two micro-steps each."""
    sampler = adapter_for(pipe, height=8, width=8, max_sequence_length=8)
    latents = sampler.initial_latents(seeded_generators([(0, 0), (0, 1)]))
    conditioning = sampler.encode_prompts(["a red square", "a circle"], 4.5)
    for _ in range(n):
        for i in range(2):
            with engine.accumulate(sync=i == 1), engine.autocast():
                v = sampler.guided(
                    latents[i : i + 1], torch.tensor(500.0), conditioning.select(torch.tensor([i])), 4.5, engine.model
                )
                engine.backward(-v.mean() / 2)
        engine.optimizer_step()


def test_lora_trains_only_adapters_and_the_reference_disables_them(tmp_path):
    pipe = tiny_pipeline("sd3")
    before = velocity(pipe)
    engine = Engine(engine_config(tmp_path), pipe)
    names = [n for n, _ in engine.named_parameters]
    assert names and all("lora_" in n for n in names)
    assert any("add_q_proj" in n for n in names) and any("to_out.0" in n for n in names)
    assert all(not p.requires_grad for p in pipe.text_encoder.parameters())
    torch.testing.assert_close(velocity(pipe), before)  # B starts at zero: the initial policy is the base model
    train_steps(engine, pipe, 3)
    assert engine.step == 3 and not torch.allclose(velocity(pipe), before)
    with engine.reference() as reference:
        torch.testing.assert_close(velocity(pipe, reference), before)
    assert not torch.allclose(velocity(pipe), before)  # adapters are back on


def test_full_fine_tuning_keeps_a_frozen_reference(tmp_path):
    pipe = tiny_pipeline("sd3")
    before = velocity(pipe)
    engine = Engine(engine_config(tmp_path, use_lora=False, learning_rate=1e-3), pipe, keep_reference=True)
    assert sum(p.numel() for p in engine.parameters) == sum(p.numel() for p in pipe.transformer.parameters())
    train_steps(engine, pipe, 2)
    assert not torch.allclose(velocity(pipe), before)
    with engine.reference() as reference:
        torch.testing.assert_close(velocity(pipe, reference), before)


def test_ema_is_swapped_in_and_out(tmp_path):
    pipe = tiny_pipeline("sd3")
    engine = Engine(engine_config(tmp_path, ema_decay=0.5, ema_update_every=1), pipe)
    train_steps(engine, pipe, 2)
    trained = [p.detach().clone() for p in engine.parameters]
    with engine.ema_weights():
        ema = [p.detach().clone() for p in engine.parameters]
    assert any(not torch.equal(a, b) for a, b in zip(ema, trained))
    assert all(torch.equal(p, t) for p, t in zip(engine.parameters, trained))


def test_ema_follows_flow_grpo_warm_up_ramp_in_float64():
    """ema <- d ema + (1 - d) param every `every` steps with d = min(decay, (1 + step) / (10 + step)) (Flow-GRPO's
    `get_current_decay`): computed here independently in float64 from the parameters after each step."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(5, generator=generator))
    ema = EMA([param], decay=0.9, every=2)
    expected = param.detach().double().clone()
    for step in range(1, 101):
        with torch.no_grad():
            param.add_(torch.randn(5, generator=generator))
        ema.update(step)
        if step % 2 == 0:
            d = min(0.9, (1 + step) / (10 + step))
            expected = d * expected + (1 - d) * param.detach().double()
        if step in (2, 40, 100):
            torch.testing.assert_close(ema.shadow[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.decay_at(2) == 3 / 12 and ema.decay_at(79) < 0.9 and ema.decay_at(80) == 0.9 == ema.decay_at(500)


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    results = []
    for checkpointing in (False, True):
        pipe = tiny_pipeline("sd3")
        engine = Engine(engine_config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing), pipe)
        train_steps(engine, pipe, 2)
        results.append([p.detach().clone() for p in engine.parameters])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_checkpoint_resume_continues_exactly(tmp_path):
    config = engine_config(tmp_path, ema_decay=0.5, ema_update_every=1, save_steps=2, lr_scheduler="linear")
    pipe = tiny_pipeline("sd3")
    engine = Engine(config, pipe)
    train_steps(engine, pipe, 2)
    assert engine.maybe_checkpoint({"prompt_sampler": {"iteration": 7}}) is not None
    train_steps(engine, pipe, 2)
    uninterrupted = [p.detach().clone() for p in engine.parameters]
    with engine.ema_weights():
        uninterrupted_ema = [p.detach().clone() for p in engine.parameters]

    assert [p.name for p in checkpoints(config.output_dir)] == ["checkpoint-2"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no temporary folder left behind
    config.resume_from = "latest"
    pipe = tiny_pipeline("sd3")
    resumed = Engine(config, pipe)
    assert resumed.resume() == {"prompt_sampler": {"iteration": 7}} and resumed.step == 2
    train_steps(resumed, pipe, 2)
    for a, b in zip(resumed.parameters, uninterrupted):
        assert torch.equal(a, b)
    with resumed.ema_weights():
        assert all(torch.equal(a, b) for a, b in zip(resumed.parameters, uninterrupted_ema))
    assert resumed.lr_scheduler.get_last_lr() == engine.lr_scheduler.get_last_lr()


def test_checkpoint_limit_and_latest(tmp_path):
    config = engine_config(tmp_path, save_steps=1, checkpoints_total_limit=2, resume_from="latest")
    pipe = tiny_pipeline("sd3")
    engine = Engine(config, pipe)
    assert engine.resume() is None  # 'latest' with nothing saved starts fresh
    for _ in range(3):
        train_steps(engine, pipe, 1)
        engine.maybe_checkpoint({})
    assert [p.name for p in checkpoints(config.output_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(config.output_dir).name == "checkpoint-3"
    with pytest.raises(FileNotFoundError, match="state.json"):
        engine.load_checkpoint(tmp_path / "nowhere")


def test_saved_lora_loads_with_load_lora_weights(tmp_path):
    pipe = tiny_pipeline("sd3")
    engine = Engine(engine_config(tmp_path, lora_alpha=16), pipe)  # alpha != rank: the scale must survive the trip
    train_steps(engine, pipe, 3)
    trained = velocity(pipe)
    folder = engine.finish()
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    fresh = tiny_pipeline("sd3")
    base = velocity(fresh)
    fresh.load_lora_weights(folder)
    assert not torch.allclose(trained, base)
    torch.testing.assert_close(velocity(fresh), trained, atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_final_loads_through_the_lora_argument(tmp_path):
    pipe = tiny_pipeline("sd3")
    engine = Engine(engine_config(tmp_path, use_lora=False, learning_rate=1e-3), pipe)
    train_steps(engine, pipe, 3)
    trained = velocity(pipe)
    folder = engine.finish()
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    fresh, _ = load_generator("tiny:sd3", lora=folder)
    base, _ = load_generator("tiny:sd3")
    assert not torch.allclose(velocity(base), trained)
    torch.testing.assert_close(velocity(fresh), trained, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="--lora-scale 0.5"):
        load_generator("tiny:sd3", lora=folder, lora_scale=0.5)
    with pytest.raises(ValueError, match="denoiser is a unet"):
        load_generator("tiny:sd", lora=folder)
    with pytest.raises(ValueError, match="trained from another model"):
        load_generator("world:sd3", lora=folder)  # the same class at another size
    with pytest.raises(FileNotFoundError, match=f"fully fine-tuned transformer, not a pipeline.*--lora {folder}"):
        load_generator(folder)
    with pytest.raises(FileNotFoundError, match=f"its trained weights are in {folder}"):
        load_generator("tiny:sd3", lora=folder.parent)


def test_final_lora_holds_the_ema_weights(tmp_path):
    pipe = tiny_pipeline("sd3")
    engine = Engine(engine_config(tmp_path, ema_decay=0.9, ema_update_every=1), pipe)
    train_steps(engine, pipe, 3)
    trained = velocity(pipe)
    with engine.ema_weights():
        averaged = velocity(pipe)
    folder = engine.finish()
    fresh = tiny_pipeline("sd3")
    fresh.load_lora_weights(folder)
    assert not torch.allclose(averaged, trained)
    torch.testing.assert_close(velocity(fresh), averaged, atol=1e-5, rtol=1e-5)
