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


def deepspeed_launch_env(name: str, num_processes: int = 2) -> dict[str, str]:
    """The environment `accelerate launch --config_file NAME` gives a DeepSpeed run (accelerate's own functions)."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    argv = ["--config_file", str(CONFIGS / name), "--num_processes", str(num_processes), "train.py"]
    args, defaults, mixed_precision_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # what `accelerate launch` sets before this
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs `pip install deepspeed` (optional)")
def test_deepspeed_zero2_config_builds_a_plugin_the_engine_configures(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    from visalign.sharding import deepspeed_config_updates

    for key, value in deepspeed_launch_env("deepspeed_zero2.yaml").items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    assert plugin.zero_stage == 2 and config["gradient_clipping"] == "auto"
    plugin.set_mixed_precision("bf16")  # what the Accelerator does with the recipe's mixed_precision
    updates = deepspeed_config_updates(config, max_grad_norm=0.5, mixed_precision="bf16", num_processes=8)
    assert updates == {
        "gradient_clipping": 0.5,
        "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": 8,
    }


def ds_config(**overrides) -> dict:
    """A DeepSpeed config as accelerate's plugin writes it from a YAML launch ("auto" where the YAML is silent)."""
    config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "fp16": {"enabled": False},
        "bf16": {"enabled": "auto"},
    }
    return config | overrides


def test_deepspeed_clipping_comes_from_max_grad_norm_where_the_config_says_auto():
    from visalign.sharding import deepspeed_config_updates

    assert deepspeed_config_updates(ds_config(), 2.0, "no", 4)["gradient_clipping"] == 2.0
    assert deepspeed_config_updates(ds_config(), 0.0, "no", 4)["gradient_clipping"] == 0.0  # 0: DeepSpeed's "off"
    assert deepspeed_config_updates(ds_config(gradient_clipping=1.0), 1.0, "no", 4)["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match=r"gradient_clipping \(1.0\) differs from the recipe's max_grad_norm \(0.3\)"):
        deepspeed_config_updates(ds_config(gradient_clipping=1.0), 0.3, "no", 4)


def test_deepspeed_batch_sizes_fill_autos_and_keep_numbers():
    from visalign.sharding import deepspeed_config_updates

    updates = deepspeed_config_updates(ds_config(train_micro_batch_size_per_gpu=2), 1.0, "no", 4)
    assert updates["train_micro_batch_size_per_gpu"] == 2 and updates["train_batch_size"] == 8
    assert deepspeed_config_updates(ds_config(train_batch_size=12), 1.0, "no", 4)["train_batch_size"] == 12


@pytest.mark.parametrize(
    "overrides, mixed_precision, message",
    [
        ({"zero_optimization": {"stage": 3}}, "no", "ZeRO-3 partitions the parameters themselves"),
        ({"gradient_accumulation_steps": 4}, "no", "gradient_accumulation_steps is 4.*must be 1"),
        ({"optimizer": {"type": "AdamW"}}, "no", "has a `optimizer` section"),
        ({"scheduler": {"type": "WarmupLR"}}, "no", "has a `scheduler` section"),
        ({"bf16": {"enabled": True}}, "no", r"trains in 'bf16' but the recipe's mixed_precision is 'no'"),
        ({"fp16": {"enabled": "true"}, "bf16": {"enabled": False}}, "bf16", r"trains in 'fp16'.* is 'bf16'"),
    ],
)
def test_deepspeed_configs_the_engine_cannot_honour_say_why(overrides, mixed_precision, message):
    from visalign.sharding import deepspeed_config_updates

    with pytest.raises(ValueError, match=message):
        deepspeed_config_updates(ds_config(**overrides), 1.0, mixed_precision, 2)


def test_deepspeed_precision_reads_the_config():
    from visalign.sharding import deepspeed_precision

    assert deepspeed_precision(ds_config()) == "no"  # "auto" not yet filled in by the Accelerator
    assert deepspeed_precision(ds_config(bf16={"enabled": True})) == "bf16"
    assert deepspeed_precision(ds_config(fp16={"enabled": "true"})) == "fp16"


def test_a_deepspeed_launch_selects_the_deepspeed_branch():
    """`sharding_mode` reads only the launch kind here (a stand-in Accelerator: a real one needs DeepSpeed)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from visalign.sharding import sharding_mode
    from visalign.testing import tiny_pipeline

    launch = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2)
    transformer = tiny_pipeline("sd3").transformer
    assert sharding_mode(launch, False, transformer, "transformer") == "deepspeed"
    with pytest.raises(ValueError, match="`fsdp=true` under a DeepSpeed launch"):
        sharding_mode(launch, True, transformer, "transformer")


def test_readme_launches_every_config():
    readme = (ROOT / "README.md").read_text()
    for name in EXPECTED:
        assert f"configs/accelerate/{name}" in readme
