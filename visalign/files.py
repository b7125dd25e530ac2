"""Reading and writing the files a run touches, with errors that name the file (and the line where there is one).

- `read_text`: a UTF-8 text file (a byte-order mark is dropped); any other encoding is a `BadFileError` naming the
  file, the line and column of the first byte that is not UTF-8, and the byte (a UTF-16 file is recognised).
- `load_image`: an image file as pixels `[3, H, W]` in [0, 1]; a truncated or foreign file is a `BadFileError`.
- `load_safetensors`: a safetensors file; a truncated or damaged one is a `BadFileError`.
- `save_state` / `load_state`: a nested state (an optimizer's or a learning-rate schedule's `state_dict`, RNG states)
  as one safetensors file: its tensors as tensors, the structure around them (dicts with int keys, tuples, numbers,
  strings, numpy arrays) as JSON in the file's metadata. Nothing is ever unpickled, so loading a state cannot run
  code (`torch.load(..., weights_only=False)` can).
- `refuse_pickles`: raise when a folder holds pickle files (`.pt`, `.bin`, ...), naming the first.
- `to_uint8` / `to_pil`: float pixels in [0, 1] as 8-bit arrays or PIL images (the one conversion every writer uses).
- `run_record` / `write_run_record`: the one provenance record of a run (training, benchmark, ReNO, world models):
  the command, the resolved config, the seeds, package versions, platform, and the sha256 of every input file.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
STATE_KEY = "visalign_state"  # the safetensors metadata entry holding a state's JSON structure
_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"
RECORD_PACKAGES = ("visalign", "torch", "diffusers", "transformers", "accelerate", "peft", "numpy")
HASH_LIMIT = 2**31  # bytes: a larger input folder (a full checkpoint) is recorded by size, not hashed


class BadFileError(ValueError):
    """A file that exists but cannot be read as what it should be; the message names it."""


def decode_text(data: bytes, path: str | Path, what: str = "file") -> str:
    """`data` (the bytes of `path`) as UTF-8 text without a byte-order mark; `BadFileError` naming the line if not."""
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[offset:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = offset + e.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        hint = ""
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            hint = " (it starts with a UTF-16 byte-order mark)"
        raise BadFileError(
            f"{what} {path}: line {line}, column {column} is not UTF-8 (byte 0x{data[at]:02x}){hint}; "
            "save the file as UTF-8"
        ) from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of `path`; `FileNotFoundError` or `BadFileError`, each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return decode_text(path.read_bytes(), path, what)


def load_image(path: str | Path) -> Tensor:
    """An image file as float pixels `[3, H, W]` in [0, 1]; `BadFileError` naming the file when it cannot be decoded
    (truncated, damaged, not an image)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated data is an OSError
        raise BadFileError(f"image {path} cannot be read ({type(e).__name__}: {e})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file; `BadFileError` naming the file when it is truncated or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BadFileError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from None


def refuse_pickles(folder: str | Path) -> None:
    """Raise `BadFileError` naming the first pickle file in `folder` (visalign never unpickles a checkpoint)."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise BadFileError(
                f"{path} is a pickle: visalign never unpickles a checkpoint file (loading a pickle can run any code "
                "it holds). visalign checkpoints hold only safetensors and JSON; this folder was written by "
                "something else (or an older visalign): start a fresh run instead of resuming it"
            )


def save_state(state: Any, path: str | Path) -> None:
    """Write a nested state (dicts, lists, tuples, tensors, numpy arrays, numbers, strings, None) to `path`."""
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, Tensor):
            key = str(len(tensors))
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(value, np.ndarray):
            return {_ARRAY: value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v, f"{where}[{k!r}]") for k, v in value.items()}
            return {_ITEMS: [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        raise TypeError(f"cannot store a {type(value).__name__} at {where} of a state")

    structure = json.dumps(encode(state, "state"))
    save_file(tensors, str(path), metadata={"format": "pt", STATE_KEY: structure})


def load_state(path: str | Path) -> Any:
    """Read what `save_state` wrote (tensors on the CPU); `BadFileError` naming the file when it is not such a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        structure = json.loads(metadata[STATE_KEY])
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        raise BadFileError(f"{path} is not a visalign state file (truncated or damaged?): {e}") from None

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _ARRAY in value:
            return np.array(value[_ARRAY], dtype=value["dtype"])
        if _TUPLE in value:
            return tuple(decode(v) for v in value[_TUPLE])
        if _ITEMS in value:
            return {decode(k): decode(v) for k, v in value[_ITEMS]}
        return {k: decode(v) for k, v in value.items()}

    try:
        return decode(structure)
    except (KeyError, TypeError, ValueError) as e:
        raise BadFileError(f"{path} holds a damaged state structure ({type(e).__name__}: {e})") from None


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Pixels `[3, H, W]` or `[B, 3, H, W]` (float in [0, 1]) as uint8 `[H, W, 3]` / `[B, H, W, 3]` on the CPU:
    `round(clamp(x, 0, 1) * 255)`, the quantization a saved PNG holds."""
    if not isinstance(pixels, Tensor) or pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"`pixels` must be a [3, H, W] or [B, 3, H, W] tensor, got {shape}")
    x = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().cpu().numpy()


def to_pil(pixels: Tensor) -> Image.Image:
    """A `[3, H, W]` image in [0, 1] as an RGB PIL image (8 bits, rounded)."""
    from PIL import Image

    if pixels.dim() != 3:
        raise ValueError(f"`pixels` must be one [3, H, W] image, got shape {tuple(pixels.shape)}")
    return Image.fromarray(to_uint8(pixels))


def package_versions(names: tuple[str, ...] = RECORD_PACKAGES) -> dict[str, str | None]:
    """Installed versions of `names` (None for one that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def input_hash(path: str | Path) -> dict[str, Any]:
    """`{"path", "sha256", "bytes"}` of a file, or of a folder (the digest of its files' relative names and
    contents, in sorted order); a folder over `HASH_LIMIT` bytes gets `"sha256": None`."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    if path.is_dir() and size > HASH_LIMIT:
        return {"path": str(path), "sha256": None, "bytes": size}
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": size}


def run_record(
    *,
    config: Any = None,
    seeds: Any = None,
    inputs: Mapping[str, str | Path | None] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """What reproducing a run needs: the command, the resolved `config` (a dataclass or a mapping), its `seeds`,
    package versions, the platform, and `inputs` (name -> a local file or folder, hashed; a hub id or any other
    string that is not a path is kept as given). `command` defaults to this process's command line."""
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    hashed = {}
    for name, value in (inputs or {}).items():
        if value is not None:
            hashed[name] = input_hash(value) if os.path.exists(value) else {"id": str(value)}
    return {
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "seeds": seeds,
        "inputs": hashed,
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_run_record(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write a record (a `run_record`, with whatever a writer adds) as indented JSON, to a temporary name and
    renamed, so a reader never sees half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path
