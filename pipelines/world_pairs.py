"""World reward data: verifier-labelled preference pairs on the shapes world, for training and testing rewards.

`world_pairs`: synthetic human-like preferences on the shapes world. Each pair holds two images of one
prompt: renders of the prompt or of a near miss of it (a color, shape, count or relation changed), and, with a
generator, its samples. The verifier scores both (the fraction of the prompt's clauses that hold); the higher
wins, equal fractions tie, and each decided label flips with probability `label_noise` (ties stay ties). The
verifier fractions are kept in `pairs.scores`, so the clean label of every pair is known.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from visalign.pipelines.pickapic import TIES
from visalign.pipelines.preference_data import PreferencePairs, sample_groups
from visalign.pipelines.reward_data import RewardPairs
from visalign.world.scenes import COLORS, NUMBERS, RELATIONS, SHAPES, Obj, Prompt, prompt_split, render_prompt
from visalign.world.verifier import verify


def near_miss(prompt: Prompt, rng: np.random.Generator) -> Prompt:
    """A `Prompt` like `prompt` with one thing changed: an object's shape or color, the relation, or (counting
    prompts) the count."""
    objects = list(prompt.objects)
    k = int(rng.integers(len(objects)))
    o = objects[k]
    kinds = ["shape"] + (["color"] if o.color else []) + (["relation"] if prompt.relation else [])
    kinds += ["count"] if prompt.category == "counting" else []  # elsewhere the verifier only checks presence
    kind = kinds[int(rng.integers(len(kinds)))]
    relation = prompt.relation
    if kind == "shape":
        objects[k] = Obj(str(rng.choice([s for s in SHAPES if s != o.shape])), o.color, o.count)
    elif kind == "color":
        objects[k] = Obj(o.shape, str(rng.choice([c for c in COLORS if c != o.color])), o.count)
    elif kind == "count":
        objects[k] = Obj(o.shape, o.color, int(rng.choice([n for n in (1, *NUMBERS) if n != o.count])))
    else:
        relation = str(rng.choice([r for r in RELATIONS if r != prompt.relation]))
    return Prompt("", prompt.category, tuple(objects), relation)


def _render(prompt: Prompt, misses: int, rng: np.random.Generator) -> np.ndarray:
    """A render of `prompt` with `misses` near-miss changes (retrying when the objects do not fit)."""
    for _ in range(20):
        target = prompt
        for _ in range(misses):
            target = near_miss(target, rng)
        try:
            return render_prompt(target, rng)
        except RuntimeError:
            continue
    raise RuntimeError(f"could not render a near miss of {prompt.text!r}")


def _sample_prompts(categories: list[list[Prompt]], n: int, rng: np.random.Generator) -> list[Prompt]:
    """`n` prompts: a category uniformly, then one of its prompts (GenEval's balance)."""
    return [categories[c][int(rng.integers(len(categories[c])))] for c in rng.integers(len(categories), size=n)]


# (near misses of image 0, of image 1) of a rendered pair, and how often: mostly a correct render against a miss
RENDERED_PAIRS = ((0, 1), (0, 2), (1, 2), (0, 0), (1, 1))
RENDERED_WEIGHTS = (0.45, 0.2, 0.15, 0.1, 0.1)


def world_pairs(
    num_pairs: int,
    *,
    split: str = "train",
    label_noise: float = 0.1,
    ties: str = "keep",
    pipe: Any = None,
    generated_fraction: float = 0.3,
    images_per_prompt: int = 8,
    pairs_per_prompt: int = 8,
    seed: int = 0,
    **generation_kwargs: Any,
) -> RewardPairs:
    """Verifier-labelled pairs of world images (see the module docstring).

    Args:
        num_pairs (`int`): how many pairs.
        split (`str`): the prompts' split (`"train"` or `"test"`).
        label_noise (`float`): the probability of flipping each decided label, in [0, 0.5).
        ties (`str`): `"keep"` equal-verifier pairs as ties, or `"drop"` them (drawing others).
        pipe (*optional*): a world pipeline; `generated_fraction` of the pairs then pair its samples
            (`images_per_prompt` per prompt, plus one correct render) with each other, up to `pairs_per_prompt`
            pairs per prompt; `generation_kwargs` go to it.
        seed (`int`): every render, sample and flip is a function of it.
    """
    if num_pairs < 1:
        raise ValueError(f"`num_pairs` must be >= 1, got {num_pairs}")
    if not 0 <= label_noise < 0.5:
        raise ValueError(f"`label_noise` must be in [0, 0.5), got {label_noise}")
    if ties not in TIES:
        raise ValueError(f"`ties` must be one of {TIES}, got {ties!r}")
    if pipe is None and generated_fraction:
        generated_fraction = 0.0
    rng = np.random.default_rng(seed)
    categories = [g for g in prompt_split(split).values() if g]
    fraction = lambda image, prompt: verify(image, prompt).fraction  # noqa: E731
    found: list[tuple[str, np.ndarray, np.ndarray, float, float, str]] = []

    num_generated = round(num_pairs * generated_fraction)
    chunk = 0
    while len(found) < num_generated:
        prompts = _sample_prompts(categories, math.ceil((num_generated - len(found)) / pairs_per_prompt), rng)
        samples = sample_groups(
            pipe,
            [p.text for p in prompts],
            num_images_per_prompt=images_per_prompt,
            seed=seed + 7919 * chunk,
            **generation_kwargs,
        )
        chunk += 1
        for prompt, group in zip(prompts, samples.numpy()):
            candidates = [*group, _render(prompt, 0, rng)]
            scores = [fraction(image, prompt) for image in candidates]
            pairs = [(a, b) for a in range(len(candidates)) for b in range(a + 1, len(candidates))]
            pairs = [pairs[i] for i in rng.permutation(len(pairs))]
            pairs = [(a, b) for a, b in pairs if ties == "keep" or scores[a] != scores[b]][:pairs_per_prompt]
            for a, b in pairs[: num_generated - len(found)]:
                found.append((prompt.text, candidates[a], candidates[b], scores[a], scores[b], "generated"))
    while len(found) < num_pairs:
        prompt = _sample_prompts(categories, 1, rng)[0]
        misses = RENDERED_PAIRS[rng.choice(len(RENDERED_PAIRS), p=RENDERED_WEIGHTS)]
        misses = misses if rng.random() < 0.5 else misses[::-1]
        images = [_render(prompt, m, rng) for m in misses]
        s0, s1 = (fraction(image, prompt) for image in images)
        if s0 == s1 and ties == "drop":
            continue
        found.append((prompt.text, images[0], images[1], s0, s1, "rendered"))
    order = rng.permutation(len(found))
    found = [found[i] for i in order]
    labels = []
    for *_, s0, s1, _ in found:
        label = 1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5
        labels.append(1 - label if label != 0.5 and rng.random() < label_noise else label)
    as_tensor = lambda k: torch.from_numpy(np.stack([f[k] for f in found])).float().clamp(0, 1)  # noqa: E731
    pairs = PreferencePairs.from_tensors(
        [f[0] for f in found],
        as_tensor(1),
        as_tensor(2),
        labels,
        scores=[(f[3], f[4]) for f in found],
        on_error="skip",
    )
    return RewardPairs(pairs, kinds=[found[r][5] for r in pairs.rows])
