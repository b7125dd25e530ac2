"""The accelerate configs in `configs/accelerate/` parse with accelerate's own loader and launch the right plugin."""

import importlib.util
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "fsdp_full_shard.yaml": DistributedType.FSDP,
    "fsdp_cpu_offload.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
}


def test_every_shipped_config_is_expected():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerates_loader(name):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == EXPECTED[name]
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("name, offload", [("fsdp_full_shard.yaml", False), ("fsdp_cpu_offload.yaml", True)])
def test_fsdp_configs_launch_an_fsdp2_plugin(name, offload, monkeypatch):
    """What `accelerate launch --config_file` exports is what `FullyShardedDataParallelPlugin()` reads."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert (type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy") is offload


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="GPU-only path: DeepSpeed is not installed")
def test_deepspeed_config_builds_a_plugin(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert DeepSpeedPlugin().zero_stage == 2


def test_readme_launches_every_config():
    readme = (ROOT / "README.md").read_text()
    for name in EXPECTED:
        assert f"configs/accelerate/{name}" in readme
