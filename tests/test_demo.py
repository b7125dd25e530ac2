"""`visalign demo` at reduced size on the shipped world model: it trains a LoRA through the `visalign train`
registry and reports base, best-of-N and the aligned model; an unknown method is an error listing the methods."""

import json

from safetensors.torch import load_file

from visalign.cli import main


def test_demo_trains_and_reports_three_columns(tmp_path):
    argv = ["demo", "--per-category", "1", "--images-per-prompt", "2", "--max-steps", "2", "--steps", "2"]
    argv += ["--set", "num_inference_steps=4", "group_size=4", "sample_batch_size=4", "per_device_train_batch_size=4"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 0
    # the LoRA trained: PEFT initializes lora_B to zero, so a nonzero lora_B means optimizer steps changed it
    lora = load_file(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors")
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "flow-grpo" and summary["family"] == "sd3" and summary["max_steps"] == 2
    assert summary["slice"]["prompts"] == 6 and set(summary["slice"]["per_category"].values()) == {1}
    assert summary["selection"]["n"] == 2  # best-of-N spends the aligned model's k calls per prompt
    for name in ("base", "best_of_n", "aligned"):
        assert 0.0 <= summary[name]["overall"] <= 1.0
    assert summary["reward_curve"] and [s for s, _ in summary["heldout_curve"]][0] == 0.0
    html = (tmp_path / "report.html").read_text()
    assert "Held-out verifier accuracy" in html and "<svg" in html and "data:image/png;base64," in html
    assert "best-of-2" in html and "flow-grpo" in html and "Training reward" in html
    assert "<script" not in html


def test_demo_rejects_unknown_method_listing_methods(tmp_path, capsys):
    assert main(["demo", "--method", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "visalign demo: error: `--method` 'nope'" in err and "Traceback" not in err
    for method in ("tempflow-grpo", "flow-grpo", "diffusion-dpo", "prdp"):
        assert method in err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_demo_length_defaults_per_method_and_max_steps_overrides(tmp_path):
    import argparse

    from visalign.pipelines.demo import DEFAULT_STEPS, _config, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    lengths = {}
    for argv in (
        ["--method", "flow-grpo"],
        ["--method", "pref-grpo"],
        ["--method", "tempflow-grpo"],
        ["--method", "diffusion-dpo"],
        ["--method", "flow-grpo", "--max-steps", "7"],
        ["--method", "flow-grpo", "--set", "lr_scheduler=cosine", "ema_decay=0"],
    ):
        config, family = _config(parser.parse_args(argv), tmp_path / "slice.txt", tmp_path / "run")
        lengths[" ".join(argv)] = (config.max_steps, config.eval_steps, family, config.lr_scheduler, config.ema_decay)
        assert config.ema_update_every == 1
    # the GRPO recipes' steps hold 128 samples each, so their demo is 30 of them; the others keep
    # the longer default; the recipes' cosine decay gives way to their constant peak rate, and the weights' EMA
    # (decay 0.9, updated every step) is what the demo evaluates, unless `--set` asks otherwise
    assert lengths == {
        "--method flow-grpo": (30, 15, "sd3", "constant", 0.9),
        "--method pref-grpo": (30, 15, "sd3", "constant", 0.9),
        "--method tempflow-grpo": (30, 15, "sd3", "constant", 0.9),
        "--method diffusion-dpo": (DEFAULT_STEPS, DEFAULT_STEPS // 2, "sd3", "constant", 0.9),
        "--method flow-grpo --max-steps 7": (7, 3, "sd3", "constant", 0.9),
        "--method flow-grpo --set lr_scheduler=cosine ema_decay=0": (30, 15, "sd3", "cosine", 0.0),
    }
