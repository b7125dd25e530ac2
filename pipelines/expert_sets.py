"""Expert sets for Diffusion-DRO (Wu et al. 2025, arXiv 2510.18353): `(caption, image)` demonstrations.

An `ExpertSet` is the top-k images of a pool by a reward (`top_k_experts`; the paper keeps the 500 best Pick-a-Pic
images by PickScore or HPSv2) or a manifest folder of `{"caption", "image"}` rows (`load_experts`, written by
`save_experts`). Image fields follow the dataset rules of `visalign.pipelines.preference_data`: bytes or paths that
stay inside the root, decoded only when an expert is read, bad rows raised naming the row or skipped and counted.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from visalign.pipelines.preference_data import (
    MANIFEST,
    ON_ERROR,
    BadRow,
    Source,
    _open,
    _png,
    _raise_or_count,
    _read_rows,
    _resize_center_crop,
    _source,
    _to_tensor,
)
from visalign.rewards import RewardModel
from visalign.types import check_pixels, check_prompts

logger = logging.getLogger(__name__)


@dataclass
class ExpertSet(Dataset):
    """Diffusion-DRO's expert demonstrations: `experts[i]` is `(caption, image [3, H, W] in [0, 1])`.

    Args:
        captions (`list[str]`), sources (`list[Source]`): one entry per expert image.
        resolution (`int`, *optional*): resize and center-crop when read.
        scores (`list[float]`, *optional*): the reward that selected each image.
    """

    captions: list[str]
    sources: list[Source]
    resolution: int | None = None
    scores: list[float] | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.captions:
            raise ValueError(f"{self.source} holds no expert image")
        if len(self.captions) != len(self.sources):
            raise ValueError("`captions` and `sources` must have one entry per expert image")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        source = self.sources[index]
        image = source if isinstance(source, Tensor) else _to_tensor(_open(source, f"row {index} of {self.source}"))
        return self.captions[index], image if self.resolution is None else _resize_center_crop(image, self.resolution)


@torch.no_grad()
def top_k_experts(
    images: Tensor,
    captions: Sequence[str],
    reward: RewardModel,
    k: int,
    *,
    per_caption: int | None = None,
    min_score: float | None = None,
    batch_size: int = 64,
) -> ExpertSet:
    """The `k` highest-scoring `(caption, image)` rows of a pool (`images` `[N, 3, H, W]` in [0, 1]) under `reward`.

    Ties keep the pool's order. `per_caption` keeps at most that many images of one caption (a diverse set rather
    than many samples of the easiest prompts); `min_score` drops rows scoring below it. With either, fewer than `k`
    rows may qualify: all that do are kept. `scores` records each kept image's reward.
    """
    check_pixels(images, "images")
    captions = check_prompts(list(captions), images.shape[0], "captions")
    if not 1 <= k <= len(captions):
        raise ValueError(f"`k` must be in [1, {len(captions)}] (the pool size), got {k}")
    if per_caption is not None and per_caption < 1:
        raise ValueError(f"`per_caption` must be >= 1 (or None), got {per_caption}")
    if min_score is not None and not math.isfinite(min_score):
        raise ValueError(f"`min_score` must be a finite number (or None), got {min_score}")
    scores = torch.cat(
        [
            reward.score(images[i : i + batch_size].to(reward.device), captions[i : i + batch_size]).score.cpu()
            for i in range(0, len(captions), batch_size)
        ]
    )
    kept: list[int] = []
    taken: Counter = Counter()
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if len(kept) == k or (min_score is not None and float(scores[i]) < min_score):
            break
        if per_caption is None or taken[captions[i]] < per_caption:
            taken[captions[i]] += 1
            kept.append(i)
    if not kept:
        raise ValueError(f"no image of the pool scores >= `min_score` ({min_score}); best {float(scores.max()):.4g}")
    return ExpertSet(
        [captions[i] for i in kept], [images[i].cpu() for i in kept], scores=[float(scores[i]) for i in kept]
    )


def load_experts(path: str | Path, *, resolution: int | None = None, on_error: str = "raise") -> ExpertSet:
    """Expert images from a folder with `manifest.jsonl` (or a `.jsonl` file) of `{"caption", "image"}` rows; paths
    stay inside the root; missing or corrupt images raise naming the row, or are skipped with `on_error="skip"`."""
    if on_error not in ON_ERROR:
        raise ValueError(f"`on_error` must be one of {ON_ERROR}, got {on_error!r}")
    path = Path(path)
    root, records = _read_rows(path, ["caption", "image"])
    captions, sources, counts = [], [], Counter()
    for where, record in records:
        try:
            if not isinstance(record.get("caption"), str):
                raise BadRow(f"{where}: `caption` must be a string, got {record.get('caption')!r}", "caption")
            source = _source(record.get("image"), root, f"{where}: image")
            _open(source, f"{where}: image")
        except BadRow as e:
            _raise_or_count(e, on_error, counts)
            continue
        captions.append(record["caption"])
        sources.append(source)
    if counts:
        logger.info("%s: kept %d of %d expert images, skipped %s", path, len(captions), len(records), dict(counts))
    return ExpertSet(captions, sources, resolution=resolution, source=str(path))


def save_experts(experts: ExpertSet, folder: str | Path) -> Path:
    """Write an expert set as a folder of PNGs with `manifest.jsonl` (`load_experts` reads it back)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / MANIFEST, "w") as f:
        for i in range(len(experts)):
            caption, image = experts[i]
            name = f"images/{i:06d}.png"
            (folder / name).write_bytes(_png(image))
            row = {"caption": caption, "image": name}
            if experts.scores is not None:
                row["score"] = experts.scores[i]
            f.write(json.dumps(row) + "\n")
    return folder
