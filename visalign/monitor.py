"""The reward-hacking monitor: a held-out gold reward tracked beside the training reward during alignment.

A policy optimized against a learned reward can raise it while the quality it stands for falls (Gao et al. 2023,
"Scaling Laws for Reward Model Overoptimization", arXiv 2210.10760). The monitor scores the policy's samples with a
gold reward that is never trained on (on the shapes world, the verifier; elsewhere another reward model or a
judge), logs both, and flags the divergence: over the last `window` updates the training reward rose by more than
`min_rise` while the gold one fell by more than `min_drop`, each change at least `significance` standard errors from
zero (batch means move with the prompts drawn as much as with the policy: without the test, a trainer that samples a
few prompts per update raises false alarms).

The two rewards have different scales, so both are shown in one unit: each update's batch mean minus the first
update's, over the pooled within-batch standard deviation of that reward so far (`train_z`, `gold_z`; a reward whose
batches were all constant keeps its raw units); `gap = train_z - gold_z`. The rise or fall over a window is the
least-squares line through its `z` values, evaluated across the window; its standard error comes from the residuals
about that line. `agreement` is, within a batch, the fraction
of sample pairs (of the same prompt when prompts are given: what group-relative advantages compare) that both rewards
order the same way, gold ties left out and training ties counting 1/2: when it falls, the learned reward has
stopped tracking the gold on the policy's current samples.

Flow-GRPO, Pref-GRPO with a pointwise reward and TempFlow-GRPO keep one whenever an `external_reward` is configured
(`visalign.pipelines.grpo.FlowGRPOTrainer`): every iteration records the training and the external (gold) rewards
of all processes' samples, grouped by prompt; checkpoints carry its records, so a resumed run continues its curve;
the end of training writes `<output_dir>/monitor/` (`monitor.jsonl`, `monitor.json`, `monitor.svg`).
Elsewhere, `update` scores the gold reward itself on a batch of images, and `record` takes both rewards' scores.

The returned metrics (`monitor/train`, `monitor/gold`, `monitor/train_z`, `monitor/gold_z`, `monitor/gap`,
`monitor/agreement`, `monitor/hacking`) go to `engine.log`, so TensorBoard shows both curves live.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visalign.rewards import RewardModel
from visalign.types import check_prompts, check_scores


@dataclass(frozen=True)
class MonitorRecord:
    """One update: the batch means and variances of both rewards, the sample count and the agreement."""

    step: int
    train: float
    gold: float
    train_var: float
    gold_var: float
    count: int
    agreement: float


def agreement(train_scores: Tensor, gold_scores: Tensor, prompts: Sequence[str] | None = None) -> float:
    """The fraction of sample pairs both rewards order the same way (see the module docstring); NaN when the gold
    ties every pair. With `prompts`, only pairs sharing a prompt count."""
    t, g = train_scores.double().flatten(), gold_scores.double().flatten()
    d_gold = g[:, None] - g[None, :]
    d_train = t[:, None] - t[None, :]
    mask = torch.triu(d_gold != 0, diagonal=1)
    if prompts is not None:
        ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        group = torch.tensor([ids[p] for p in prompts])
        mask &= group[:, None] == group[None, :]
    if not mask.any():
        return math.nan
    right = torch.where(d_train == 0, 0.5, ((d_train > 0) == (d_gold > 0)).double())
    return float(right[mask].mean())


class RewardMonitor:
    """Tracks a gold reward beside the training reward and flags divergence (see the module docstring).

    Args:
        gold (`RewardModel`, *optional*): scores the images given to `update`; None when the caller scores the gold
            itself and calls `record`.
        window (`int`): updates over which rises and falls are measured (>= 3).
        min_rise (`float`): the training reward's rise over a window, in `z` units, that counts as rising.
        min_drop (`float`): the gold reward's fall over a window, in `z` units, that counts as falling.
        significance (`float`): how many standard errors from zero each change must be.
        batch_size (`int`): images per gold-reward call in `update`.
    """

    def __init__(
        self,
        gold: RewardModel | None = None,
        *,
        window: int = 10,
        min_rise: float = 0.5,
        min_drop: float = 0.25,
        significance: float = 2.0,
        batch_size: int = 64,
    ) -> None:
        if gold is not None and not isinstance(gold, RewardModel):
            raise ValueError(f"`gold` must be a RewardModel or None, got {type(gold).__name__}")
        if not isinstance(window, int) or window < 3:
            raise ValueError(f"`window` must be an int >= 3, got {window!r}")
        if not (min_rise >= 0 and min_drop >= 0 and significance >= 0):
            raise ValueError(
                f"`min_rise`, `min_drop` and `significance` must be >= 0, got {min_rise, min_drop, significance}"
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.gold, self.window, self.batch_size = gold, window, batch_size
        self.min_rise, self.min_drop, self.significance = min_rise, min_drop, significance
        self.records: list[MonitorRecord] = []

    @torch.no_grad()
    def update(self, step: int, images: Tensor, prompts: list[str], train_scores: Tensor) -> dict[str, float]:
        """Score `images` (`[N, 3, H, W]` in [0, 1]) of `prompts` with the gold reward and `record` them beside the
        training reward's `train_scores` `[N]`."""
        if self.gold is None:
            raise ValueError("this monitor has no `gold` reward: pass one, or call `record` with the gold scores")
        prompts = check_prompts(prompts, images.shape[0])
        gold = torch.cat(
            [
                self.gold.score(images[i : i + self.batch_size].to(self.gold.device), prompts[i : i + self.batch_size])
                .score.detach()
                .cpu()
                for i in range(0, len(prompts), self.batch_size)
            ]
        )
        return self.record(step, train_scores, gold, prompts=prompts)

    def record(
        self, step: int, train_scores: Tensor, gold_scores: Tensor, *, prompts: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Add one update's per-sample scores of both rewards (`[N]` each); returns the `monitor/*` metrics."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"`step` must be an int, got {step!r}")
        if self.records and step <= self.records[-1].step:
            raise ValueError(f"`step` must increase: got {step} after {self.records[-1].step}")
        if not isinstance(train_scores, Tensor) or train_scores.ndim != 1 or len(train_scores) == 0:
            raise ValueError("`train_scores` must be a non-empty 1-D tensor [N]")
        n = len(train_scores)
        t = check_scores(train_scores.detach().cpu(), n, "train_scores").double()
        g = check_scores(gold_scores.detach().cpu(), n, "gold_scores").double()
        if prompts is not None:
            prompts = check_prompts(list(prompts), n)
        self.records.append(
            MonitorRecord(
                step,
                float(t.mean()),
                float(g.mean()),
                float(t.var(correction=0)),
                float(g.var(correction=0)),
                n,
                agreement(t, g, prompts),
            )
        )
        return self.metrics()

    def _z(self, name: str) -> list[float]:
        """The `z` series of `"train"` or `"gold"` (see the module docstring)."""
        means = [getattr(r, name) for r in self.records]
        pooled = math.sqrt(sum(getattr(r, f"{name}_var") for r in self.records) / len(self.records))
        scale = pooled if pooled > 0 else 1.0
        return [(m - means[0]) / scale for m in means]

    def _window_change(self, values: list[float], steps: list[int]) -> tuple[float, float]:
        """The least-squares line through the last `window` points: its change from the window's first step to its
        last, and that change over its standard error (infinite when the points lie on the line)."""
        x, y = torch.tensor(steps[-self.window :], dtype=torch.float64), torch.tensor(values[-self.window :])
        x_centered = x - x.mean()
        slope = float((x_centered * (y - y.mean())).sum() / (x_centered**2).sum())
        residuals = y - y.mean() - slope * x_centered
        se = math.sqrt(float((residuals**2).sum()) / (len(x) - 2) / float((x_centered**2).sum()))
        t = slope / se if se > 0 else math.copysign(math.inf, slope) if slope else 0.0
        return slope * float(x[-1] - x[0]), t

    def flags(self) -> list[bool]:
        """For every update: was the training reward rising while the gold fell over the window ending there?"""
        train, gold, steps = self._z("train"), self._z("gold"), [r.step for r in self.records]
        out = []
        for i in range(len(self.records)):
            if i + 1 < self.window:
                out.append(False)
                continue
            rise, t_rise = self._window_change(train[: i + 1], steps[: i + 1])
            fall, t_fall = self._window_change(gold[: i + 1], steps[: i + 1])
            rising = rise > self.min_rise and t_rise > self.significance
            falling = -fall > self.min_drop and -t_fall > self.significance
            out.append(rising and falling)
        return out

    def metrics(self) -> dict[str, float]:
        """The latest update's `monitor/*` values."""
        if not self.records:
            raise ValueError("the monitor has no record yet")
        last = self.records[-1]
        train_z, gold_z = self._z("train")[-1], self._z("gold")[-1]
        return {
            "monitor/train": last.train,
            "monitor/gold": last.gold,
            "monitor/train_z": train_z,
            "monitor/gold_z": gold_z,
            "monitor/gap": train_z - gold_z,
            "monitor/agreement": last.agreement,
            "monitor/hacking": float(self.flags()[-1]),
        }

    def summary(self) -> dict[str, Any]:
        """What happened: first and last means of both rewards, the gold's best update (the checkpoint to keep),
        the final gap, and whether and where hacking was flagged."""
        if not self.records:
            raise ValueError("the monitor has no record yet")
        flags = self.flags()
        first, last = self.records[0], self.records[-1]
        best = max(self.records, key=lambda r: r.gold)
        flagged = [r.step for r, f in zip(self.records, flags) if f]
        return {
            "updates": len(self.records),
            "train": {"first": first.train, "last": last.train, "change_z": self._z("train")[-1]},
            "gold": {"first": first.gold, "last": last.gold, "change_z": self._z("gold")[-1]},
            "gold_best": {"step": best.step, "value": best.gold},
            "final_gap_z": self._z("train")[-1] - self._z("gold")[-1],
            "agreement": {"first": first.agreement, "last": last.agreement},
            "hacking": bool(flagged),
            "hacking_steps": flagged,
            "rule": f"over {self.window} updates: train rises > {self.min_rise} and gold falls > {self.min_drop} (z), "
            f"each > {self.significance} standard errors",
        }

    def plot(self, title: str = "Training reward vs gold reward") -> Any:
        """Both `z` curves against the step (`visalign.html.line_plot`)."""
        from visalign.html import line_plot

        steps = [r.step for r in self.records]
        return line_plot(
            {"training reward": list(zip(steps, self._z("train"))), "gold reward": list(zip(steps, self._z("gold")))},
            title=title,
            xlabel="step",
            ylabel="change (pooled std units)",
        )

    def save(self, folder: str | Path) -> Path:
        """Write `monitor.jsonl` (one record per update), `monitor.json` (the summary) and `monitor.svg` (the plot)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "monitor.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records))
        (folder / "monitor.json").write_text(json.dumps(self.summary(), indent=2))
        (folder / "monitor.svg").write_text(self.plot().svg)
        return folder

    def state_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [MonitorRecord(**r) for r in state["records"]]
