"""Finding and loading reward-model checkpoints: hub ids or local paths, strict key maps, clear errors.

Every `from_pretrained` of `visalign.reward_models` goes through here:

- `resolve_file` / `resolve_folder` turn `pretrained` (a local file, a local folder, or a Hugging Face Hub repo id)
  into local paths. Hub ids go through `huggingface_hub`, so the cache and `HF_HUB_OFFLINE=1` behave as usual; when a
  file cannot be had (offline, missing repo or file) the error names the files, the repo and what to do.
- `load_checkpoint` reads `.safetensors` or a torch pickle with `weights_only=True` (no code runs from the file).
- `load_mapped_state_dict` renames checkpoint keys with an explicit key map and loads with `strict=True`; a
  mismatch raises an error listing missing, unexpected and mis-shaped keys by name.
- `load_transformers_model` does the same for transformers folders (`from_pretrained` with loading info), and
  `load_tokenizer` checks that the tokenizer files are there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

HUB = "https://huggingface.co"
MAX_KEYS_SHOWN = 8
M = TypeVar("M", bound=nn.Module)
T = TypeVar("T")


def _hub_error(what: str, repo_id: str, files: Iterable[str], error: Exception) -> FileNotFoundError:
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled

    names = ", ".join(files)
    if isinstance(error, HFValidationError):
        return FileNotFoundError(
            f"{what}: `pretrained`={repo_id!r} is neither an existing local file or folder nor a Hub repo id"
        )
    offline = isinstance(error, OfflineModeIsEnabled) or "offline" in str(error).lower()
    reason = "offline mode is on (HF_HUB_OFFLINE=1) and they are not in the cache" if offline else str(error)
    return FileNotFoundError(
        f"{what}: could not get {names} from the Hub repo {repo_id!r}: {reason}. They come from "
        f"{HUB}/{repo_id}; fetch them where the Hub is reachable (`hf download {repo_id} {' '.join(files)}`) "
        f"and pass the local folder as `pretrained`."
    )


def resolve_file(pretrained: str | Path, filename: str, *, what: str) -> Path:
    """Local path of `filename` given a file, a folder holding it, or a Hub repo id holding it."""
    path = Path(pretrained)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            present = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(f"{what}: {path} has no {filename} (it holds: {', '.join(present) or 'nothing'})")
        return path / filename
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=str(pretrained), filename=filename))
    except Exception as e:  # offline, missing repo or file, invalid id: all become one clear message
        raise _hub_error(what, str(pretrained), [filename], e) from e


def resolve_folder(pretrained: str | Path, patterns: list[str], *, required: list[str], what: str) -> Path:
    """Local folder for `pretrained` (a folder, or a Hub repo id downloaded with `allow_patterns=patterns`).

    `required` files must be present in the folder; the error lists the missing ones.
    """
    path = Path(pretrained)
    if path.is_file():
        raise FileNotFoundError(f"{what}: `pretrained` must be a folder or a Hub repo id, got the file {path}")
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(repo_id=str(pretrained), allow_patterns=patterns))
        except Exception as e:
            raise _hub_error(what, str(pretrained), patterns, e) from e
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {path} lacks {', '.join(missing)}")
    return path


def load_checkpoint(path: Path, *, key: str | None = None, what: str) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file or a torch pickle read with `weights_only=True`.

    `key` selects a nested state dict (HPSv2 files keep theirs under `"state_dict"`).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what}: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if key is not None:
        if not isinstance(state, Mapping) or key not in state:
            found = sorted(state)[:MAX_KEYS_SHOWN] if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"{what}: {path} has no {key!r} entry (found: {found})")
        state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict of tensors")
    return dict(state)


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else "")


def key_mismatch_error(
    what: str, source: str, missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str] = ()
) -> ValueError:
    """The error for a checkpoint that does not fit the architecture, naming the keys."""
    parts = [
        f"{label} ({len(keys)}): {_names(keys)}"
        for label, keys in (("missing", list(missing)), ("unexpected", list(unexpected)), ("wrong shape", mismatched))
        if keys
    ]
    return ValueError(f"{what}: the checkpoint {source} does not match the architecture; " + "; ".join(parts))


def load_mapped_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    key_map: Callable[[str], str | None],
    *,
    what: str,
    source: str,
) -> None:
    """Load `state_dict` into `module` with `strict=True` after renaming each key with `key_map`.

    `key_map(checkpoint_key)` returns the module's key, or None for a key the reference checkpoint holds but the
    score never uses (it is dropped on purpose). Missing keys are named as the module calls them, unexpected ones
    as the checkpoint does.
    """
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for k, v in state_dict.items():
        new = key_map(k)
        if new is not None:
            mapped[new], origin[new] = v, k
    expected = module.state_dict()
    missing = set(expected) - set(mapped)
    unexpected = [origin[k] for k in set(mapped) - set(expected)]
    mismatched = [
        f"{origin[k]} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise key_mismatch_error(what, source, missing, unexpected, mismatched)
    module.load_state_dict(mapped, strict=True)


def load_transformers_model(cls: type[M], folder: Path, *, what: str, **kwargs: Any) -> M:
    """`cls.from_pretrained(folder, **kwargs)` in float32 that fails on any missing, unexpected or mis-shaped weight.

    Keys a class skips on purpose are those of its `_keys_to_ignore_on_load_unexpected`.
    """
    try:
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kwargs)
    except Exception as e:
        raise ValueError(f"{what}: could not load a {cls.__name__} from {folder} ({type(e).__name__}: {e})") from e
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if info["missing_keys"] or info["unexpected_keys"] or mismatched:
        raise key_mismatch_error(what, str(folder), info["missing_keys"], info["unexpected_keys"], mismatched)
    return model.eval()


def load_tokenizer(cls: type[T], source: str | Path, needs: list[tuple[str, ...]], *, what: str) -> T:
    """`cls.from_pretrained` on a folder or Hub repo holding one of the file sets in `needs`.

    transformers builds an empty vocabulary without a word of warning when the files are absent, so their presence
    is checked here.
    """
    patterns = sorted(
        {name for names in needs for name in names} | {"tokenizer_config.json", "special_tokens_map.json"}
    )
    folder = resolve_folder(source, patterns, required=[], what=what)
    if not any(all((folder / name).is_file() for name in names) for names in needs):
        options = " or ".join(" + ".join(names) for names in needs)
        raise FileNotFoundError(f"{what}: {folder} has no tokenizer files ({options})")
    return cls.from_pretrained(folder)


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """A JSON object from `path`, with an error naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


REWARD_FILE = "reward.json"  # what `visalign train reward` writes beside a learned reward's weights (`learned.py`)


def refuse_learned_head(pretrained: str | Path | None, *, what: str) -> None:
    """Raise when `pretrained` is a folder `visalign train reward` wrote with a head other than the cosine: a CLIP
    loader would read its towers and serve their cosine, silently dropping the trained head."""
    if pretrained is None:
        return
    folder = Path(pretrained)
    folder = folder.parent if folder.is_file() else folder
    meta_path = folder / REWARD_FILE
    if not meta_path.is_file():
        return
    heads = read_json(meta_path, what=what).get("heads", {})
    if heads.get("head", "cosine") != "cosine":
        raise ValueError(
            f"{what}: {meta_path} describes a learned reward with a {heads['head']!r} head, which this loader "
            f'would drop (it serves the CLIP cosine); load it with load_reward("learned", pretrained={str(folder)!r})'
        )


def cast_backbone(model: nn.Module, dtype: torch.dtype | None, keep_float32: Iterable[str] = ()) -> nn.Module:
    """Cast `model` to `dtype` (None keeps float32), keeping the named parameters float32 at full precision.

    CLIP's `logit_scale` is kept this way: in bfloat16, `exp(4.6052)` would move by up to 0.4%.
    """
    if dtype is None:
        return model
    if not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating point dtype, got {dtype}")
    kept = {name: model.get_parameter(name).detach().float().clone() for name in keep_float32}
    model.to(dtype)
    for name, value in kept.items():
        model.get_parameter(name).data = value
    return model
