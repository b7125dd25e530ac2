"""Scoring of per-image verdicts: accuracies per criterion, theme and subtheme, bootstrap intervals, comparisons.

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

Per-image records (what the bench run writes to `verdicts.jsonl`, one line per image) look like
`{"prompt_id", "image_id", "theme", "subtheme", "test_points": [{"criterion", "passed", "status", "reason",
"judge"}, ...], ...}`. `visalign.benchmarks.report` turns the results into Markdown and HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
