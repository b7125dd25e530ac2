"""`visalign demo` at reduced size on the shipped world model: it writes the report and the summary."""

import json

from visalign.cli import main


def test_demo_writes_report_and_summary(tmp_path):
    argv = [
        "demo",
        "--per-category",
        "1",
        "--images-per-prompt",
        "1",
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "best-of-2" and summary["prompts"] == 6
    assert [c["n"] for c in summary["curve"]] == [1, 2]
    assert summary["curve"][1]["reward"] >= summary["curve"][0]["reward"]  # best-of-2 never picks a worse reward
    html = (tmp_path / "report.html").read_text()
    assert "Held-out verifier accuracy" in html and "<svg" in html and "data:image/png;base64," in html
    assert "<script" not in html


def test_demo_rejects_bad_sizes(tmp_path, capsys):
    assert main(["demo", "--n", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "visalign demo: error: `--n`" in err and "Traceback" not in err
