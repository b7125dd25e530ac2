"""GenEval's rules on detections, and Flow-GRPO's strict/partial GenEval reward on the same detections.

GenEval (Ghosh et al., 2023; `djghosh13/geneval:evaluation/evaluate_images.py`) detects COCO objects with
mmdetection's Mask2Former (Swin-S, COCO instance) and checks each prompt's metadata (`{"tag", "include",
"exclude"}`):

- Filtering (`evaluate_image`): per class, detections sorted by confidence, kept when `score > 0.3` (`> 0.9` for
  the `counting` tag), at most 16, greedy NMS at IoU `max_overlap` (1.0 = no NMS, the default).
- Correctness (`evaluate`): include clauses AND-ed: the `count` most confident objects of the class must exist;
  with a color, at least `count` of them must be classified that color; with a position `[relation, k]`, each of
  them must stand in `relation` to every object of include clause `k` (a failed clause `k` fails it). Exclude
  clauses OR-ed: `count` or more objects of the class fail the image.
- Position (`relative_position`): centre offset `d = c_a - c_b` shrunk per axis by `0.1 (size_a + size_b)`, divided
  by `|d|`; a component beyond 0.5 gives left of / right of / above / below (image y points down).
- Color (`color_classification`): the object pasted on a `#999` grey background through its mask, cropped to its
  box, classified zero-shot by CLIP ViT-L/14 (OpenAI) among 10 colors with 3 templates (clip_benchmark: each
  template's text embedding normalized, averaged, re-normalized; argmax of the cosine).

Flow-GRPO's reward server (`yifan123/reward-server:reward_server/gen_eval.py`, `evaluate_reward`) scores the same
detections "strictly": every include clause needs exactly `count` objects (all of them, not the top `count`), its
color on exactly `count`, its position; excludes are ignored. Its partial score is the mean of the terms each clause
appends: `1 - |count - n_found| / count` (negative when far over), a 0 for a color or position clause that lacks
its objects, `1 - |count - n_color| / count` for the color, and for a position a 0 on the first wrong pair and then
a 1 in every case (the reference's quirk, kept). Flow-GRPO trains on the partial score; `GenEvalReward` reports
strict accuracy as its score by default (`score="partial"` trains as Flow-GRPO does).
The detector (Mask2Former + CLIP colors) is `visalign.reward_models.geneval`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from torch import Tensor

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
METADATA = "prompts/geneval.jsonl"  # GenEval's evaluation_metadata.jsonl, bundled in visalign.assets


# ---------------------------------------------------------------------------------------------------------------
# Detections and the rules


@dataclass(frozen=True)
class Detection:
    """A detected object: class label, confidence, box `(x0, y0, x1, y1)` in pixels, its color if known, and its
    instance mask (`Tensor` `[H, W]` bool at the image's size) if the detector segments."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None
    mask: Tensor | None = field(default=None, repr=False, compare=False)


class Detector(ABC):
    """Finds objects in an image. Subclasses set `name` and implement `detect`; `min_score` is the score at or
    below which they drop detections (the rules' thresholds must not be below it)."""

    name: str = "detector"
    min_score: float = 0.0

    def settings(self) -> dict:
        return {}

    @abstractmethod
    def detect(self, pixels: Tensor) -> list[Detection]:
        """Objects in `pixels` (`[3, H, W]`, float in [0, 1])."""

    def detect_batch(self, pixels: Tensor) -> list[list[Detection]]:
        """Objects in each image of `pixels` (`[B, 3, H, W]`); detectors that batch override this."""
        return [self.detect(p) for p in pixels]

    def classify_colors(self, pixels: Tensor, objects: Sequence[Detection], classname: str) -> list[str | None]:
        """The color of each of `objects` (of class `classname`) in `pixels` `[3, H, W]`; None where unknown.

        Default: the colors the detector attached (`Detection.color`).
        """
        return [d.color for d in objects]

    def classify_colors_many(self, requests: Sequence[tuple[Tensor, Sequence[Detection], str]]) -> list[list]:
        """`classify_colors` of several (pixels, objects, class name) requests; detectors that batch override it."""
        return [self.classify_colors(*r) for r in requests]


ColorFn = Callable[[Sequence[Detection], str], list]


@dataclass
class GenEvalRules:
    """GenEval's thresholds (`evaluation/evaluate_images.py` defaults)."""

    threshold: float = field(default=0.3, metadata={"help": "keep detections scoring above this"})
    counting_threshold: float = field(default=0.9, metadata={"help": "the same, for prompts tagged counting"})
    max_objects: int = field(default=16, metadata={"help": "at most this many detections per class"})
    max_overlap: float = field(default=1.0, metadata={"help": "NMS IoU threshold; 1.0 turns NMS off"})
    position_threshold: float = field(default=0.1, metadata={"help": "box-size fraction removed from offsets"})


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's `+1` pixel convention for widths and heights (`compute_iou`)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(a: Detection, b: Detection, position_threshold: float) -> set[str]:
    """Relations of `a` to `b` ("left of", "right of", "above", "below"), GenEval's rule.

    The center offset shrinks on each axis by `position_threshold * (size_a + size_b)`; a relation holds when the
    shrunk offset, divided by the length of the full offset, exceeds 0.5 along its axis.
    """
    ba, bb = np.array(a.box, np.float64).reshape(2, 2), np.array(b.box, np.float64).reshape(2, 2)
    offset = ba.mean(0) - bb.mean(0)
    dims = np.abs(np.diff(ba, axis=0))[0] + np.abs(np.diff(bb, axis=0))[0]
    revised = np.maximum(np.abs(offset) - position_threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {k for k, v in rel.items() if v}


def filter_detections(detections: Sequence[Detection], tag: str | None, rules: GenEvalRules) -> dict:
    """GenEval's per-class filtering: `{label: [Detection, ...]}` by descending score, classes with none left out.

    Score strictly above the threshold (the counting threshold for tag `counting`), the first `max_objects`, then
    greedy NMS at IoU `max_overlap` (skipped at 1.0).
    """
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for label in dict.fromkeys(d.label for d in detections):
        ranked = sorted((d for d in detections if d.label == label and d.score > threshold), key=lambda d: -d.score)
        kept: list[Detection] = []
        for d in ranked[: rules.max_objects]:
            if rules.max_overlap >= 1 or all(_iou(d.box, k.box) < rules.max_overlap for k in kept):
                kept.append(d)
        if kept:
            by_class[label] = kept
    return by_class


def _position_failure(found, targets, relation: str, rules: GenEvalRules) -> str | None:
    """The reason the first (object, target) pair fails `relation`, or None when every pair holds."""
    for obj in found:
        for t in targets:
            seen = relative_position(obj, t, rules.position_threshold)
            if relation not in seen:
                return f"expected {obj.label} {relation} target, found {' and '.join(sorted(seen)) or 'no relation'}"
    return None


def _check_target(req: dict, groups: list) -> int:
    target = req["position"][1]
    if not 0 <= target < len(groups):
        raise ValueError(f"`spec` position target {target} of {req['class']} must index an earlier include")
    return target


def check_geneval(
    spec: dict, detections: Sequence[Detection], rules: GenEvalRules, colors: ColorFn | None = None
) -> tuple[bool | None, str]:
    """GenEval's verdict (`evaluate`) on a metadata clause (`{"tag", "include": [...], "exclude": [...]}`).

    Includes are AND-ed (at least `count` objects of the class; the `count` most confident must have `color`; each
    of them must stand in `position` to every object of the target include), excludes OR-ed (fewer than `count`).
    `colors(objects, classname)` classifies colors (default: `Detection.color`). Returns (passed, reason); passed
    is None when a color is required and none is known.
    """
    by_class = filter_detections(detections, spec.get("tag"), rules)
    ok, reasons, groups = True, [], []
    for req in spec.get("include", []):
        cls, count = req["class"], req["count"]
        found = by_class.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if matched and "color" in req:
            seen = colors(found, cls) if colors is not None else [d.color for d in found]
            if None in seen:
                return None, f"the detector gives no colors, needed for {req['color']} {cls}"
            if seen.count(req["color"]) < count:
                matched = False
                reasons.append(f"expected {req['color']} {cls}>={count}, found colors {', '.join(seen)}")
        if matched and "position" in req:
            target = _check_target(req, groups)
            why = "no target for {} to be {}".format(cls, req["position"][0]) if groups[target] is None else None
            why = why or _position_failure(found, groups[target], req["position"][0], rules)
            if why:
                matched = False
                reasons.append(why)
        ok &= matched
        groups.append(found if matched else None)
    for req in spec.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            ok = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return ok, "; ".join(reasons) or "all clauses hold"


def geneval_reward(
    spec: dict, detections: Sequence[Detection], rules: GenEvalRules, colors: ColorFn | None = None
) -> tuple[bool, float, str]:
    """Flow-GRPO's reward-server check (`evaluate_reward`): (strict correctness, partial score, reason).

    Each include clause needs exactly `count` objects (all detections of the class after filtering), its color on
    exactly `count` of them, its position on every pair; excludes are ignored. The partial score is the mean of the
    appended terms: `1 - |count - n| / count` for the count; 0 for a color/position clause without its objects;
    `1 - |count - n_color| / count` for the color; for a position 0 when there is no target, else 0 on a wrong pair
    and then 1 unconditionally (the reference appends both). Not clipped: over-counting makes it negative.
    """
    by_class = filter_detections(detections, spec.get("tag"), rules)
    strict, terms, reasons, groups = True, [], [], []
    for req in spec.get("include", []):
        cls, count = req["class"], req["count"]
        found = by_class.get(cls, [])
        matched = len(found) == count
        terms.append(1 - abs(count - len(found)) / count)
        if not matched:
            reasons.append(f"expected {cls}=={count}, found {len(found)}")
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                seen = colors(found, cls) if colors is not None else [d.color for d in found]
                if None in seen:
                    raise ValueError(f"the detector gives no colors, needed for {req['color']} {cls}")
                n = seen.count(req["color"])
                terms.append(1 - abs(count - n) / count)
                if n != count:
                    matched = False
                    reasons.append(f"expected {req['color']} {cls}=={count}, found colors {', '.join(seen)}")
            if "position" in req and matched:
                target = _check_target(req, groups)
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {req['position'][0]}")
                    terms.append(0.0)
                else:
                    why = _position_failure(found, groups[target], req["position"][0], rules)
                    if why:
                        matched = False
                        reasons.append(why)
                        terms.append(0.0)
                    terms.append(1.0)
        strict &= matched
        groups.append(found if matched else None)
    return strict, (sum(terms) / len(terms) if terms else 0.0), "; ".join(reasons) or "all clauses hold"


def color_requests(spec: dict, detections: Sequence[Detection], rules: GenEvalRules) -> list[list[Detection]]:
    """The object lists whose colors `check_geneval` and `geneval_reward` will ask for (the top `count` of a class,
    when there are that many), so a batch can classify them all in one pass."""
    by_class = filter_detections(detections, spec.get("tag"), rules)
    return [
        by_class[req["class"]][: req["count"]]
        for req in spec.get("include", [])
        if "color" in req and len(by_class.get(req["class"], [])) >= req["count"]
    ]


def load_metadata(path: str | Path | None = None) -> dict[str, dict]:
    """GenEval metadata lines (`{"tag", "include", "exclude"?, "prompt"}`) by prompt text.

    `None` reads GenEval's `evaluation_metadata.jsonl` bundled with visalign; Flow-GRPO's `train_metadata.jsonl`
    has the same lines. A prompt repeated with different metadata is an error.
    """
    if path is None:
        path = Path(str(resources.files("visalign.assets") / METADATA))
    out: dict[str, dict] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            prompt, spec = d["prompt"], {k: d[k] for k in ("tag", "include", "exclude") if k in d}
            spec["include"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {n} is not a GenEval metadata line ({type(e).__name__}: {e})") from None
        if out.get(prompt, spec) != spec:
            raise ValueError(f"{path}: line {n} gives the prompt {prompt!r} different metadata than before")
        out[prompt] = spec
    if not out:
        raise ValueError(f"{path}: no GenEval metadata lines")
    return out
