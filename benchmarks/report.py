"""The bench reports people read: Markdown summaries and comparisons, and the sections of their HTML pages.

The numbers come from `visalign.benchmarks.scoring` (`aggregate`, `compare`, `changed_prompts`); the pages are
written with `visalign.html.write_html_report`. `summary_markdown` and `bench_sections` report one run;
`compare_markdown` and `compare_sections` report run B against run A. Overall is always shown with the number of
failed judgments and the strict Overall (failures counted wrong) beside it (`overall_line`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visalign.html import GridCell, GridRow, Mark, Plot, Section, bar_plot

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
