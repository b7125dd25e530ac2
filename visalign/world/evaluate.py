"""Generate with a world pipeline and score it by the verifier, GenEval protocol.

Each prompt gets `images_per_prompt` images from fixed seeds; an image is correct when every clause of its prompt
holds; a category's accuracy is the mean over its images, and `overall` the mean over categories.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from torch import Tensor
from tqdm.auto import tqdm

from visalign.world.models import MAX_SEQUENCE_LENGTH
from visalign.world.scenes import CATEGORIES, Prompt, parse_prompt
from visalign.world.verifier import verify

HELDOUT = "world/heldout.jsonl"


def heldout_prompts(limit_per_category: int | None = None) -> list[Prompt]:
    """The shipped held-out evaluation set (test-split prompts, never trained on)."""
    text = (resources.files("visalign.assets") / HELDOUT).read_text()
    prompts = [Prompt.from_dict(json.loads(line)) for line in text.splitlines()[1:] if line.strip()]
    if limit_per_category is None:
        return prompts
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        if seen.get(p.category, 0) < limit_per_category:
            seen[p.category] = seen.get(p.category, 0) + 1
            out.append(p)
    return out


def default_generation(pipe: DiffusionPipeline) -> dict:
    kw = dict(num_inference_steps=20, guidance_scale=3.0, height=32, width=32, output_type="pt")
    if isinstance(pipe, StableDiffusion3Pipeline):
        kw["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    return kw


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline, texts: list[str], *, seed: int = 0, batch_size: int = 64, progress: bool = True, **kw
) -> Tensor:
    """Images `[N, 3, 32, 32]` in [0, 1] for `texts`; image i uses the generator seeded with `seed + i`."""
    kw = {**default_generation(pipe), **kw}
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = texts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out.append(pipe(chunk, generator=gens, **kw).images.float().clamp(0, 1))
    return torch.cat(out)


def accuracy(images: Tensor, prompts: list[Prompt]) -> dict:
    """Per-category and overall verifier accuracy of `images` (one per prompt, same order).

    `overall` is GenEval's: the mean over categories, whatever their sizes; `image_accuracy` the mean over images.
    """
    if len(images) != len(prompts):
        raise ValueError(f"`images` has {len(images)} items but `prompts` has {len(prompts)}")
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for img, p in zip(images.cpu().numpy(), prompts):
        hits[p.category].append(verify(img, p).correct)
    per = {c: float(np.mean(h)) for c, h in hits.items() if h}
    return {
        "overall": float(np.mean(list(per.values()))),
        "per_category": per,
        "image_accuracy": float(np.mean([hit for h in hits.values() for hit in h])),
        "images": len(prompts),
    }


def category_sums(prompts: list[str], correct: Tensor) -> dict[str, float] | None:
    """The trainers' evaluation: sums of a world verifier's per-image `correct` ([B]) for each category (every
    category present, zeros included, so that processes reduce the same keys); None when a prompt is not a
    shapes-world caption."""
    try:
        cats = [parse_prompt(t).category for t in prompts]
    except ValueError:
        return None
    values = correct.double().cpu().tolist()
    return {c: float(sum(v for v, k in zip(values, cats) if k == c)) for c in CATEGORIES}


def add_levels(metrics: dict[str, float], prefix: str, texts: list[str]) -> dict[str, float]:
    """Name the levels of a world evaluation: `metrics` holds `{prefix}/correct` (the share of correct images) and
    `{prefix}/correct@{category}` (category sums over all `len(texts)` images, from `category_sums`); returns them
    as `{prefix}/image_accuracy` (= correct) and `{prefix}/overall` (GenEval's: the mean over categories of each
    category's accuracy, the README's number), with `{prefix}/overall/{category}`."""
    keys = [f"{prefix}/correct@{c}" for c in CATEGORIES]
    if not all(k in metrics for k in keys):
        return metrics
    sums = {c: metrics.pop(k) * len(texts) for c, k in zip(CATEGORIES, keys)}
    counts = {c: sum(parse_prompt(t).category == c for t in texts) for c in CATEGORIES}
    per = {c: sums[c] / counts[c] for c in CATEGORIES if counts[c]}
    metrics[f"{prefix}/image_accuracy"] = metrics[f"{prefix}/correct"]
    metrics[f"{prefix}/overall"] = float(np.mean(list(per.values())))
    metrics |= {f"{prefix}/overall/{c}": v for c, v in per.items()}
    return metrics


def evaluate(
    pipe: DiffusionPipeline, prompts: list[Prompt], *, images_per_prompt: int = 4, seed: int = 0, **kw
) -> dict:
    """GenEval-protocol accuracy of `pipe` on `prompts`."""
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    images = generate(pipe, [p.text for p in expanded], seed=seed, **kw)
    return accuracy(images, expanded) | {"prompts": len(prompts), "images_per_prompt": images_per_prompt}


def write_heldout(path: Path, per_category: dict[str, int], seed: int = 0) -> list[Prompt]:
    """Choose the held-out set from the test split and write it as JSONL (a header line, then one prompt a line)."""
    from visalign.world.scenes import prompt_split

    rng = np.random.default_rng(seed)
    test = prompt_split("test")
    chosen = []
    for cat, n in per_category.items():
        pool = test[cat]
        idx = rng.permutation(len(pool))[:n]
        chosen += [pool[i] for i in sorted(idx)]
    header = {
        "name": "shapes-world-heldout",
        "version": 1,
        "license": "Apache-2.0",
        "prompts": len(chosen),
        "protocol": "GenEval: 4 images per prompt, an image is correct when all clauses hold",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(d) for d in [header] + [p.to_dict() for p in chosen]) + "\n")
    return chosen
