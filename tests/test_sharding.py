"""Sharded training through the engine: FSDP2 over gloo on CPU (torchrun) equals one process; resume and export."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visalign.cli import main
from visalign.config import TrainConfig
from visalign.engine import Engine
from visalign.sharding import full_tensor, shard_like
from visalign.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_where_it_cannot_apply_is_an_error_not_an_unsharded_run(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), fsdp=True, cpu=True, report_to="none", max_steps=1)
    with pytest.raises(ValueError, match=r"`fsdp=true` cannot apply to this run \(NO, 1 process") as error:
        Engine(config, tiny_pipeline("sd3"))
    assert "fsdp_full_shard.yaml" in str(error.value) and "torchrun" in str(error.value)


def test_fsdp_error_reaches_the_command_line(tmp_path, capsys):
    recipe = str(ROOT / "configs" / "tiny_flow_grpo.yaml")
    code = main(["train", "flow-grpo", "--config", recipe, "--set", "fsdp=true", "cpu=true", f"output_dir={tmp_path}"])
    assert code == 2 and "`fsdp=true` cannot apply" in capsys.readouterr().err


def test_a_component_without_blocks_cannot_shard_and_says_why():
    from accelerate import Accelerator

    from visalign.sharding import sharding_mode

    accelerator = Accelerator(cpu=True)
    with pytest.raises(ValueError, match=r"FSDP cannot shard the trained 'trained' \(Linear\).*_no_split_modules"):
        sharding_mode(accelerator, True, torch.nn.Linear(2, 2), "trained")
    assert sharding_mode(accelerator, False, torch.nn.Linear(2, 2), "trained") == "none"


def test_unsharded_tensors_pass_through_the_gathers():
    t = torch.randn(3, 2)
    assert full_tensor(t) is t and shard_like(t, torch.zeros(3, 2)) is t


def torchrun(args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]  # torchrun, in any venv
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([*command, "-m", "visalign.cli", *args], env=env, check=True, cwd=ROOT)


def assert_same(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], **tolerance)


def as_if_killed_after(run: Path, copy: Path, step: int) -> None:
    """`copy` holds `run` as it was on disk when a process died after `checkpoint-step` (later files removed)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    for later in (copy / "checkpoints").glob("checkpoint-*"):
        if int(later.name.split("-")[-1]) > step:
            shutil.rmtree(later)
    info = json.loads((copy / "run.json").read_text())
    info.pop("step", None)
    (copy / "run.json").write_text(json.dumps(info | {"status": "running"}))


@pytest.mark.slow
def test_fsdp_full_fine_tuning_dpo_on_two_processes_equals_one(tmp_path):
    """Diffusion-DPO, whole UNet and its frozen reference sharded over 2 processes = the same global batch on one
    (4 pairs a step: 4 on one process, 2 on each of two)."""
    common = ["train", "diffusion-dpo", "--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "--set", "cpu=true"]
    common += ["use_lora=false", "max_steps=2", "save_steps=2"]
    assert main(common + [f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4"]) == 0
    torchrun(common + [f"output_dir={tmp_path / 'two'}", "fsdp=true", "per_device_train_batch_size=2"])
    for file in ("checkpoints/checkpoint-2/trainable.safetensors", "final/unet/diffusion_pytorch_model.safetensors"):
        one, two = (load_file(str(tmp_path / run / file)) for run in ("one", "two"))
        # float32 sums over 4 pairs vs 2 x 2 (reduce-scattered); Adam at lr 1e-3 turns that roundoff into ~1e-5
        assert_same(one, two, atol=1e-4, rtol=1e-3)
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tmp_path / "two" / "final" / "unet")  # the export loads as a diffusers model


@pytest.mark.slow
def test_fsdp_lora_flow_grpo_equals_one_process_resumes_exactly_and_exports(tmp_path):
    common = ["train", "flow-grpo", "--config", str(ROOT / "configs" / "tiny_flow_grpo.yaml"), "--set", "cpu=true"]
    common += ["max_steps=4", "num_batches_per_iteration=1", "save_steps=2", "ema_decay=0.5"]
    common += ["ema_update_every=1"]
    assert (
        main(common + [f"output_dir={tmp_path / 'one'}", "sample_batch_size=4", "per_device_train_batch_size=4"]) == 0
    )
    sharded = common + ["sample_batch_size=2", "per_device_train_batch_size=2", "fsdp=true"]
    torchrun(sharded + [f"output_dir={tmp_path / 'two'}"])
    files = ("checkpoints/checkpoint-4/trainable.safetensors", "final/pytorch_lora_weights.safetensors")
    for file in files:
        one, two = (load_file(str(tmp_path / run / file)) for run in ("one", "two"))
        assert_same(one, two, atol=1e-6, rtol=1e-4)

    as_if_killed_after(tmp_path / "two", tmp_path / "resumed", step=2)
    torchrun(sharded + [f"output_dir={tmp_path / 'resumed'}", "resume_from=latest"])
    for file in files:  # weights, optimizer, EMA and RNG restored into the shards: the same run, bit for bit
        two, resumed = (load_file(str(tmp_path / run / file)) for run in ("two", "resumed"))
        assert_same(two, resumed, atol=0, rtol=0)

    pipe = tiny_pipeline("sd3")
    before = [p.clone() for p in pipe.transformer.parameters()]
    pipe.load_lora_weights(tmp_path / "two" / "final")  # the gathered adapter in the diffusers format
    assert sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora" in n) > 0
    assert len(list(pipe.transformer.parameters())) > len(before)


# -- DeepSpeed ZeRO-2 ---------------------------------------------------------------------------------------------
# accelerate drives DeepSpeed only where it finds an accelerator backend; on CPUs these tests hand it gloo (a driver
# script sets `PartialState(backend="gloo")` first) and DeepSpeed runs on its CPU accelerator. The launch environment
# is the one `accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` exports.

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs `pip install deepspeed` (the optional extra)"
)
DRIVER = """import sys
from accelerate import PartialState
PartialState(backend="gloo")
from visalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def deepspeed_torchrun(args: list[str], tmp_path: Path) -> None:
    from test_accelerate_configs import deepspeed_launch_env

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, **deepspeed_launch_env("deepspeed_zero2.yaml")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(driver), *args]
    subprocess.run(command, env=env, check=True, cwd=ROOT)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero2_lora_flow_grpo_equals_one_process_resumes_exactly_and_exports(tmp_path):
    """ZeRO-2 on 2 processes: DeepSpeed clips and steps; the gathered masters, EMA and grad norms equal one process."""
    common = ["train", "flow-grpo", "--config", str(ROOT / "configs" / "tiny_flow_grpo.yaml"), "--set"]
    common += ["max_steps=4", "num_batches_per_iteration=1", "save_steps=2", "ema_decay=0.5"]
    common += ["ema_update_every=1", "max_grad_norm=0.003"]  # below the tiny run's norms: DeepSpeed's clip acts
    one = common + [
        "cpu=true",
        f"output_dir={tmp_path / 'one'}",
        "sample_batch_size=4",
        "per_device_train_batch_size=4",
    ]
    assert main(one) == 0
    sharded = common + ["sample_batch_size=2", "per_device_train_batch_size=2"]
    deepspeed_torchrun(sharded + [f"output_dir={tmp_path / 'two'}"], tmp_path)
    files = ["final/pytorch_lora_weights.safetensors"]
    files += [f"checkpoints/checkpoint-4/{name}.safetensors" for name in ("trainable", "ema")]
    for file in files:
        one, two = (load_file(str(tmp_path / run / file)) for run in ("one", "two"))
        assert_same(one, two, atol=1e-6, rtol=1e-4)
    norms = [
        [json.loads(row)["train/grad_norm"] for row in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert len(norms[0]) == 4 and max(norms[0]) > 0.003 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    files.append("checkpoints/checkpoint-4/optimizer.safetensors")  # by parameter name under DeepSpeed
    assert not list((tmp_path / "two").rglob("*.pt")) and not list((tmp_path / "two").rglob("*.bin"))

    as_if_killed_after(tmp_path / "two", tmp_path / "resumed", step=2)
    deepspeed_torchrun(sharded + [f"output_dir={tmp_path / 'resumed'}", "resume_from=latest"], tmp_path)
    for file in files:  # masters, Adam moments, EMA and RNG restored into the partitions: bit for bit
        two, resumed = (load_file(str(tmp_path / run / file)) for run in ("two", "resumed"))
        assert_same(two, resumed, atol=0, rtol=0)

    pipe = tiny_pipeline("sd3")
    pipe.load_lora_weights(tmp_path / "two" / "final")
    assert sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora" in n) > 0


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero2_full_fine_tuning_dpo_with_its_reference_equals_one_process(tmp_path):
    common = ["train", "diffusion-dpo", "--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "--set"]
    common += ["use_lora=false", "max_steps=2", "save_steps=2"]
    assert main(common + ["cpu=true", f"output_dir={tmp_path / 'one'}"]) == 0
    deepspeed_torchrun(common + [f"output_dir={tmp_path / 'two'}"], tmp_path)
    for file in ("checkpoints/checkpoint-2/trainable.safetensors", "final/unet/diffusion_pytorch_model.safetensors"):
        one, two = (load_file(str(tmp_path / run / file)) for run in ("one", "two"))
        assert_same(one, two, atol=1e-4, rtol=1e-3)  # float32 sums over 4 pairs vs 2 x 2, through Adam
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tmp_path / "two" / "final" / "unet")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="GPU-only: DeepSpeed bf16 over NCCL needs 2 CUDA devices")
def test_deepspeed_zero2_bf16_on_gpus_trains_and_exports(tmp_path):
    """The GPU launch as the README gives it: bf16 from the recipe into DeepSpeed's config, fp32 masters saved."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2"]
    command += ["-m", "visalign.cli", "train", "flow-grpo", "--config", str(ROOT / "configs" / "tiny_flow_grpo.yaml")]
    command += ["--set", "mixed_precision=bf16", "max_steps=2", "save_steps=2", "sample_batch_size=2"]
    command += ["per_device_train_batch_size=2", f"output_dir={tmp_path}"]
    subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, cwd=ROOT)
    weights = load_file(str(tmp_path / "checkpoints" / "checkpoint-2" / "trainable.safetensors"))
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    tiny_pipeline("sd3").load_lora_weights(tmp_path / "final")
