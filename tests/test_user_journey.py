"""The user's path on the shipped world models, through the command line only: train a LoRA (`--smoke`), evaluate
the base and the LoRA (`bench run --lora`), compare them, and meet each common mistake as one actionable line.

Training runs as its own process (its stderr is what a user sees: one labelled bar per phase); every other command
runs in-process through `visalign.cli.main`, as a user's shell would run it. About a minute on 2 CPU cores (the
issue's bound is five).
"""

import json
import re
import subprocess
import sys
import time

import pytest

from visalign.cli import main

# one prompt per category, one image each: small, and still every primary criterion (so Overall is reported)
BENCH = ["--set", "world:heldout", "--judge", "world", "--limit-per-category", "1", "--images-per-prompt", "1"]
BENCH += ["--bootstrap", "50", "--grid-prompts", "6"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `visalign ARGV`."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_actionable(err: str, command: str, *fix: str) -> None:
    """One `visalign COMMAND: error:` message that names the fix, and no traceback."""
    assert f"visalign {command}: error:" in err, err
    assert "Traceback" not in err and 'File "' not in err, err
    for words in fix:
        assert words in err, (words, err)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """`visalign train diffusion-dpo --config world_dpo --smoke` in its own process, as a shell runs it (a bundled
    recipe, found by name, cut to seconds): its run folder and its stderr."""
    out = tmp_path_factory.mktemp("journey") / "dpo"
    argv = ["train", "diffusion-dpo", "--config", "world_dpo", "--smoke", "--set", f"output_dir={out}"]
    cli = "import sys; from visalign.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", cli, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out, done.stderr


@pytest.fixture(scope="module")
def trained(training):
    return training[0]


def test_training_is_quiet_one_labelled_bar_per_phase(training):
    _, err = training
    assert "Traceback" not in err
    # the issue counted 882 lines, 124 of them unlabelled nested pipeline bars; a smoke run now prints about a dozen
    assert err.count("\n") <= 30, err
    frames = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f).strip() for line in err.split("\n") for f in line.split("\r")]
    bars = [f for f in frames if re.search(r"\d+/\d+ \[", f)]  # tqdm frames: "label:  50%|...| 1/2 [00:01<..."
    labels = {f.partition(":")[0] for f in bars}
    assert labels == {"training", "pair building"}, bars  # online DPO builds its pairs, then trains; no other bar
    warnings = [line for line in err.splitlines() if "Warning" in line or " WARNING " in line]
    assert len(warnings) == len(set(warnings)), warnings  # a repeated library warning is shown once


def test_training_eta_counts_training_steps_only(tmp_path):
    from visalign.config import TrainConfig
    from visalign.engine import Engine
    from visalign.testing import tiny_pipeline

    engine = Engine(
        TrainConfig(output_dir=str(tmp_path / "run"), report_to="none", max_steps=4),
        tiny_pipeline("sd"),
        component="unet",
    )
    bar = engine.progress
    assert not bar.disable and bar.desc == "training"
    time.sleep(0.2)  # "a training step"
    with engine.ema_weights():  # evaluation and online pair building run with the EMA weights swapped in
        time.sleep(1.0)
    with engine.pause_progress(), engine.pause_progress():  # nested pauses count once
        time.sleep(0.5)
    bar.update(1)
    assert bar.format_dict["elapsed"] < 0.9  # 0.2 s of training, not 1.7 s
    assert bar.format_dict["rate"] > 1.4  # steps per second of training (1 / 0.2 s); 1 / 1.7 s with the pauses
    time.sleep(0.2)
    assert bar.format_dict["elapsed"] >= 0.4  # time outside a pause counts
    engine.finish()


def test_train_evaluate_compare(trained, tmp_path, capsys):
    lora = trained / "final"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()

    code, out, err = run(capsys, "bench", "run", *BENCH, "--model", "world:sd", "--out", tmp_path / "base")
    assert code == 0, err
    assert "Overall (mean of 6 primary criteria)" in out  # a stratified small run still reports Overall
    code, out, err = run(
        capsys, "bench", "run", *BENCH, "--model", "world:sd", "--lora", lora, "--out", tmp_path / "lora"
    )
    assert code == 0, err

    base = json.loads((tmp_path / "base" / "record.json").read_text())
    tuned = json.loads((tmp_path / "lora" / "record.json").read_text())
    # the world model's own defaults were sampled with, written out in full, and the LoRA is part of the record
    assert base["settings"]["call"] == {"num_inference_steps": 20, "guidance_scale": 3.0, "height": 32, "width": 32}
    assert base["settings"]["scheduler"]["class"] == "DDIMScheduler"
    assert tuned["settings"] == base["settings"] and tuned["lora"] == {"path": str(lora), "scale": 1.0}
    report = (tmp_path / "lora" / "report.md").read_text()
    assert "num_inference_steps=20" in report and f"LoRA {lora}" in report

    code, out, err = run(capsys, "bench", "compare", tmp_path / "base", tmp_path / "lora", "--out", tmp_path / "cmp")
    assert code == 0, err
    assert "Overall:" in out and "different generation settings" not in out
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Overall:" in html and "Runs" in html

    # the same LoRA sampled with 10 steps: refused, naming the setting; allowed on request, differences on top
    code, _, err = run(
        capsys,
        "bench",
        "run",
        *BENCH,
        "--model",
        "world:sd",
        "--lora",
        lora,
        "--num-inference-steps",
        "10",
        "--out",
        tmp_path / "lora10",
    )
    assert code == 0, err
    code, _, err = run(capsys, "bench", "compare", tmp_path / "base", tmp_path / "lora10")
    assert code == 2
    assert_actionable(err, "bench compare", "num_inference_steps: 20 vs 10", "--allow-different-settings")
    code, out, _ = run(
        capsys, "bench", "compare", tmp_path / "base", tmp_path / "lora10", "--allow-different-settings"
    )
    assert code == 0
    assert out.index("different generation settings") < out.index("Overall:")
    assert "num_inference_steps: 20 vs 10" in out


def test_mistakes_are_one_line_that_names_the_fix(trained, tmp_path, capsys):
    lora = trained / "final"
    # a LoRA folder given as the model: the message says how to load it
    code, _, err = run(capsys, "bench", "run", *BENCH, "--model", lora, "--out", tmp_path / "x")
    assert code == 2
    assert_actionable(err, "bench run", f"--model world:sd --lora {lora}")
    code, _, err = run(capsys, "world", "eval", "--model", lora, "--limit-per-category", "1")
    assert code == 2
    assert_actionable(err, "world eval", f"--lora {lora}")
    # a training run's folder given as the LoRA: the message points at its final/
    code, _, err = run(
        capsys, "bench", "run", *BENCH, "--model", "world:sd", "--lora", trained, "--out", tmp_path / "y"
    )
    assert code == 2
    assert_actionable(err, "bench run", str(lora))

    # a real-model recipe offline: every missing thing at once, before anything loads, each with where it comes from
    code, _, err = run(
        capsys, "train", "flow-grpo", "--config", "sd35m_flow_grpo", "--set", f"output_dir={tmp_path}/r"
    )
    assert code == 2
    assert_actionable(
        err,
        "train",
        "4 things this run needs are missing or unusable",
        "stabilityai/stable-diffusion-3.5-medium",
        "gated",
        "hf auth login",
        "hf download yuvalkirstain/PickScore_v1",
        "data/pickscore/train.txt",
        "data/pickscore/test.txt",
    )
    # an unknown reward and an unknown config key: the valid names in the message, no traceback
    code, _, err = run(capsys, "train", "flow-grpo", "--config", "world_flow_grpo", "--set", "reward=pickscorr")
    assert code == 2
    assert_actionable(err, "train", "unknown reward", "world-verifier", "pickscore")
    code, _, err = run(capsys, "train", "flow-grpo", "--config", "world_flow_grpo", "--set", "max_stepz=3")
    assert code == 2
    assert_actionable(err, "train", "max_stepz", "valid keys", "max_steps")
    code, _, err = run(capsys, "train", "flow-grpo", "--config", "no_such_recipe")
    assert code == 2
    assert_actionable(err, "train", "world_flow_grpo")  # the bundled recipes are listed

    # a prompt outside the world's language, for a world reward: named with its line before anything loads
    (tmp_path / "prompts.txt").write_text("two red circles\na purple hexagon\n")
    code, _, err = run(
        capsys, "train", "flow-grpo", "--config", "world_flow_grpo", "--set", f"prompts={tmp_path / 'prompts.txt'}"
    )
    assert code == 2
    assert_actionable(err, "train", "line 2 'a purple hexagon'", "two red circles")

    # a judge that covers none of a set's criteria: non-zero exit, saying so
    code, _, err = run(
        capsys,
        "bench",
        "run",
        "--set",
        "visalign-core",
        "--judge",
        "world",
        "--limit",
        "2",
        "--images-per-prompt",
        "1",
        "--model",
        "world:sd",
        "--bootstrap",
        "0",
        "--out",
        tmp_path / "core",
    )
    assert code == 2
    assert_actionable(err, "bench run", "abstained", "--judge")

    # --debug shows the traceback instead
    with pytest.raises(ValueError, match="--lora"):
        main(["bench", "run", *BENCH, "--model", str(lora), "--out", str(tmp_path / "z"), "--debug"])


def test_hub_dataset_ids_pass_the_preflight_once_cached(tmp_path, monkeypatch, capsys):
    from visalign.config import load_config
    from visalign.pipelines.dpo import DPOConfig
    from visalign.pipelines.reward_training import RewardConfig
    from visalign.pipelines.train import find_config
    from visalign.preflight import config_problems, dataset_problem

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    # not cached, offline: one line naming the dataset's page and the download command (it was "no such file")
    argv = ["train", "diffusion-dpo", "--config", "world_dpo", "--set", "dataset=yuvalkirstain/pickapic_v2"]
    code, _, err = run(capsys, *argv, f"output_dir={tmp_path / 'r'}")
    assert code == 2
    assert_actionable(
        err,
        "train",
        "1 thing this run needs is missing",
        "datasets/yuvalkirstain/pickapic_v2",
        "hf download yuvalkirstain/pickapic_v2 --repo-type dataset",
    )
    assert not (tmp_path / "r").exists()  # nothing was loaded or written

    # a snapshot in the Hub cache (datasets--, not models--) passes, for DPO's `dataset` and the reward's data
    snapshot = tmp_path / "hub" / "datasets--yuvalkirstain--pickapic_v2" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("pairs")
    config = load_config(DPOConfig, find_config("world_dpo"), ["dataset=yuvalkirstain/pickapic_v2"])
    assert [problem for thing, _, problem in config_problems(config) if "pickapic" in thing] == [None]
    reward = RewardConfig(train_data="yuvalkirstain/pickapic_v2", eval_data="owner/held-out")
    problems = {field: problem for _, field, problem in config_problems(reward) if "data" in field}
    assert (
        problems["`train_data`"] is None
        and "hf download owner/held-out --repo-type dataset" in problems["`eval_data`"]
    )
    # a split that `datasets` prepared (its own cache) loads offline too
    (tmp_path / "datasets" / "owner___held-out" / "default").mkdir(parents=True)
    assert dataset_problem("owner/held-out") is None
    # a cached model of that name is no dataset, and a missing local file is not sent to the Hub
    (tmp_path / "hub" / "models--owner--other" / "snapshots" / "abc").mkdir(parents=True)
    assert "hf download owner/other --repo-type dataset" in dataset_problem("owner/other")
    assert dataset_problem(str(tmp_path / "pairs.parquet")) == "no such file or folder"
    assert dataset_problem("world:pairs") is None and dataset_problem(str(snapshot)) is None


def test_train_help_lists_the_config_keys(capsys):
    assert main(["train", "diffusion-dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "config keys of diffusion-dpo" in out and "beta (float, default 5000.0)" in out
    assert "world_dpo" in out  # bundled recipes


def test_world_names_work_in_every_command(tmp_path, capsys):
    # world:sd3 in bench run (it failed with an HFValidationError), with its sequence length from the model
    code, _, err = run(
        capsys,
        "bench",
        "run",
        "--set",
        "world:heldout",
        "--judge",
        "world",
        "--limit",
        "1",
        "--images-per-prompt",
        "1",
        "--bootstrap",
        "0",
        "--model",
        "world:sd3",
        "--out",
        tmp_path / "sd3",
    )
    assert code == 0, err
    record = json.loads((tmp_path / "sd3" / "record.json").read_text())
    assert record["settings"]["call"]["max_sequence_length"] == 16
    assert record["settings"]["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
