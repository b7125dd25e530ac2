"""`benchmarks/gpu/check.py`: skips cleanly without CUDA, runs its four checks on tiny models, predicts real sizes."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu" / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skips_with_a_message_without_cuda(check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--out", str(tmp_path / "gpu_check.json")]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.json").exists()


def test_real_sizes_refuse_the_cpu(check, tmp_path):
    assert check.main(["--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2


def test_the_four_checks_run_on_tiny_models_and_record(check, tmp_path):
    out = tmp_path / "gpu_check.json"
    assert check.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert sorted(record["results"]) == sorted(check.CHECKS)
    assert record["results"]["flow_grpo_sd35m"]["trained_parameters"] > 0
    assert all(r["seconds"] > 0 for r in record["results"].values())


def test_predictions_at_real_sizes(check):
    from visalign.plan import Workload

    reno = check.reno_prediction()
    assert 5 < reno < 20  # ~2.6 GiB of bf16 weights, ~3.7 GiB reward, activations of one 512 image
    meter = check.Meter("cpu")
    meter.peak, meter.seconds = None, 1.0
    work = Workload(
        family="sdxl",
        method="diffusion-dpo",
        use_lora=False,
        gradient_checkpointing=True,
        height=1024,
        width=1024,
        micro_batch=1,
        images_per_unit=2,
    )
    rec = check.record(meter, work, ["text encoders + VAE"], tiny=False)
    assert 45 < rec["predicted_gib"] < 70  # float32 weights, reference, gradients and AdamW: 16 bytes x 2.57 B
    assert "text encoders + VAE" not in rec["predicted_items_gib"]
