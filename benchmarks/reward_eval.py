"""`visalign bench reward`: how well a reward model agrees with held-out preferences and labels.

    visalign bench reward --model world-clip --pretrained runs/world_reward --pairs heldout_pairs/ --out runs/eval
    visalign bench reward --model pickscore --pairs test.parquet --out runs/pickscore_eval
    visalign bench reward --model learned --pretrained runs/aspects \\
        --scores labelled/manifest.jsonl --aspects alignment aesthetic --out runs/aspects_eval

Both images of a pair are scored with `reward.score`; the model's preference probability is the Bradley-Terry
`p_0 = sigmoid((s_0 - s_1) / reward.temperature)` (what `RewardModel.compare` computes for pointwise rewards).
Benchmarks disagree on ties (`references/reward_models.md` section 18), so three accuracies are reported, each with
its policy:
- `accuracy_without_ties`: pairs labelled as ties are left out; a pair is right when the preferred image scores
  higher, and equal scores count 1/2 (imscore's Pick-a-Pic v2 protocol, HPSv2's for HPDv2 pairs).
- `accuracy_with_ties`: every pair; the model predicts a tie when `|p_0 - p_1| <= tie_threshold` (default 0: only
  equal scores); a right call counts 1, a tie on either side (predicted or labelled, not both) 1/2, a wrong call 0
  (PickScore's `eval_preference_predictor.py`).
- `accuracy_with_ties_calibrated`: the same with the threshold that maximizes it on the evaluated pairs (the tie
  calibration of "Ties Matter", Deutsch et al. 2023, used by VideoAlign): an optimistic figure, shown with its
  threshold.
Calibration is a reliability table of `p_0` against the labels of non-tie pairs, symmetrized (each pair also counts
as `(1 - p_0, 1 - label)`, since the order of a pair is arbitrary), with the expected calibration error (ECE).
Labelled images give Pearson and Spearman correlations of the score and of each aspect with their labels, and the
MSE of each heatmap; pairs with per-aspect labels give each aspect's accuracy without ties.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BINS = 10


def pairwise_accuracy(prob_0: Any, label_0: Any, *, tie_threshold: float = 0.0) -> dict[str, float]:
    """Accuracies with and without ties (see the module docstring) of preference probabilities against labels.

    Args:
        prob_0 (`[N]`): the model's probability that image 0 is preferred.
        label_0 (`[N]`): 1 (image 0 preferred), 0 (image 1) or 0.5 (a tie).
        tie_threshold (`float`): predicted ties are pairs with `|2 p_0 - 1| <= tie_threshold`.
    Returns `pairs`, `ties`, `accuracy_without_ties` (NaN when every pair is a tie), `accuracy_with_ties`,
    `tie_threshold`, `accuracy_with_ties_calibrated` and `calibrated_threshold`.
    """
    p, y = np.asarray(prob_0, dtype=np.float64), np.asarray(label_0, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape or len(p) == 0:
        raise ValueError(
            f"`prob_0` and `label_0` must be non-empty 1-D arrays of one length, got {p.shape}, {y.shape}"
        )
    if not np.all(np.isin(y, (0.0, 0.5, 1.0))):
        raise ValueError(f"`label_0` values must be 0, 0.5 or 1, got {sorted(set(y.tolist()) - {0.0, 0.5, 1.0})}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("`prob_0` values must lie in [0, 1]")
    if not 0 <= tie_threshold <= 1:
        raise ValueError(f"`tie_threshold` must be in [0, 1], got {tie_threshold}")
    tie = y == 0.5
    decided = ~tie
    right = np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1.0)).astype(np.float64))
    margin = np.abs(2 * p - 1)
    candidates = np.unique(np.concatenate([[0.0], margin]))
    with_ties = np.array([_with_ties(margin, p, y, t) for t in candidates])
    best = int(np.argmax(with_ties))
    return {
        "pairs": float(len(p)),
        "ties": float(tie.sum()),
        "accuracy_without_ties": float(right[decided].mean()) if decided.any() else math.nan,
        "accuracy_with_ties": _with_ties(margin, p, y, tie_threshold),
        "tie_threshold": float(tie_threshold),
        "accuracy_with_ties_calibrated": float(with_ties[best]),
        "calibrated_threshold": float(candidates[best]),
    }


def _with_ties(margin: np.ndarray, p: np.ndarray, y: np.ndarray, threshold: float) -> float:
    predicted = np.where(margin <= threshold, 0.5, (p > 0.5).astype(np.float64))
    score = np.where(predicted == y, 1.0, np.where((predicted == 0.5) | (y == 0.5), 0.5, 0.0))
    return float(score.mean())


def reliability(prob_0: Any, label_0: Any, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """A symmetrized reliability table of `prob_0` against the non-tie labels: `bins` equal-width bins of the
    predicted probability, each with `count`, `mean_prob` and `frequency` (of the preferred outcome), and `ece`
    (the count-weighted mean of `|frequency - mean_prob|`). NaN ECE when no pair is decided."""
    p, y = np.asarray(prob_0, dtype=np.float64), np.asarray(label_0, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"`prob_0` and `label_0` must be 1-D arrays of one length, got {p.shape}, {y.shape}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"`bins` must be a positive int, got {bins!r}")
    keep = y != 0.5
    p, y = np.concatenate([p[keep], 1 - p[keep]]), np.concatenate([y[keep], 1 - y[keep]])
    index = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        row = {"low": b / bins, "high": (b + 1) / bins, "count": count, "mean_prob": None, "frequency": None}
        if count:
            row["mean_prob"], row["frequency"] = float(p[members].mean()), float(y[members].mean())
            ece += count * abs(row["frequency"] - row["mean_prob"])
        table.append(row)
    return {"bins": table, "ece": ece / len(p) if len(p) else math.nan, "symmetrized_pairs": int(keep.sum())}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman's convention)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def correlations(prediction: Any, target: Any) -> dict[str, float]:
    """Pearson and Spearman correlations over the finite entries of `target` (NaN = unlabelled), and their count;
    NaN when fewer than 2 remain or either side is constant."""
    x, y = np.asarray(prediction, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"`prediction` and `target` must be 1-D arrays of one length, got {x.shape}, {y.shape}")
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        if len(a) < 2 or a.std() == 0 or b.std() == 0:
            return math.nan
        return float(np.corrcoef(a, b)[0, 1])

    return {"pearson": pearson(x, y), "spearman": pearson(_ranks(x), _ranks(y)), "count": float(len(x))}


def score_images(reward: Any, images: Any, prompts: list[str]) -> Any:
    """`reward.score` of `images` on the reward's device, the output moved to the CPU (no gradient)."""
    import torch

    with torch.no_grad():
        out = reward.score(images.to(reward.device), prompts)
    return out.detach()


def evaluate_reward(
    reward: Any, data: Any, *, batch_size: int = 64, tie_threshold: float = 0.0, bins: int = DEFAULT_BINS
) -> dict[str, Any]:
    """Agreement of `reward` with `data` (`RewardPairs` or `ScoredImages` of `visalign.pipelines.reward_data`).

    Returns `metrics` (flat floats: the accuracies, ECE, per-aspect and per-kind figures, or the correlations) and,
    for pairs, `reliability`.
    """
    import torch

    from visalign.pipelines.reward_data import RewardPairs, ScoredImages

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    if isinstance(data, RewardPairs):
        scores_0, scores_1, aspects_0, aspects_1 = [], [], [], []
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            out = score_images(reward, torch.cat([batch["images_0"], batch["images_1"]]), batch["captions"] * 2)
            s_0, s_1 = out.score.cpu().double().chunk(2)
            scores_0.append(s_0)
            scores_1.append(s_1)
            pairs = {k: v.cpu().double().chunk(2) for k, v in out.aspects.items()}
            aspects_0.append({k: v[0] for k, v in pairs.items()})
            aspects_1.append({k: v[1] for k, v in pairs.items()})
        s_0, s_1 = torch.cat(scores_0), torch.cat(scores_1)
        prob = torch.sigmoid((s_0 - s_1) / reward.temperature).numpy()
        labels = data.labels.numpy()
        metrics = pairwise_accuracy(prob, labels, tie_threshold=tie_threshold)
        calibration = reliability(prob, labels, bins)
        metrics["ece"] = calibration["ece"]
        for k, name in enumerate(data.aspect_names):
            if name not in reward.aspect_names:
                raise ValueError(f"the data labels the aspect {name!r}, which {reward.name} does not output")
            a_0 = torch.cat([a[name] for a in aspects_0])
            a_1 = torch.cat([a[name] for a in aspects_1])
            target = data.aspect_labels[:, k].double()
            known = torch.isfinite(target) & (target != 0.5)
            right = torch.where(a_0 == a_1, 0.5, ((a_0 > a_1) == (target > 0.5)).double())
            metrics[f"aspect/{name}/accuracy_without_ties"] = float(right[known].mean()) if known.any() else math.nan
        for kind in sorted(set(data.kinds or ())):
            rows = np.array([k == kind for k in data.kinds])
            part = pairwise_accuracy(prob[rows], labels[rows], tie_threshold=tie_threshold)
            metrics[f"{kind}/accuracy_without_ties"] = part["accuracy_without_ties"]
            metrics[f"{kind}/pairs"] = part["pairs"]
        return {"metrics": metrics, "reliability": calibration}
    if isinstance(data, ScoredImages):
        scores, aspects, errors = [], [], {n: [] for n in data.heatmap_names}
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            out = score_images(reward, batch["images"], batch["captions"])
            scores.append(out.score.cpu().double())
            aspects.append({k: v.cpu().double() for k, v in out.aspects.items()})
            for name in data.heatmap_names:
                if name not in out.heatmaps:
                    raise ValueError(f"the data has heatmap {name!r}, which {reward.name} does not output")
                errors[name].append(
                    ((out.heatmaps[name].cpu().double() - batch["heatmaps"][name].double()) ** 2).mean((1, 2))
                )
        metrics: dict[str, float] = {"images": float(len(data))}
        if data.has_overall:
            metrics |= {f"score/{k}": v for k, v in correlations(torch.cat(scores), data.scores).items()}
        for k, name in enumerate(data.aspect_names):
            if name not in reward.aspect_names:
                raise ValueError(f"the data labels the aspect {name!r}, which {reward.name} does not output")
            predicted = torch.cat([a[name] for a in aspects])
            metrics |= {f"aspect/{name}/{m}": v for m, v in correlations(predicted, data.aspects[:, k]).items()}
        for name, values in errors.items():
            metrics[f"heatmap/{name}/mse"] = float(torch.cat(values).mean())
        return {"metrics": metrics}
    raise ValueError(f"`data` must be RewardPairs or ScoredImages, got {type(data).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Report and command line


def report_markdown(result: dict[str, Any], title: str) -> str:
    """The metrics table, the tie policies and the reliability table as Markdown."""
    m = result["metrics"]
    lines = [f"# {title}", ""]
    if "accuracy_without_ties" in m:
        lines += [
            f"{int(m['pairs'])} pairs, {int(m['ties'])} labelled as ties.",
            "",
            "| metric | value | tie policy |",
            "| --- | --- | --- |",
            f"| accuracy without ties | {m['accuracy_without_ties']:.4f} | tie-labelled pairs left out; "
            "equal scores 1/2 |",
            f"| accuracy with ties | {m['accuracy_with_ties']:.4f} | predicted tie when abs(p0 - p1) <= "
            f"{m['tie_threshold']:g}; a tie on one side 1/2 |",
            f"| accuracy with ties, calibrated | {m['accuracy_with_ties_calibrated']:.4f} | threshold "
            f"{m['calibrated_threshold']:.4g} chosen on these pairs (optimistic) |",
            f"| ECE | {m['ece']:.4f} | non-tie pairs, symmetrized |",
        ]
        others = {k: v for k, v in m.items() if "/" in k}
        if others:
            lines += ["", "| breakdown | value |", "| --- | --- |"] + [f"| {k} | {v:.4g} |" for k, v in others.items()]
        lines += ["", "Reliability (predicted probability of the preferred outcome vs. observed frequency):", ""]
        lines += ["| bin | pairs | mean p | frequency |", "| --- | --- | --- | --- |"]
        for row in result["reliability"]["bins"]:
            if row["count"]:
                lines.append(
                    f"| {row['low']:.1f}-{row['high']:.1f} | {row['count']} | {row['mean_prob']:.3f} | "
                    f"{row['frequency']:.3f} |"
                )
    else:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.4g} |" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def reliability_plot(calibration: dict[str, Any], title: str = "Reliability") -> Any:
    """The reliability diagram (`visalign.html.line_plot`): the model's bins against the diagonal."""
    from visalign.html import line_plot

    points = [(row["mean_prob"], row["frequency"]) for row in calibration["bins"] if row["count"]]
    return line_plot(
        {"model": points, "perfect calibration": [(0.0, 0.0), (1.0, 1.0)]},
        title=title,
        xlabel="predicted probability",
        ylabel="observed frequency",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a reward name (list_rewards()) or package.module:Class")
    parser.add_argument("--pretrained", default=None, help="its weights: a folder, file or hub id")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--pairs", help="held-out pairs: Pick-a-Pic parquet/jsonl/folder, or an HPDv2 .json")
    data.add_argument("--scores", help="labelled images: a jsonl file or a folder with manifest.jsonl")
    parser.add_argument(
        "--split", default="test", help="Pick-a-Pic shards or hub dataset: the split to evaluate (default: test)"
    )
    parser.add_argument("--image-root", default=None, help="HPDv2: the image folder (default: the json's folder)")
    parser.add_argument("--aspects", nargs="*", default=[], help="aspect labels to evaluate")
    parser.add_argument("--heatmaps", nargs="*", default=[], help="heatmap labels to evaluate (with --scores)")
    parser.add_argument("--resolution", type=int, default=None, help="resize and center-crop images to this")
    parser.add_argument("--tie-threshold", type=float, default=0.0, help="predicted tie when |p0 - p1| <= this")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS, help="reliability bins")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad rows: raise, or skip")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    parser.add_argument("--out", default=None, help="folder for reward_eval.json, report.md, reliability.svg")


def run(args: argparse.Namespace) -> int:
    from visalign.pipelines.reward_data import load_hpdv2, load_pickapic, load_scored_images
    from visalign.rewards import load_reward

    try:
        if args.pairs:
            if Path(args.pairs).suffix == ".json":
                data = load_hpdv2(
                    args.pairs, image_root=args.image_root, on_error=args.on_error, resolution=args.resolution
                )
            else:
                data = load_pickapic(
                    args.pairs,
                    split=args.split,
                    aspects=args.aspects,
                    on_error=args.on_error,
                    resolution=args.resolution,
                )
        else:
            data = load_scored_images(
                args.scores,
                aspects=args.aspects,
                heatmaps=args.heatmaps,
                on_error=args.on_error,
                resolution=args.resolution,
            )
        reward = load_reward(args.model, args.pretrained, device=args.device)
        result = evaluate_reward(
            reward, data, batch_size=args.batch_size, tie_threshold=args.tie_threshold, bins=args.bins
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"visalign bench reward: {e}", file=sys.stderr)
        return 2
    result["model"], result["pretrained"] = args.model, args.pretrained
    result["data"] = args.pairs or args.scores
    result["skipped"] = data.pairs.skipped if args.pairs else data.skipped
    title = f"{args.model} on {result['data']}"
    markdown = report_markdown(result, title)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reward_eval.json").write_text(json.dumps(result, indent=2))
        (out / "report.md").write_text(markdown)
        if "reliability" in result and result["reliability"]["symmetrized_pairs"]:
            (out / "reliability.svg").write_text(reliability_plot(result["reliability"], title).svg)
    return 0
