import ast
import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.benchmarks import taxonomy
from visalign.benchmarks.report import compare_markdown, summary_markdown
from visalign.benchmarks.scoring import aggregate, compare
from visalign.html import GridCell, GridRow, Mark, Section, bar_plot, line_plot, write_html_report


def tp(criterion, outcome):
    """A test-point verdict: outcome True/False (judged), None (abstained) or "error" (judge failure)."""
    if outcome == "error":
        return {"criterion": criterion, "passed": False, "status": "error", "reason": "unparseable", "judge": "j"}
    status = "abstain" if outcome is None else "ok"
    return {"criterion": criterion, "passed": outcome, "status": status, "reason": "r", "judge": "j"}


def image(prompt_id, image_id, theme, subtheme, *points):
    return {
        "prompt_id": prompt_id,
        "image_id": image_id,
        "theme": theme,
        "subtheme": subtheme,
        "test_points": list(points),
    }


C, Q, S, T = "Attribute - Color", "Attribute - Quantity", "Style", "Text Generation"
RUN_A = [
    image("p1", 0, "Art", "Graphic Art", tp(C, True), tp(Q, False), tp(S, True)),
    image("p1", 1, "Art", "Graphic Art", tp(C, True), tp(Q, True), tp(S, True)),
    image("p2", 0, "Design", "Poster Design", tp(C, False), tp(T, None)),
    image("p2", 1, "Design", "Poster Design", tp(C, "error"), tp(T, None)),
]
# B: the same images after alignment fixed p1's quantity and p2's first color
RUN_B = [
    image("p1", 0, "Art", "Graphic Art", tp(C, True), tp(Q, True), tp(S, True)),
    RUN_A[1],
    image("p2", 0, "Design", "Poster Design", tp(C, True), tp(T, None)),
    RUN_A[3],
]


def test_aggregation_on_a_hand_computed_example():
    s = aggregate(RUN_A, ["Attribute", "Style"], errors="fail", bootstrap=200)
    acc = lambda kind: {k: v["accuracy"] for k, v in s[kind].items()}  # noqa: E731
    # color: p1 2/2, p2 0/2 (a failure and a judge error, counted as failures); quantity 1/2; style 2/2
    assert acc("sub") == {C: 0.5, Q: 0.5, S: 1.0, T: None}
    assert acc("primary") == {"Attribute": 3 / 6, "Style": 1.0, "Text Generation": None}
    assert acc("theme") == {"Art": 5 / 6, "Design": 0.0}
    assert acc("subtheme") == {"Art / Graphic Art": 5 / 6, "Design / Poster Design": 0.0}
    assert s["sub"][T] == {"correct": 0, "total": 0, "accuracy": None, "ci": None, "abstained": 2, "errors": 0}
    assert s["sub"][C]["errors"] == 1 and s["primary"]["Attribute"]["total"] == 6
    assert s["overall"]["accuracy"] == pytest.approx((0.5 + 1.0) / 2) and s["overall"]["complete"]
    assert s["coverage"] == {"test_points": 10, "judged": 7, "abstained": 2, "errors": 1, "not_covered": [T]}
    assert s["errors"]["count"] == 1 and "p2_1 Attribute - Color: unparseable" in s["errors"]["examples"][0]
    assert s["images"]["all_pass"] == 0.25
    only_abstained = image("p3", 0, "Art", "Other", tp(T, None))
    with_abstained = aggregate(RUN_A + [only_abstained], ["Style"], errors="fail", bootstrap=0)
    assert with_abstained["images"]["all_pass"] == 0.25  # not a pass
    for kind in ("primary", "sub", "theme"):
        for cell in s[kind].values():
            if cell["accuracy"] is not None:
                assert cell["ci"][0] <= cell["accuracy"] <= cell["ci"][1]
    assert s["sub"][S]["ci"] == [1.0, 1.0]  # only p1 has a style test point, and it always passes
    assert s == aggregate(RUN_A, ["Attribute", "Style"], errors="fail", bootstrap=200)  # deterministic


def test_overall_only_when_every_primary_is_covered():
    s = aggregate(RUN_A, ["Attribute", "Style", "Text Generation"], bootstrap=0)
    assert s["overall"]["accuracy"] is None and s["overall"]["missing"] == ["Text Generation"]
    assert "Overall: not reported" in summary_markdown(s) and "Text Generation" in summary_markdown(s)
    assert list(s["primary"]) == ["Attribute", "Style", "Text Generation"]  # the set's order


def test_errors_are_excluded_by_default_but_still_counted():
    s = aggregate(RUN_A, ["Attribute", "Style"], bootstrap=0)
    assert s["sub"][C]["accuracy"] == 2 / 3 and s["primary"]["Attribute"]["accuracy"] == 3 / 5
    assert s["sub"][C]["errors"] == 1 and s["errors"]["policy"] == "exclude"
    assert s["overall"]["accuracy"] == pytest.approx((3 / 5 + 1) / 2)
    assert s["overall"]["failed"] == {"test_points": 1, "images": 1}
    assert s["overall"]["strict"] == pytest.approx((3 / 6 + 1) / 2)  # the error counted wrong
    strict = aggregate(RUN_A, ["Attribute", "Style"], errors="fail", bootstrap=0)["overall"]
    assert strict["accuracy"] == strict["strict"] == s["overall"]["strict"]
    with pytest.raises(ValueError, match="errors"):
        aggregate(RUN_A, ["Style"], errors="drop")


def test_bootstrap_interval_has_the_binomial_width():
    rng = np.random.default_rng(0)
    records = [
        image(f"p{i}", j, "Art", "Other", tp(S, bool(rng.random() < 0.7))) for i in range(200) for j in range(4)
    ]
    cell = aggregate(records, ["Style"], bootstrap=1000)["sub"][S]
    lo, hi = cell["ci"]
    half = 1.96 * np.sqrt(0.7 * 0.3 / 800)  # independent images: the prompt bootstrap matches the binomial interval
    assert lo < cell["accuracy"] < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.25)


def test_compare_gives_paired_deltas():
    c = compare(RUN_A, RUN_B, ["Attribute", "Style"], errors="fail", bootstrap=500)
    assert c["sub"][C]["delta"] == pytest.approx(0.75 - 0.5)
    assert c["sub"][Q]["delta"] == pytest.approx(1.0 - 0.5)
    assert c["primary"]["Attribute"]["delta"] == pytest.approx(5 / 6 - 3 / 6)
    assert c["sub"][S]["delta"] == 0 and c["sub"][S]["ci"] == [0.0, 0.0]  # unchanged images: no uncertainty
    assert c["sub"][T]["delta"] is None
    assert c["overall"]["delta"] == pytest.approx((5 / 6 + 1) / 2 - (3 / 6 + 1) / 2)
    for cell in [c["overall"], *c["primary"].values()]:
        if cell["delta"] is not None:
            assert cell["ci"][0] - 1e-9 <= cell["delta"] <= cell["ci"][1] + 1e-9
    assert c["prompts"] == {"shared": 2, "only_a": 0, "only_b": 0}
    md = compare_markdown(c, "base", "aligned")
    assert "+25.00" in md and "+50.00" in md and "aligned vs base" in md
    only_p1 = compare(RUN_A, RUN_B[:2], ["Attribute", "Style"], errors="fail", bootstrap=0)
    assert only_p1["prompts"] == {"shared": 1, "only_a": 1, "only_b": 0}
    assert only_p1["sub"][C]["a"] == 1.0  # p2 is left out of both sides


def official_calculate_scores(rows):
    """UniGenBench's `calculate_scores` (eval/src/eval_common.py), rewritten from its description: for each result
    row, `literal_eval` the test points and the judge's `result_json`; a row that raises is skipped whole; each
    (checkpoint, score) adds 1 to the totals of its sub-dimension (the full name) and of its primary (the text before
    the first "-", trailing space kept) and `score == 1` adds 1 to their correct counts. Overall is the leaderboard's
    mean of the primary accuracies."""
    primary, sub = {}, {}
    for row in rows:
        try:
            checkpoints = ast.literal_eval(row["testpoint"])
            scores = ast.literal_eval(row["result_json"])["score"]
        except (ValueError, SyntaxError, TypeError, KeyError):
            continue
        for cp, score in zip(checkpoints, scores):
            big = cp.split("-", 1)[0] if "-" in cp else cp
            for stats, key in ((primary, big), (sub, cp)):
                stats.setdefault(key, [0, 0])
                stats[key][1] += 1
                stats[key][0] += score == 1
    acc = lambda stats: {k.strip(): c / t for k, (c, t) in stats.items()}  # noqa: E731
    return acc(primary), acc(sub), float(np.mean(list(acc(primary).values())))


@pytest.mark.parametrize("failure_rate", [0.0, 0.05, 0.3])
def test_aggregation_equals_the_official_formula_with_and_without_failures(failure_rate):
    """Random verdicts over UniGenBench's criteria; a failed judgment fails the whole image, as upstream's does (its
    row is written with `result_json = None`, which does not parse)."""
    rng = np.random.default_rng(int(failure_rate * 100))
    criteria = list(taxonomy.CRITERIA)
    records, rows, strict_rows = [], [], []
    for p in range(120):
        points = [criteria[k] for k in rng.choice(len(criteria), size=rng.integers(1, 6), replace=False)]
        skill = rng.random()
        for j in range(4):
            failed = rng.random() < failure_rate
            passed = [bool(rng.random() < skill) for _ in points]
            outcome = ["error"] * len(points) if failed else passed
            records.append(image(f"p{p}", j, "Art", "Other", *(tp(c, o) for c, o in zip(points, outcome))))
            result = "null" if failed else json.dumps({"score": [int(x) for x in passed]})
            rows.append({"testpoint": repr(points), "result_json": result})
            strict_rows.append({"testpoint": repr(points), "result_json": json.dumps({"score": [0] * len(points)})})
    primary, sub, overall = official_calculate_scores(rows)
    s = aggregate(records, taxonomy.PRIMARY_CRITERIA, bootstrap=0)
    assert {k: c["accuracy"] for k, c in s["primary"].items()} == pytest.approx(primary)
    assert {k: c["accuracy"] for k, c in s["sub"].items()} == pytest.approx(sub)
    assert s["overall"]["accuracy"] == pytest.approx(overall)
    failed = [r for r, row in zip(records, rows) if row["result_json"] == "null"]
    assert s["overall"]["failed"]["images"] == len(failed) and (len(failed) > 0) == (failure_rate > 0)
    strict = [row if row["result_json"] != "null" else bad for row, bad in zip(rows, strict_rows)]
    assert s["overall"]["strict"] == pytest.approx(official_calculate_scores(strict)[2])
    if failure_rate:
        assert s["overall"]["strict"] < s["overall"]["accuracy"]
        line = summary_markdown(s).splitlines()[2]
        assert f"failed judgments: {s['overall']['failed']['test_points']} test points" in line
        assert f"strict Overall (failures counted wrong): {100 * s['overall']['strict']:.2f}%" in line
    else:
        assert s["overall"]["strict"] == pytest.approx(s["overall"]["accuracy"])


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_escapes_every_text_and_embeds_images(tmp_path):
    evil = "<script>alert('x')</script> & <img src=x onerror=alert(1)>"
    pixels = torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(0))
    sections = [
        Section(
            f"Section {evil}",
            [f"paragraph {evil}"],
            ["name", evil],
            [[evil, 0.5]],
            bar_plot({evil: {evil: 0.5, "b": 0.25}}, intervals={evil: {evil: [0.4, 0.6]}}, title=evil),
        ),
        Section(
            "Grid",
            grid=[
                GridRow(
                    evil,
                    [
                        GridCell(pixels, [Mark(evil, True, evil), Mark("b", None)], evil),
                        GridCell(None, [Mark("c", False, "wrong")]),
                    ],
                    note=evil,
                )
            ],
            grid_columns=["before", evil],
        ),
        Section("Curve", plot=line_plot({evil: [(0, 1.0), (1, 2.0), (2, 1.5)]}, title=evil, xlabel="step")),
    ]
    page = write_html_report(tmp_path / "r" / "report.html", evil, sections, subtitle=evil).read_text()
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and page.lower().count("<script") == 0
    assert "<img src=x" not in page and page.count("<img ") == 1
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert any(evil in t for t in parser.text)  # what the reader sees is the original text
    url = page.split('src="', 1)[1].split('"', 1)[0]
    embedded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert embedded.size == (171, 256)  # longer side capped at max_side, aspect kept
    assert "✓" in page and "✗" in page and "missing" in page and "<polyline" in page


def test_plots_reject_empty_input():
    with pytest.raises(ValueError, match="series"):
        bar_plot({})
    with pytest.raises(ValueError, match="series"):
        line_plot({"a": [(0, float("nan"))]})
    with pytest.raises(ValueError, match="plot"):
        write_html_report("/tmp/never.html", "t", [Section("s", plot="<svg onload=alert(1)>")])
