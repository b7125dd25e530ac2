"""Bad input, as a hostile but fair user gives it: every error names the file (and line) or the argument, a checkpoint
never runs code, a run never overwrites another, and judge failures are error verdicts with their reason.

Covers issue 20 case by case and the class each case stands for: other encodings (Latin-1, CP1252, UTF-16,
Shift-JIS) in every prompt reader, other truncations (images, safetensors files, state files), other transport
failures (short bodies, non-HTTP bytes, hang-ups, trickling, stalls, error statuses) from a socket server bound to
127.0.0.1 that stops itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visalign.benchmarks.cli import add_arguments
from visalign.benchmarks.judges import Sample, build_judge
from visalign.benchmarks.prompts import PromptItem, TestPoint, load_prompt_set, load_world_heldout
from visalign.benchmarks.run_folder import BenchError, judge_images
from visalign.benchmarks.runner import BenchConfig, run_bench
from visalign.benchmarks.vlm import OpenAIServerVLM, ReplayVLM, VLMJudge, VLMJudgeConfig
from visalign.cli import main
from visalign.config import TrainConfig, config_from_dict, load_config, save_config
from visalign.engine import Engine, NonFiniteError
from visalign.files import BadFileError, load_image, load_safetensors, load_state, read_text, save_state
from visalign.pipelines.train import METHODS
from visalign.prompts import load_prompts
from visalign.reward_models.vlm import ChatTransportError, post_chat
from visalign.rundir import checkpoints, claim_output_dir
from visalign.testing import tiny_pipeline

ANSWER = "<analysis>['it is there']</analysis><score>[1]</score>"

# ---------------------------------------------------------------------------------------------------------------
# A tiny training loop, importable here and runnable as a script that kills itself (kill -9) after step 3.

TRAIN_SCRIPT = '''
import os
import random
import signal
import sys

import numpy as np
import torch

from visalign.config import TrainConfig
from visalign.engine import Engine
from visalign.generators import adapter_for, seeded_generators
from visalign.testing import tiny_pipeline


def config(output_dir, **kw):
    base = dict(output_dir=str(output_dir), report_to="none", lora_rank=4, lora_alpha=8, learning_rate=1e-2,
                save_steps=2, ema_decay=0.5, ema_update_every=1, lr_scheduler="linear", max_steps=4)
    return TrainConfig(**{**base, **kw})


def train(engine, pipe, until, kill_after=None):
    """Steps to `until` (after `resume_from`, if any), each drawing from the python, numpy and torch RNGs (a resume
    must restore all three)."""
    engine.resume()
    sampler = adapter_for(pipe, height=8, width=8, max_sequence_length=8)
    conditioning = sampler.encode_prompts(["a red square"], 4.5)
    while engine.step < until:
        latents = sampler.initial_latents(seeded_generators([(0, 0)])) + torch.randn(1, 1, 1, 1)
        scale = 1 + random.random() + float(np.random.rand())
        with engine.accumulate(sync=True), engine.autocast():
            v = sampler.guided(latents, torch.tensor(500.0), conditioning, 4.5, engine.model)
            engine.backward(-v.mean() * scale)
        metrics = engine.optimizer_step()
        engine.log({"loss": -scale, "grad_norm": metrics["grad_norm"]})
        engine.maybe_checkpoint({"note": "x"})
        if kill_after is not None and engine.step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    engine.maybe_checkpoint({"note": "x"}, force=True)
    return engine.finish()


if __name__ == "__main__":
    engine_ = Engine(config(sys.argv[1]), tiny_pipeline("sd3"))
    train(engine_, engine_.pipe, 4, kill_after=int(sys.argv[2]))
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("script") / "train_script.py"
    path.write_text(TRAIN_SCRIPT)
    spec = importlib.util.spec_from_file_location("train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.path = path
    return module


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_resume_gives_identical_weights_and_each_step_once(script, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pipe = tiny_pipeline("sd3")
    script.train(Engine(script.config(a), pipe), pipe, 4)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions as run a
    killed = subprocess.run([sys.executable, str(script.path), str(b), "3"], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert steps(b) == [1, 2, 3] and [c.name for c in checkpoints(b)] == ["checkpoint-2"]
    pipe = tiny_pipeline("sd3")
    script.train(Engine(script.config(b, resume_from="latest"), pipe), pipe, 4)
    assert steps(b) == [1, 2, 3, 4]  # step 3 was logged before the kill and again after the resume: kept once
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()
    x, y = (load_file(r / "final" / "pytorch_lora_weights.safetensors") for r in (a, b))  # EMA weights
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    x, y = (load_file(r / "checkpoints" / "checkpoint-4" / "trainable.safetensors") for r in (a, b))
    assert all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints hold no pickles


def small_engine(output_dir: Path, **kw) -> Engine:
    base = dict(output_dir=str(output_dir), report_to="none", lora_rank=4, lora_alpha=8, learning_rate=1e-2)
    return Engine(TrainConfig(**{**base, **kw}), tiny_pipeline("sd3"))


@pytest.fixture(scope="module")
def checkpoint(script, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with EMA and its checkpoint-2."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    pipe = tiny_pipeline("sd3")
    script.train(Engine(script.config(run, max_steps=2), pipe), pipe, 2)
    return run / "checkpoints" / "checkpoint-2"


def copy_run(checkpoint: Path, to: Path) -> Path:
    shutil.copytree(checkpoint.parents[1], to)
    return to / "checkpoints" / "checkpoint-2"


def test_a_checkpoint_holds_only_safetensors_json_and_yaml(checkpoint):
    suffixes = {p.suffix for p in checkpoint.iterdir()}
    assert suffixes <= {".safetensors", ".json", ".yaml"}, suffixes
    for name in ("optimizer", "scheduler", "random_states_0"):
        state = load_state(checkpoint / f"{name}.safetensors")
        assert isinstance(state, dict) and state
    rng = load_state(checkpoint / "random_states_0.safetensors")
    assert set(rng) >= {"python", "numpy", "torch"} and rng["numpy"][1].dtype == np.uint32


class Payload:
    """Unpickling this touches a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("name", ["random_states_0.pt", "optimizer.pt", "extra.bin", "scheduler.pkl"])
def test_resume_refuses_a_pickle_by_name_and_runs_none_of_it(script, checkpoint, tmp_path, name):
    folder = copy_run(checkpoint, tmp_path / "run")
    marker = tmp_path / "code-ran"
    (folder / name).write_bytes(pickle.dumps({"state": Payload(marker)}))
    engine = Engine(script.config(tmp_path / "run", max_steps=2, resume_from=str(folder)), tiny_pipeline("sd3"))
    with pytest.raises(BadFileError, match=rf"{name} is a pickle: visalign never unpickles"):
        engine.resume()
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        "trainable.safetensors",
        "optimizer.safetensors",
        "scheduler.safetensors",
        "random_states_0.safetensors",
        "ema.safetensors",
    ],
)
@pytest.mark.parametrize("cut", ["empty", "header", "half", "last-byte"])
def test_a_truncated_checkpoint_file_is_named(script, checkpoint, tmp_path, name, cut):
    folder = copy_run(checkpoint, tmp_path / "run")
    data = (folder / name).read_bytes()
    keep = {"empty": 0, "header": 5, "half": len(data) // 2, "last-byte": len(data) - 1}[cut]
    (folder / name).write_bytes(data[:keep])
    engine = Engine(script.config(tmp_path / "run", max_steps=2, resume_from="latest"), tiny_pipeline("sd3"))
    with pytest.raises(BadFileError, match=rf"{folder / name}.*(truncated or damaged)"):
        engine.resume()


def test_a_damaged_state_json_is_named(script, checkpoint, tmp_path):
    folder = copy_run(checkpoint, tmp_path / "run")
    (folder / "state.json").write_text('["not", "a", "state"]')
    engine = Engine(script.config(tmp_path / "run", max_steps=2, resume_from="latest"), tiny_pipeline("sd3"))
    with pytest.raises(ValueError, match="state.json is not a visalign checkpoint state"):
        engine.resume()


def test_state_files_round_trip_every_structure_exactly(tmp_path):
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 7: {}},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 7], "foreach": None, "amsgrad": False}],
        "rng": (3, tuple(range(5)), None),
        "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        "__odd": "keys starting with __ survive too",
        "floats": [math.inf, -0.0, 1 / 3],
    }
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["state"][0]["exp_avg"].equal(state["state"][0]["exp_avg"]) and back["state"][7] == {}
    assert back["param_groups"] == state["param_groups"] and back["rng"] == state["rng"]
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    assert back["__odd"] == state["__odd"] and back["floats"][:2] == [math.inf, -0.0]
    assert back["floats"][2] == 1 / 3
    with pytest.raises(TypeError, match=r"cannot store a object at state\['x'\]"):
        save_state({"x": object()}, tmp_path / "bad.safetensors")
    (tmp_path / "plain.safetensors").write_bytes((tmp_path / "s.safetensors").read_bytes()[:-3])
    with pytest.raises(BadFileError, match="plain.safetensors"):
        load_state(tmp_path / "plain.safetensors")
    with pytest.raises(BadFileError, match="w.safetensors is not a readable safetensors file"):
        (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
        load_safetensors(tmp_path / "w.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# A run directory belongs to one run


def fake_run(out: Path, *, finished: bool, checkpoint: bool = False, config: TrainConfig | None = None) -> None:
    out.mkdir(parents=True)
    save_config(config or TrainConfig(output_dir=str(out)), out / "config.yaml")
    (out / "run.json").write_text(json.dumps({"status": "finished" if finished else "running"}))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    if finished:
        (out / "final").mkdir()
    if checkpoint:
        (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)


def test_a_new_run_where_a_run_lives_is_refused_with_what_to_do(tmp_path):
    out = tmp_path / "run"
    assert claim_output_dir(TrainConfig(output_dir=str(out))) == "fresh"
    fake_run(out, finished=True, checkpoint=True)
    with pytest.raises(FileExistsError, match=r"holds a finished run.*resume_from=latest.*overwrite_output_dir=true"):
        claim_output_dir(TrainConfig(output_dir=str(out)))
    assert claim_output_dir(TrainConfig(output_dir=str(out), resume_from="latest")) == "resume"
    mine = str(out / "checkpoints" / "checkpoint-1")
    assert claim_output_dir(TrainConfig(output_dir=str(out), resume_from=mine)) == "resume"
    with pytest.raises(FileExistsError, match="is not one of its checkpoints"):
        claim_output_dir(TrainConfig(output_dir=str(out), resume_from=str(tmp_path / "elsewhere" / "checkpoint-3")))
    assert claim_output_dir(TrainConfig(output_dir=str(out), overwrite_output_dir=True)) == "overwrite"
    with pytest.raises(ValueError, match="`overwrite_output_dir`.*cannot be combined with `resume_from`"):
        TrainConfig(output_dir=str(out), overwrite_output_dir=True, resume_from="latest")


def test_a_run_killed_before_its_first_checkpoint_restarts_only_with_the_same_config(tmp_path):
    out = tmp_path / "run"
    fake_run(out, finished=False, config=TrainConfig(output_dir=str(out), resume_from="latest"))
    assert claim_output_dir(TrainConfig(output_dir=str(out), resume_from="latest")) == "restart"
    with pytest.raises(FileExistsError, match="no checkpoint to resume, made with another config"):
        claim_output_dir(TrainConfig(output_dir=str(out), resume_from="latest", learning_rate=1e-3))
    with pytest.raises(FileExistsError, match="holds an unfinished run"):
        claim_output_dir(TrainConfig(output_dir=str(out)))


def test_overwrite_never_clears_the_working_directory(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fake_run(out, finished=True)
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="refusing to clear .*working directory"):
        claim_output_dir(TrainConfig(output_dir=str(out), overwrite_output_dir=True))


def test_the_engine_refuses_before_writing_and_overwrite_clears_first(script, tmp_path):
    run = tmp_path / "run"
    pipe = tiny_pipeline("sd3")
    script.train(Engine(script.config(run, max_steps=2), pipe), pipe, 2)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=f"output_dir {run} holds a finished run"):
        small_engine(run, learning_rate=1e-3)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    engine = small_engine(run, overwrite_output_dir=True)
    assert not (run / "final").exists() and not checkpoints(run) and not (run / "metrics.jsonl").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    engine.finish()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_resuming_an_earlier_checkpoint_drops_the_later_ones_and_their_metrics(script, tmp_path):
    run = tmp_path / "run"
    pipe = tiny_pipeline("sd3")
    script.train(Engine(script.config(run), pipe), pipe, 4)
    assert [c.name for c in checkpoints(run)] == ["checkpoint-2", "checkpoint-4"] and steps(run) == [1, 2, 3, 4]
    engine = Engine(script.config(run, resume_from=str(run / "checkpoints" / "checkpoint-2")), tiny_pipeline("sd3"))
    assert engine.resume() == {"note": "x"} and engine.step == 2
    assert [c.name for c in checkpoints(run)] == ["checkpoint-2"] and steps(run) == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Non-finite numbers


def float_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None)]


def method_configs() -> list[type]:
    out = [TrainConfig]
    for spec, _ in METHODS.values():
        module, _, name = spec.partition(":")
        out.append(getattr(importlib.import_module(module), name))
    return out


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_every_float_field_of_every_config_refuses_non_finite_values(value):
    checked = 0
    for cls in method_configs():
        for name in float_fields(cls):
            with pytest.raises(ValueError, match=rf"`{name}` must be a finite number"):
                load_config(cls, None, [f"{name}={value}"])
            checked += 1
    assert checked > 30


def test_non_finite_values_are_refused_from_yaml_python_and_nested_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: .inf\n")
    with pytest.raises(ValueError, match="`learning_rate` must be a finite number"):
        load_config(TrainConfig, tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="`adam_epsilon` must be a finite number"):
        TrainConfig(adam_epsilon=math.nan)
    with pytest.raises(ValueError, match=r"`max_steps` must be an integer"):
        config_from_dict(TrainConfig, {"max_steps": math.inf})
    with pytest.raises(ValueError, match=r"`weights\[a\]` must be a finite number"):
        config_from_dict(Nested, {"weights": {"a": math.nan}})
    with pytest.raises(ValueError, match=r"`extra\[call\]\[1\]` must be a finite number"):
        config_from_dict(Nested, {"extra": {"call": [1.0, -math.inf]}})


@dataclasses.dataclass
class Nested:
    weights: dict[str, float] = dataclasses.field(default_factory=dict, metadata={"help": "typed"})
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "passed through"})


def nan_at_step_3(engine: Engine, pipe, kind: str) -> None:
    from visalign.generators import adapter_for, seeded_generators

    sampler = adapter_for(pipe, height=8, width=8, max_sequence_length=8)
    latents = sampler.initial_latents(seeded_generators([(0, 0)]))
    conditioning = sampler.encode_prompts(["a red square"], 4.5)
    for step in range(1, 4):
        with engine.accumulate(sync=True):
            v = sampler.guided(latents, torch.tensor(500.0), conditioning, 4.5, engine.model)
            if step < 3:
                loss = -v.mean()
            elif kind == "loss":
                loss = -v.mean() * math.nan
            else:  # a finite loss (0) whose gradient is not: d sqrt(x) / dx at 0
                loss = torch.sqrt(v.mean() * 0.0)
            engine.backward(loss)
        engine.optimizer_step()
        engine.maybe_checkpoint({})


@pytest.mark.parametrize("kind,what", [("loss", "non-finite loss"), ("gradient", "non-finite gradient norm")])
def test_a_non_finite_loss_or_gradient_stops_training_naming_the_step_and_checkpoint(tmp_path, kind, what):
    engine = small_engine(tmp_path / "run", save_steps=2)
    before = None
    with pytest.raises(NonFiniteError, match=rf"{what}.* at step 3.*last good checkpoint is .*checkpoint-2"):
        before = [p.detach().clone() for p in engine.parameters]
        nan_at_step_3(engine, engine.pipe, kind)
    assert engine.step == 2 and all(torch.isfinite(p).all() for p in engine.parameters)
    assert before is not None and not all(torch.equal(a, b) for a, b in zip(before, engine.parameters))


def test_nan_weights_are_never_written(tmp_path):
    engine = small_engine(tmp_path / "run", ema_decay=0.5, ema_update_every=1)
    with torch.no_grad():
        engine.parameters[0][0] = math.nan
    with pytest.raises(NonFiniteError, match="weights in checkpoint-0.*no checkpoint was written yet"):
        engine.save_checkpoint({})
    with pytest.raises(NonFiniteError, match="non-finite weights in the final weights"):
        engine.finish()
    assert not (tmp_path / "run" / "final").exists() and not checkpoints(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# Files that do not read: encodings, YAML, JSONL headers


ENCODINGS = {  # text with one character outside ASCII on line 2, and the line the error must name
    "latin-1": ("a cat\nun café rouge\n", 2),
    "cp1252": ("a cat\n\u201ca dog\u201d\n", 2),
    "shift_jis": ("a cat\n猫が二匹\n", 2),
    "utf-16": ("a cat\nun café\n", 1),
}


def write_encoded(path: Path, text: str, encoding: str) -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("reader", ["train", "t2i-compbench", "parti", "unigenbench", "visalign", "geneval", "score"])
def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys, encoding, reader):
    text, line = ENCODINGS[encoding]
    suffix = {"train": ".txt", "t2i-compbench": ".txt", "parti": ".tsv", "unigenbench": ".csv", "score": ".txt"}
    path = write_encoded(tmp_path / f"prompts{suffix.get(reader, '.jsonl')}", text, encoding)
    message = rf"{path}: line {line}, column \d+ is not UTF-8 \(byte 0x[0-9a-f]{{2}}\)"
    if encoding == "utf-16":
        message += ".*UTF-16"
    if reader == "train":
        with pytest.raises(BadFileError, match=message):
            load_prompts(str(path))
    elif reader == "score":
        image = tmp_path / "0.png"
        Image.new("RGB", (8, 8)).save(image)
        assert main(["score", "--reward", "world-verifier", "--images", str(image), "--prompts", str(path)]) == 2
        assert re.search(message, capsys.readouterr().err)
    else:
        with pytest.raises(BadFileError, match=message):
            load_prompt_set(path, None if reader == "visalign" else reader)  # None: guessed, reading the file too


def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa café\n".encode())
    assert load_prompts(str(path)) == ["a café"] and read_text(path) == "a café\n"


@pytest.mark.parametrize(
    "text,where",
    [
        ("learning_rate: [1e-4\nmax_steps: 3\n", "line 2"),
        ("max_steps: 3\n\tlearning_rate: 1\n", "line 2, column 1"),
        ("project_name: 'unclosed\n", "line 2"),
        ("a: b: c\n", "line 1, column 5"),
    ],
)
def test_a_yaml_syntax_error_names_the_config_file_and_line(tmp_path, text, where):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"config file {path}: YAML syntax error at {where}") as error:
        load_config(TrainConfig, path)
    assert "<unicode string>" not in str(error.value)


def test_config_encoding_and_override_errors_are_named(tmp_path):
    path = write_encoded(tmp_path / "recipe.yaml", "project_name: café\n", "latin-1")
    with pytest.raises(BadFileError, match=rf"config file {path}: line 1"):
        load_config(TrainConfig, path)
    with pytest.raises(ValueError, match=r"override 'lora_target_modules=\[to_q': the value is not valid YAML"):
        load_config(TrainConfig, None, ["lora_target_modules=[to_q"])


@pytest.mark.parametrize("header", ["[1, 2]", '"visalign-prompts"', "3", "null"])
def test_a_jsonl_header_that_is_not_an_object_is_named(tmp_path, header):
    path = tmp_path / "set.jsonl"
    path.write_text(header + '\n{"id": "a", "text": "a cat", "test_points": []}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 1 \(the header\) must be a JSON object"):
        load_prompt_set(path, "visalign")
    with pytest.raises(ValueError, match=rf"{path}: line 1 \(the header\) must be a JSON object"):
        load_world_heldout(path)


def test_a_prompt_line_of_the_wrong_shape_is_named(tmp_path):
    path = tmp_path / "set.jsonl"
    header = {"format": "visalign-prompts", "format_version": 1}
    path.write_text(json.dumps(header) + '\n{"id": "a", "text": "a cat", "test_points": [["Color", "x"]]}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a valid prompt"):
        load_prompt_set(path)


# ---------------------------------------------------------------------------------------------------------------
# Truncated and foreign images


def png_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BAD_IMAGES = {
    "png-half": lambda: png_bytes()[: len(png_bytes()) // 2],
    "png-signature-only": lambda: png_bytes()[:8],
    "png-cut-in-data": lambda: png_bytes()[:-100],
    "jpeg-half": lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2],
    "empty": lambda: b"",
    "text": lambda: b"not an image at all\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_an_unreadable_image_is_named(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    path.write_bytes(BAD_IMAGES[kind]())
    with pytest.raises(BadFileError, match=rf"image {path} cannot be read"):
        load_image(path)


def bench_setup(tmp_path: Path, bad: bytes) -> tuple:
    items = [
        PromptItem(p, f"a {p} thing", test_points=(TestPoint("Color", "x"), TestPoint("Shape", "y"))) for p in "ab"
    ]
    images = tmp_path / "images"
    images.mkdir()
    (images / "a_0.png").write_bytes(png_bytes())
    (images / "b_0.png").write_bytes(bad)
    answers = tmp_path / "answers.jsonl"
    raw = "<analysis>['ok', 'ok']</analysis><score>[1, 1]</score>"
    answers.write_text("".join(json.dumps({"prompt_id": p, "image_id": 0, "raw": raw}) + "\n" for p in "ab"))
    judge = build_judge(f"replay:{answers}")
    return items, images, judge


@pytest.mark.parametrize("kind", ["png-half", "jpeg-half", "empty"])
def test_bench_judges_an_unreadable_image_as_an_error_verdict_naming_it(tmp_path, kind):
    items, images, judge = bench_setup(tmp_path, BAD_IMAGES[kind]())
    paths = {(it.id, 0): images / f"{it.id}_0.png" for it in items}
    (tmp_path / "verdicts.jsonl").write_text('[1, 2]\n"a string"\n{"prompt_id": "a", "image_id": 0, "sha')  # dropped
    records = judge_images(judge, items, paths, tmp_path / "verdicts.jsonl")
    good, bad = records
    assert all(tp["status"] == "ok" and tp["passed"] for tp in good["test_points"])
    assert all(
        tp["status"] == "error" and f"image {images / 'b_0.png'} cannot be read" in tp["reason"]
        for tp in bad["test_points"]
    )
    # a rerun retries the failed image (it may have been fixed) and reuses the good one
    (images / "b_0.png").write_bytes(png_bytes())
    again = judge_images(judge, items, paths, tmp_path / "verdicts.jsonl")
    assert all(tp["status"] == "ok" for r in again for tp in r["test_points"])


def test_a_verdicts_line_that_is_not_a_record_is_named(tmp_path):
    from visalign.benchmarks.run_folder import read_jsonl

    path = tmp_path / "verdicts.jsonl"
    path.write_text('{"prompt_id": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a record \(a list, not a JSON object\)"):
        read_jsonl(path)
    assert read_jsonl(path, skip_broken=True) == [{"prompt_id": "a"}]


def test_bench_run_with_errors_abort_stops_at_the_unreadable_image(tmp_path):
    items, images, judge = bench_setup(tmp_path, BAD_IMAGES["png-half"]())
    from visalign.benchmarks.prompts import PromptSet

    prompt_set = PromptSet("t", items, primary_criteria=("Color", "Shape"))
    config = BenchConfig(str(tmp_path / "out"), images_per_prompt=1, bootstrap=0, abort_on_error=True)
    with pytest.raises(BenchError, match=rf"image {images / 'b_0.png'}: image .*cannot be read.*--errors abort"):
        run_bench(prompt_set, judge, config, images_dir=images)
    config = BenchConfig(str(tmp_path / "out2"), images_per_prompt=1, bootstrap=0)
    summary = run_bench(prompt_set, judge, config, images_dir=images)  # the default: an error verdict, not an abort
    assert summary["coverage"]["errors"] == 2 and (tmp_path / "out2" / "report.html").is_file()


def test_bench_run_accepts_judge_timeout_and_errors_abort():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "run",
            "--set",
            "s",
            "--images",
            "d",
            "--judge",
            "world",
            "--out",
            "o",
            "--judge-timeout",
            "2.5",
            "--errors",
            "abort",
        ]
    )
    assert args.judge_timeout == 2.5 and args.errors == "abort"
    judge = build_judge("openai:QwenVL@http://127.0.0.1:9/v1", timeout=2.5)
    assert judge.backend.timeout == 2.5
    with pytest.raises(ValueError, match="`timeout` must be a positive number"):
        OpenAIServerVLM("http://127.0.0.1:9/v1", "QwenVL", timeout=math.inf)


def test_score_reports_an_unreadable_image_by_name_and_scores_the_rest(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes(png_bytes((32, 32)))
    (images / "1.png").write_bytes(BAD_IMAGES["png-half"]())
    (images / "2.png").write_bytes(png_bytes((32, 32)))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "s.json"
    argv = ["score", "--reward", "world-verifier", "--images", str(images), "--prompts", str(prompts)]
    assert main([*argv, "--output", str(out), "--output", str(tmp_path / "s.csv")]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[1]["world-verifier"] is None and f"image {images / '1.png'} cannot be read" in rows[1]["error"]
    assert rows[0]["world-verifier"] is not None and rows[2]["world-verifier"] is not None
    assert "1 of 3 images could not be read" in capsys.readouterr().err
    assert main([*argv, "--errors", "abort"]) == 2
    assert f"image {images / '1.png'} cannot be read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Judges: every transport failure is an error verdict with its reason


class RawServer:
    """A TCP server on 127.0.0.1 that reads one HTTP request per connection and answers with `behave(n, conn)`.

    Bounded and self-stopping: it accepts for at most `lifetime` seconds, every socket has a timeout, and `close()`
    (or leaving the `with` block) stops it.
    """

    def __init__(self, behave: Callable[[int, socket.socket], None], lifetime: float = 30.0):
        self.behave, self.count, self.stop = behave, 0, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.deadline = time.monotonic() + lifetime
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            n, self.count = self.count, self.count + 1
            threading.Thread(target=self._handle, args=(n, conn), daemon=True).start()
        self.sock.close()

    def _handle(self, n: int, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536) or b"!"
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next((h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.behave(n, conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def completion(text: str = ANSWER) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def http(body: bytes, status: str = "200 OK", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n".encode() + body


def trickle(conn: socket.socket, data: bytes, every: float = 0.2) -> None:
    for i in range(len(data)):
        conn.sendall(data[i : i + 1])
        time.sleep(every)


FAILURES = {  # behaviour -> what the reason must say
    "short-body": (lambda n, c: c.sendall(http(completion()[:20], length=200)), "cut short"),
    "garbage": (lambda n, c: c.sendall(b"\x00\x01 not http at all\r\n\r\n"), "not HTTP"),
    "hang-up": (lambda n, c: None, "closed the connection without an answer"),
    "trickled-body": (lambda n, c: trickle(c, http(completion())), "no complete answer within 1 s"),
    "trickled-status": (lambda n, c: trickle(c, b"HTTP/1.1 200 OK\r\n" * 20), "no complete answer within 1 s"),
    "stall": (lambda n, c: time.sleep(3), "no complete answer within 1 s"),
    "not-json": (lambda n, c: c.sendall(http(b"<html>busy</html>")), "not JSON"),
    "not-a-completion": (lambda n, c: c.sendall(http(b'{"error": "overloaded"}')), "not a chat completion"),
    "content-not-text": (
        lambda n, c: c.sendall(http(json.dumps({"choices": [{"message": {"content": 5}}]}).encode())),
        "not text",
    ),
    "server-error": (
        lambda n, c: c.sendall(http(b'{"error": "boom"}', "500 Internal Server Error")),
        "HTTP Error 500",
    ),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_every_transport_failure_is_an_error_verdict_with_its_reason(kind):
    behave, reason = FAILURES[kind]
    item = PromptItem("p", "a red circle", test_points=(TestPoint("Color", "red"),))
    with RawServer(behave) as server:
        judge = VLMJudge(OpenAIServerVLM(server.url, "QwenVL", timeout=1), VLMJudgeConfig(max_retries=1, backoff=0.01))
        start = time.monotonic()
        (result,) = judge.judge([Sample(item, 0, torch.rand(3, 8, 8))])
        elapsed = time.monotonic() - start
    (verdict,) = result.verdicts
    assert verdict.status == "error" and reason in verdict.reason and server.url in verdict.reason, verdict.reason
    assert server.count == 2  # one retry, bounded
    assert elapsed < 2 * 1 + 0.01 + 2.0  # two attempts of at most 1 s each, whatever the server does


def test_a_trickling_server_cannot_stall_a_request_past_its_deadline():
    with RawServer(lambda n, c: trickle(c, http(completion()), every=0.05)) as server:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no complete answer within 0.5 s"):
            post_chat(server.url + "/chat/completions", {"model": "m"}, timeout=0.5)
        assert time.monotonic() - start < 1.5


def test_post_chat_errors_are_oserrors_or_valueerrors_with_reasons():
    with RawServer(lambda n, c: c.sendall(http(completion()[:10], length=100))) as server:
        with pytest.raises(ChatTransportError, match=r"cut short \(10 bytes read, 90 more expected\)"):
            post_chat(server.url + "/chat/completions", {}, timeout=2)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(ChatTransportError, match="ConnectionRefusedError"):
        post_chat(f"http://127.0.0.1:{port}/v1/chat/completions", {}, timeout=2)
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        post_chat("ftp://127.0.0.1/x", {}, timeout=2)


def test_a_failed_request_is_retried_with_backoff_and_can_recover():
    def flaky(n, conn):
        conn.sendall(b"garbage\r\n\r\n" if n < 2 else http(completion()))

    item = PromptItem("p", "a red circle", test_points=(TestPoint("Color", "red"),))
    with RawServer(flaky) as server:
        judge = VLMJudge(OpenAIServerVLM(server.url, "QwenVL", timeout=2), VLMJudgeConfig(max_retries=2, backoff=0.05))
        start = time.monotonic()
        (result,) = judge.judge([Sample(item, 0, torch.rand(3, 8, 8))])
        assert time.monotonic() - start >= 0.05 + 0.1  # waited 0.05 s, then 0.1 s
    assert server.count == 3 and result.verdicts[0].status == "ok" and result.verdicts[0].passed


@pytest.mark.parametrize("raw", [5, ["a"], {"text": ANSWER}, True])
def test_a_replay_record_of_the_wrong_type_is_an_error_verdict_naming_the_record(tmp_path, raw):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        json.dumps({"prompt_id": "q", "image_id": 0, "raw": ANSWER})
        + "\n"
        + json.dumps({"prompt_id": "p", "image_id": 0, "raw": raw})
        + "\n"
    )
    item = PromptItem("p", "a red circle", test_points=(TestPoint("Color", "red"),))
    (result,) = VLMJudge(ReplayVLM.from_jsonl(path)).judge([Sample(item, 0, torch.rand(3, 8, 8))])
    (verdict,) = result.verdicts
    assert verdict.status == "error"
    assert f"the record of image p_0 ({path}, line 2) holds a {type(raw).__name__}" in verdict.reason


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "{not json", '{"prompt_id": "p"}'])
def test_a_replay_file_line_that_is_not_a_record_is_named(tmp_path, line):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"prompt_id": "q", "image_id": 0, "raw": ANSWER}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{path}: line 2 is not a recorded answer"):
        ReplayVLM.from_jsonl(path)
    write_encoded(path, '{"raw": "café"}\n', "latin-1")
    with pytest.raises(BadFileError, match=rf"replay file {path}: line 1"):
        ReplayVLM.from_jsonl(path)
