"""Configs: dataclasses whose fields carry their help, read from YAML with `key=value` overrides.

    config = load_config(FlowGRPOConfig, "configs/world_flow_grpo.yaml", ["learning_rate=1e-4", "max_steps=20"])

Every field has a default and `metadata={"help": ...}` (trl's `GRPOConfig` style). Values from YAML and from
overrides are coerced to the field's annotated type here: PyYAML reads `1e-5` as the string `'1e-5'` (YAML 1.1
floats need a dot), so a float field accepts it and an int field accepts `1e3`. An unknown key, or a value that
cannot be the field's type, is a `ValueError` naming the key and the value; so is a non-finite number (`.inf`,
`.nan`) in any numeric field, nested ones included (`check_finite` does the same for configs built in Python). A YAML
syntax error names the file, line and column. Range checks live in each config's `__post_init__`.

Booleans are strict: `true`/`false`, `yes`/`no` (any case) and `1`/`0`; anything else (`flase`, `on`, `2`) is an
error naming the key and the value, never a silent False. This is the one override parser: every `--set` of every
command goes through `parse_overrides`.

One vocabulary, transformers' and trl's training names, means the same in every method: `TrainConfig` holds what the
training engine (`visalign.engine.Engine`) and the run loop (`visalign.lifecycle`) read, `GeneratorConfig` adds the
generator and its evaluation (diffusers' argument names), and method configs add only their own fields.

- `per_device_train_batch_size`: the micro-batch of one process (one forward and backward);
- `gradient_accumulation_steps`: micro-batches per optimizer step, so one step sees
  `per_device_train_batch_size x gradient_accumulation_steps x processes` examples;
- `max_steps`, `eval_steps`, `save_steps`: counted in optimizer steps in every method (a GRPO iteration takes
  several).

Keys of the earlier vocabulary are errors naming their replacement (`RENAMED`, and `MEANING_CHANGED` where the
value must be converted, not just renamed); there are no silent aliases.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from visalign.files import read_text

C = TypeVar("C")
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's `on`/`off` booleans: only `true/false/yes/no` (any case) are bools."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE|yes|Yes|YES|no|No|NO)$"),
    list("tTfFyYnN"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


# Keys of the earlier vocabulary -> their name now. `config_from_dict` turns an old key into a `ValueError` naming the
# new one (only when the key is not a field of the config being read).
RENAMED = {
    "train_batch_size": "per_device_train_batch_size",
    "eval_every": "eval_steps",
    "checkpointing_steps": "save_steps",
    "pretrained": "pretrained_model_name_or_path",
    "lr": "learning_rate",  # ReNO, world train-base
    "grad_clip": "max_grad_norm",  # ReNO
    "batch_size": "per_device_train_batch_size",  # world train-base, and its stage-prefixed keys:
    "vae_batch_size": "vae_per_device_train_batch_size",
    "clip_batch_size": "clip_per_device_train_batch_size",
    "vae_lr": "vae_learning_rate",
    "clip_lr": "clip_learning_rate",
    "sd3_lr": "sd3_learning_rate",
}
# Where the value changes meaning with the name: how to convert an old value.
MEANING_CHANGED = {
    "train_batch_size": (
        "it was the micro-batch per process in flow-grpo, pref-grpo, tempflow-grpo and prdp (same value), but a whole "
        "optimizer step across processes in diffusion-dpo, diffusion-dro and reward: there set "
        "per_device_train_batch_size = train_batch_size / gradient_accumulation_steps / processes (reward: "
        "train_batch_size / processes)"
    ),
    "eval_every": (
        "it counted iterations in flow-grpo, pref-grpo and tempflow-grpo: there set eval_steps = eval_every x "
        "optimizer steps per iteration (num_inner_epochs x the iteration's steps); elsewhere it already counted steps"
    ),
}


def renamed_key_error(cls_name: str, key: str) -> str:
    """The message for an earlier-vocabulary `key` read into the config `cls_name`."""
    message = f"{cls_name} key `{key}` was renamed `{RENAMED[key]}`"
    if key in MEANING_CHANGED:
        message += f"; {MEANING_CHANGED[key]}"
    return message


# peft targets: the joint-attention projections of SD3 and FLUX blocks (Flow-GRPO's LoRA targets).
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class TrainConfig:
    """What every trainer's engine needs: output, optimization, precision, LoRA, EMA, logging and checkpoints."""

    output_dir: str = field(default="runs/visalign", metadata={"help": "Folder for checkpoints, logs and the result."})
    seed: int = field(default=0, metadata={"help": "Seed of the LoRA init, the prompts and every noise draw."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to train for."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Examples per micro-batch and process: what one forward and backward sees."}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step: a step sees per_device_train_batch_size x this x processes "
            "examples."
        },
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate (Flow-GRPO LoRA: 3e-4)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clip; 0 disables clipping."})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "A `diffusers.optimization.get_scheduler` name: constant, linear, ..."}
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the learning-rate schedule."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "Autocast dtype; frozen weights are stored in it, trained ones in float32."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    use_lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (else the whole denoiser)."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank r (Flow-GRPO: 32)."})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (Flow-GRPO: 64)."})
    lora_init: str = field(default="gaussian", metadata={"help": "peft `init_lora_weights` (B starts at 0)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(ATTENTION_PROJECTIONS),
        metadata={"help": "Module-name suffixes that get adapters (attention projections)."},
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the trained weights (ramped in as min(decay, (1 + step) / (10 + step))), "
            "0 = no EMA (Flow-GRPO: 0.9 every 8 steps)."
        },
    )
    ema_update_every: int = field(default=8, metadata={"help": "Optimizer steps between EMA updates."})
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker: tensorboard, wandb, all, or none."}
    )
    project_name: str = field(default="visalign", metadata={"help": "Tracker project name."})
    eval_steps: int = field(
        default=0,
        metadata={"help": "Evaluate every this many optimizer steps; always at the start and the end (0: only then)."},
    )
    save_steps: int = field(
        default=0, metadata={"help": "Checkpoint every this many optimizer steps (0 = only at the end)."}
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many."})
    resume_from: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (the newest under output_dir, if any)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Clear output_dir first when it holds another run; without it, starting a new run where a "
            "finished or different run lives is refused (resume that run with resume_from=latest instead)."
        },
    )
    cpu: bool = field(default=False, metadata={"help": "Force CPU (gloo) even when an accelerator is present."})
    fsdp: bool = field(
        default=False,
        metadata={
            "help": "Shard the trained component over the processes (FSDP2): accelerate's FSDP plugin on GPUs "
            "(launch with configs/accelerate/fsdp_*.yaml), torch's fully_shard over gloo on CPUs (torchrun, cpu=true)."
        },
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.overwrite_output_dir and self.resume_from is not None:
            raise ValueError("`overwrite_output_dir` clears output_dir, so it cannot be combined with `resume_from`")
        for name, value in {
            "max_steps": self.max_steps,
            "learning_rate": self.learning_rate,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "ema_update_every": self.ema_update_every,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }.items():
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}")
        for name, value in {
            "max_grad_norm": self.max_grad_norm,
            "lr_warmup_steps": self.lr_warmup_steps,
            "eval_steps": self.eval_steps,
            "save_steps": self.save_steps,
            "adam_weight_decay": self.adam_weight_decay,
        }.items():
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"`checkpoints_total_limit` must be >= 1 or None, got {self.checkpoints_total_limit}")
        if self.report_to not in ("tensorboard", "wandb", "all", "none"):
            raise ValueError(f"`report_to` must be tensorboard, wandb, all or none, got {self.report_to!r}")


@dataclass
class GeneratorConfig(TrainConfig):
    """What every trainer of a text-to-image generator shares: the pipeline, how it samples, and its evaluation
    (diffusers' argument names). Method configs change defaults here and add only their own fields."""

    pretrained_model_name_or_path: str = field(
        default="world:sd3",
        metadata={
            "help": "The pipeline: a diffusers folder or hub id, `world:sd` / `world:sd3`, `tiny:sd` / `tiny:sd3`."
        },
    )
    height: int | None = field(default=None, metadata={"help": "Image height (None: the denoiser's native size)."})
    width: int | None = field(default=None, metadata={"help": "Image width (None: the denoiser's native size)."})
    num_inference_steps: int = field(default=20, metadata={"help": "Sampling steps of the method's own samples."})
    guidance_scale: float = field(
        default=7.5, metadata={"help": "CFG scale of the method's own samples (FLUX.1-dev: its guidance embedding)."}
    )
    num_frames: int | None = field(
        default=None, metadata={"help": "Video families (Wan): frames per video, (F - 1) % 4 == 0 (None: 81)."}
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={"help": "Text tokens (None: the family's: 256 for SD3, 512 for FLUX, Qwen-Image, Wan; world: 16)."},
    )
    negative_prompt: str | None = field(
        default=None,
        metadata={"help": 'The CFG negative prompt (None: the family\'s: "", Qwen-Image\'s " ").'},
    )
    eval_prompts: str | None = field(
        default=None, metadata={"help": "Evaluation prompts (`world:heldout`, a file); None: no evaluation."}
    )
    eval_reward: str | None = field(
        default=None,
        metadata={
            "help": "The evaluation judge (`list_rewards()`); GRPO's None: the external reward, else the reward."
        },
    )
    eval_num_inference_steps: int = field(default=20, metadata={"help": "Sampling steps at evaluation."})
    eval_guidance_scale: float = field(default=7.5, metadata={"help": "Guidance scale at evaluation."})
    eval_images_per_prompt: int = field(default=1, metadata={"help": "Images per evaluation prompt."})
    eval_batch_size: int = field(default=32, metadata={"help": "Images per evaluation batch and process."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "num_inference_steps",
            "eval_num_inference_steps",
            "eval_images_per_prompt",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width", "num_frames", "max_sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {getattr(self, name)}")

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `visalign.generators.adapter_for` this config sets (None: the family's)."""
        return dict(
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            max_sequence_length=self.max_sequence_length,
            negative_prompt=self.negative_prompt,
        )


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build `cls` from its defaults, then the YAML mapping at `path`, then `key=value` `overrides`.

    Override values are parsed as YAML (`beta=0.04`, `use_lora=false`, `lora_target_modules=[to_q, to_k]`,
    `resume_from=null`) and coerced like file values (booleans strictly, see the module docstring).
    """
    values: dict[str, Any] = {}
    if path is not None:
        text = read_text(path, "config file")
        try:
            loaded = _load_yaml(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path}: {_yaml_problem(e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of field names to values")
        values.update(loaded)
    values.update(parse_overrides(overrides))
    return config_from_dict(cls, values)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["key=value", ...]` -> `{key: YAML-parsed value}` (types are coerced later, against the dataclass).

    The one parser of `--set key=value` for every command (`visalign train`, `visalign world train-base`, ...).
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"an override must look like key=value, got {pair!r}")
        try:
            out[key.strip()] = _load_yaml(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override {pair!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return out


def _yaml_problem(error: yaml.YAMLError) -> str:
    """`YAML syntax error at line L, column C: <problem>` (PyYAML's own text names a `<unicode string>`)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {problem}"


def check_finite(config: Any) -> None:
    """`ValueError` naming the first field of the dataclass `config` that holds a non-finite float (nested in lists,
    tuples and dicts too): `learning_rate=.inf` would train to NaN weights."""
    for f in dataclasses.fields(config):
        _check_finite_value(getattr(config, f.name), f.name)


def _check_finite_value(value: Any, name: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite_value(v, f"{name}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_value(v, f"{name}[{k}]")


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """`cls(**values)` after rejecting unknown keys and coercing each value to its field's type."""
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    for key in unknown:
        if key in RENAMED and RENAMED[key] in names:
            raise ValueError(renamed_key_error(cls.__name__, key))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    coerced = {k: coerce(v, hints[k], k) for k, v in values.items()}
    for k, v in coerced.items():
        _check_finite_value(v, k)  # also inside `Any`-typed fields, which `coerce` passes through
    return cls(**coerced)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-safe values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """`value` as an instance of `annotation` (bool, int, float, str, Literal, X | None, list, tuple, dict)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"`{name}`: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"`{name}` must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"`{name}` must have {len(args)} items, got {value!r}")
            return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"`{name}` must be a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {coerce(k, key_type, name): coerce(v, value_type, f"{name}[{k}]") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in BOOLEANS:
            return BOOLEANS[str(value).strip().lower()]
        raise ValueError(f"`{name}` must be a boolean (true/false, yes/no or 1/0), got {value!r}")
    if annotation is int:
        number = _number(value, name)
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"`{name}` must be an integer, got {value!r}")
        return int(number)
    if annotation is float:
        number = float(_number(value, name))
        if not math.isfinite(number):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"`{name}` must be a string, got {value!r}")
        return str(value)
    raise ValueError(f"`{name}` has an annotation configs cannot read: {annotation!r}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"`{name}` must be a number, got {value!r}")
