"""Prompt sets of the published benchmarks, parsed into `visalign.prompts.PromptSet`s.

The prompt-set types, our JSONL format, the shapes world's sets and the one registry of formats and built-in sets
live in `visalign.prompts` (trainers and benchmarks share them); they are re-exported here for the benchmark code.
This module holds the parsers of the published formats, each registered in `visalign.prompts.PROMPT_FORMATS`.

Loaders for published files keep going past bad rows: each malformed row becomes a `LoadIssue` with its row number,
and the set records the file's path and sha256 so a run says which copy it used:

- UniGenBench CSVs (`index, prompt_en, sub_dims_en` or the `_zh` columns; short or long): themes, subthemes and
  test points are mapped to the canonical taxonomy (`taxonomy.py`), keys and labels are stripped of stray spaces.
- GenEval `evaluation_metadata.jsonl`: one test point per prompt, its task tag, with the line as its `spec`.
- PartiPrompts TSV (criterion = Challenge, theme = Category) and T2I-CompBench text files (criterion = the file's
  category): plain prompt lists, one test point spanning the whole prompt.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

from visalign.benchmarks import taxonomy
from visalign.prompts import (  # re-exported: the benchmark code's prompt-set vocabulary
    BUILTIN_SETS,
    FORMAT,
    FORMAT_VERSION,
    FORMATS,
    PROMPT_ID,
    LoadIssue,
    PromptItem,
    PromptSet,
    TestPoint,
    load_prompt_set,
    load_text,
    load_visalign_jsonl,
    load_world_jsonl,
    read_prompt_file,
    world_spec,
    write_prompt_set,
)

__all__ = [
    "BUILTIN_SETS",
    "FORMAT",
    "FORMAT_VERSION",
    "FORMATS",
    "GENEVAL_TAGS",
    "LoadIssue",
    "PromptItem",
    "PromptSet",
    "TestPoint",
    "load_geneval_jsonl",
    "load_parti_tsv",
    "load_prompt_set",
    "load_t2i_compbench_txt",
    "load_unigenbench_csv",
    "load_visalign_jsonl",
    "load_world_heldout",
    "world_spec",
    "write_prompt_set",
]

logger = logging.getLogger(__name__)


def _stripped(d: dict) -> dict:
    return {k.strip() if isinstance(k, str) else k: v.strip() if isinstance(v, str) else v for k, v in d.items()}


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
    text, sha = read_prompt_file(path)
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
        if not row.get(f"prompt_{lang}") or not PROMPT_ID.match(row.get("index") or "") or row["index"] in seen:
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
# GenEval

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def load_geneval_jsonl(path: str | Path, name: str | None = None) -> PromptSet:
    """Load GenEval's `evaluation_metadata.jsonl`: prompt `i` gets id `{i:05d}` (GenEval's folder names)."""
    text, sha = read_prompt_file(path)
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


def load_world_heldout(path: str | Path | None = None) -> PromptSet:
    """The shapes world's held-out set (`world:heldout`, the shipped file by default) or a file in its layout."""
    return load_prompt_set("world:heldout") if path is None else load_world_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------
# Plain prompt lists


def load_parti_tsv(path: str | Path, name: str | None = None) -> PromptSet:
    """PartiPrompts (`Prompt, Category, Challenge, Note`): theme = Category, one test point = Challenge."""
    text, sha = read_prompt_file(path)
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
    plain = load_text(path, category)
    return dataclasses.replace(plain, name=f"t2i-compbench-{Path(path).stem}", license="MIT (T2I-CompBench)")
