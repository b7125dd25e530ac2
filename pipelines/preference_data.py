"""Preference pairs in memory, pairs built online from a model and a reward, and the image-row helpers.

A `PreferencePairs` holds one comparison per pair in the Pick-a-Pic schema (Kirstain et al. 2023, arXiv 2305.01569):
a caption, two image sources and `label_0` (1: image 0 preferred, 0: image 1 preferred, 0.5: a tie). Its images are
decoded, and resized when asked, only when a pair is read (`pairs[i]`, `collate_pairs` for `DataLoader` batches), in
`DataLoader` workers too. Reading pair datasets from disk or the hub (Pick-a-Pic parquet shards and splits, JSONL,
manifest folders) and writing them is `visalign.pipelines.pickapic`; the lazy row stores behind its parquet and hub
sources are `visalign.pipelines.row_stores`. `IndexSampler` draws resumable epochs of indices.

Online pairs (`build_pairs`): sample `num_images_per_prompt` images per prompt from the current model, score each
group with any `RewardModel` (`group`, so pairwise judges give win rates), and keep best vs worst or every pair whose
score gap exceeds `margin` (UnifiedReward's and Flow-GRPO's online DPO pairing). `pickapic.save_pairs` writes any pair
set to disk as a manifest folder or a Pick-a-Pic parquet file, so online pairs become an offline dataset.

Diffusion-DRO's expert sets are `visalign.pipelines.expert_sets`.

Shared by the loaders here, in `pickapic`, `expert_sets` and `reward_data`: image fields are bytes or paths relative
to the dataset root that may not leave it (`_source`: an absolute path or one resolving outside the root is an error,
always); a bad row raises `BadRow`, turned into a `ValueError` naming the row and the column or skipped and counted
(`_raise_or_count`); small JSONL, manifest and parquet files are read whole (`_read_rows`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from visalign.files import to_pil
from visalign.generators import seeded_generators
from visalign.pipelines.row_stores import StoredCell, find_shards
from visalign.rewards import RewardModel
from visalign.types import check_pixels, check_prompts

MANIFEST = "manifest.jsonl"
PICKAPIC_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
ON_ERROR = ("raise", "skip")
PAIR_MODES = ("best_worst", "all")
# an image: encoded bytes, a checked path inside the root, pixels [3, H, W], or a cell of a store read when used
Source = bytes | Path | Tensor | StoredCell


class BadRow(ValueError):
    """A row that cannot be used; its message names the row, the column and the reason."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: `image_0` and `image_1` (`Tensor` `[3, H, W]` in [0, 1], or videos `[F, 3, H, W]`) of
    `caption`, `label_0` as in Pick-a-Pic, and `row`, its row in the source."""

    caption: str
    image_0: Tensor
    image_1: Tensor
    label_0: float
    row: int

    def winner_loser(self) -> tuple[Tensor, Tensor]:
        """`(preferred, other)`; a tie has no winner."""
        if self.label_0 == 0.5:
            raise ValueError(f"row {self.row} is a tie (label_0 = 0.5): it has no winner")
        return (self.image_0, self.image_1) if self.label_0 == 1 else (self.image_1, self.image_0)


class PreferencePairs(Dataset):
    """A pair set whose images are decoded when read (`pairs[i]` is a `PreferencePair`).

    Args:
        captions (`list[str]`), sources (`list[tuple[Source, Source]]`), labels (`list[float]`), rows (`list[int]`):
            one entry per kept pair, already validated.
        resolution (`int`, *optional*): resize the shorter side to this and center-crop a square (bilinear).
        skipped (`dict[str, int]`): rows left out, by reason (`"tie"`, `"missing"`, `"corrupt"`, `"identical"`,
            `"label"`, `"no_margin"`).
        scores (`list[tuple[float, float]]`, *optional*): the reward of each image, for pairs built online.
        source (`str`): where the pairs came from, for messages.
    """

    def __init__(
        self,
        captions: list[str],
        sources: list[tuple[Source, Source]],
        labels: list[float],
        rows: list[int],
        *,
        resolution: int | None = None,
        skipped: dict[str, int] | None = None,
        scores: list[tuple[float, float]] | None = None,
        source: str = "<memory>",
    ):
        if not (len(captions) == len(sources) == len(labels) == len(rows)):
            raise ValueError("`captions`, `sources`, `labels` and `rows` must have one entry per pair")
        self.skipped = dict(skipped or {})
        if not captions:
            raise ValueError(f"{source} has no usable preference pair (skipped: {self.skipped or 'none'})")
        if resolution is not None and resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer or None, got {resolution}")
        self.captions, self.sources, self.labels, self.rows = captions, sources, labels, rows
        self.resolution, self.scores, self.source = resolution, scores, source

    @classmethod
    def from_tensors(
        cls,
        captions: Sequence[str],
        images_0: Tensor,
        images_1: Tensor,
        labels: Sequence[float] | None = None,
        *,
        on_error: str = "raise",
        scores: list[tuple[float, float]] | None = None,
        skipped: dict[str, int] | None = None,
    ) -> PreferencePairs:
        """Pairs from pixels `[N, 3, H, W]` (or videos `[N, F, 3, H, W]`, for video generators) in [0, 1] (labels
        default to 1: `images_0` preferred). Video pairs live in memory (`save_pairs` writes images only)."""
        check_pixels(images_0, "images_0", video=None)
        check_pixels(images_1, "images_1", video=None)
        captions = check_prompts(captions, images_0.shape[0], "captions")
        if images_1.shape != images_0.shape:
            raise ValueError(f"`images_1` must have the shape of `images_0` {tuple(images_0.shape)}")
        labels = [1.0] * len(captions) if labels is None else list(labels)
        if len(labels) != len(captions):
            raise ValueError(f"`labels` has {len(labels)} items for {len(captions)} pairs")
        counts: Counter = Counter(skipped or {})
        kept = []
        for i, (a, b) in enumerate(zip(images_0, images_1)):
            try:
                labels[i] = _check_label(labels[i], f"row {i}")
                if torch.equal(a, b):
                    raise BadRow(f"row {i}: the two images are identical", "identical")
            except BadRow as e:
                _raise_or_count(e, on_error, counts)
                continue
            kept.append(i)
        return cls(
            [captions[i] for i in kept],
            [(images_0[i].detach().cpu(), images_1[i].detach().cpu()) for i in kept],
            [labels[i] for i in kept],
            kept,
            skipped=dict(counts),
            scores=None if scores is None else [scores[i] for i in kept],
        )

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> PreferencePair:
        a, b = (self._pixels(s, index, c) for s, c in zip(self.sources[index], PICKAPIC_IMAGE_COLUMNS))
        return PreferencePair(self.captions[index], a, b, self.labels[index], self.rows[index])

    def at_resolution(self, resolution: int) -> PreferencePairs:
        """The same pairs, read resized and center-cropped to `resolution` (a square)."""
        return PreferencePairs(
            self.captions,
            self.sources,
            self.labels,
            self.rows,
            resolution=resolution,
            skipped=self.skipped,
            scores=self.scores,
            source=self.source,
        )

    @property
    def has_ties(self) -> bool:
        return any(label == 0.5 for label in self.labels)

    def _pixels(self, source: Source, index: int, column: str) -> Tensor:
        if isinstance(source, Tensor):
            image = source
        else:
            where = source.where() if isinstance(source, StoredCell) else f"row {self.rows[index]} of {self.source}"
            image = _to_tensor(_open(source, where if isinstance(source, StoredCell) else f"{where}: {column}"))
        return image if self.resolution is None else _resize_center_crop(image, self.resolution)


def collate_pairs(items: Sequence[PreferencePair]) -> dict[str, Any]:
    """A `DataLoader` batch of pairs of one size (set `resolution`): `captions`, `images_0` and `images_1`
    (`[B, 3, H, W]`), `labels` (`[B]`) and `rows`."""
    return {
        "captions": [p.caption for p in items],
        "images_0": torch.stack([p.image_0 for p in items]),
        "images_1": torch.stack([p.image_1 for p in items]),
        "labels": torch.tensor([p.label_0 for p in items]),
        "rows": [p.row for p in items],
    }


class IndexSampler:
    """Dataset indices in epochs, each a fresh permutation keyed by `(seed, epoch)`: deterministic and resumable.

    `draw(n)` continues the current permutation and crosses into the next epoch when it runs out. Its state is
    `{"size", "seed", "epoch", "position"}`; loading a state written for another dataset size raises (the same
    `(seed, epoch)` would then give another permutation, and a resumed run would silently train on other rows).
    """

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"`size` must be >= 1, got {size}")
        self.size, self.seed = size, seed
        self.epoch = self.position = 0

    def draw(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            generator = seeded_generators([(self.seed, 0xDA7A, self.epoch)])[0]
            order = torch.randperm(self.size, generator=generator).tolist()
            take = order[self.position : self.position + n - len(out)]
            out += take
            self.position += len(take)
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        size = int(state.get("size", self.size))  # checkpoints before the size was recorded lack it
        if size != self.size or not 0 <= int(state["position"]) < self.size:
            raise ValueError(
                f"sampler state {state} does not fit this sampler of {self.size} indices: it was written for "
                "another dataset (resume with the pairs or experts of the checkpoint)"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------------------------
# Online pairs and expert pools


def rank_pairs(scores: Tensor, *, mode: str = "best_worst", margin: float = 0.0) -> list[tuple[int, int]]:
    """`(winner, loser)` indices within one group of `scores` (`[G]`).

    `"best_worst"`: the highest against the lowest (first index on ties), if their gap exceeds `margin`.
    `"all"`: every `(i, j)` with `scores[i] - scores[j] > margin` (each unordered pair at most once).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"`mode` must be one of {PAIR_MODES}, got {mode!r}")
    if not margin >= 0:
        raise ValueError(f"`margin` must be >= 0, got {margin!r}")
    if not isinstance(scores, Tensor) or scores.ndim != 1 or len(scores) < 2:
        raise ValueError("`scores` must be a 1-D tensor of a group of at least 2 scores")
    if not torch.isfinite(scores).all():
        raise ValueError(f"`scores` contains NaN or infinite values: {scores.tolist()}")
    s = scores.tolist()
    if mode == "best_worst":
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        return [(best, worst)] if s[best] - s[worst] > margin else []
    return [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] - s[j] > margin]


@torch.no_grad()
def sample_groups(
    pipe: Any,
    prompts: Sequence[str],
    *,
    num_images_per_prompt: int,
    seed: int = 0,
    batch_size: int = 32,
    progress: str | None = None,
    **generation_kwargs: Any,
) -> Tensor:
    """`num_images_per_prompt` images per prompt from a diffusers pipeline: `[P, G, 3, H, W]` in [0, 1] (videos
    `[P, G, F, 3, H, W]` from a video pipeline, whose output holds `frames`).

    Image `g` of prompt `p` uses the generator keyed `(seed, p, g)` (`visalign.generators.seeded_generators`), so the
    images do not depend on `batch_size`. `generation_kwargs` go to the pipeline (`num_inference_steps`,
    `guidance_scale`, `height`, `width`, `max_sequence_length`, ...); `output_type` is `"pt"`. `progress` labels a
    progress bar over the images (None: no bar; pass it on the main process only).
    """
    prompts = check_prompts(list(prompts))
    if num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
    jobs = [(p, g) for p in range(len(prompts)) for g in range(num_images_per_prompt)]
    images = []
    with tqdm(total=len(jobs), desc=progress, unit="image", disable=progress is None, leave=False) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            generators = seeded_generators([(seed, p, g) for p, g in chunk])
            out = pipe([prompts[p] for p, _ in chunk], generator=generators, output_type="pt", **generation_kwargs)
            images.append(pipeline_pixels(out).cpu())
            bar.update(len(chunk))
    pixels = torch.cat(images)
    return pixels.view(len(prompts), num_images_per_prompt, *pixels.shape[1:])


def pipeline_pixels(output: Any) -> Tensor:
    """The float pixels in [0, 1] of a pipeline output called with `output_type="pt"`: `images` `[B, 3, H, W]`, or
    a video pipeline's `frames` `[B, F, 3, H, W]`."""
    pixels = output.frames if hasattr(output, "frames") else output.images
    return pixels.float().clamp(0, 1)


@torch.no_grad()
def build_pairs(
    pipe: Any,
    prompts: Sequence[str],
    reward: RewardModel,
    *,
    num_images_per_prompt: int = 8,
    mode: str = "best_worst",
    margin: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    **generation_kwargs: Any,
) -> PreferencePairs:
    """Online preference pairs: sample a group per prompt, score it with `reward.group`, pair with `rank_pairs`.

    Image 0 of every pair is the preferred one (`label_0 = 1`); `scores` holds both rewards; prompts whose group
    yields no pair (all scores within `margin`) are counted in `skipped["no_margin"]`. Raises when no prompt does.
    `progress` shows a "pair building" bar over the sampled images (pass it on the main process only).
    """
    groups = sample_groups(
        pipe,
        prompts,
        num_images_per_prompt=num_images_per_prompt,
        seed=seed,
        batch_size=batch_size,
        progress="pair building" if progress else None,
        **generation_kwargs,
    )
    captions, winners, losers, scores = [], [], [], []
    counts: Counter = Counter()
    for prompt, images in zip(prompts, groups):
        s = reward.group(images.to(reward.device), prompt).score.cpu()
        pairs = rank_pairs(s, mode=mode, margin=margin)
        if not pairs:
            counts["no_margin"] += 1
        for i, j in pairs:
            captions.append(prompt)
            winners.append(images[i])
            losers.append(images[j])
            scores.append((float(s[i]), float(s[j])))
    if not captions:
        raise ValueError(
            f"no pair: on all {len(prompts)} prompts the {num_images_per_prompt} images' {reward.name} scores lie "
            f"within `margin` {margin} (sample more images per prompt or lower the margin)"
        )
    return PreferencePairs.from_tensors(
        captions, torch.stack(winners), torch.stack(losers), scores=scores, on_error="skip", skipped=counts
    )


# ---------------------------------------------------------------------------------------------------------------


def _read_records(path: Path, columns: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """`(root, rows)` of a parquet file, a folder of parquet shards, a JSONL file, or a folder's manifest."""
    root, rows = _read_rows(path, columns)
    return root, [row for _, row in rows]


def _read_rows(path: Path, columns: list[str]) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    """`(root, [(where, row), ...])` as `_read_records`, with `where` naming each row and its file for messages."""
    if path.is_dir():
        shards = [] if (path / MANIFEST).exists() else find_shards(path, "train")
        if shards:
            return path.resolve(), [row for shard in shards for row in _read_parquet(shard, columns)]
        path = path / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path.parent} is a folder without {MANIFEST} or parquet shards")
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}")
    root = path.parent.resolve()
    if path.suffix == ".parquet":
        return root, _read_parquet(path, columns)
    if path.suffix != ".jsonl":
        raise ValueError(f"{path}: expected a .parquet or .jsonl file, or a folder with {MANIFEST} or parquet shards")
    records = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n + 1} is not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {n + 1} must be a JSON object, got {type(record).__name__}")
        records.append((f"row {len(records)} of {path}", record))
    return root, records


def _read_parquet(path: Path, columns: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The rows of one parquet file (all of it in memory: images included)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from e
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; it has {names}")
    extra = ["are_different"] if "are_different" in names else []
    rows = pq.read_table(path, columns=columns + extra).to_pylist()
    return [(f"row {i} of {path}", row) for i, row in enumerate(rows)]


def _source(value: Any, root: Path, where: str) -> bytes | Path:
    """An image field as bytes, or as a path checked to lie inside `root` and to exist."""
    if isinstance(value, dict):  # Hugging Face `datasets` Image struct
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise BadRow(f"{where}: expected image bytes or a path, got {type(value).__name__}", "missing")
    if Path(value).is_absolute():
        raise ValueError(f"{where}: absolute path {value!r} is not allowed; paths are relative to {root}")
    full = (root / value).resolve()
    if not full.is_relative_to(root):
        raise ValueError(f"{where}: path {value!r} escapes the dataset root {root}")
    if not full.is_file():
        raise BadRow(f"{where}: image file {value!r} is missing (looked for {full})", "missing")
    return full


def _open(source: bytes | Path | StoredCell, where: str) -> Image.Image | list[Image.Image]:
    """Decode an image fully (so truncated files fail here), as RGB; an animated PNG (a video saved by `_png`) as its
    list of frames."""
    if isinstance(source, StoredCell):
        source = _source(source.value(), source.root, where)
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
        with Image.open(io.BytesIO(data)) as image:
            if getattr(image, "n_frames", 1) == 1:
                return image.convert("RGB")
            frames = []
            for i in range(image.n_frames):
                image.seek(i)
                frames.append(image.convert("RGB"))
            return frames
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadRow(f"{where}: the image cannot be decoded ({type(e).__name__}: {e})", "corrupt") from None


def _check_label(value: Any, where: str, column: str = "label_0") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in (0.0, 0.5, 1.0):
        raise BadRow(f"{where}: `{column}` must be 0, 0.5 or 1, got {value!r}", "label")
    return float(value)


def _raise_or_count(error: BadRow, on_error: str, counts: Counter) -> None:
    if on_error == "raise":
        raise ValueError(f"{error} (pass on_error='skip' to skip and count bad rows)") from None
    counts[error.reason] += 1


def _to_tensor(image: Image.Image | list[Image.Image]) -> Tensor:
    """An image `[3, H, W]`, or a video's frames `[F, 3, H, W]`, in [0, 1]."""
    if isinstance(image, list):
        return torch.stack([_to_tensor(frame) for frame in image])
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()


def _resize_center_crop(image: Tensor, size: int) -> Tensor:
    """Resize the shorter side to `size` (bilinear, antialiased) and crop the center square (of every frame of a
    video `[F, 3, H, W]`)."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    frames = image.reshape(-1, *image.shape[-3:])
    frames = torch.nn.functional.interpolate(frames, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    cropped = frames[:, :, top : top + size, left : left + size].clamp(0, 1)
    return cropped.reshape(*image.shape[:-2], size, size)


def _png(image: Tensor) -> bytes:
    """A PNG of an image `[3, H, W]`; a video `[F, 3, H, W]` as an animated PNG (lossless, one frame each)."""
    buffer = io.BytesIO()
    if image.dim() == 4:
        frames = [to_pil(frame) for frame in image]
        frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    else:
        to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()
