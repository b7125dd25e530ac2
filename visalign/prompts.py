"""Prompt sets: the one registry of prompt-set formats and built-in sets, our JSONL format, and the training sampler.

    prompt_set = load_prompt_set("world:heldout")        # a built-in set, or a file in a registered format
    texts = load_prompts("configs/my_prompts.txt")       # what a trainer's `prompts` field names, as strings
    sampler = PromptSampler(texts, seed=0)                # the prompts of each training iteration, resumable

Trainers and benchmarks read prompts through this module only. `PROMPT_FORMATS` maps a format name to its loader
(an import string, `"module:function"`, so the core imports no upper layer) and the file suffixes it reads, with an
optional detector where formats share a suffix; adding a format is one entry there. `BUILTIN_SETS` names the sets
that ship with visalign; the shapes world's sets are spelled `world:<name>` like its models (`world:sd`).

Our format (`visalign-prompts`, version 1) is JSON Lines. The first line is the set's header, every other line a
prompt:

    {"format": "visalign-prompts", "format_version": 1, "name": "visalign-core", "version": "1",
     "license": "Apache-2.0", "source": "...", "primary_criteria": ["Style", ...]}
    {"id": "core-001", "text": "three red apples on a blue plate", "theme": "Art", "subtheme": "Graphic Art",
     "test_points": [{"criterion": "Attribute - Quantity", "span": "three red apples"}]}

A test point is a criterion name plus the span of the prompt it concerns; it may carry a `spec` (a GenEval-style
`{"include": [...], "exclude": [...]}` clause) that rule judges can check. A prompt may carry a prompt-level `spec`
and free-form `extras`. Ids must be usable in file names (`{prompt_id}_{image_id}.png`). `primary_criteria` lists the
criteria whose mean is the set's Overall score; a primary criterion is the text before `" - "` of a criterion name.
Every loaded set records its file's path and sha256, so a run says which copy it used.

Formats read here: ours; the shapes world's (`assets/world/heldout.jsonl`: a header, then one structured world
prompt a line; one test point per prompt, its category); plain text (one prompt a line). The published benchmark
formats (UniGenBench CSV, GenEval metadata, PartiPrompts TSV, T2I-CompBench text) are parsed in
`visalign.benchmarks.prompts` and registered here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from visalign.files import decode_text
from visalign.world.scenes import CATEGORIES as WORLD_CATEGORIES
from visalign.world.scenes import prompt_split

FORMAT = "visalign-prompts"
FORMAT_VERSION = 1
PROMPT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")  # no "_": it separates prompt id and image id in file names


def primary_of(criterion: str) -> str:
    """The primary criterion: the text before `" - "` (stripped), or the criterion itself."""
    return criterion.split(" - ", 1)[0].strip()


@dataclass(frozen=True)
class TestPoint:
    """One thing to check in an image: a criterion, the span of the prompt it concerns, an optional rule spec."""

    __test__ = False  # not a pytest class

    criterion: str
    span: str = ""
    spec: dict | None = None

    @property
    def primary(self) -> str:
        return primary_of(self.criterion)

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "span": self.span} | ({"spec": self.spec} if self.spec else {})


@dataclass(frozen=True)
class PromptItem:
    """A prompt with its theme, subtheme and test points (and an optional prompt-level rule `spec`)."""

    id: str
    text: str
    theme: str = ""
    subtheme: str = ""
    test_points: tuple[TestPoint, ...] = ()
    spec: dict | None = None
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "theme": self.theme,
            "subtheme": self.subtheme,
            "test_points": [tp.to_dict() for tp in self.test_points],
        }
        return d | ({"spec": self.spec} if self.spec else {}) | ({"extras": self.extras} if self.extras else {})


@dataclass(frozen=True)
class LoadIssue:
    """A row a loader skipped or changed: `row` is the 1-based data row (CSV record or JSONL line)."""

    row: int
    message: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.message}"


@dataclass
class PromptSet:
    """Prompts plus set-level metadata: which copy of which file was loaded, and what Overall averages."""

    name: str
    items: list[PromptItem]
    version: str = ""
    license: str = ""
    source: str = ""
    sha256: str = ""
    primary_criteria: tuple[str, ...] = ()
    issues: list[LoadIssue] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.items:
            raise ValueError(f"prompt set {self.name!r} has no prompts (`items` is empty)")
        seen: set[str] = set()
        for item in self.items:
            if not PROMPT_ID.match(item.id):
                raise ValueError(f"prompt id {item.id!r} must match {PROMPT_ID.pattern} (it names image files)")
            if item.id in seen:
                raise ValueError(f"prompt id {item.id!r} appears twice in set {self.name!r}")
            seen.add(item.id)
        if not self.primary_criteria:
            self.primary_criteria = tuple(dict.fromkeys(tp.primary for it in self.items for tp in it.test_points))

    def __len__(self) -> int:
        return len(self.items)

    def record(self) -> dict:
        """What a run record keeps about the set."""
        return {
            "name": self.name,
            "version": self.version,
            "license": self.license,
            "source": self.source,
            "sha256": self.sha256,
            "prompts": len(self.items),
            "primary_criteria": list(self.primary_criteria),
            "issues": [str(i) for i in self.issues],
        }

    def limit(self, n: int | None) -> PromptSet:
        """The first `n` prompts (all when `n` is None), same metadata."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"`n` must be positive, got {n}")
        return dataclasses.replace(self, items=self.items[:n])


def read_prompt_file(path: str | Path) -> tuple[str, str]:
    """Text and sha256 of a prompt file; `FileNotFoundError` or `BadFileError` (not UTF-8) naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    data = path.read_bytes()
    return decode_text(data, path, "prompt file"), hashlib.sha256(data).hexdigest()


def header_line(path: str | Path, number: int, line: str) -> dict:
    """The JSON object on the header line `number` of `path`; `ValueError` naming the file and line otherwise."""
    try:
        header = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number} (the header) is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: line {number} (the header) must be a JSON object, got a {type(header).__name__}")
    return header


# ---------------------------------------------------------------------------------------------------------------
# Our format


def load_visalign_jsonl(path: str | Path) -> PromptSet:
    """Load our JSONL format; any malformed line is an error naming its line number."""
    text, sha = read_prompt_file(path)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} is empty")
    header = header_line(path, *lines[0])
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: the header must have format {FORMAT!r} and format_version {FORMAT_VERSION}")
    items = []
    for n, line in lines[1:]:
        try:
            d = json.loads(line)
            tps = tuple(TestPoint(tp["criterion"], tp.get("span", ""), tp.get("spec")) for tp in d["test_points"])
            items.append(
                PromptItem(
                    str(d["id"]),
                    d["text"],
                    d.get("theme", ""),
                    d.get("subtheme", ""),
                    tps,
                    d.get("spec"),
                    d.get("extras", {}),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: line {n} is not a valid prompt ({type(e).__name__}: {e})") from None
    known = {"format", "format_version", "name", "version", "license", "source", "primary_criteria"}
    return PromptSet(
        header.get("name", Path(path).stem),
        items,
        str(header.get("version", "")),
        header.get("license", ""),
        str(path),
        sha,
        tuple(header.get("primary_criteria", ())),
        metadata={k: v for k, v in header.items() if k not in known},
    )


def write_prompt_set(prompt_set: PromptSet, path: str | Path) -> Path:
    """Write `prompt_set` in our JSONL format (the source file's path and hash go into the header)."""
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": prompt_set.name,
        "version": prompt_set.version,
        "license": prompt_set.license,
        "primary_criteria": list(prompt_set.primary_criteria),
        "converted_from": {"source": prompt_set.source, "sha256": prompt_set.sha256},
    } | prompt_set.metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [item.to_dict() for item in prompt_set.items]
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Plain text and the shapes world


def load_text(path: str | Path, category: str | None = None) -> PromptSet:
    """One prompt a line (blank lines skipped, spaces stripped). Each prompt gets one test point spanning it, whose
    criterion is `category`, by default the file name without a `_val`/`_train` ending (T2I-CompBench's rule)."""
    text, sha = read_prompt_file(path)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt")
    category = category or re.sub(r"_(val|train)$", "", Path(path).stem)
    items = [PromptItem(f"{i:04d}", p, test_points=(TestPoint(category, p),)) for i, p in enumerate(prompts)]
    return PromptSet(Path(path).stem, items, source=str(path), sha256=sha)


_WORLD_RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}


def world_spec(prompt: dict) -> dict:
    """The GenEval-style spec of a shapes-world prompt dict (`{"text", "category", "objects", "relation"}`).

    GenEval puts the relation on the second object relative to the first; the world's relation is the first object's
    relative to the second, so the object order is swapped.
    """
    objs = [
        {"class": o["shape"], "count": o["count"]} | ({"color": o["color"]} if o["color"] else {})
        for o in prompt["objects"]
    ]
    spec: dict[str, Any] = {"tag": prompt["category"]}
    if prompt.get("relation"):
        spec["include"] = [objs[1], objs[0] | {"position": [_WORLD_RELATIONS[prompt["relation"]], 0]}]
    else:
        spec["include"] = objs
    if prompt["category"] == "counting":
        spec["exclude"] = [{"class": o["class"], "count": o["count"] + 1} for o in objs]
    return spec


def _world_item(prompt: dict, index: int) -> PromptItem:
    """A structured world prompt as an item: test point = its category, `extras["world"]` = the prompt itself."""
    point = TestPoint(prompt["category"], prompt["text"], world_spec(prompt))
    return PromptItem(
        f"world-{index:03d}", prompt["text"], "Shapes World", prompt["category"], (point,), extras={"world": prompt}
    )


def _world_criteria(items: list[PromptItem]) -> tuple[str, ...]:
    present = {it.subtheme for it in items}
    return tuple(c for c in WORLD_CATEGORIES if c in present)


def load_world_jsonl(path: str | Path) -> PromptSet:
    """A shapes-world prompt file (the held-out set's layout: a header line, then one world prompt a line).

    Each prompt's test point is its category (GenEval's six tasks); `extras["world"]` keeps the structured prompt
    for the world verifier and `spec` the same prompt as a GenEval clause for rule judges.
    """
    text, sha = read_prompt_file(path)
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"prompt file {path} is empty")
    header = header_line(path, 1, lines[0])
    items, issues = [], []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            items.append(_world_item(json.loads(line), len(items)))
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            issues.append(LoadIssue(n, f"not a world prompt ({type(e).__name__}: {e}); skipped"))
    return PromptSet(
        header.get("name", "shapes-world-heldout"),
        items,
        str(header.get("version", "")),
        header.get("license", ""),
        str(path),
        sha,
        _world_criteria(items),
        issues,
        {"protocol": header.get("protocol", "")},
    )


def world_split_set(split: str, balanced: bool = False) -> PromptSet:
    """Every prompt of the shapes world's `train` or `test` split (built from its grammar), category by category.

    `balanced` repeats each category's prompts `round(largest / size)` times, so that a uniform draw (as
    `PromptSampler` makes) picks each category about equally often, as GenEval weighs its six tasks; unbalanced, the
    train split is 78% position prompts (1,657 of 2,125).
    """
    groups = [group for group in prompt_split(split).values() if group]
    largest = max(len(group) for group in groups)
    prompts = [p.to_dict() for group in groups for p in group * (round(largest / len(group)) if balanced else 1)]
    items = [_world_item(p, i) for i, p in enumerate(prompts)]
    name = f"world:{split}" + ("-balanced" if balanced else "")
    return PromptSet(f"shapes-world-{split}", items, "1", "Apache-2.0", name, "", _world_criteria(items))


# ---------------------------------------------------------------------------------------------------------------
# The registry


def _json_object(line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class PromptFormat:
    """A prompt-set format: its loader (`"module:function"`, path -> `PromptSet`), the file suffixes it reads, and,
    where formats share a suffix, a detector given the file's first two non-empty lines."""

    loader: str
    suffixes: tuple[str, ...]
    detect: Callable[[list[str]], bool] | None = None


PROMPT_FORMATS: dict[str, PromptFormat] = {  # guessing tries these in order
    "visalign": PromptFormat(
        "visalign.prompts:load_visalign_jsonl", (".jsonl",), lambda head: _json_object(head[0]).get("format") == FORMAT
    ),
    "world": PromptFormat(
        "visalign.prompts:load_world_jsonl",
        (".jsonl",),
        lambda head: {"category", "objects"} <= _json_object(head[1]).keys(),
    ),
    "geneval": PromptFormat(
        "visalign.benchmarks.prompts:load_geneval_jsonl",
        (".jsonl",),
        lambda head: {"tag", "include"} <= _json_object(head[0]).keys(),
    ),
    "text": PromptFormat("visalign.prompts:load_text", (".txt",)),
    "t2i-compbench": PromptFormat("visalign.benchmarks.prompts:load_t2i_compbench_txt", (".txt",)),  # never guessed
    "unigenbench": PromptFormat("visalign.benchmarks.prompts:load_unigenbench_csv", (".csv",)),
    "parti": PromptFormat("visalign.benchmarks.prompts:load_parti_tsv", (".tsv",)),
}
FORMATS = tuple(PROMPT_FORMATS)


def _asset(relative: str, format: str) -> PromptSet:
    return load_prompt_file(Path(str(resources.files("visalign.assets") / relative)), format)


BUILTIN_SETS: dict[str, Callable[[], PromptSet]] = {
    "visalign-core": partial(_asset, "prompts/visalign_core.jsonl", "visalign"),
    "geneval": partial(_asset, "prompts/geneval.jsonl", "geneval"),  # GenEval's evaluation_metadata.jsonl (MIT)
    "world:heldout": partial(_asset, "world/heldout.jsonl", "world"),  # the world's evaluation set (test split)
    "world:train": partial(world_split_set, "train"),
    "world:train-balanced": partial(world_split_set, "train", balanced=True),  # each category equally often
    "world:test": partial(world_split_set, "test"),
}
RENAMED_SETS = {"world-heldout": "world:heldout"}  # old spellings: an error naming the new one, never an alias


def guess_format(path: str | Path) -> str:
    """The first registered format that reads `path`'s suffix and whose detector (if any) accepts its first lines."""
    path = Path(path)
    candidates = [name for name, f in PROMPT_FORMATS.items() if path.suffix.lower() in f.suffixes]
    head = ["", ""]
    if any(PROMPT_FORMATS[name].detect for name in candidates):
        text, _ = read_prompt_file(path)
        head = ([line for line in text.splitlines() if line.strip()] + ["", ""])[:2]
    for name in candidates:
        detect = PROMPT_FORMATS[name].detect
        if detect is None or detect(head):
            return name
    readable = ", ".join(f"{name} ({'/'.join(f.suffixes)})" for name, f in PROMPT_FORMATS.items())
    raise ValueError(f"cannot tell the format of {path}; pass `format` (one of {readable})")


def load_prompt_file(path: str | Path, format: str | None = None) -> PromptSet:
    """A prompt file in the registered `format` (guessed from its suffix and first lines when None)."""
    if format is not None and format not in PROMPT_FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}")
    module, _, name = PROMPT_FORMATS[format or guess_format(path)].loader.partition(":")
    return getattr(importlib.import_module(module), name)(path)


def load_prompt_set(name_or_path: str | Path, format: str | None = None) -> PromptSet:
    """A built-in set by name (`BUILTIN_SETS`: `visalign-core`, `geneval`, `world:heldout`, `world:train`,
    `world:train-balanced`, `world:test`) or a file in one of `FORMATS` (guessed when `format` is None)."""
    name = str(name_or_path)
    if name in BUILTIN_SETS:
        if format is not None:
            raise ValueError(f"`format` is for prompt files; {name!r} is a built-in set")
        return BUILTIN_SETS[name]()
    if not Path(name).is_file():  # a renamed set, an unknown world set, or a missing file
        problem = prompt_set_problem(name)
        error = FileNotFoundError if problem.startswith("no such file") else ValueError
        raise error(f"`name_or_path` {name!r}: {problem}")
    return load_prompt_file(name_or_path, format)


def prompt_set_problem(name_or_path: str) -> str | None:
    """Why `name_or_path` names no prompt set (without reading the file), or None."""
    if name_or_path in BUILTIN_SETS:
        return None
    if name_or_path in RENAMED_SETS and not Path(name_or_path).is_file():
        return f"the built-in set is now called {RENAMED_SETS[name_or_path]!r}"
    if name_or_path.startswith("world:") and not Path(name_or_path).is_file():
        return f"the world's prompt sets are {', '.join(n for n in BUILTIN_SETS if n.startswith('world:'))}"
    path = Path(name_or_path)
    if not path.is_file():
        return "no such file, and not a built-in set (such as visalign-core or world:train)"
    if not any(path.suffix.lower() in f.suffixes for f in PROMPT_FORMATS.values()):
        readable = ", ".join(f"{name} ({'/'.join(f.suffixes)})" for name, f in PROMPT_FORMATS.items())
        return f"visalign reads prompt files by their suffix, and {path.suffix or 'no suffix'} is none of: {readable}"
    return None


def load_prompts(spec: str) -> list[str]:
    """The prompt texts a config names: a built-in set (`world:train`, `world:heldout`, ...) or a prompt file
    (plain text with one prompt a line, or any registered format)."""
    return [item.text for item in load_prompt_set(spec).items]


# ---------------------------------------------------------------------------------------------------------------
# Training prompts


class PromptSampler:
    """The prompts of each training iteration, drawn from `Generator(seed, iteration)`: deterministic and resumable.

    `draw(n)` returns `n` prompts in a fresh random order (without replacement while `n <= len(prompts)`, then
    cycling the same permutation). Its state is the iteration count.
    """

    def __init__(self, prompts: Sequence[str], seed: int):
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("`prompts` must be a non-empty list of strings")
        self.prompts = list(prompts)
        self.seed = seed
        self.iteration = 0

    def draw(self, n: int) -> list[str]:
        from visalign.generators.rollout import seeded_generators  # the generator layer imports diffusers

        generator = seeded_generators([(self.seed, 0x5EED, self.iteration)])[0]
        order = torch.randperm(len(self.prompts), generator=generator)
        order = order.repeat(math.ceil(n / len(self.prompts)))[:n]
        self.iteration += 1
        return [self.prompts[i] for i in order.tolist()]

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])
