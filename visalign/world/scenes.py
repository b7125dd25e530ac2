"""Scenes, captions and the renderer of the shapes world.

A scene is 1-4 flat shapes (circle, square, triangle) of six colors on a dark 32x32 background. Prompts follow
GenEval's six categories, with several phrasings each:

| category      | example                                   | clauses checked by the verifier          |
| ------------- | ----------------------------------------- | ---------------------------------------- |
| single_object | "a circle"                                | a circle is present                      |
| colors        | "a red circle"                            | a red circle is present                  |
| counting      | "three triangles", "two green squares"    | exactly n of that (colored) shape        |
| two_objects   | "a circle and a square"                   | both shapes present                      |
| color_attr    | "a red circle and a blue square"          | both colored shapes present              |
| position      | "a red circle to the left of a blue square" | both present, and the relation holds   |

Every caption is generated from a `Prompt`, and `parse_prompt` inverts the mapping exactly (the prompt space is
small enough to enumerate), so any reward can recover the structure from the text alone.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.22),
    "blue": (0.15, 0.32, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.62, 0.18, 0.85),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND = (0.06, 0.06, 0.08)
RELATIONS = ("to the left of", "to the right of", "above", "below")
CATEGORIES = ("single_object", "colors", "counting", "two_objects", "color_attr", "position")
NUMBERS = {2: "two", 3: "three", 4: "four"}

_TEMPLATES = {
    "single_object": (
        "a {0}",
        "one {0}",
        "a single {0}",
        "a picture of a {0}",
        "an image of a {0}",
        "a drawing of a {0}",
        "a {0} on a dark background",
        "there is a {0}",
    ),
    "colors": ("a {0}", "one {0}", "a single {0}", "a picture of a {0}"),
    "counting": ("{0}", "a picture of {0}", "exactly {0}"),
    "two_objects": (
        "a {0} and a {1}",
        "a picture of a {0} and a {1}",
        "one {0} and one {1}",
        "both a {0} and a {1}",
        "a {0} together with a {1}",
    ),
    "color_attr": ("a {0} and a {1}", "one {0} and one {1}"),
    "position": ("a {0} {2} a {1}", "a {0} is {2} a {1}"),
}


@dataclass(frozen=True)
class Obj:
    """One requested object: a shape, optionally a color, and how many."""

    shape: str
    color: str | None = None
    count: int = 1

    def noun(self) -> str:
        words = ([self.color] if self.color else []) + [self.shape + ("s" if self.count > 1 else "")]
        return " ".join(words)


@dataclass(frozen=True)
class Prompt:
    """A structured prompt: its caption, GenEval category, requested objects and relation (objects[0] to [1])."""

    text: str
    category: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "category": self.category,
            "objects": [{"shape": o.shape, "color": o.color, "count": o.count} for o in self.objects],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Prompt:
        return cls(d["text"], d["category"], tuple(Obj(**o) for o in d["objects"]), d.get("relation"))


def _prompts_of(category: str) -> list[Prompt]:
    out = []
    if category == "single_object":
        for s in SHAPES:
            out += [Prompt(t.format(s), category, (Obj(s),)) for t in _TEMPLATES[category]]
    elif category == "colors":
        for c, s in itertools.product(COLORS, SHAPES):
            out += [Prompt(t.format(f"{c} {s}"), category, (Obj(s, c),)) for t in _TEMPLATES[category]]
    elif category == "counting":
        for n, s, c in itertools.product(NUMBERS, SHAPES, (None, *COLORS)):
            o = Obj(s, c, n)
            out += [Prompt(t.format(f"{NUMBERS[n]} {o.noun()}"), category, (o,)) for t in _TEMPLATES[category]]
    elif category == "two_objects":
        for s1, s2 in itertools.permutations(SHAPES, 2):
            out += [Prompt(t.format(s1, s2), category, (Obj(s1), Obj(s2))) for t in _TEMPLATES[category]]
    elif category == "color_attr":
        for (s1, s2), (c1, c2) in itertools.product(
            itertools.permutations(SHAPES, 2), itertools.permutations(COLORS, 2)
        ):
            a, b = Obj(s1, c1), Obj(s2, c2)
            out += [Prompt(t.format(a.noun(), b.noun()), category, (a, b)) for t in _TEMPLATES[category]]
    elif category == "position":
        for (a, b), rel in itertools.product(
            itertools.permutations([Obj(s, c) for c, s in itertools.product(COLORS, SHAPES)], 2), RELATIONS
        ):
            out += [Prompt(t.format(a.noun(), b.noun(), rel), category, (a, b), rel) for t in _TEMPLATES[category]]
    else:
        raise ValueError(f"`category` must be one of {CATEGORIES}, got {category!r}")
    return out


@functools.lru_cache(maxsize=1)
def all_prompts() -> dict[str, Prompt]:
    """Every caption of the world, keyed by its normalized text."""
    table: dict[str, Prompt] = {}
    for cat in CATEGORIES:
        for p in _prompts_of(cat):
            key = normalize(p.text)
            if key in table:
                raise AssertionError(f"caption {p.text!r} is ambiguous")
            table[key] = p
    return table


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def parse_prompt(text: str) -> Prompt:
    """The structured prompt of a world caption; `ValueError` for text outside the world's language."""
    p = all_prompts().get(normalize(text))
    if p is None:
        raise ValueError(f"prompt {text!r} is not a shapes-world caption (e.g. 'two red circles')")
    return p


def split_of(text: str, test_fraction: float = 1 / 3) -> str:
    """`"train"` or `"test"`, a fixed function of the caption (no prompt is in both splits)."""
    h = int(hashlib.sha1(normalize(text).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


def prompt_split(split: str) -> dict[str, list[Prompt]]:
    """Prompts of one split (`"train"` or `"test"`), grouped by category."""
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}")
    out: dict[str, list[Prompt]] = {c: [] for c in CATEGORIES}
    for p in all_prompts().values():
        if split_of(p.text) == split:
            out[p.category].append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Placed:
    """An object placed in a scene: shape, color, center (x right, y down, pixels) and radius."""

    shape: str
    color: str
    x: float
    y: float
    r: float


def _relation_holds(a: Placed, b: Placed, relation: str, margin: float) -> bool:
    dx, dy = b.x - a.x, b.y - a.y
    return {
        "to the left of": dx > margin,
        "to the right of": -dx > margin,
        "above": dy > margin,
        "below": -dy > margin,
    }[relation]


def sample_scene(prompt: Prompt, rng: np.random.Generator, max_tries: int = 200) -> list[Placed]:
    """A random scene that satisfies `prompt`: exactly the requested objects, none overlapping."""
    wanted = []
    for o in prompt.objects:
        for _ in range(o.count):
            wanted.append((o.shape, o.color or str(rng.choice(list(COLORS)))))
    r_max = {1: 5.5, 2: 5.0, 3: 4.5}.get(len(wanted), 4.0)
    for _ in range(max_tries):
        placed: list[Placed] = []
        for shape, color in wanted:
            for _ in range(50):
                r = float(rng.uniform(3.2, r_max))
                x, y = rng.uniform(r + 1, SIZE - r - 1, size=2)
                cand = Placed(shape, color, float(x), float(y), r)
                if all(np.hypot(cand.x - p.x, cand.y - p.y) >= cand.r + p.r + 2 for p in placed):
                    placed.append(cand)
                    break
            else:
                break
        else:
            if prompt.relation is None or _relation_holds(placed[0], placed[1], prompt.relation, margin=6):
                return placed
    raise RuntimeError(f"could not place the objects of {prompt.text!r} in {max_tries} tries")


def _coverage(shape: str, x: float, y: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xs - x) ** 2 + (ys - y) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(xs - x) <= h) & (np.abs(ys - y) <= h)
    if shape == "triangle":  # pointing up, inscribed in the circle of radius r*1.15
        top, base, half = y - r * 1.05, y + r * 0.85, r * 1.1
        t = (ys - top) / (base - top)
        return (t >= 0) & (t <= 1) & (np.abs(xs - x) <= half * t)
    raise ValueError(f"`shape` must be one of {SHAPES}, got {shape!r}")


def render(scene: list[Placed], supersample: int = 4) -> np.ndarray:
    """Render a scene to a float32 `[3, 32, 32]` array in [0, 1] (anti-aliased by supersampling)."""
    n = SIZE * supersample
    coords = (np.arange(n) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for p in scene:
        img[_coverage(p.shape, p.x, p.y, p.r, xs, ys)] = COLORS[p.color]
    img = img.reshape(SIZE, supersample, SIZE, supersample, 3).mean(axis=(1, 3))
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def render_prompt(prompt: Prompt, rng: np.random.Generator) -> np.ndarray:
    return render(sample_scene(prompt, rng))
