"""The one pipeline loader: every command that loads a generator (`train`, `bench run`, `world eval`, `reno`,
`demo`) goes through `load_generator`, so the same model names work everywhere:

- `world:sd`, `world:sd3`: the shapes world's shipped models (`visalign/assets/world/`);
- `tiny:sd`, `tiny:sd3`, `tiny:qwen-image`, `tiny:wan`, ...: the tiny random pipelines of `visalign.testing`
  (tests and smoke runs);
- a diffusers pipeline folder of any family (components saved as absent, such as SD3 without T5 or Wan2.1's
  `transformer_2`, load as None);
- a Hugging Face Hub repo id (the cache and `HF_HUB_OFFLINE=1` behave as usual).

Where a world family is expected (`world:<family>`, the world commands' `--family`, a recipe's `world:` model),
`check_world_family` refuses a folder whose `model_index.json` names the other family's pipeline class.

`lora` loads what a trainer writes to `output_dir/final` into the pipeline: a LoRA adapter folder
(`pytorch_lora_weights.safetensors`) at `lora_scale`, or a full fine-tune's folder (`use_lora=false`: the trained
component's `save_pretrained` folder, `unet/` or `transformer/`), which replaces that component of the base.

Generation defaults travel with the model: a shapes-world folder keeps them in `visalign_world.json`, and the
loader registers them on the pipeline's config as `_visalign_generation`, which `save_pretrained` writes into
`model_index.json` (diffusers ignores private keys when loading). So a pipeline saved or fused after loading keeps
its defaults, and `resolve_settings` turns defaults plus overrides into the exact call arguments a run records.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_KEY = "_visalign_generation"
# Call arguments that decide what a pipeline samples; recorded and compared by `bench`. Qwen-Image's CFG weight is
# `true_cfg_scale` (its `guidance_scale` only feeds guidance-distilled checkpoints); Wan samples `num_frames`.
SETTING_NAMES = (
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "height",
    "width",
    "num_frames",
    "max_sequence_length",
)
WORLD_FAMILIES = ("sd", "sd3")
# The diffusers pipeline class of each world family (`_class_name` in a saved folder's model_index.json).
WORLD_PIPELINES = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}


def model_folder(model: str | Path) -> Path | None:
    """The local folder a model name points at (`world:<family>` or a folder), or None for a Hub id / `tiny:`."""
    name = str(model)
    kind, _, rest = name.partition(":")
    if kind == "world" and rest:
        if rest not in WORLD_FAMILIES:
            raise ValueError(f"model {name!r}: the shipped world generators are world:sd and world:sd3")
        from visalign.world.models import default_model_dir

        return default_model_dir(rest)
    if kind == "tiny" and rest:
        return None
    path = Path(name)
    return path if path.is_dir() else None


def check_world_family(model: str | Path, family: str) -> None:
    """`ValueError` when the world model `model` (`world:<family>` or a pipeline folder) is of another family than
    `family` ("sd": the epsilon UNet `StableDiffusionPipeline`, "sd3": the flow `StableDiffusion3Pipeline`), as its
    `model_index.json` `_class_name` says. Names without a folder (`tiny:`, Hub ids) and folders without
    `model_index.json` pass: loading reports those."""
    if family not in WORLD_PIPELINES:
        raise ValueError(f"`family` must be one of {WORLD_FAMILIES}, got {family!r}")
    folder = model_folder(model)
    index = None if folder is None else folder / "model_index.json"
    if index is None or not index.is_file():
        return
    found = json.loads(index.read_text()).get("_class_name")
    expected = WORLD_PIPELINES[family]
    if found != expected:
        other = {cls: name for name, cls in WORLD_PIPELINES.items()}.get(found)
        what = f"the `{other}` family's {found}" if other else f"a {found}"
        where = str(model) if Path(model) == folder else f"{model} ({folder})"
        raise ValueError(
            f"model {where}: expected a world model of the `{family}` family (a {expected}), but its "
            f"model_index.json names {what}"
        )


def _trained_components(folder: Path) -> list[str]:
    """The denoiser folders a full fine-tune's `final` holds (`unet/`, `transformer/`: `save_pretrained` output)."""
    return [name for name in ("unet", "transformer") if (folder / name / "config.json").is_file()]


def _holds_trained_weights(folder: Path) -> bool:
    """Whether `folder` is what a trainer writes to `output_dir/final` (a LoRA adapter or fine-tuned components)."""
    return (folder / LORA_FILE).is_file() or bool(_trained_components(folder))


def _not_a_pipeline(folder: Path) -> str:
    """Why `folder` (which lacks model_index.json) is not a pipeline, and what to pass instead."""
    held = f"a LoRA adapter ({LORA_FILE})" if (folder / LORA_FILE).is_file() else None
    if held is None and (parts := _trained_components(folder)):
        held = f"a fully fine-tuned {' and '.join(parts)}"
    if held is not None:
        base = "MODEL"
        config = folder.parent / "config.yaml"
        if config.is_file():
            import yaml

            recorded = yaml.safe_load(config.read_text()) or {}
            base = recorded.get("pretrained_model_name_or_path", recorded.get("pretrained", base))  # runs before #16
        return (
            f"{folder} holds {held}, not a pipeline: load the base model and the trained weights "
            f"with `--model {base} --lora {folder}`"
        )
    final = folder / "final"
    if _holds_trained_weights(final):
        return f"{folder} is a training run: its trained weights are in {final} (`--lora {final}`)"
    return f"{folder} is not a diffusers pipeline folder (model_index.json missing)"


def generation_defaults(pipe: Any = None, folder: str | Path | None = None) -> dict[str, Any]:
    """Sampling defaults of a model: `_visalign_generation` on the pipeline's config, else `model_index.json`'s,
    else a world folder's `visalign_world.json`; `{}` when the model has none (the pipeline's own defaults apply)."""
    if pipe is not None and pipe.config.get(CONFIG_KEY):
        return dict(pipe.config[CONFIG_KEY])
    if folder is None:
        return {}
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        stored = json.loads(index.read_text()).get(CONFIG_KEY)
        if stored:
            return dict(stored)
    meta = folder / "visalign_world.json"
    return dict(json.loads(meta.read_text())["generation"]) if meta.is_file() else {}


def load_generator(
    model: str | Path,
    *,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    device: str | None = None,
    dtype: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """A diffusers pipeline for `model` (see the module docstring for the names) and its generation defaults.

    The pipeline's own progress bars are off (commands show one bar per phase); its defaults are registered on its
    config so that `save_pretrained` keeps them. `dtype` is a `torch.dtype` or its name ("bfloat16").
    """
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = str(model)
    kind, _, rest = name.partition(":")
    folder = model_folder(model)
    if kind == "tiny" and rest:
        from visalign.testing import tiny_pipeline

        pipe = tiny_pipeline(rest)
    elif folder is not None:
        if not (folder / "model_index.json").is_file():
            if kind == "world":
                raise FileNotFoundError(f"model {name}: no world model at {folder} (`visalign world train-base`)")
            raise FileNotFoundError(_not_a_pipeline(folder))
        if kind == "world":
            check_world_family(name, rest)
        from diffusers import DiffusionPipeline

        index = json.loads((folder / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        pipe = DiffusionPipeline.from_pretrained(folder, **absent, **({"dtype": dtype} if dtype else {}))
    else:
        pipe = _from_hub(name, dtype)
    defaults = generation_defaults(pipe, folder)
    if defaults:
        pipe.register_to_config(**{CONFIG_KEY: defaults})
    if lora is not None:
        load_lora(pipe, lora, lora_scale)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, defaults


def _from_hub(repo_id: str, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"model {repo_id!r}: no such folder, and not a Hub repo id (use world:sd, world:sd3, a diffusers "
            f"pipeline folder or an id like stabilityai/stable-diffusion-3.5-medium)"
        ) from None
    try:
        return DiffusionPipeline.from_pretrained(repo_id, **({"dtype": dtype} if dtype else {}))
    except OSError as e:
        raise FileNotFoundError(
            f"model {repo_id!r} could not be loaded from the Hub or its cache ({str(e).splitlines()[0]}); fetch it "
            f"where the Hub is reachable with `hf download {repo_id}` (a gated model needs its license accepted on "
            f"its Hub page and `hf auth login` first), or pass a local folder"
        ) from e


def load_lora(pipe: Any, lora: str | Path, scale: float = 1.0) -> None:
    """Load a run's trained weights into `pipe`: a LoRA adapter folder (or its `.safetensors` file) weighted by
    `scale`, or a full fine-tune's folder, whose `unet/` or `transformer/` replaces that component (safetensors
    only, in the replaced component's dtype)."""
    path = Path(lora)
    if path.is_dir() and not (path / LORA_FILE).is_file():
        if _trained_components(path):
            _load_full_components(pipe, path, scale)
            return
        run = _holds_trained_weights(path / "final")
        hint = f" (a training run? its trained weights are in {path / 'final'})" if run else ""
        raise FileNotFoundError(f"--lora {path}: no {LORA_FILE} and no fine-tuned unet/ or transformer/ in it{hint}")
    if not path.exists():
        raise FileNotFoundError(f"--lora {path}: no such folder or file")
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the trainers' adapters hold no text-encoder keys: no warning for that
    try:
        pipe.load_lora_weights(str(path), adapter_name="lora")
    finally:
        diffusers_logging.set_verbosity(level)
    if scale != 1.0:
        pipe.set_adapters(["lora"], adapter_weights=[scale])


def _load_full_components(pipe: Any, folder: Path, scale: float) -> None:
    """Replace `pipe`'s components by the fully fine-tuned ones saved in `folder` (`_trained_components`)."""
    if scale != 1.0:
        raise ValueError(f"--lora-scale {scale}: {folder} holds fully fine-tuned weights, which load whole (scale 1)")
    for name in _trained_components(folder):
        current = pipe.components.get(name)
        if current is None:
            have = [n for n in ("unet", "transformer") if pipe.components.get(n) is not None]
            raise ValueError(
                f"--lora {folder}: it holds a fine-tuned {name}, but the model's denoiser is a {' '.join(have)} "
                f"({type(pipe).__name__}): pass the model it was trained from"
            )
        saved = json.loads((folder / name / "config.json").read_text())
        config = json.loads(json.dumps(dict(current.config), default=str))  # tuples as the saved lists
        differ = sorted(k for k, v in config.items() if not k.startswith("_") and k in saved and saved[k] != v)
        if differ:
            raise ValueError(
                f"--lora {folder}: its {name} was trained from another model than this one ({', '.join(differ[:4])} "
                f"differ): pass the model it was trained from (its run's config.yaml names it)"
            )
        trained = type(current).from_pretrained(folder / name, torch_dtype=current.dtype, use_safetensors=True)
        pipe.register_modules(**{name: trained.to(current.device)})


def default_size(pipe: Any) -> int:
    """The image side a pipeline samples when `height`/`width` are None (what its `__call__` computes)."""
    if "unet" in pipe.components:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.default_sample_size * pipe.vae_scale_factor


def resolve_settings(pipe: Any, defaults: dict | None = None, overrides: dict | None = None) -> dict[str, Any]:
    """The exact call arguments a run samples with: for each of `SETTING_NAMES` the pipeline's `__call__` takes,
    `overrides` (None = unset) over the model's `defaults` over the call's own default; `height`/`width` resolved
    to numbers. Other keys of `defaults` and `overrides` pass through."""
    defaults, overrides = dict(defaults or {}), {k: v for k, v in (overrides or {}).items() if v is not None}
    params = inspect.signature(pipe.__call__).parameters
    out = {**defaults, **overrides}
    for name in SETTING_NAMES:
        if name in params and name not in out:
            out[name] = params[name].default
        if name not in params:
            out.pop(name, None)
    for side in ("height", "width"):
        if side in out and out[side] is None:
            out[side] = default_size(pipe)
    return out


def scheduler_record(pipe: Any) -> dict[str, Any]:
    """The scheduler's class and public config (what a run records about its sampler)."""
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    return {"class": type(pipe.scheduler).__name__, **json.loads(json.dumps(config, default=str))}
