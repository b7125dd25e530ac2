"""Prompt sets: our JSONL format and loaders for the published ones.

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

Loaders for published files keep going past bad rows: each malformed row becomes a `LoadIssue` with its row number,
and the set records the file's path and sha256 so a run says which copy it used:

- UniGenBench CSVs (`index, prompt_en, sub_dims_en` or the `_zh` columns; short or long): themes, subthemes and
  test points are mapped to the canonical taxonomy (`taxonomy.py`), keys and labels are stripped of stray spaces.
- GenEval `evaluation_metadata.jsonl`: one test point per prompt, its task tag, with the line as its `spec`.
- The shapes world's held-out set (`assets/world/heldout.jsonl`): one test point per prompt, its category.
- PartiPrompts TSV (criterion = Challenge, theme = Category) and T2I-CompBench text files (criterion = the file's
  category): plain prompt lists, one test point spanning the whole prompt.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from visalign.benchmarks import taxonomy
from visalign.files import decode_text
from visalign.world.scenes import CATEGORIES as WORLD_CATEGORIES

logger = logging.getLogger(__name__)

FORMAT = "visalign-prompts"
FORMAT_VERSION = 1
BUILTIN_SETS = {
    "visalign-core": "prompts/visalign_core.jsonl",
    "world-heldout": "world/heldout.jsonl",
    "geneval": "prompts/geneval.jsonl",  # GenEval's evaluation_metadata.jsonl (MIT)
}
FORMATS = ("visalign", "unigenbench", "geneval", "world", "parti", "t2i-compbench")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")  # no "_": it separates prompt id and image id in file names


@dataclass(frozen=True)
class TestPoint:
    """One thing to check in an image: a criterion, the span of the prompt it concerns, an optional rule spec."""

    __test__ = False  # not a pytest class

    criterion: str
    span: str = ""
    spec: dict | None = None

    @property
    def primary(self) -> str:
        return taxonomy.primary_of(self.criterion)

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
            if not _ID.match(item.id):
                raise ValueError(f"prompt id {item.id!r} must match {_ID.pattern} (it names image files)")
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


def _read(path: str | Path) -> tuple[str, str]:
    """Text and sha256 of a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    data = path.read_bytes()
    return decode_text(data, path, "prompt file"), hashlib.sha256(data).hexdigest()


def _header(path: str | Path, number: int, line: str) -> dict:
    """The JSON object on the header line `number` of `path`; `ValueError` naming the file and line otherwise."""
    try:
        header = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number} (the header) is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: line {number} (the header) must be a JSON object, got a {type(header).__name__}")
    return header


def _stripped(d: dict) -> dict:
    return {k.strip() if isinstance(k, str) else k: v.strip() if isinstance(v, str) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------------
# Our format


def load_visalign_jsonl(path: str | Path) -> PromptSet:
    """Load our JSONL format; any malformed line is an error naming its line number."""
    text, sha = _read(path)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {path} is empty")
    header = _header(path, *lines[0])
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
# UniGenBench

_UGB_KEYS = {  # our field -> (English key, Chinese key)
    "theme": ("Primary Categories", "一级垂类"),
    "subtheme": ("Secondary Categories", "二级垂类"),
    "subject": ("Subjects", "主体"),
    "sentence": ("Sentence Structure", "句式"),
    "test_points": ("Testpoints", "考点"),
    "spans": ("Testpoint Description", "考点对应描述"),
}


def load_unigenbench_csv(path: str | Path, name: str | None = None) -> PromptSet:
    """Load a UniGenBench test CSV (`index, prompt_en, sub_dims_en`, or the `_zh` columns).

    Rows whose `sub_dims` JSON does not parse, whose test points and descriptions differ in length, or that lack a
    prompt are skipped and reported as issues; unknown theme, subtheme, sentence or criterion labels are kept as
    given and reported.
    """
    text, sha = _read(path)
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    lang = "zh" if "prompt_zh" in columns else "en"
    if f"prompt_{lang}" not in columns or f"sub_dims_{lang}" not in columns or "index" not in columns:
        raise ValueError(f"{path}: expected columns index, prompt_en|zh, sub_dims_en|zh; got {columns}")
    keys = {field_: pair[lang == "zh"] for field_, pair in _UGB_KEYS.items()}
    items, issues, seen = [], [], set()
    for row_number, raw in enumerate(reader, 1):
        row = _stripped(raw)
        where = f"index {row.get('index')!r}"
        try:
            dims = json.loads(row[f"sub_dims_{lang}"] or "")
        except json.JSONDecodeError as e:
            issues.append(LoadIssue(row_number, f"{where}: sub_dims is not valid JSON ({e}); row skipped"))
            continue
        if not isinstance(dims, dict):
            issues.append(LoadIssue(row_number, f"{where}: sub_dims is not a JSON object; row skipped"))
            continue
        dims = _stripped(dims)
        criteria, spans = dims.get(keys["test_points"]), dims.get(keys["spans"])
        if not row.get(f"prompt_{lang}") or not _ID.match(row.get("index") or "") or row["index"] in seen:
            issues.append(LoadIssue(row_number, f"{where}: no prompt, or a missing, odd or repeated index; skipped"))
            continue
        if not isinstance(criteria, list) or not isinstance(spans, list) or len(criteria) != len(spans):
            issues.append(LoadIssue(row_number, f"{where}: test points and descriptions differ; row skipped"))
            continue
        tps = []
        for label, span in zip(criteria, spans):
            criterion = taxonomy.canonical_criterion(str(label))
            if criterion is None:
                issues.append(LoadIssue(row_number, f"{where}: unknown test point {label!r} kept as given"))
            tps.append(TestPoint(criterion or str(label).strip(), str(span).strip().strip('"')))
        theme_label, sub_label = str(dims.get(keys["theme"], "")), str(dims.get(keys["subtheme"], ""))
        theme = taxonomy.canonical_theme(theme_label)
        subtheme = taxonomy.canonical_subtheme(theme, sub_label) if theme else None
        if theme is None or subtheme is None:
            issues.append(LoadIssue(row_number, f"{where}: unknown theme/subtheme {theme_label!r}/{sub_label!r}"))
        sentence = str(dims.get(keys["sentence"], ""))
        extras = {
            "lang": lang,
            "subject": dims.get(keys["subject"], ""),
            "sentence": taxonomy.canonical_sentence(sentence) or sentence,
        }
        seen.add(row["index"])
        items.append(
            PromptItem(
                row["index"],
                row[f"prompt_{lang}"],
                theme or theme_label,
                subtheme or sub_label,
                tuple(tps),
                extras=extras,
            )
        )
    if not items:
        raise ValueError(f"{path}: no valid rows ({len(issues)} issues, first: {issues[0] if issues else '-'})")
    for issue in issues:
        logger.warning("%s: %s", path, issue)
    return PromptSet(
        name or f"unigenbench-{Path(path).stem}",
        items,
        "",
        "CC-BY-4.0 (UniGenBench, Tencent)",
        str(path),
        sha,
        taxonomy.PRIMARY_CRITERIA,
        issues,
        {"lang": lang},
    )


# ---------------------------------------------------------------------------------------------------------------
# GenEval and the shapes world

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def load_geneval_jsonl(path: str | Path, name: str | None = None) -> PromptSet:
    """Load GenEval's `evaluation_metadata.jsonl`: prompt `i` gets id `{i:05d}` (GenEval's folder names)."""
    text, sha = _read(path)
    items, issues = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            spec = {"tag": d["tag"], "include": d["include"]} | ({"exclude": d["exclude"]} if "exclude" in d else {})
            tp = TestPoint(d["tag"], d["prompt"], spec)
            items.append(PromptItem(f"{len(items):05d}", d["prompt"], test_points=(tp,)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            issues.append(LoadIssue(n, f"not a GenEval metadata line ({type(e).__name__}: {e}); skipped"))
    if not items:
        raise ValueError(f"{path}: no valid GenEval lines")
    present = {tp.criterion for it in items for tp in it.test_points}
    return PromptSet(
        name or "geneval",
        items,
        "",
        "MIT (GenEval)",
        str(path),
        sha,
        tuple(t for t in GENEVAL_TAGS if t in present),
        issues,
    )


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


def load_world_heldout(path: str | Path | None = None) -> PromptSet:
    """The shapes world's held-out set (the shipped one by default) as a prompt set.

    Each prompt's test point is its category (GenEval's six tasks); `extras["world"]` keeps the structured prompt
    for the world verifier and `spec` the same prompt as a GenEval clause for rule judges.
    """
    path = (
        Path(path)
        if path is not None
        else Path(str(resources.files("visalign.assets") / BUILTIN_SETS["world-heldout"]))
    )
    text, sha = _read(path)
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"prompt file {path} is empty")
    header = _header(path, 1, lines[0])
    items, issues = [], []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            spec = world_spec(d)
            tp = TestPoint(d["category"], d["text"], spec)
            items.append(
                PromptItem(
                    f"world-{len(items):03d}", d["text"], "Shapes World", d["category"], (tp,), extras={"world": d}
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            issues.append(LoadIssue(n, f"not a world prompt ({type(e).__name__}: {e}); skipped"))
    present = {it.subtheme for it in items}
    return PromptSet(
        header.get("name", "shapes-world-heldout"),
        items,
        str(header.get("version", "")),
        header.get("license", ""),
        str(path),
        sha,
        tuple(c for c in WORLD_CATEGORIES if c in present),
        issues,
        {"protocol": header.get("protocol", "")},
    )


# ---------------------------------------------------------------------------------------------------------------
# Plain prompt lists


def load_parti_tsv(path: str | Path, name: str | None = None) -> PromptSet:
    """PartiPrompts (`Prompt, Category, Challenge, Note`): theme = Category, one test point = Challenge."""
    text, sha = _read(path)
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    items, issues = [], []
    for n, raw in enumerate(reader, 1):
        row = _stripped(raw)
        if not row.get("Prompt"):
            issues.append(LoadIssue(n, "no Prompt; skipped"))
            continue
        tp = TestPoint(row.get("Challenge") or "Prompt", row["Prompt"])
        items.append(
            PromptItem(
                f"{len(items):04d}",
                row["Prompt"],
                row.get("Category") or "",
                "",
                (tp,),
                extras={"note": row["Note"]} if row.get("Note") else {},
            )
        )
    if not items:
        raise ValueError(f"{path}: no prompts (expected a TSV with a Prompt column)")
    return PromptSet(name or "partiprompts", items, "", "Apache-2.0 (PartiPrompts)", str(path), sha, issues=issues)


def load_t2i_compbench_txt(path: str | Path, category: str | None = None) -> PromptSet:
    """A T2I-CompBench prompt file (one prompt a line); the category defaults to the file name without `_val`."""
    text, sha = _read(path)
    category = category or re.sub(r"_(val|train)$", "", Path(path).stem)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    items = [PromptItem(f"{i:04d}", p, test_points=(TestPoint(category, p),)) for i, p in enumerate(prompts)]
    return PromptSet(f"t2i-compbench-{Path(path).stem}", items, "", "MIT (T2I-CompBench)", str(path), sha)


# ---------------------------------------------------------------------------------------------------------------


def _guess_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "unigenbench"
    if suffix == ".tsv":
        return "parti"
    if suffix == ".txt":
        return "t2i-compbench"
    if suffix == ".jsonl":
        head = decode_text(path.read_bytes(), path, "prompt file").splitlines()[:2] + ["{}", "{}"]
        try:
            first, second = (json.loads(line or "{}") for line in head[:2])
        except json.JSONDecodeError:
            first = second = {}
        first, second = (d if isinstance(d, dict) else {} for d in (first, second))
        if first.get("format") == FORMAT:
            return "visalign"
        if "tag" in first and "include" in first:
            return "geneval"
        if "category" in second and "objects" in second:
            return "world"
    raise ValueError(f"cannot tell the format of {path}; pass `format` (one of {', '.join(FORMATS)})")


def load_prompt_set(name_or_path: str | Path, format: str | None = None) -> PromptSet:
    """A built-in set by name (`visalign-core`, `world-heldout`, `geneval`) or a file in one of `FORMATS` (guessed
    if None)."""
    if str(name_or_path) in BUILTIN_SETS:
        path = Path(str(resources.files("visalign.assets") / BUILTIN_SETS[str(name_or_path)]))
        builtin = {"world-heldout": load_world_heldout, "geneval": load_geneval_jsonl}
        return builtin.get(str(name_or_path), load_visalign_jsonl)(path)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`name_or_path` {str(name_or_path)!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a file"
        )
    if format is not None and format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}")
    loader = {
        "visalign": load_visalign_jsonl,
        "unigenbench": load_unigenbench_csv,
        "geneval": load_geneval_jsonl,
        "world": load_world_heldout,
        "parti": load_parti_tsv,
        "t2i-compbench": load_t2i_compbench_txt,
    }
    return loader[format or _guess_format(path)](path)
