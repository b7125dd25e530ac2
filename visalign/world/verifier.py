"""The verifier: reads a 32x32 image and a world prompt, and says which of the prompt's clauses hold.

Detection is color segmentation and connected components: each pixel takes the nearest palette color when it is
close enough (else it is background or unknown), components smaller than `MIN_AREA` pixels are noise, and a
component's shape comes from whether its area sits low in its bounding box (a triangle pointing up) and whether
its top and bottom rows span the box (a square) or not (a circle).
Relations compare centroids with a margin of `MARGIN` pixels, as GenEval compares box centers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visalign.world.scenes import BACKGROUND, COLORS, Obj, Prompt

MIN_AREA = 5
MARGIN = 3.0
COLOR_DISTANCE = 0.30  # a pixel further than this (RGB L2) from every palette color is not an object pixel
EXTRA_COST, MAX_EXTRAS = 0.1, 3  # `tidy_fraction`: the cost of an object beyond those asked for, and how many count
_PALETTE = np.array(list(COLORS.values()), np.float32)
_NAMES = list(COLORS)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    x: float
    y: float
    area: int


@dataclass(frozen=True)
class Verdict:
    """Per-clause results: `clauses` is a list of (kind, passed, reason); `correct` means every clause passed."""

    clauses: tuple[tuple[str, bool, str], ...]
    detections: tuple[Detection, ...]

    @property
    def correct(self) -> bool:
        return all(ok for _, ok, _ in self.clauses)

    @property
    def fraction(self) -> float:
        return sum(ok for _, ok, _ in self.clauses) / len(self.clauses)

    @property
    def reason(self) -> str:
        return "; ".join(f"{'ok' if ok else 'FAIL'} {why}" for _, ok, why in self.clauses)


def color_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index of a `[3, H, W]` image: -1 for background or unknown colors."""
    px = image.transpose(1, 2, 0)
    d = np.linalg.norm(px[..., None, :] - _PALETTE, axis=-1)
    label = d.argmin(-1)
    bg = np.linalg.norm(px - np.array(BACKGROUND, np.float32), axis=-1)
    keep = (d.min(-1) < COLOR_DISTANCE) & (d.min(-1) < bg)
    return np.where(keep, label, -1)


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (0 = not in mask), by min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            return np.where(mask, lab, 0)
        lab = new


def _shape_of(ys: np.ndarray, xs: np.ndarray) -> str:
    """Triangles (pointing up) put most of their area in the lower half of their box; a square's top and bottom
    rows span its box, a circle's do not."""
    mid = (ys.max() + ys.min()) / 2
    lower_excess = ((ys > mid).sum() - (ys < mid).sum()) / len(ys)
    if lower_excess > 0.22:
        return "triangle"
    rows = np.bincount(ys - ys.min())
    edge = (rows[0] + rows[-1]) / (2 * (xs.max() - xs.min() + 1))
    return "square" if edge > 0.8 else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a `[3, H, W]` float image in [0, 1]."""
    labels = color_labels(image)
    found = []
    for ci, name in enumerate(_NAMES):
        comp = _components(labels == ci)
        for k in np.unique(comp[comp > 0]):
            ys, xs = np.nonzero(comp == k)
            if len(xs) >= MIN_AREA:
                found.append(
                    Detection(_shape_of(ys, xs), name, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, len(xs))
                )
    return found


def _matches(d: Detection, o: Obj) -> bool:
    return d.shape == o.shape and (o.color is None or d.color == o.color)


def _relation(a: Detection, b: Detection, relation: str) -> bool:
    dx, dy = b.x - a.x, b.y - a.y
    return {
        "to the left of": dx > MARGIN,
        "to the right of": -dx > MARGIN,
        "above": dy > MARGIN,
        "below": -dy > MARGIN,
    }[relation]


def verify(image: np.ndarray, prompt: Prompt) -> Verdict:
    """Check each clause of `prompt` on a `[3, H, W]` image in [0, 1]."""
    dets = detect(image)
    clauses = []
    for o in prompt.objects:
        n = sum(_matches(d, o) for d in dets)
        if prompt.category == "counting":
            clauses.append(("count", n == o.count, f"{n} {o.noun()} found, {o.count} wanted"))
        else:
            clauses.append(("color" if o.color else "object", n >= 1, f"{n} {o.noun()} found"))
    if prompt.relation is not None:
        a, b = prompt.objects
        ok = _relation_holds(dets, prompt)
        clauses.append(("position", ok, f"{a.noun()} {prompt.relation} {b.noun()}: {'yes' if ok else 'no'}"))
    return Verdict(tuple(clauses), tuple(dets))


def _relation_holds(detections: tuple[Detection, ...] | list[Detection], prompt: Prompt) -> bool:
    """Some object matching the subject (objects[0]) stands in the prompt's relation to another matching objects[1]."""
    a, b = prompt.objects
    pairs = [(da, db) for da in detections if _matches(da, a) for db in detections if _matches(db, b) and db is not da]
    return any(_relation(da, db, prompt.relation) for da, db in pairs)


def exact_fraction(detections: tuple[Detection, ...] | list[Detection], prompt: Prompt) -> float:
    """`verify`'s clause fraction with the exact counts of Flow-GRPO's GenEval reward (`partial_score`), binary.

    An object clause holds when the image has exactly as many objects of its shape as the prompt asks for (its
    `count`, 1 outside counting, summed over requested objects of that shape) and at least `count` of them in its
    color; the relation clause is `verify`'s. The judge (`verify`, GenEval's rule) lets extra objects pass; this
    score, like Flow-GRPO's but without its partial credit, does not.
    """
    wanted: dict[str, int] = {}
    for o in prompt.objects:
        wanted[o.shape] = wanted.get(o.shape, 0) + o.count
    clauses = [
        sum(d.shape == o.shape for d in detections) == wanted[o.shape]
        and sum(_matches(d, o) for d in detections) >= o.count
        for o in prompt.objects
    ]
    if prompt.relation is not None:
        clauses.append(_relation_holds(detections, prompt))
    return sum(clauses) / len(clauses)


def tidy_fraction(verdict: Verdict, prompt: Prompt) -> float:
    """`verify`'s clause fraction less `EXTRA_COST` for each object drawn beyond those the prompt asks for (at most
    `MAX_EXTRAS` counted). The cost never outweighs a clause (0.3 < 1/3, the smallest clause weight), so it only
    orders images that satisfy the same number of clauses: the fewer extras, the better. The judge lets extras pass
    outside counting; a policy trained on the plain fraction learns to draw them, and its counting falls."""
    extras = max(0, len(verdict.detections) - sum(o.count for o in prompt.objects))
    return verdict.fraction - EXTRA_COST * min(extras, MAX_EXTRAS)


def partial_score(detections: tuple[Detection, ...] | list[Detection], prompt: Prompt) -> float:
    """Flow-GRPO's partial GenEval score (its reward server's `evaluate_reward`, the score Flow-GRPO trains on),
    read on the world's detections: `visalign.reward_models.geneval_rules.geneval_reward`'s terms, per object.

    Each requested object wants exactly `count` objects of its shape (1 outside counting): a term
    `1 - |count - n| / count` (negative when far over), then, if the count is wrong, a 0 for its color or position;
    else its color on `1 - |count - n_color| / count`, and its relation to the other object's shapes (objects[0] is
    the subject) a 0 when any pair fails and a 1 in every case (the reference appends both). The mean of the terms.
    Unlike `verify` (GenEval's rule: at least one), extra objects of a requested shape lower it.
    """
    terms: list[float] = []
    found: list[list[Detection]] = []
    matched: list[bool] = []
    for i, o in enumerate(prompt.objects):
        same_shape = [d for d in detections if d.shape == o.shape]
        ok = len(same_shape) == o.count
        terms.append(1 - abs(o.count - len(same_shape)) / o.count)
        if not ok:
            terms += [0.0] * (o.color is not None or (prompt.relation is not None and i == 0))
        elif o.color is not None:
            n = sum(d.color == o.color for d in same_shape)
            terms.append(1 - abs(o.count - n) / o.count)
            ok = n == o.count
        found.append(same_shape)
        matched.append(ok)
    if prompt.relation is not None and matched[0]:
        if not matched[1]:
            terms.append(0.0)  # no target group
        else:
            if not all(_relation(a, b, prompt.relation) for a in found[0] for b in found[1]):
                terms.append(0.0)
            terms.append(1.0)
    return sum(terms) / len(terms)
