"""Aggregation, confidence intervals, comparisons, and the reports people read (Markdown, static HTML, SVG plots).

Scoring follows UniGenBench: every (image, test point) verdict is 0 or 1; a sub-criterion's accuracy is
correct / judged, pooled over all images; a primary criterion pools its sub-criteria; a theme or subtheme pools
every test point of its prompts. Overall is the unweighted mean of the set's primary criteria, reported only when
every primary criterion has at least one judgment (never a mean over the covered subset). Abstentions are left out
of the denominators and listed. Judge errors (failed judgments: an answer that does not parse after the retries) are
left out of the denominators by default (`errors="exclude"`), as UniGenBench's official `calculate_scores` does: it
skips a result row whose `result_json` does not parse, so its numbers match the leaderboard's; `errors="fail"` counts
them wrong. Whatever the policy, Overall is shown with the number of failed judgments and the strict Overall (failures
counted wrong) beside it, so a judge that fails more on hard images cannot inflate a score unnoticed.

Confidence intervals are percentile bootstraps over prompts (a prompt's images and test points stay together):
each replicate draws prompts with replacement, as multinomial weights, and recomputes every cell. Comparisons
(`compare`) use the same weights for both runs on their shared prompts (a paired bootstrap of the difference).

Per-image records (what `runner` writes to `verdicts.jsonl`, one line per image) look like
`{"prompt_id", "image_id", "theme", "subtheme", "test_points": [{"criterion", "passed", "status", "reason",
"judge"}, ...], ...}`.

`write_html_report(path, title, sections)` writes a self-contained HTML page (images embedded as base64 PNG, no
scripts); the bench report and `visalign demo` both use it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visalign.benchmarks.taxonomy import primary_of

KINDS = ("primary", "sub", "theme", "subtheme")


def _cells_of(record: dict, tp: dict) -> list[tuple[str, str]]:
    cells = [("primary", primary_of(tp["criterion"])), ("sub", tp["criterion"])]
    if record.get("theme"):
        cells.append(("theme", record["theme"]))
        if record.get("subtheme"):
            cells.append(("subtheme", f"{record['theme']} / {record['subtheme']}"))
    return cells


@dataclass
class _Table:
    """Per-prompt correct and judged counts for every cell, plus abstention and error counts."""

    prompts: list[str]
    cells: list[tuple[str, str]]
    correct: np.ndarray  # [prompts, cells]
    total: np.ndarray
    abstained: dict[tuple[str, str], int]
    errors: dict[tuple[str, str], int]


def _counts(tp: dict, errors: str) -> bool:
    """Whether a test-point verdict enters the accuracy (judged, or a judge error under `errors="fail"`)."""
    return tp["status"] == "ok" or (tp["status"] == "error" and errors == "fail")


def _tabulate(records: Sequence[dict], errors: str, prompts: Sequence[str] | None = None) -> _Table:
    if errors not in ("fail", "exclude"):
        raise ValueError(f"`errors` must be 'fail' or 'exclude', got {errors!r}")
    prompts = list(prompts) if prompts is not None else list(dict.fromkeys(r["prompt_id"] for r in records))
    row = {p: i for i, p in enumerate(prompts)}
    cells: dict[tuple[str, str], int] = {}
    entries, abstained, errs = [], {}, {}
    for r in records:
        if r["prompt_id"] not in row:
            continue
        for tp in r["test_points"]:
            for cell in _cells_of(r, tp):
                cells.setdefault(cell, len(cells))
                if tp["status"] == "abstain":
                    abstained[cell] = abstained.get(cell, 0) + 1
                elif tp["status"] == "error":
                    errs[cell] = errs.get(cell, 0) + 1
                if _counts(tp, errors):
                    entries.append((row[r["prompt_id"]], cells[cell], tp["passed"] is True))
    correct, total = np.zeros((len(prompts), len(cells))), np.zeros((len(prompts), len(cells)))
    for p, c, ok in entries:
        total[p, c] += 1
        correct[p, c] += ok
    return _Table(prompts, list(cells), correct, total, abstained, errs)


def _weights(n_prompts: int, reps: int, seed: int) -> np.ndarray:
    """`[reps, n_prompts]` multinomial counts: each replicate resamples the prompts with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=reps).astype(np.float64)


def _ratio(c: np.ndarray, t: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(t > 0, c / np.where(t > 0, t, 1), np.nan)


def _interval(samples: np.ndarray) -> list[float] | None:
    """The central 95% percentile interval of bootstrap replicates (NaN replicates ignored)."""
    samples = samples[~np.isnan(samples)]
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))] if len(samples) else None


def _overall(acc: dict[str, Any], primaries: Sequence[str]) -> Any:
    """Mean over `primaries` of per-primary accuracies (scalars or replicate arrays); None/NaN if one is missing."""
    values = [acc.get(p) for p in primaries]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _strict_overall(records: Sequence[dict], primary_criteria: Sequence[str]) -> float | None:
    """Overall with every failed judgment counted wrong (`errors="fail"`); None when a primary lacks judgments."""
    table = _tabulate(records, "fail")
    acc = _ratio(table.correct.sum(0), table.total.sum(0))
    primary = {cell[1]: float(a) for cell, a in zip(table.cells, acc) if cell[0] == "primary" and not np.isnan(a)}
    overall = _overall(primary, primary_criteria)
    return None if overall is None else float(overall)


def aggregate(
    records: Sequence[dict],
    primary_criteria: Sequence[str],
    *,
    errors: str = "exclude",
    bootstrap: int = 1000,
    seed: int = 0,
    missing_images: int = 0,
) -> dict:
    """The summary of per-image records: per primary, sub, theme and subtheme cell, coverage, errors, Overall.

    Each cell is `{"correct", "total", "accuracy", "ci", "abstained", "errors"}` (`accuracy` None when nothing was
    judged); `bootstrap` replicates (0 = no intervals) with generator `seed` give the 95% intervals.
    """
    table = _tabulate(records, errors)
    acc = _ratio(table.correct.sum(0), table.total.sum(0))
    boot = None
    if bootstrap > 0 and table.prompts:
        w = _weights(len(table.prompts), bootstrap, seed)
        boot = _ratio(w @ table.correct, w @ table.total)  # [reps, cells]
    summary: dict[str, Any] = {kind: {} for kind in KINDS}
    for j, cell in enumerate(table.cells):
        total = int(table.total[:, j].sum())
        summary[cell[0]][cell[1]] = {
            "correct": int(table.correct[:, j].sum()),
            "total": total,
            "accuracy": None if total == 0 else float(acc[j]),
            "ci": None if boot is None or total == 0 else _interval(boot[:, j]),
            "abstained": table.abstained.get(cell, 0),
            "errors": table.errors.get(cell, 0),
        }
    order = {p: i for i, p in enumerate(primary_criteria)}
    summary["primary"] = dict(sorted(summary["primary"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    summary["sub"] = dict(
        sorted(summary["sub"].items(), key=lambda kv: (order.get(primary_of(kv[0]), len(order)), kv[0]))
    )
    primary_acc = {p: c["accuracy"] for p, c in summary["primary"].items() if c["accuracy"] is not None}
    missing = [p for p in primary_criteria if p not in primary_acc]
    overall_ci = None
    if boot is not None and not missing:
        index = {cell: j for j, cell in enumerate(table.cells)}
        reps = _overall({p: boot[:, index[("primary", p)]] for p in primary_criteria}, primary_criteria)
        overall_ci = _interval(reps)
    tps = [tp for r in records for tp in r["test_points"]]
    summary["overall"] = {
        "accuracy": None if missing else float(_overall(primary_acc, primary_criteria)),
        "ci": overall_ci,
        "complete": not missing,
        "primary_criteria": list(primary_criteria),
        "missing": missing,
        "policy": errors,
        "failed": {
            "test_points": sum(tp["status"] == "error" for tp in tps),
            "images": sum(any(tp["status"] == "error" for tp in r["test_points"]) for r in records),
        },
        "strict": _strict_overall(records, primary_criteria),
    }
    counted = [[tp for tp in r["test_points"] if _counts(tp, errors)] for r in records]
    all_pass = [all(tp["passed"] is True for tp in tps_) for tps_ in counted if tps_]
    summary["images"] = {
        "judged": len(records),
        "missing": missing_images,
        "all_pass": float(np.mean(all_pass)) if all_pass else None,
    }
    counts = {s: sum(tp["status"] == s for tp in tps) for s in ("ok", "abstain", "error")}
    summary["coverage"] = {
        "test_points": len(tps),
        "judged": counts["ok"],
        "abstained": counts["abstain"],
        "errors": counts["error"],
        "not_covered": [name for name, c in summary["sub"].items() if c["total"] == 0],
    }
    summary["errors"] = {
        "policy": errors,
        "count": counts["error"],
        "examples": [
            f"{r['prompt_id']}_{r['image_id']} {tp['criterion']}: {tp['reason']}"
            for r in records
            for tp in r["test_points"]
            if tp["status"] == "error"
        ][:5],
    }
    summary["bootstrap"] = {"replicates": bootstrap, "seed": seed, "unit": "prompt", "level": 0.95}
    return summary


def compare(
    records_a: Sequence[dict],
    records_b: Sequence[dict],
    primary_criteria: Sequence[str],
    *,
    errors: str = "exclude",
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Per-cell accuracy of run A and run B on their shared prompts, the difference B - A, and its paired 95% CI."""
    shared = sorted({r["prompt_id"] for r in records_a} & {r["prompt_id"] for r in records_b})
    if not shared:
        raise ValueError("`records_a` and `records_b` share no prompt")
    ta, tb = _tabulate(records_a, errors, shared), _tabulate(records_b, errors, shared)
    cells = list(dict.fromkeys(ta.cells + tb.cells))
    w = _weights(len(shared), bootstrap, seed) if bootstrap > 0 else None

    def columns(t: _Table) -> tuple[np.ndarray, np.ndarray]:
        idx = {c: j for j, c in enumerate(t.cells)}
        pick = lambda m: np.stack([m[:, idx[c]] if c in idx else np.zeros(len(shared)) for c in cells], 1)  # noqa: E731
        return pick(t.correct), pick(t.total)

    (ca, na), (cb, nb) = columns(ta), columns(tb)
    acc_a, acc_b = _ratio(ca.sum(0), na.sum(0)), _ratio(cb.sum(0), nb.sum(0))
    boot_a = boot_b = None
    if w is not None:
        boot_a, boot_b = _ratio(w @ ca, w @ na), _ratio(w @ cb, w @ nb)
    out: dict[str, Any] = {kind: {} for kind in KINDS}
    for j, cell in enumerate(cells):
        a = None if np.isnan(acc_a[j]) else float(acc_a[j])
        b = None if np.isnan(acc_b[j]) else float(acc_b[j])
        delta = None if a is None or b is None else b - a
        ci = None if delta is None or w is None else _interval(boot_b[:, j] - boot_a[:, j])
        out[cell[0]][cell[1]] = {
            "a": a,
            "b": b,
            "delta": delta,
            "ci": ci,
            "n_a": int(na[:, j].sum()),
            "n_b": int(nb[:, j].sum()),
        }
    index = {c: j for j, c in enumerate(cells)}
    prim = [("primary", p) for p in primary_criteria]
    overall: dict[str, Any] = {"a": None, "b": None, "delta": None, "ci": None}
    if all(
        c in index and out["primary"][c[1]]["a"] is not None and out["primary"][c[1]]["b"] is not None for c in prim
    ):
        overall["a"] = float(np.mean([out["primary"][p]["a"] for p in primary_criteria]))
        overall["b"] = float(np.mean([out["primary"][p]["b"] for p in primary_criteria]))
        overall["delta"] = overall["b"] - overall["a"]
        if w is not None:
            diff = np.mean([boot_b[:, index[c]] - boot_a[:, index[c]] for c in prim], axis=0)
            overall["ci"] = _interval(diff)
    out["overall"] = overall | {"complete": overall["delta"] is not None, "primary_criteria": list(primary_criteria)}
    out["prompts"] = {
        "shared": len(shared),
        "only_a": len({r["prompt_id"] for r in records_a}) - len(shared),
        "only_b": len({r["prompt_id"] for r in records_b}) - len(shared),
    }
    out["bootstrap"] = {"replicates": bootstrap, "seed": seed, "unit": "prompt", "paired": True, "level": 0.95}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "–" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def summary_rows(cells: dict[str, dict]) -> list[list[str]]:
    """Rows `name, accuracy %, 95% CI, counted, abstained, errors` of a summary section."""
    return [
        [name, _pct(c["accuracy"]), _ci(c["ci"]), c["total"], c["abstained"], c["errors"]] for name, c in cells.items()
    ]


SUMMARY_HEADER = ("Criterion", "Accuracy (%)", "95% CI", "Counted", "Abstained", "Errors")
COUNTED_NOTE = "Counted: test-point verdicts in the accuracy (judge errors included when they count as failures)."


def overall_line(overall: dict) -> str:
    """Overall with its interval, the failed judgments and the strict Overall (failures counted wrong) beside it."""
    n = len(overall["primary_criteria"])
    if overall["complete"]:
        line = f"Overall (mean of {n} primary criteria): {_pct(overall['accuracy'])}% {_ci(overall['ci'])}"
    else:
        line = f"Overall: not reported; no judgment for primary criteria {', '.join(overall['missing'])}"
    failed = overall.get("failed")
    if failed is None:  # a summary written before failed judgments were reported
        return line
    how = "left out, as the official scorer does" if overall["policy"] == "exclude" else "counted wrong"
    strict = "–" if overall["strict"] is None else f"{_pct(overall['strict'])}%"
    return (
        f"{line} · failed judgments: {failed['test_points']} test points on {failed['images']} images ({how}) · "
        f"strict Overall (failures counted wrong): {strict}"
    )


def _worth_showing(summary: dict, kind: str) -> bool:
    """A table that is not empty and does not repeat the primary table (sets whose criteria are single-level)."""
    return bool(summary[kind]) and not (kind == "sub" and set(summary["sub"]) == set(summary["primary"]))


def _policy(summary: dict) -> str:
    return "counted as failures" if summary["errors"]["policy"] == "fail" else "excluded from the denominators"


def summary_markdown(summary: dict, title: str = "Benchmark results", record: dict | None = None) -> str:
    """Markdown: Overall, then tables per primary criterion, sub-criterion, theme and subtheme, then coverage."""
    parts = [f"# {title}", ""]
    if record:
        ps, judge = record.get("prompt_set", {}), record.get("judge", {})
        parts += [
            f"- Prompt set: {ps.get('name')} ({ps.get('prompts')} prompts, sha256 {ps.get('sha256', '')[:12]})",
            f"- Judge: {judge.get('name')} (fingerprint {judge.get('fingerprint')})",
            f"- Images: {record.get('model') or record.get('images_dir')}, {record.get('images_per_prompt')} "
            f"per prompt, seeds {record.get('seeds') or record.get('seed_rule')}",
            f"- Generation settings: {settings_text(record.get('settings'), record.get('lora'))}",
        ]
        issues = ps.get("issues", [])
        if issues:
            shown = "; ".join(issues[:5]) + (
                f"; ... ({len(issues) - 5} more in record.json)" if len(issues) > 5 else ""
            )
            parts.append(f"- Prompt-file rows skipped or changed: {len(issues)} ({shown})")
        parts.append("")
    parts += [overall_line(summary["overall"]), "", COUNTED_NOTE, ""]
    for kind, heading in (
        ("primary", "Primary criteria"),
        ("sub", "Sub-criteria"),
        ("theme", "Themes"),
        ("subtheme", "Subthemes"),
    ):
        if _worth_showing(summary, kind):
            parts += [f"## {heading}", "", _md_table(("Name", *SUMMARY_HEADER[1:]), summary_rows(summary[kind])), ""]
    cov, img = summary["coverage"], summary["images"]
    parts += [
        "## Coverage",
        "",
        f"- Test-point verdicts: {cov['test_points']} ({cov['judged']} judged, {cov['abstained']} abstained, "
        f"{cov['errors']} judge errors {_policy(summary)})",
        f"- Images judged: {img['judged']}; missing: {img['missing']}",
        f"- Not covered: {', '.join(cov['not_covered']) or 'none'}",
    ]
    parts += [f"- Error: {e}" for e in summary["errors"]["examples"]]
    return "\n".join(parts) + "\n"


def compare_rows(cells: dict[str, dict]) -> list[list[str]]:
    return [
        [name, _pct(c["a"]), _pct(c["b"]), "–" if c["delta"] is None else f"{100 * c['delta']:+.2f}", _ci(c["ci"])]
        for name, c in cells.items()
    ]


COMPARE_HEADER = ("Criterion", "A (%)", "B (%)", "B − A (points)", "95% CI of B − A")


def settings_text(settings: dict | None, lora: dict | None = None) -> str:
    """One line for a run's recorded generation settings (`runner.run_bench`'s `settings`) and its LoRA."""
    if settings is None:
        return "unknown (existing images)"
    call = ", ".join(f"{k}={v}" for k, v in settings["call"].items())
    adapter = f"; LoRA {lora['path']} at scale {lora['scale']}" if lora else ""
    return (
        f"{call}; scheduler {settings['scheduler']['class']}; {settings['dtype']}; "
        f"{settings['images_per_prompt']} images per prompt from seeds {settings['seed']}+j{adapter}"
    )


def changed_prompts(
    records_a: Sequence[dict], records_b: Sequence[dict], k: int = 8, *, errors: str = "exclude"
) -> list[dict]:
    """The `k` shared prompts whose share of passed test points (over all their images) moved most from A to B,
    largest change first; prompts that did not move are left out."""

    def shares(records: Sequence[dict]) -> dict[str, tuple[float, str]]:
        counts: dict[str, list] = {}
        for r in records:
            c = counts.setdefault(r["prompt_id"], [0, 0, r.get("text", r["prompt_id"])])
            for tp in r["test_points"]:
                if _counts(tp, errors):
                    c[0] += tp["passed"] is True
                    c[1] += 1
        return {p: (c[0] / c[1], c[2]) for p, c in counts.items() if c[1]}

    sa, sb = shares(records_a), shares(records_b)
    moved = [
        {"prompt_id": p, "text": sa[p][1], "a": sa[p][0], "b": sb[p][0], "delta": sb[p][0] - sa[p][0]}
        for p in sa
        if p in sb and sb[p][0] != sa[p][0]
    ]
    return sorted(moved, key=lambda m: (-abs(m["delta"]), m["prompt_id"]))[:k]


def compare_markdown(comparison: dict, name_a: str = "A", name_b: str = "B") -> str:
    o = comparison["overall"]
    p = comparison["prompts"]
    parts = [f"# {name_b} vs {name_a}", ""]
    differences = comparison.get("settings_differences") or []
    if differences:
        parts += [
            f"**The runs sampled with different generation settings** ({len(differences)}); part of any difference "
            "below comes from the sampler, not the model:",
            "",
            *[f"- {d}" for d in differences],
            "",
        ]
    for name in comparison.get("settings_unknown") or []:
        parts += [f"Run {name} scored existing images: its generation settings are unknown and were not checked.", ""]
    parts += [
        f"A = {name_a}; B = {name_b}; {p['shared']} shared prompts "
        f"({p['only_a']} only in A, {p['only_b']} only in B); paired bootstrap over prompts.",
        "",
    ]
    models, settings = comparison.get("models"), comparison.get("settings")
    if models and settings:
        for name in ("a", "b"):
            lora = models[name].get("lora")
            parts.append(f"- {name.upper()}: {models[name]['model']}; settings {settings_text(settings[name], lora)}")
        parts.append("")
    if o["complete"]:
        parts.append(
            f"Overall: {_pct(o['a'])} -> {_pct(o['b'])} ({100 * o['delta']:+.2f} points, 95% CI {_ci(o['ci'])})"
        )
    else:
        parts.append("Overall: not reported (a primary criterion lacks judgments in one of the runs)")
    for kind, heading in (("primary", "Primary criteria"), ("sub", "Sub-criteria"), ("theme", "Themes")):
        if comparison[kind]:
            parts += ["", f"## {heading}", "", _md_table(COMPARE_HEADER, compare_rows(comparison[kind]))]
    moved = comparison.get("changed_prompts") or []
    if moved:
        rows = [[m["prompt_id"], m["text"], _pct(m["a"]), _pct(m["b"]), f"{100 * m['delta']:+.1f}"] for m in moved]
        parts += ["", "## Prompts that changed most", "", _md_table(CHANGED_HEADER, rows)]
    return "\n".join(parts) + "\n"


CHANGED_HEADER = ("Prompt", "Text", "A passed (%)", "B passed (%)", "B − A (points)")


def compare_sections(
    comparison: dict,
    records_a: Sequence[dict],
    records_b: Sequence[dict],
    images_a: str | Path,
    images_b: str | Path,
    plot: Plot | None = None,
) -> list[Section]:
    """The compare report's HTML sections: settings, the tables, and A's and B's images side by side (with their
    marks) for the prompts that changed most (`comparison["changed_prompts"]`)."""
    differences = comparison.get("settings_differences") or []
    models, settings = comparison.get("models"), comparison.get("settings")
    lines = [f"DIFFERENT SETTINGS: {d}" for d in differences]
    if models and settings:
        lines += [
            f"{n.upper()}: {models[n]['model']}; settings {settings_text(settings[n], models[n].get('lora'))}"
            for n in "ab"
        ]
    sections = [Section("Runs", lines)] if lines else []
    sections += [
        Section(heading, (), COMPARE_HEADER, compare_rows(comparison[kind]), plot if kind == "primary" else None)
        for kind, heading in (("primary", "Primary criteria"), ("sub", "Sub-criteria"), ("theme", "Themes"))
        if comparison[kind]
    ]
    moved = comparison.get("changed_prompts") or []
    if moved:
        by_image = {}
        for name, records in (("a", records_a), ("b", records_b)):
            for r in records:
                by_image.setdefault((name, r["prompt_id"]), []).append(r)
        n = max(len(by_image.get((name, m["prompt_id"]), [])) for m in moved for name in "ab")
        rows = []
        for m in moved:
            cells = []
            for name, folder in (("a", Path(images_a)), ("b", Path(images_b))):
                shown = sorted(by_image.get((name, m["prompt_id"]), []), key=lambda r: r["image_id"])
                for r in shown:
                    path = folder / r["file"]
                    cells.append(GridCell(path if path.is_file() else None, [_mark(tp) for tp in r["test_points"]]))
                cells += [GridCell(None)] * (n - len(shown))
            note = f"{m['prompt_id']} · passed {_pct(m['a'])}% -> {_pct(m['b'])}% ({100 * m['delta']:+.1f} points)"
            rows.append(GridRow(m["text"], cells, note))
        sections.append(
            Section(
                "Prompts that changed most",
                ["A's images, then B's, same seeds; hover a mark for its reason."],
                grid=rows,
                grid_columns=[f"A {j}" for j in range(n)] + [f"B {j}" for j in range(n)],
            )
        )
    return sections


# ---------------------------------------------------------------------------------------------------------------
# SVG plots


@dataclass(frozen=True)
class Plot:
    """An SVG figure made by `bar_plot` or `line_plot` (its text already escaped)."""

    svg: str


_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#9c755f", "#edc948")


def _text(x: float, y: float, s: str, anchor: str = "middle", size: int = 11, extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {extra}>{html.escape(str(s))}</text>'
    )


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi] in about `n` steps."""
    hi = hi if hi > lo else lo + 1
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(round((stop - start) / step) + 1)]


def _svg_open(width: float, height: float, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" font-family="sans-serif">',
        _text(width / 2, 16, title, size=13),
    ]


def _y_axis(ticks: Sequence[float], y: Any, left: float, right: float, label: str, mid: float) -> list[str]:
    out = []
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{right:.1f}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
        out.append(_text(left - 4, y(t) + 4, f"{t:.4g}", "end", 10))
    return out + [_text(14, mid, label, extra=f'transform="rotate(-90 14 {mid:.1f})"')]


def _legend(names: Sequence[str], x: float, y: float) -> list[str]:
    """Color keys stacked at (x, y), to the right of the plot area; nothing for a single series."""
    if len(names) < 2:
        return []
    out = []
    for i, name in enumerate(names):
        out.append(f'<rect x="{x:.1f}" y="{y + 14 * i:.1f}" width="10" height="10" fill="{_PALETTE[i % 8]}"/>')
        out.append(_text(x + 14, y + 9 + 14 * i, name, "start", 10))
    return out


def _legend_width(names: Sequence[str]) -> float:
    return 30 + 6 * max(len(n) for n in names) if len(names) > 1 else 0


def bar_plot(
    series: dict[str, dict[str, float | None]],
    *,
    intervals: dict[str, dict[str, Sequence[float] | None]] | None = None,
    title: str = "",
    ylabel: str = "",
    ymax: float | None = None,
) -> Plot:
    """Grouped bars: `series` maps a series name (e.g. "before") to {category: value}; optional error bars
    `intervals` in the same layout ({series: {category: (low, high)}}); the y axis starts at 0."""
    names = list(series)
    cats = list(dict.fromkeys(c for s in series.values() for c in s))
    if not cats:
        raise ValueError("`series` has no values")
    tops = [v for s in series.values() for v in s.values() if v is not None]
    tops += [ci[1] for s in (intervals or {}).values() for ci in s.values() if ci is not None]
    ticks = _ticks(0, ymax if ymax is not None else max(tops + [1e-9]))
    top = ticks[-1]
    bar, gap, left, plot_h, top_pad = 14, 12, 56, 200, 36
    group_w = bar * len(names) + gap
    plot_w = 10 + group_w * len(cats)
    width = max(left + plot_w + 10 + _legend_width(names), 7 * len(title) + 20)
    height = top_pad + plot_h + 16 + 4.2 * max(len(c) for c in cats)
    y = lambda v: top_pad + plot_h * (1 - min(max(v, 0), top) / top)  # noqa: E731
    out = _svg_open(width, height, title) + _y_axis(ticks, y, left, left + plot_w, ylabel, top_pad + plot_h / 2)
    for i, cat in enumerate(cats):
        x0 = left + 10 + i * group_w
        for k, name in enumerate(names):
            v = series[name].get(cat)
            if v is None:
                continue
            x = x0 + k * bar
            out.append(
                f'<rect x="{x}" y="{y(v):.1f}" width="{bar - 2}" height="{y(0) - y(v):.1f}" '
                f'fill="{_PALETTE[k % 8]}"><title>{html.escape(f"{name} {cat}: {v:.4g}")}</title></rect>'
            )
            ci = (intervals or {}).get(name, {}).get(cat)
            if ci is not None:
                cx = x + (bar - 2) / 2
                out.append(f'<line x1="{cx}" x2="{cx}" y1="{y(ci[0]):.1f}" y2="{y(ci[1]):.1f}" stroke="#222"/>')
        lx, ly = x0 + (group_w - gap) / 2, top_pad + plot_h + 12
        out.append(_text(lx, ly, cat, "end", 10, f'transform="rotate(-40 {lx:.1f} {ly:.1f})"'))
    out += _legend(names, left + plot_w + 10, top_pad)
    return Plot("\n".join(out + ["</svg>"]))


def line_plot(
    series: dict[str, Sequence[tuple[float, float]]], *, title: str = "", xlabel: str = "", ylabel: str = ""
) -> Plot:
    """Lines: `series` maps a name to `(x, y)` points (e.g. reward per training step); non-finite points are
    skipped."""
    clean = {name: [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b)] for name, pts in series.items()}
    points = [p for pts in clean.values() for p in pts]
    if not points:
        raise ValueError("`series` has no finite points")
    xt = _ticks(min(p[0] for p in points), max(p[0] for p in points))
    yt = _ticks(min(p[1] for p in points), max(p[1] for p in points))
    left, plot_w, top_pad, plot_h = 64, 440, 30, 220
    width, height = left + plot_w + 20 + _legend_width(list(clean)), top_pad + plot_h + 50
    px = lambda v: left + plot_w * (v - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    py = lambda v: top_pad + plot_h * (1 - (v - yt[0]) / (yt[-1] - yt[0]))  # noqa: E731
    out = _svg_open(width, height, title) + _y_axis(yt, py, left, left + plot_w, ylabel, top_pad + plot_h / 2)
    out += [_text(px(t), top_pad + plot_h + 14, f"{t:.4g}", size=10) for t in xt]
    out.append(_text(left + plot_w / 2, top_pad + plot_h + 36, xlabel))
    for k, (name, pts) in enumerate(clean.items()):
        coords = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in pts)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{_PALETTE[k % 8]}" stroke-width="2">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
    out += _legend(list(clean), left + plot_w + 20, top_pad)
    return Plot("\n".join(out + ["</svg>"]))


# ---------------------------------------------------------------------------------------------------------------
# HTML


@dataclass
class Mark:
    """A pass/fail mark under an image: `passed` True (✓), False (✗) or None (not judged)."""

    label: str
    passed: bool | None
    reason: str = ""


@dataclass
class GridCell:
    """An image (`Tensor` `[3, H, W]` in [0, 1], PIL image, PNG bytes or a file path; None = missing) and marks."""

    image: Any
    marks: Sequence[Mark] = ()
    caption: str = ""


@dataclass
class GridRow:
    prompt: str
    cells: Sequence[GridCell]
    note: str = ""


@dataclass
class Section:
    """A report section: paragraphs, then a table (`columns` + `rows`), a plot, and an image grid."""

    title: str
    paragraphs: Sequence[str] = ()
    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()
    plot: Plot | None = None
    grid: Sequence[GridRow] = ()
    grid_columns: Sequence[str] = field(default_factory=tuple)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """An 8-bit RGB image of `pixels` (`Tensor` `[3, H, W]`, float in [0, 1])."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"`pixels` must be [3, H, W], got {tuple(pixels.shape)}")
    array = (pixels.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def image_data_url(image: Any, max_side: int = 256) -> str:
    """A `data:image/png;base64,...` URL of `image`, downscaled so its longer side is at most `max_side`."""
    if isinstance(image, torch.Tensor):
        pil = to_pil(image)
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, bytes):
        pil = Image.open(io.BytesIO(image)).convert("RGB")
    elif isinstance(image, (str, Path)):
        pil = Image.open(image).convert("RGB")
    else:
        raise ValueError(f"`image` must be a tensor, PIL image, PNG bytes or path, got {type(image).__name__}")
    if max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 13px; }
th { background: #f3f3f3; }
.grid td { vertical-align: top; }
.prompt { max-width: 320px; font-size: 13px; }
.prompt small { color: #666; }
img { image-rendering: pixelated; display: block; }
.mark { display: inline-block; font-size: 11px; padding: 0 4px; margin: 1px; border-radius: 3px; }
.pass { background: #d4edda; } .fail { background: #f8d7da; } .none { background: #e2e3e5; }
details { font-size: 11px; max-width: 260px; }
"""


def _cell_html(cell: GridCell, max_side: int) -> str:
    e = html.escape
    if cell.image is None:
        body = '<div class="mark none">missing</div>'
    else:
        try:
            url = image_data_url(cell.image, max_side)
        except (OSError, SyntaxError, ValueError) as error:  # a truncated or damaged file: say so, draw the rest
            url = None
            body = f'<div class="mark none" title="{e(str(error))}">unreadable</div>'
        if url is not None:
            body = f'<img src="{url}" width="{max(96, min(max_side, 160))}" alt="{e(cell.caption)}">'
    symbol = {True: ("✓", "pass"), False: ("✗", "fail"), None: ("–", "none")}
    marks = "".join(
        f'<span class="mark {symbol[m.passed][1]}" title="{e(m.reason)}">{symbol[m.passed][0]} {e(m.label)}</span>'
        for m in cell.marks
    )
    reasons = "".join(f"<li>{e(m.label)}: {e(m.reason)}</li>" for m in cell.marks if m.reason)
    details = f"<details><summary>reasons</summary><ul>{reasons}</ul></details>" if reasons else ""
    caption = f"<div><small>{e(cell.caption)}</small></div>" if cell.caption else ""
    return f"<td>{body}{caption}<div>{marks}</div>{details}</td>"


def _section_html(section: Section, max_side: int) -> str:
    e = html.escape
    out = [f"<h2>{e(section.title)}</h2>"] + [f"<p>{e(p)}</p>" for p in section.paragraphs]
    if section.columns:
        out.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in section.columns) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in section.rows]
        out.append("</table>")
    if section.plot is not None:
        if not isinstance(section.plot, Plot):
            raise ValueError(f"`plot` must be a Plot from bar_plot/line_plot, got {type(section.plot).__name__}")
        out.append(f"<div>{section.plot.svg}</div>")
    if section.grid:
        out.append('<table class="grid">')
        if section.grid_columns:
            out.append("<tr><th>Prompt</th>" + "".join(f"<th>{e(c)}</th>" for c in section.grid_columns) + "</tr>")
        for row in section.grid:
            note = f"<br><small>{e(row.note)}</small>" if row.note else ""
            out.append(
                f'<tr><td class="prompt">{e(row.prompt)}{note}</td>'
                + "".join(_cell_html(c, max_side) for c in row.cells)
                + "</tr>"
            )
        out.append("</table>")
    return "\n".join(out)


def write_html_report(
    path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str = "", max_side: int = 256
) -> Path:
    """Write a self-contained static HTML report and return its path.

    Args:
        path: the `.html` file to write (parent folders are created).
        title: the page title; `subtitle` a line under it.
        sections: `Section(title, paragraphs=(), columns=(), rows=(), plot=None, grid=(), grid_columns=())`, in
            order. A table is `columns` (header strings) plus `rows` (lists of values, shown with `str`). `plot` is a
            `Plot` from `bar_plot(series, intervals=..., title=..., ylabel=...)` or `line_plot(series, ...)`.
            `grid` is a list of `GridRow(prompt, cells, note="")`, one per prompt, whose `cells` are
            `GridCell(image, marks=(Mark(label, passed, reason), ...), caption="")`; `grid_columns` names the
            columns (e.g. `["before", "after"]` or image ids). Images are tensors `[3, H, W]` in [0, 1], PIL
            images, PNG bytes or paths; they are embedded as base64 PNG, downscaled to at most `max_side` pixels.
        max_side: the longest embedded image side.

    Every prompt, caption, label, reason and table value is HTML-escaped; the page has no scripts and loads nothing.
    """
    body = [f"<h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(subtitle)}</p>"] if subtitle else [])
    body += [_section_html(s, max_side) for s in sections]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _mark(tp: dict) -> Mark:
    label = (
        tp["criterion"].split(" - ")[-1]
        + {"ok": "", "abstain": " (not judged)", "error": " (judge error)"}[tp["status"]]
    )
    return Mark(label, None if tp["status"] == "abstain" else tp["passed"], tp["reason"])


def bench_sections(
    summary: dict,
    record: dict,
    records: Sequence[dict],
    items: Sequence[Any],
    image_paths: dict[tuple[str, int], Path],
    *,
    max_prompts: int = 100,
) -> list[Section]:
    """The sections of a bench run's HTML report: run record, tables with a plot, coverage, and the image grid.

    `items` are the run's `PromptItem`s; `image_paths` maps (prompt id, image id) to the image file (absent =
    missing). The grid shows the first `max_prompts` prompts, with one ✓/✗/– mark per test point.
    """
    ps, judge = record["prompt_set"], record["judge"]
    run = Section(
        "Run",
        [
            f"Prompt set: {ps['name']} {ps['version']} ({ps['prompts']} prompts, license "
            f"{ps['license'] or 'unknown'}), file {ps['source']}, sha256 {ps['sha256']}",
            f"Images: {record.get('model') or record.get('images_dir')}; {record['images_per_prompt']} per prompt; "
            f"seeds {record['seeds'] or record['seed_rule']}",
            f"Generation settings: {settings_text(record.get('settings'), record.get('lora'))}",
            f"Judge: {judge['name']} (fingerprint {judge['fingerprint']}); settings {json.dumps(judge['settings'])}",
        ]
        + [f"Prompt-file issue: {i}" for i in ps["issues"][:20]],
    )
    primary = summary["primary"]
    plot = (
        bar_plot(
            {"accuracy": {k: c["accuracy"] for k, c in primary.items()}},
            intervals={"accuracy": {k: c["ci"] for k, c in primary.items()}},
            title="Primary criteria (95% CI over prompts)",
            ylabel="accuracy",
            ymax=1.0,
        )
        if primary
        else None
    )
    sections = [
        run,
        Section(
            "Primary criteria",
            [overall_line(summary["overall"]), COUNTED_NOTE],
            SUMMARY_HEADER,
            summary_rows(primary),
            plot,
        ),
    ]
    for kind, heading in (("sub", "Sub-criteria"), ("theme", "Themes"), ("subtheme", "Subthemes")):
        if _worth_showing(summary, kind):
            sections.append(Section(heading, (), SUMMARY_HEADER, summary_rows(summary[kind])))
    cov, img = summary["coverage"], summary["images"]
    sections.append(
        Section(
            "Coverage",
            [
                f"{cov['test_points']} test-point verdicts: {cov['judged']} judged, {cov['abstained']} abstained, "
                f"{cov['errors']} judge errors ({_policy(summary)}).",
                f"Images judged: {img['judged']}; missing: {img['missing']}.",
                f"Criteria not covered: {', '.join(cov['not_covered']) or 'none'}.",
            ]
            + [f"Error: {e}" for e in summary["errors"]["examples"]],
        )
    )
    by_image = {(r["prompt_id"], r["image_id"]): r for r in records}
    n = record["images_per_prompt"]
    rows = []
    for item in items[:max_prompts]:
        cells = []
        for j in range(n):
            r = by_image.get((item.id, j))
            marks = [_mark(tp) for tp in (r["test_points"] if r else [])]
            cells.append(GridCell(image_paths.get((item.id, j)), marks))
        rows.append(GridRow(item.text, cells, f"{item.id} · {item.theme} / {item.subtheme}".rstrip(" /·")))
    shown = f"first {max_prompts} of {len(items)} prompts" if len(items) > max_prompts else f"{len(items)} prompts"
    sections.append(
        Section(
            "Images",
            [f"{shown}; hover a mark for its reason."],
            grid=rows,
            grid_columns=[f"image {j}" for j in range(n)],
        )
    )
    return sections
