"""`benchmarks/world_efficacy.py`: held-out accuracy against training CPU minutes, read from a run's metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from visalign.benchmarks.world_efficacy import efficacy, main, read_curve

CATEGORIES = ("single_object", "colors", "counting", "two_objects", "color_attr", "position")


def write_run(folder, evaluations, *, timed=True):
    """A run folder as the run loop leaves it: training rows between evaluation rows `(step, cpu_min, overall)`."""
    folder.mkdir(parents=True)
    rows = []
    for step, cpu, overall in evaluations:
        if step:  # two training rows since the last evaluation, rewards step / 400 and step / 400 + 0.1
            rows.append({"step": step - 20, "reward/mean": step / 400, "time/iteration": 1.0})
            rows.append({"step": step, "reward/mean": step / 400 + 0.1, "time/iteration": 1.0})
        row = {"step": step, "eval/world-verifier": overall + 0.1, "eval/world-verifier/overall": overall}
        row |= {f"eval/world-verifier/overall/{c}": overall + i / 100 for i, c in enumerate(CATEGORIES)}
        if timed:
            row |= {"time/train_cpu_minutes": cpu, "time/train_wall_minutes": cpu / 2}
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"pretrained_model_name_or_path": "world:sd3", "seed": 0, "max_steps": 160, "eval_steps": 40}
    config |= {"learning_rate": 1e-3, "eval_prompts": "world:heldout", "eval_images_per_prompt": 1}
    config |= {"eval_num_inference_steps": 20, "eval_guidance_scale": 3.0, "lora_rank": 16}
    record = {"command": "visalign train flow-grpo --config configs/world_flow_grpo.yaml", "config": config}
    (folder / "run.json").write_text(json.dumps(record | {"status": "finished"}))
    return folder


def test_curve_first_crossing_json_and_an_escaped_html_report(tmp_path):
    # gains +10, +16 (first crossing at 7.0 CPU-min), +12, +17 points over a 30% base
    evaluations = [(0, 0.0, 0.30), (40, 3.5, 0.40), (80, 7.0, 0.46), (120, 10.5, 0.42), (160, 14.0, 0.47)]
    fast = write_run(tmp_path / "fast", evaluations)
    slow = write_run(tmp_path / "slow", [(0, 0.0, 0.30), (40, 9.0, 0.35), (80, 18.0, 0.44)])
    hostile = "<script>alert(1)</script>"
    out = tmp_path / "results" / "efficacy.json"
    assert main(["--run", f"flow-grpo={fast}", "--run", f"{hostile}={slow}", "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["goal"] == "+15 points within 15 CPU minutes"
    flow = result["methods"]["flow-grpo"]
    assert [p["step"] for p in flow["curve"]] == [0, 40, 80, 120, 160]  # evaluation rows only
    assert [p["train_cpu_minutes"] for p in flow["curve"]] == [0.0, 3.5, 7.0, 10.5, 14.0]
    assert flow["curve"][2]["train_wall_minutes"] == 3.5
    assert flow["curve"][1]["per_category"]["position"] == pytest.approx(0.45)
    # the mean training reward of the steps since the previous evaluation (none before the base)
    assert flow["curve"][0]["train_reward"] is None
    assert [p["train_reward"] for p in flow["curve"][1:]] == pytest.approx([0.15, 0.25, 0.35, 0.45])
    assert flow["base"]["overall"] == 0.30
    assert flow["best_gain_points"] == pytest.approx(17) and flow["best_step"] == 160
    assert flow["final_gain_points"] == pytest.approx(17)
    assert flow["goal_cpu_minutes"] == 7.0 and flow["goal_step"] == 80 and flow["goal_met"] is True
    assert flow["command"].startswith("visalign train flow-grpo") and flow["status"] == "finished"
    assert flow["train_command"] is None  # read, not trained here
    other = result["methods"][hostile]
    assert other["goal_cpu_minutes"] is None and other["goal_met"] is False
    assert other["best_gain_points"] == pytest.approx(14)

    page = out.with_suffix(".html").read_text()
    assert "<svg" in page and "<polyline" in page and "goal: 45.0% at 15 CPU-min" in page
    assert "training reward" in page and "<td>0.450</td>" in page
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_training_reward_of_a_win_rate_run_is_its_verifier_score(tmp_path):
    # Pref-GRPO's own reward is a win rate (mean 0.5 by construction); its external verifier score is the one read
    run = write_run(tmp_path / "pref", [(0, 0.0, 0.30), (40, 3.0, 0.35)])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if "reward/mean" in row:
            row |= {"reward/mean": 0.5, "external/world-verifier": row["reward/mean"] / 2}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["train_reward"] for p in read_curve(run)] == [None, pytest.approx(0.075)]


def test_a_crossing_after_the_budget_does_not_meet_the_goal():
    curve = [
        {"step": s, "train_cpu_minutes": m, "train_wall_minutes": m, "overall": o, "per_category": {}}
        for s, m, o in [(0, 0.0, 0.20), (40, 10.0, 0.30), (80, 20.0, 0.35), (120, 30.0, 0.31)]
    ]
    result = efficacy(curve)
    assert result["goal_cpu_minutes"] == 20.0 and result["goal_met"] is False
    assert result["best_gain_points"] == pytest.approx(15) and result["final_gain_points"] == pytest.approx(11)


def test_run_folders_without_metrics_or_time_keys_are_named(tmp_path):
    old = write_run(tmp_path / "old_run", [(0, 0.0, 0.30), (40, 3.0, 0.35)], timed=False)
    with pytest.raises(ValueError, match=r"old_run.*steps \[0, 40\].*time/train_cpu_minutes"):
        read_curve(old)
    with pytest.raises(ValueError, match="old_run.*time/train_cpu_minutes"):
        main(["--run", f"flow-grpo={old}", "--out", str(tmp_path / "r.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no metrics.jsonl"):
        read_curve(tmp_path / "empty")
    untrained = tmp_path / "no_evals"
    untrained.mkdir()
    (untrained / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward/mean": 0.1}) + "\n")
    with pytest.raises(ValueError, match="no_evals.*no evaluation row"):
        read_curve(untrained)
    started = write_run(tmp_path / "started", [(0, 0.0, 0.30)])
    with pytest.raises(ValueError, match="started: only the step-0 evaluation so far; the next comes at step 40"):
        main(["--run", f"flow-grpo={started}", "--out", str(tmp_path / "r.json")])


def test_train_knows_only_the_world_recipes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--run", f"dpo={tmp_path / 'dpo'}", "--train"])
    assert "flow-grpo" in capsys.readouterr().err and not (tmp_path / "dpo").exists()
    with pytest.raises(SystemExit):
        main(["--run", f"flow-grpo={tmp_path}", "--set", "max_steps=2"])
    assert "--set overrides the recipes of --train" in capsys.readouterr().err
