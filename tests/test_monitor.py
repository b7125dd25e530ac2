"""The reward-hacking monitor: a synthetic divergence is flagged where it happens and not before, an aligned run is
never flagged, and the record, summary, plot and state round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from preference_helpers import Brightness, Redness

from visalign.monitor import RewardMonitor, agreement


def _policy_samples(step: int, n: int = 32) -> torch.Tensor:
    """What a hacked policy draws at `step`: images brighten every step (the training reward, brightness, rises) and
    redden until step 10, then turn blue (the gold reward, redness, rises then falls)."""
    g = torch.Generator().manual_seed(step)
    images = torch.rand(n, 3, 8, 8, generator=g) * 0.2 + 0.02 * step
    shift = 0.03 * min(step, 10) - 0.05 * max(step - 10, 0)
    images[:, 0] += 0.3 + shift
    images[:, 2] += 0.3 - shift
    return images.clamp(0, 1)


def test_the_monitor_flags_a_synthetic_divergence_after_the_gold_peak(tmp_path):
    train_reward = Brightness()
    monitor = RewardMonitor(Redness(), window=4)
    prompts = ["a red square"] * 32
    metrics = []
    for step in range(1, 21):
        images = _policy_samples(step)
        metrics.append(monitor.update(step, images, prompts, train_reward.score(images, prompts).score))
    flagged = [m["monitor/hacking"] for m in metrics]
    assert not any(flagged[:11])  # both rewards rise up to the gold's peak at step 10
    assert all(flagged[14:])  # from a few updates after the turn the divergence is flagged every update
    summary = monitor.summary()
    assert summary["hacking"] and summary["hacking_steps"][0] > 10
    assert summary["gold_best"]["step"] == 10
    assert summary["train"]["change_z"] > 0 > summary["gold"]["change_z"] and summary["final_gap_z"] > 0
    assert metrics[-1]["monitor/gap"] == pytest.approx(summary["final_gap_z"])
    folder = monitor.save(tmp_path / "monitor")
    assert len((folder / "monitor.jsonl").read_text().splitlines()) == 20
    assert json.loads((folder / "monitor.json").read_text())["hacking"] is True
    svg = (folder / "monitor.svg").read_text()
    assert svg.startswith("<svg") and "training reward" in svg and "gold reward" in svg


def test_an_aligned_run_is_never_flagged():
    monitor = RewardMonitor(window=3)
    for step in range(10):
        train = torch.linspace(0, 1, 16) + 0.1 * step
        gold = 2 * train + 5
        monitor.record(step, train, gold)
        assert monitor.metrics()["monitor/hacking"] == 0
    assert monitor.metrics()["monitor/agreement"] == 1.0
    assert monitor.metrics()["monitor/gap"] == pytest.approx(0.0, abs=1e-6)  # both in pooled-std units
    assert not monitor.summary()["hacking"]


def test_batch_to_batch_noise_is_not_flagged_without_significance():
    """Batch means that wander with the prompts drawn (4 prompts x 8 samples an update, as the world's GRPO samples;
    each reward finds other prompts easy) but have no trend: the significance test keeps them from raising the alarms
    that a bare threshold raises."""
    g = torch.Generator().manual_seed(0)
    plain, tested = RewardMonitor(significance=0.0), RewardMonitor()
    for step in range(60):
        prompt_effects = torch.randn(2, 4, generator=g).repeat_interleave(8, dim=1)
        train = prompt_effects[0] + 0.3 * torch.randn(32, generator=g)
        gold = prompt_effects[1] + 0.3 * torch.randn(32, generator=g)
        plain.record(step, train, gold)
        tested.record(step, train, gold)
    assert plain.summary()["hacking"]
    assert not tested.summary()["hacking"]


def test_agreement_counts_pairs_ordered_alike():
    train = torch.tensor([1.0, 2.0, 3.0, 3.0])
    gold = torch.tensor([0.0, 1.0, 0.5, 2.0])
    # gold-ordered pairs (6, none tied): (0,1) ok, (0,2) ok, (0,3) ok, (1,2) wrong, (1,3) ok, (2,3) train tie -> 1/2
    assert agreement(train, gold) == pytest.approx(4.5 / 6)
    # within prompts: pairs (0,1) and (2,3) only
    assert agreement(train, gold, ["a", "a", "b", "b"]) == pytest.approx(1.5 / 2)
    assert math.isnan(agreement(train, torch.zeros(4)))


def test_bad_input_is_refused_with_the_argument_named():
    monitor = RewardMonitor()
    with pytest.raises(ValueError, match="gold"):
        monitor.update(0, torch.rand(2, 3, 8, 8), ["a", "b"], torch.zeros(2))
    with pytest.raises(ValueError, match="gold_scores"):
        monitor.record(0, torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="train_scores"):
        monitor.record(0, torch.tensor([0.0, float("nan")]), torch.zeros(2))
    monitor.record(3, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="step"):
        monitor.record(3, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="window"):
        RewardMonitor(window=2)


def test_state_round_trip_resumes_the_same_series():
    monitor = RewardMonitor(window=3)
    for step in range(5):
        monitor.record(step, torch.rand(8, generator=torch.Generator().manual_seed(step)), torch.rand(8))
    resumed = RewardMonitor(window=3)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert resumed.metrics() == monitor.metrics() and resumed.summary() == monitor.summary()
