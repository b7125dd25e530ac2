"""Sharded training for the engine: which FSDP applies to a run, torch's FSDP2 where accelerate's cannot, and the
gathers and splits that checkpoints and exports need.

    mode = sharding_mode(accelerator, config)     # "none", "accelerate" (its FSDP2 plugin) or "torch" (fully_shard)
    if mode == "torch":
        shard_module(model, mixed_precision_dtype)

Where FSDP comes from:
- On accelerators, accelerate's FSDP plugin (launch with `configs/accelerate/fsdp_full_shard.yaml` or
  `fsdp_cpu_offload.yaml`): `Accelerator.prepare(model, optimizer)` shards the trained component. The engine needs
  FSDP2 (`fsdp_version: 2`): parameters stay where they were as `DTensor` shards, names unchanged, so clipping, EMA,
  checkpoints and LoRA export keep working on them. accelerate shards one model per accelerator; the frozen reference
  copy of full fine-tuning is sharded here with `fully_shard` the same way (no full copy per process).
- On CPUs (`torchrun --nproc_per_node N ... cpu=true`), accelerate ignores its FSDP plugin (its state becomes
  MULTI_CPU, never FSDP), so `fsdp=true` shards with torch's own FSDP2 (`fully_shard`) over gloo: each block named in
  the model's `_no_split_modules` is a unit, then the root; gradients are reduce-scattered (averaged) as under DDP.
- Anywhere else (one process, or several GPUs launched without an FSDP config), `fsdp=true` is an error: the run
  would otherwise train unsharded without saying so.
- DeepSpeed launches (`configs/accelerate/deepspeed_zero2.yaml`) stop with an error for now: DeepSpeed's engine
  steps, clips and scales the loss inside `backward`, which the engine's explicit accumulation does not drive yet.

Checkpoints and exports hold whole tensors: `full_tensor` gathers a shard (a collective, so every process calls it,
and only the main process writes), `shard_like` cuts a whole tensor back into this process's shard, and the
optimizer state goes through torch's distributed-checkpoint state-dict API in its full (unsharded) form, so a
sharded checkpoint has the same files as an unsharded one.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

NONE, ACCELERATE, TORCH = "none", "accelerate", "torch"


def sharding_mode(accelerator: Accelerator, fsdp: bool, model: nn.Module, component: str) -> str:
    """How the trained `model` (the pipeline's `component`) is sharded in this run; a `ValueError` saying why when
    FSDP is asked for and cannot apply."""
    kind = accelerator.distributed_type
    if (fsdp or kind == DistributedType.FSDP) and not getattr(model, "_no_split_modules", None):
        raise ValueError(
            f"FSDP cannot shard the trained {component!r} ({type(model).__name__}): it names no blocks "
            "(`_no_split_modules`) to gather one at a time, and its parts are called outside its own forward (a "
            "trained reward scores through its towers), where FSDP2 has gathered nothing. Sharding covers the "
            "diffusers denoisers (UNet, SD3, FLUX, Qwen-Image, Wan); train this one with DDP (fsdp=false)"
        )
    if kind == DistributedType.DEEPSPEED:
        raise ValueError(
            "a DeepSpeed launch: the engine does not drive DeepSpeed yet (its ZeRO engine steps, clips and scales the "
            "loss inside backward, where the engine accumulates and clips explicitly); shard with FSDP instead "
            "(configs/accelerate/fsdp_full_shard.yaml, which also partitions gradients and optimizer state)"
        )
    if kind == DistributedType.FSDP:
        version = accelerator.state.fsdp_plugin.fsdp_version
        if version != 2:
            raise ValueError(
                f"the accelerate config asks for FSDP version {version}; the engine needs FSDP2 (`fsdp_version: 2`, "
                "as in configs/accelerate/fsdp_full_shard.yaml): FSDP1 flattens parameters, which clipping, EMA, "
                "checkpoints and LoRA export address by name"
            )
        return ACCELERATE
    if not fsdp:
        return NONE
    if kind == DistributedType.MULTI_CPU and accelerator.num_processes > 1:
        return TORCH
    raise ValueError(
        f"`fsdp=true` cannot apply to this run ({kind.value}, {accelerator.num_processes} process(es)), and it "
        "would train unsharded: launch on GPUs with `accelerate launch --config_file "
        "configs/accelerate/fsdp_full_shard.yaml --num_processes N ...`, or on CPUs with "
        "`torchrun --nproc_per_node N -m visalign.cli ... --set cpu=true` "
        "(accelerate applies its FSDP plugin only on accelerators)"
    )


def shard_module(module: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `module` in place with torch's FSDP2: every block in `_no_split_modules` (innermost first), then the
    root. `compute_dtype` gathers parameters in that dtype for compute (mixed precision; gradients are reduced in
    float32) and lets float32 adapters sit beside low-precision frozen weights in one unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    names = set(getattr(module, "_no_split_modules", None) or ())
    for block in reversed(list(module.modules())):
        if block is not module and type(block).__name__ in names:
            fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def full_tensor(tensor: Tensor) -> Tensor:
    """A `DTensor` shard gathered whole (a collective: every process must call it); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` cut as the `DTensor` `like` is (this process's shard, no communication); `full` when `like` is plain."""
    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.to_local().device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a sharded module on the CPU (every process calls it; all of them get it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a sharded model, whole and keyed by parameter name (every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `full_optimizer_state` returned (every process holds it whole) into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def save_full_component(module: nn.Module, state: dict[str, Tensor], folder: Any) -> None:
    """Write a diffusers model's gathered `state` in its `save_pretrained` layout (config and one safetensors file),
    so `from_pretrained(folder)` loads it as if it had never been sharded."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    module.save_config(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / SAFETENSORS_WEIGHTS_NAME))
