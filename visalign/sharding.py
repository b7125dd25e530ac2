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
- DeepSpeed ZeRO-2 (`configs/accelerate/deepspeed_zero2.yaml`): accelerate's `prepare` hands the trained component
  and AdamW to a `DeepSpeedEngine`, which partitions gradients and optimizer state. DeepSpeed owns backward, loss
  scaling, clipping, the step and zero_grad (`engine.backward(loss)` then `engine.step()`, DeepSpeed's documented
  loop, which accelerate's `backward` runs): the engine marks each micro-step's accumulation boundary, checks the
  losses before the step, clips through the config's `gradient_clipping` (the recipe's `max_grad_norm` where it says
  "auto", `deepspeed_config_updates`) and logs DeepSpeed's gradient norm. Mixed precision is the DeepSpeed config's
  (it must agree with the recipe's `mixed_precision`). Checkpoints stay the engine's safetensors files: the fp32
  master weights and Adam moments are gathered whole per parameter (`deepspeed_trained_state`,
  `deepspeed_optimizer_state`), never DeepSpeed's pickled `save_checkpoint`. ZeRO-2 replicates the parameters, so the
  EMA, the finite-weight checks and a full-fine-tuning reference work on them as under DDP.
- DeepSpeed ZeRO-3 is refused (`deepspeed_config_updates` says why): it partitions the parameters themselves.

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

NONE, ACCELERATE, TORCH, DEEPSPEED = "none", "accelerate", "torch", "deepspeed"


def sharding_mode(accelerator: Accelerator, fsdp: bool, model: nn.Module, component: str) -> str:
    """How the trained `model` (the pipeline's `component`) is sharded in this run ("none", "accelerate", "torch" or
    "deepspeed"); a `ValueError` saying why when FSDP is asked for and cannot apply."""
    kind = accelerator.distributed_type
    if (fsdp or kind == DistributedType.FSDP) and not getattr(model, "_no_split_modules", None):
        raise ValueError(
            f"FSDP cannot shard the trained {component!r} ({type(model).__name__}): it names no blocks "
            "(`_no_split_modules`) to gather one at a time, and its parts are called outside its own forward (a "
            "trained reward scores through its towers), where FSDP2 has gathered nothing. Sharding covers the "
            "diffusers denoisers (UNet, SD3, FLUX, Qwen-Image, Wan); train this one with DDP (fsdp=false)"
        )
    if kind == DistributedType.DEEPSPEED:
        if fsdp:
            raise ValueError("`fsdp=true` under a DeepSpeed launch: choose one (ZeRO-2 partitions gradients, state)")
        return DEEPSPEED
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


# -- DeepSpeed ZeRO-2 ---------------------------------------------------------------------------------------------

ZERO3_REFUSED = (
    "DeepSpeed ZeRO-3 partitions the parameters themselves (each process keeps a slice, gathered by hooks around "
    "each module's forward): the engine's EMA swap, its finite-weight checks and the frozen full-fine-tuning "
    "reference address whole parameters, and accelerate prepares one DeepSpeed engine, so the reference would stay "
    "a full copy per process. Use configs/accelerate/fsdp_full_shard.yaml (FSDP2 shards parameters with all of "
    "these) or configs/accelerate/deepspeed_zero2.yaml"
)


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and str(section.get("enabled", False)).lower() == "true"


def deepspeed_precision(ds_config: dict[str, Any]) -> str:
    """The mixed precision a DeepSpeed config trains in: "bf16", "fp16" or "no"."""
    return "bf16" if _enabled(ds_config.get("bf16")) else "fp16" if _enabled(ds_config.get("fp16")) else "no"


def deepspeed_config_updates(
    ds_config: dict[str, Any], max_grad_norm: float, mixed_precision: str, num_processes: int
) -> dict[str, Any]:
    """The top-level values the engine sets in accelerate's DeepSpeed config before `prepare` (a pure function); a
    `ValueError` where the config contradicts the engine.

    - `gradient_clipping`: DeepSpeed clips inside its step, so the recipe's `max_grad_norm` goes there where the
      config says "auto" (or nothing); `max_grad_norm <= 0` becomes 0, DeepSpeed's "no clipping". A number must equal
      `max_grad_norm`: two clip values for one run would leave the reader guessing which held.
    - `gradient_accumulation_steps`: the engine accumulates its micro-batches itself (each loss scaled by the caller,
      the boundary marked for DeepSpeed), so DeepSpeed's count must be 1 ("auto" becomes 1); more would divide every
      loss a second time.
    - `train_micro_batch_size_per_gpu`, `train_batch_size`: DeepSpeed uses them for its throughput report and one
      consistency assertion only; "auto" becomes 1 sample per process (the methods own their batches).
    - ZeRO stage 3 is refused (`ZERO3_REFUSED`), as are `optimizer`/`scheduler` sections (the engine brings AdamW and
      the learning-rate schedule); the config's fp16/bf16 must agree with the recipe's `mixed_precision`.
    """
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage == 3:
        raise ValueError(ZERO3_REFUSED)
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(
                f"the DeepSpeed config has a `{section}` section: the engine brings its own AdamW and schedule "
                "(learning_rate, lr_scheduler, adam_* in the recipe); remove the section"
            )
    precision = deepspeed_precision(ds_config)
    if precision != mixed_precision:
        raise ValueError(
            f"the DeepSpeed config trains in {precision!r} but the recipe's mixed_precision is {mixed_precision!r}: "
            f"make them agree (--set mixed_precision={precision}, or change the DeepSpeed config's fp16/bf16)"
        )
    clip = max(float(max_grad_norm), 0.0)
    if not _is_auto(ds_config.get("gradient_clipping")) and float(ds_config["gradient_clipping"]) != clip:
        raise ValueError(
            f"the DeepSpeed config's gradient_clipping ({ds_config['gradient_clipping']}) differs from the recipe's "
            f"max_grad_norm ({max_grad_norm}): set gradient_clipping: auto to take max_grad_norm, or make them equal"
        )
    accumulation = ds_config.get("gradient_accumulation_steps")
    if not _is_auto(accumulation) and int(accumulation) != 1:
        raise ValueError(
            f"the DeepSpeed config's gradient_accumulation_steps is {accumulation}: the engine accumulates the "
            "method's micro-batches itself and marks the boundary for DeepSpeed, so it must be 1 (or auto)"
        )
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    micro = 1 if _is_auto(micro) else int(micro)
    total = ds_config.get("train_batch_size")
    return {
        "gradient_clipping": clip,
        "gradient_accumulation_steps": 1,
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * num_processes if _is_auto(total) else int(total),
    }


def configure_deepspeed(accelerator: Accelerator, max_grad_norm: float, mixed_precision: str) -> None:
    """Write `deepspeed_config_updates` into the accelerator's DeepSpeed config (call it before `prepare`)."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config.update(deepspeed_config_updates(ds_config, max_grad_norm, mixed_precision, accelerator.num_processes))


def deepspeed_step(engine: Any) -> float:
    """DeepSpeed's update at an accumulation boundary: unscale, clip (`gradient_clipping`), AdamW step, zero the
    gradients (`DeepSpeedEngine.step`); returns the global gradient norm before clipping that DeepSpeed computed.
    DeepSpeed skips a step whose gradients overflowed (fp16, float32) and reports the norm as inf."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def deepspeed_trained_state(named_parameters: list[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """The trained parameters' float32 master weights, whole and by name, on the CPU.

    `deepspeed.utils.safe_get_full_fp32_param` all-reduces each parameter's partitions (a collective: every process
    calls it). Under bf16/fp16 the module holds rounded copies; these are the weights the optimizer steps.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu() for n, p in named_parameters}


def deepspeed_optimizer_state(named_parameters: list[tuple[str, nn.Parameter]], optimizer: Any) -> dict[str, Any]:
    """AdamW's state of a ZeRO `optimizer`, whole and by parameter name (every process calls it).

    `exp_avg` and `exp_avg_sq` per parameter (`deepspeed.utils.safe_get_full_optimizer_state`), the step count of the
    partitions, and the parameter groups' hyperparameters: tensors and numbers only, stored by `save_state`.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    base = optimizer.optimizer  # the torch AdamW over this process's flat float32 partitions
    steps = [s["step"] for s in base.state.values() if "step" in s]
    return {
        "state": {
            n: {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in ("exp_avg", "exp_avg_sq")}
            for n, p in named_parameters
        },
        "step": steps[0].detach().cpu().clone() if steps else None,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
    }


def load_deepspeed_state(
    named_parameters: list[tuple[str, nn.Parameter]], optimizer: Any, weights: dict[str, Tensor], state: dict[str, Any]
) -> None:
    """Restore what `deepspeed_trained_state` and `deepspeed_optimizer_state` returned into this process's partitions
    (the float32 masters and Adam moments) and into the module's replicated working copies (ZeRO-2)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if sorted(state["state"]) != sorted(n for n, _ in named_parameters):
        raise ValueError("the checkpoint's optimizer state does not name the trained parameters")
    base = optimizer.optimizer
    for group in base.param_groups:  # AdamW creates its moments at its first step: a resumed run needs them before
        for flat in group["params"]:
            if not base.state[flat]:
                zeros = torch.zeros_like(flat)
                base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    optimizer._lazy_init_hp_params_optimizer_state()  # ZeRO links each parameter to its slice of the moments
    with torch.no_grad():
        for n, p in named_parameters:
            safe_set_full_fp32_param(p, weights[n].to(p.device, torch.float32))
            p.copy_(weights[n])
            for key, value in state["state"][n].items():
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
    for s in base.state.values():
        if "step" in s and state["step"] is not None:
            s["step"] = state["step"].to(s["step"].device, s["step"].dtype).clone()
    for group, saved in zip(base.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k in group})
