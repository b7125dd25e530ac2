"""What an engine checkpoint holds, written and read back exactly: weights, optimizer, schedule, EMA, RNG states.

    final = write_checkpoint(engine, state)            # output_dir/checkpoints/checkpoint-{step}, atomically
    state, step, rows = read_checkpoint(engine, folder)  # restores the engine's state; the caller's state back

`visalign.engine.Engine.save_checkpoint` / `load_checkpoint` call these; `visalign.rundir` finds, prunes and rewinds
the checkpoint folders. A checkpoint folder holds, all safetensors (`visalign.files.save_state` for the optimizer,
the schedule and the RNG states) or JSON/YAML, never a pickle:

- `trainable.safetensors`: the trained parameters, whole (gathered when sharded; DeepSpeed's float32 masters);
- `optimizer.safetensors`, `scheduler.safetensors`, `ema.safetensors` (when EMA is on);
- `random_states_{process}.safetensors`: python, numpy and torch (CPU and CUDA) RNG states of every process;
- `state.json`: the step, the rows of `metrics.jsonl` written so far and the caller's JSON state (main process);
  `caller_state_{process}.safetensors`: the caller's tensors (e.g. a replay buffer), per process;
- `config.yaml`, and under LoRA the adapter in the diffusers format (`pipe.load_lora_weights(folder)` works).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from visalign.config import save_config
from visalign.files import load_safetensors, load_state, read_text, refuse_pickles, save_state
from visalign.rundir import CHECKPOINTS, count_rows, prune_checkpoints
from visalign.sharding import (
    DEEPSPEED,
    NONE,
    deepspeed_optimizer_state,
    full_optimizer_state,
    full_tensor,
    load_deepspeed_state,
    load_full_optimizer_state,
    shard_like,
)

if TYPE_CHECKING:
    from visalign.engine import Engine

logger = logging.getLogger(__name__)


def write_checkpoint(engine: Engine, state: dict[str, Any]) -> Path:
    """Write `engine`'s `output_dir/checkpoints/checkpoint-{step}` atomically (temporary folder, then rename), then
    prune to `checkpoints_total_limit`; returns the folder. A collective: call it on every process.

    `state` is the caller's: its JSON values (the main process's) go to `state.json`, its tensor values (every
    process's own) to `caller_state_{process}.safetensors`.
    """
    root = engine.output_dir / CHECKPOINTS
    final = root / f"checkpoint-{engine.step}"
    tmp = root / f".checkpoint-{engine.step}.tmp"
    if engine.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.accelerator.wait_for_everyone()
    save_state(random_states(), tmp / f"random_states_{engine.process_index}.safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    if tensors:
        save_file(tensors, tmp / f"caller_state_{engine.process_index}.safetensors")
    state = {k: v for k, v in state.items() if k not in tensors}
    # whole tensors on every process (gathers when sharded, so every process takes part), written by the main one
    trained = engine.trained_state()
    ema = None if engine.ema is None else {k: full_tensor(v) for k, v in engine.ema.state_dict().items()}
    sharded = engine.sharding != NONE
    if engine.sharding == DEEPSPEED:
        optimizer = deepspeed_optimizer_state(engine.named_parameters, engine.optimizer.optimizer)
    else:
        optimizer = full_optimizer_state(engine.unwrapped, engine.optimizer.optimizer) if sharded else None
    if engine.is_main_process:
        save_file({n: t.cpu().contiguous() for n, t in trained.items()}, tmp / "trainable.safetensors")
        save_state(optimizer if sharded else engine.optimizer.state_dict(), tmp / "optimizer.safetensors")
        save_state(engine.lr_scheduler.state_dict(), tmp / "scheduler.safetensors")
        if ema is not None:
            save_file({k: v.cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        if engine.config.use_lora:
            engine.save_lora(tmp, trained if sharded else None)
        save_config(engine.config, tmp / "config.yaml")
        metrics = engine.output_dir / "metrics.jsonl"
        state = {"step": engine.step, "metrics_rows": count_rows(metrics), **state}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    engine.accelerator.wait_for_everyone()
    if engine.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(engine.output_dir, engine.config.checkpoints_total_limit)
        logger.info("saved checkpoint %s", final)
    engine.accelerator.wait_for_everyone()
    return final


def read_checkpoint(engine: Engine, folder: Path) -> tuple[dict[str, Any], int, int | None]:
    """Restore `engine`'s weights, optimizer, schedule, EMA and this process's RNG states from `folder`; returns the
    caller's state (its tensors on the CPU), the checkpoint's step and its `metrics.jsonl` row count (None when the
    checkpoint did not count them). The engine's step is the caller's to set.

    Nothing is unpickled: a folder holding a pickle is refused, naming the file.
    """
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"no visalign checkpoint at {folder} (state.json missing)")
    refuse_pickles(folder)
    # read on the CPU (safetensors refuses "cpu:0", the device of a multi-process CPU run); copy_ moves them
    weights = load_safetensors(folder / "trainable.safetensors", device="cpu")
    names = [n for n, _ in engine.named_parameters]
    if sorted(weights) != sorted(names):
        missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise ValueError(
            f"checkpoint {folder} does not match the trained parameters (missing {missing[:3]}, extra "
            f"{extra[:3]}): was it written with the same model and LoRA settings?"
        )
    with torch.no_grad():
        for n, p in engine.named_parameters:
            p.copy_(shard_like(weights[n], p))  # this process's shard when sharded
    if engine.sharding == NONE:
        engine.optimizer.load_state_dict(load_state(folder / "optimizer.safetensors"))
    elif engine.sharding == DEEPSPEED:  # the masters and Adam moments into this process's partitions
        state = load_state(folder / "optimizer.safetensors")
        load_deepspeed_state(engine.named_parameters, engine.optimizer.optimizer, weights, state)
    else:
        optimizer = load_state(folder / "optimizer.safetensors")
        load_full_optimizer_state(engine.unwrapped, engine.optimizer.optimizer, optimizer)
    engine.lr_scheduler.load_state_dict(load_state(folder / "scheduler.safetensors"))
    if engine.ema is not None:
        ema = load_safetensors(folder / "ema.safetensors", device="cpu")
        engine.ema.load_state_dict({k: shard_like(v, engine.ema.shadow[int(k)]) for k, v in ema.items()})
    rng = folder / f"random_states_{engine.process_index}.safetensors"
    if rng.exists():
        set_random_states(load_state(rng))
    try:
        state = json.loads(read_text(folder / "state.json"))
        step, rows = int(state.pop("step")), state.pop("metrics_rows", None)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'state.json'} is not a visalign checkpoint state ({e})") from None
    tensors = folder / f"caller_state_{engine.process_index}.safetensors"
    if tensors.exists():  # this process's tensor values of the caller's state, on the CPU
        state |= load_safetensors(tensors, device="cpu")
    return state, step, rows


def random_states() -> dict[str, Any]:
    """python, numpy and torch (CPU and CUDA) RNG states of this process (stored by `visalign.files.save_state`)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore the RNG states `random_states()` captured."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
