"""Preflight: before `train`, `bench run` or `reno` loads anything, check every model, reward, prompt file and
dataset it names, and report everything missing at once, each with where it comes from.

A missing thing is found without loading weights: local paths must exist (a pipeline folder must hold
`model_index.json`); a Hub repo must be a valid id and, when the Hub cannot be reached (`HF_HUB_OFFLINE=1`), be in
the local cache; a gated repo (SD3/SD3.5, FLUX.1-dev) needs a login when it still has to be downloaded. Rewards must be
registered (`visalign.list_rewards()`), and the Hub repos their default weights come from must be reachable the
same way. Rewards are named here through import strings, as in the reward registry, so the core imports no upper
layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HUB = "https://huggingface.co"
# Hub repos that need an accepted license and a login (a prefix matches every repo it starts).
GATED = ("stabilityai/stable-diffusion-3", "black-forest-labs/FLUX.1-dev")
# reward name -> import strings of the Hub repos its default weights come from (when `pretrained` is not given)
REWARD_SOURCES: dict[str, tuple[str, ...]] = {
    "pickscore": ("visalign.reward_models.clip:PICKSCORE", "visalign.reward_models.clip:PICKSCORE_PROCESSOR"),
    "clipscore": ("visalign.reward_models.clip:CLIPSCORE",),
    "hpsv2": ("visalign.reward_models.hps:HPS_REPO",),
    "hpsv2.1": ("visalign.reward_models.hps:HPS_REPO",),
    "imagereward": ("visalign.reward_models.imagereward:IMAGEREWARD_REPO",),
    "aesthetic": ("visalign.reward_models.aesthetic:CLIP_L14",),
}


class PreflightError(ValueError):
    """Things a run needs are missing; the message lists every one."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached(repo_id: str, repo_type: str = "model") -> bool:
    """Whether a snapshot of `repo_id` (`repo_type` "model" or "dataset") is in the Hub cache; a dataset also counts
    as cached when `datasets` has prepared it (its own cache, `{owner}___{name}`), which it loads from offline."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if repo_type != "dataset":
        return False
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    prepared = prepared / repo_id.replace("/", "___")
    return prepared.is_dir() and any(prepared.iterdir())


def hub_problem(repo_id: str, repo_type: str = "model") -> str | None:
    """Why the Hub repo `repo_id` (`repo_type` "model" or "dataset") cannot be had here (None when it is cached, or
    reachable and not gated)."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return "no such local path, and not a Hub repo id"
    if _cached(repo_id, repo_type):
        return None
    gated = repo_id.startswith(GATED)
    page = f"{HUB}/datasets/{repo_id}" if repo_type == "dataset" else f"{HUB}/{repo_id}"
    login = f"it is gated: accept its license at {page} and log in (`hf auth login`)"
    download = f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    if _offline():
        return (
            f"not in the local Hugging Face cache (a Hub {repo_type} from {page}) and offline mode is on "
            "(HF_HUB_OFFLINE=1); "
            + (f"{login}, then " if gated else "")
            + f"fetch it with `{download}` where the Hub is reachable"
        )
    if gated and get_token() is None:
        return f"not in the local cache, and {login} so that it can be downloaded"
    return None


def model_problem(model: str, *, pipeline: bool = True) -> str | None:
    """Why `model` (world:sd, world:sd3, tiny:..., a folder or a Hub id) cannot be loaded; `pipeline` False for a
    non-pipeline backbone (a transformers folder, `world:clip`)."""
    kind, _, rest = model.partition(":")
    if kind == "tiny" and rest:
        return None
    if kind == "world" and rest:
        families = ("sd", "sd3") if pipeline else ("clip",)
        if rest not in families:
            return f"the shapes world's models here are {', '.join('world:' + f for f in families)}"
        from visalign.world.models import default_model_dir

        folder = default_model_dir(rest)
        if not folder.is_dir():
            return f"no shipped world model at {folder} (`visalign world train-base`)"
        if pipeline:
            from visalign.loading import check_world_family

            try:
                check_world_family(model, rest)
            except ValueError as e:
                return str(e)
        return None
    path = Path(model)
    if path.exists():
        if pipeline and not (path / "model_index.json").is_file():
            from visalign.loading import _not_a_pipeline

            return _not_a_pipeline(path)
        return None
    return hub_problem(model)


def reward_problem(name: str, pretrained: str | None = None) -> str | None:
    """Why the reward `name` with weights `pretrained` (None: its default) cannot be loaded."""
    from visalign.rewards import REWARDS

    if name not in REWARDS and ":" not in name:
        return f"unknown reward; registered rewards: {', '.join(sorted(REWARDS))}"
    if pretrained is not None:
        if pretrained.startswith(("http://", "https://")) or Path(pretrained).exists():
            return None
        problem = hub_problem(pretrained)
        return None if problem is None else f"weights {pretrained}: {problem}"
    problems = []
    for target in REWARD_SOURCES.get(name, ()):
        module, _, attr = target.partition(":")
        repo = getattr(importlib.import_module(module), attr)
        problem = hub_problem(repo)
        if problem is not None:
            problems.append(f"weights {repo}: {problem}")
    return "; ".join(problems) or None


def prompts_problem(spec: str) -> str | None:
    """Why a prompt spec (a built-in set such as `world:train`, or a prompt file) cannot be read."""
    from visalign.prompts import prompt_set_problem

    return prompt_set_problem(spec)


def world_words_problem(spec: str) -> str | None:
    """For a prompt set scored by a world reward: the prompts that are not shapes-world captions, if any."""
    if spec.startswith("world:"):
        return None
    from visalign.files import read_text
    from visalign.prompts import guess_format, load_prompt_set
    from visalign.world.scenes import parse_prompt

    if guess_format(spec) == "text":  # one prompt a line: name the line
        lines = enumerate(read_text(spec, "prompt file").splitlines(), 1)
        prompts = [(f"line {n}", line.strip()) for n, line in lines if line.strip()]
    else:
        prompts = [(f"prompt {item.id}", item.text) for item in load_prompt_set(spec).items]
    bad = []
    for where, text in prompts:
        try:
            parse_prompt(text)
        except ValueError:
            bad.append(f"{where} {text!r}")
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"the world rewards read only shapes-world captions (e.g. 'two red circles'); not one: {shown}"


def path_problem(path: str) -> str | None:
    """Why a local file or folder cannot be read (`world:...` datasets are built in memory)."""
    if path.startswith("world:"):
        return None
    return None if Path(path).exists() else "no such file or folder"


def dataset_problem(path: str) -> str | None:
    """Why a dataset (a local file or folder, a Hub dataset id `owner/name`, or `world:...`) cannot be read. An
    absent path of the form `owner/name` is a Hub dataset id, as for `load_pairs`; it needs `datasets`, and offline it
    must be in the local cache."""
    if path.startswith("world:") or Path(path).exists():
        return None
    if path.count("/") != 1 or path.startswith((".", "/", "~")) or "\\" in path:
        return "no such file or folder"
    problem = hub_problem(path, "dataset")
    if problem is None and importlib.util.find_spec("datasets") is None:
        problem = "a Hub dataset is read through `datasets`, which is not installed (pip install datasets)"
    return None if problem is None else f"no such file or folder, and as a Hub dataset id: {problem}"


def check(items: Iterable[tuple[str, str, str | None]]) -> None:
    """Raise one `PreflightError` listing every `(thing, field, problem)` whose problem is not None."""
    problems = [(thing, where, p) for thing, where, p in items if p is not None]
    if not problems:
        return
    lines = [f"  - {thing} ({where}): {problem}" for thing, where, problem in problems]
    noun = "thing this run needs is" if len(problems) == 1 else "things this run needs are"
    raise PreflightError(f"{len(problems)} {noun} missing or unusable (nothing was loaded):\n" + "\n".join(lines))


# config field -> kind; the method configs of `visalign train` use these names
_CONFIG_FIELDS = {
    "pretrained_model_name_or_path": "model",
    "world_generator": "model",
    "prompts": "prompts",
    "eval_prompts": "prompts",
    "dataset": "dataset",
    "experts": "path",
    "train_data": "dataset",
    "eval_data": "dataset",
    "image_root": "path",
}
_REWARD_FIELDS = (
    ("reward", "reward_pretrained"),
    ("external_reward", "external_reward_pretrained"),
    ("eval_reward", None),
)


def config_inputs(config: Any) -> dict[str, str]:
    """The models, prompt sets, datasets and reward weights a method config names: what its run record hashes."""
    names = {*_CONFIG_FIELDS, *(weights for _, weights in _REWARD_FIELDS if weights)}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {name: value for name, value in values.items() if name in names and isinstance(value, str) and value}


def config_problems(config: Any) -> list[tuple[str, str, str | None]]:
    """`(thing, field, problem)` for every model, reward, prompt file and dataset a method config names."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    values = {name: getattr(config, name) for name in fields}
    backbone = "architecture" in values  # the reward trainer's model is a CLIP backbone, not a pipeline
    out = []
    for name, kind in _CONFIG_FIELDS.items():
        value = values.get(name)
        if not value:
            continue
        if kind == "model":
            problem = model_problem(value, pipeline=not (backbone and name == "pretrained_model_name_or_path"))
        elif kind == "prompts":
            problem = prompts_problem(value)
            if problem is None and str(values.get("reward", "")).startswith("world-"):
                problem = world_words_problem(value)
        else:
            problem = dataset_problem(value) if kind == "dataset" else path_problem(value)
            if problem is not None:  # the field's help says what the path should hold
                problem += f"; `{name}`: {fields[name].metadata.get('help', '')}"
        out.append((f"{kind} {value}", f"`{name}`", problem))
    for name, weights in _REWARD_FIELDS:
        if values.get(name):
            reward = values[name]
            problem = reward_problem(reward, values.get(weights) if weights else None)
            out.append((f"reward {reward}", f"`{name}`", problem))
    return out


def check_config(config: Any) -> None:
    """Raise `PreflightError` listing everything a method config names that is missing."""
    check(config_problems(config))


def judge_problems(spec: str) -> tuple[str, str, str | None]:
    """`(thing, "--judge", problem)` for one `bench run --judge` spec."""
    kind, _, rest = spec.partition(":")
    problem = None
    if kind == "reward":
        problem = reward_problem(rest.partition("@")[0])
    elif kind in ("vlm", "replay"):
        problem = path_problem(rest) if kind == "replay" else model_problem(rest, pipeline=False)
    return (f"judge {spec}", "--judge", problem)


def check_bench(args: Any) -> None:
    """`bench run`: the model, the LoRA, the prompt file, the image folder and the judges."""
    items = []
    if args.model:
        items.append((f"model {args.model}", "--model", model_problem(args.model)))
    if args.lora:
        items.append((f"LoRA {args.lora}", "--lora", path_problem(args.lora)))
    if args.images:
        items.append((f"images {args.images}", "--images", path_problem(args.images)))
    if "." in Path(args.set).name or "/" in args.set:  # a file; built-in sets are bare names
        items.append((f"prompt file {args.set}", "--set", path_problem(args.set)))
    items += [judge_problems(spec) for spec in args.judge]
    check(items)


def check_reno(args: Any, rewards: dict[str, dict]) -> None:
    """`reno`: the model, the LoRA and each reward (`{name: options}`, options may hold `pretrained`)."""
    items = [(f"model {args.model}", "--model", model_problem(args.model))]
    if args.lora:
        items.append((f"LoRA {args.lora}", "--lora", path_problem(args.lora)))
    for name, options in rewards.items():
        items.append((f"reward {name}", "--reward", reward_problem(name, options.get("pretrained"))))
    check(items)
