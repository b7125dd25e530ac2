"""Judges: one interface from (image, prompt, test points) to a pass/fail verdict with a reason per test point.

A `Judge` receives `Sample`s (a prompt item, the image's index among the prompt's images, and its pixels
`[3, H, W]` float in [0, 1]) and returns one `JudgeResult` per sample: a `Verdict` per test point, in the item's
order, plus the judge's raw output when it has one. A verdict's status is

- `"ok"`: judged; `passed` is True or False;
- `"abstain"`: the judge cannot judge this criterion (`passed` is None); the report lists what was not covered;
- `"error"`: the judge should have judged but failed (an unparseable VLM answer, a failed request); `passed` is
  False, so by default it counts as a failure, and it is always reported.

Judges here: `RewardJudge` (a registered reward, thresholded), `RuleJudge` (GenEval's rules over a `Detector`;
`WorldDetector` is the shapes-world verifier's detector), `WorldJudge` (the shapes-world verifier itself), and
`CompositeJudge` (the first judge that does not abstain decides each test point). The VLM judge lives in `vlm.py`.
The rules live in `visalign.reward_models.geneval_rules`; `GenEvalDetector` (`visalign.reward_models.geneval`) is
GenEval's own detector (Mask2Former + CLIP colors).
`build_judge("world" | "rules:world" | "geneval[:DETECTOR[@CLIP]]" | "reward:NAME@THRESHOLD" | "vlm:PATH" |
"openai:MODEL@URL" | "replay:FILE")` makes one from a command-line spec.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from visalign.benchmarks.prompts import PromptItem
from visalign.reward_models.geneval_rules import (  # noqa: F401 (re-exported: the rules live with the GenEval reward)
    Detection,
    Detector,
    GenEvalRules,
    check_geneval,
    relative_position,
)


@dataclass(frozen=True)
class Verdict:
    """The judgment of one test point on one image."""

    passed: bool | None
    reason: str = ""
    status: str = "ok"  # "ok" | "abstain" | "error"
    judge: str = ""

    @classmethod
    def abstain(cls, reason: str, judge: str = "") -> Verdict:
        return cls(None, reason, "abstain", judge)

    @classmethod
    def error(cls, reason: str, judge: str = "") -> Verdict:
        return cls(False, reason, "error", judge)

    def __post_init__(self):
        expected = {"ok": (True, False), "abstain": (None,), "error": (False,)}
        if self.status not in expected or self.passed not in expected[self.status]:
            raise ValueError(f"a verdict with `status` {self.status!r} cannot have `passed` {self.passed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    """What a judge looks at: a prompt item, which of its images (`image_id`), and the pixels `[3, H, W]`."""

    item: PromptItem
    image_id: int
    pixels: Tensor


@dataclass
class JudgeResult:
    verdicts: list[Verdict]
    raw: str | None = None


class Judge(ABC):
    """Base class: `name`, `settings()` (recorded in the run record and hashed into `fingerprint()`), `judge()`."""

    name: str = "judge"

    def settings(self) -> dict:
        """Everything that changes the verdicts: model ids, thresholds, decoding parameters, template versions."""
        return {}

    def fingerprint(self) -> str:
        """A hash of `name` and `settings()`: cached verdicts are reused only under the same fingerprint."""
        blob = json.dumps({"name": self.name, **self.settings()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @abstractmethod
    def judge(self, samples: Sequence[Sample]) -> list[JudgeResult]:
        """One result per sample, each with one verdict per test point of the sample's item."""


class CompositeJudge(Judge):
    """Several judges in order; each test point takes the first verdict that is not an abstention."""

    def __init__(self, judges: Sequence[Judge]):
        if not judges:
            raise ValueError("`judges` is empty")
        self.judges = list(judges)
        self.name = "+".join(j.name for j in self.judges)

    def settings(self) -> dict:
        return {"judges": [{"name": j.name, **j.settings()} for j in self.judges]}

    def judge(self, samples: Sequence[Sample]) -> list[JudgeResult]:
        verdicts: list[list[Verdict | None]] = [[None] * len(s.item.test_points) for s in samples]
        raws: list[list[str]] = [[] for _ in samples]
        pending = list(range(len(samples)))
        for judge in self.judges:  # each judge sees only the samples that still have an abstention
            if not pending:
                break
            for i, result in zip(pending, judge.judge([samples[i] for i in pending])):
                raws[i] += [f"[{judge.name}] {result.raw}"] if result.raw is not None else []
                for k, v in enumerate(result.verdicts):
                    if verdicts[i][k] is None or (verdicts[i][k].status == "abstain" and v.status != "abstain"):
                        verdicts[i][k] = v
            pending = [i for i in pending if any(v.status == "abstain" for v in verdicts[i])]
        return [JudgeResult(v, "\n".join(r) or None) for v, r in zip(verdicts, raws)]


class RewardJudge(Judge):
    """A registered reward as a judge: a test point passes when the image's score reaches `threshold`.

    The reward scores the whole prompt, so every judged test point of an image gets the same verdict; `criteria`
    (None = all) limits which criteria it judges, the others abstain.
    """

    def __init__(self, reward: Any, threshold: float, criteria: Sequence[str] | None = None, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        self.reward, self.threshold, self.batch_size = reward, float(threshold), batch_size
        self.criteria = None if criteria is None else tuple(criteria)
        self.name = f"reward:{reward.name}"

    def settings(self) -> dict:
        return {"reward": self.reward.name, "threshold": self.threshold, "criteria": self.criteria}

    @torch.no_grad()
    def judge(self, samples: Sequence[Sample]) -> list[JudgeResult]:
        scores: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            pixels = torch.stack([s.pixels for s in chunk]).to(self.reward.device)
            scores += self.reward.score(pixels, [s.item.text for s in chunk]).score.tolist()
        out = []
        for sample, score in zip(samples, scores):
            ok = score >= self.threshold
            why = f"{self.reward.name} = {score:.4g} {'>=' if ok else '<'} {self.threshold:g}"
            out.append(
                JudgeResult(
                    [
                        Verdict(ok, why, judge=self.name)
                        if self.criteria is None or tp.criterion in self.criteria
                        else Verdict.abstain(f"{self.name} does not judge {tp.criterion}", self.name)
                        for tp in sample.item.test_points
                    ],
                    raw=f"{score:.6g}",
                )
            )
        return out


# ---------------------------------------------------------------------------------------------------------------
# GenEval rules over a detector


class RuleJudge(Judge):
    """GenEval's rules over a `Detector`: judges test points that carry a `spec` (or whose prompt has one).

    Images of one size are detected in one batch; colors come from the detector's `classify_colors`. A test point
    without a spec abstains (it is not GenEval's to judge).
    """

    def __init__(self, detector: Detector, rules: GenEvalRules | None = None):
        self.detector, self.rules = detector, rules or GenEvalRules()
        self.name = f"rules:{detector.name}"

    def settings(self) -> dict:
        return {"detector": self.detector.name, **self.detector.settings(), **asdict(self.rules)}

    @torch.no_grad()
    def judge(self, samples: Sequence[Sample]) -> list[JudgeResult]:
        specs = [[tp.spec or s.item.spec for tp in s.item.test_points] for s in samples]
        detections: list[list[Detection]] = [[] for _ in samples]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, sample in enumerate(samples):
            if any(specs[i]):
                by_shape.setdefault(tuple(sample.pixels.shape), []).append(i)
        for indices in by_shape.values():
            found = self.detector.detect_batch(torch.stack([samples[i].pixels for i in indices]))
            for i, dets in zip(indices, found):
                detections[i] = dets
        out = []
        for sample, sample_specs, dets in zip(samples, specs, detections):

            def colors(objects: Sequence[Detection], classname: str, pixels: Tensor = sample.pixels) -> list:
                return self.detector.classify_colors(pixels, objects, classname)

            verdicts = []
            for tp, spec in zip(sample.item.test_points, sample_specs):
                if not spec:
                    verdicts.append(Verdict.abstain(f"no GenEval rule spec for {tp.criterion}", self.name))
                    continue
                passed, why = check_geneval(spec, dets, self.rules, colors)
                verdicts.append(Verdict(passed, why, "ok" if passed is not None else "abstain", self.name))
            found = ", ".join(f"{d.color + ' ' if d.color else ''}{d.label}@{d.score:.2f}" for d in dets)
            out.append(JudgeResult(verdicts, raw=f"detections: {found or 'none'}"))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The shapes world


class WorldDetector(Detector):
    """The shapes-world verifier's detector: shapes and palette colors by color segmentation, confidence 1.

    The verifier reports centroids and areas; the box is the square of the same area around the centroid.
    """

    name = "world"

    def detect(self, pixels: Tensor) -> list[Detection]:
        from visalign.world.verifier import detect

        out = []
        for d in detect(pixels.float().cpu().numpy()):
            h = float(np.sqrt(d.area)) / 2
            out.append(Detection(d.shape, 1.0, (d.x - h, d.y - h, d.x + h, d.y + h), d.color))
        return out


class WorldJudge(Judge):
    """The shapes-world verifier: a world prompt's test points pass when every clause of the prompt holds.

    Prompts outside the world's language are abstained on. The reason lists each clause (`ok`/`FAIL`).
    """

    name = "world"

    def settings(self) -> dict:
        from visalign.world import verifier

        return {"min_area": verifier.MIN_AREA, "margin": verifier.MARGIN, "color_distance": verifier.COLOR_DISTANCE}

    def judge(self, samples: Sequence[Sample]) -> list[JudgeResult]:
        from visalign.world.scenes import Prompt, parse_prompt
        from visalign.world.verifier import verify

        out = []
        for sample in samples:
            item = sample.item
            try:
                prompt = Prompt.from_dict(item.extras["world"]) if "world" in item.extras else parse_prompt(item.text)
            except ValueError as e:
                out.append(JudgeResult([Verdict.abstain(str(e), self.name) for _ in item.test_points]))
                continue
            verdict = verify(sample.pixels.float().cpu().numpy(), prompt)
            out.append(
                JudgeResult(
                    [Verdict(verdict.correct, verdict.reason, judge=self.name) for _ in item.test_points],
                    raw=verdict.reason,
                )
            )
        return out


# ---------------------------------------------------------------------------------------------------------------


def build_judge(
    spec: str, *, device: str | None = None, api_key: str | None = None, timeout: float = 300.0, **vlm_options: Any
) -> Judge:
    """A judge from a command-line spec.

    - `world`: the shapes-world verifier; `rules:world`: GenEval's rules over the world detector;
    - `geneval` or `geneval:DETECTOR[@CLIP]`: GenEval (its rules over a Mask2Former COCO-instance folder or Hub
      repo and a transformers CLIP for colors; defaults `facebook/mask2former-swin-small-coco-instance` and
      `openai/clip-vit-large-patch14`);
    - `reward:NAME@THRESHOLD`: a registered reward (`visalign.list_rewards()`), passing at `score >= THRESHOLD`;
    - `vlm:PATH`: a local transformers VLM (Qwen2.5-VL class); `openai:MODEL@URL`: an OpenAI-compatible server
      (URL like `http://127.0.0.1:8000/v1`); `replay:FILE`: answers recorded in a JSONL file (a run's
      `verdicts.jsonl` or lines `{"prompt_id", "image_id", "raw"}`).

    `api_key` is sent to an OpenAI-compatible server, and `timeout` bounds each of its requests in all (seconds);
    `vlm_options` go to `VLMJudgeConfig` (e.g. `max_new_tokens`, `max_retries`, `image_format`); other judges ignore
    them.
    """
    kind, _, arg = spec.partition(":")
    if spec == "world":
        return WorldJudge()
    if kind == "rules":
        if arg != "world":
            raise ValueError(f"`spec` {spec!r}: the only built-in detector is 'world' (rules:world)")
        return RuleJudge(WorldDetector())
    if kind == "geneval":
        from visalign.reward_models.geneval import CLIP, GenEvalDetector

        detector_id, _, clip_id = arg.partition("@")
        detector = GenEvalDetector.from_pretrained(detector_id or None, color_model=clip_id or CLIP)
        return RuleJudge(detector.to(device) if device is not None else detector)
    if kind == "reward":
        from visalign.rewards import load_reward

        name, sep, threshold = arg.partition("@")
        if not name or not sep:
            raise ValueError(f"`spec` {spec!r} must look like reward:NAME@THRESHOLD, e.g. reward:world-verifier@1")
        return RewardJudge(load_reward(name, device=device), float(threshold))
    if kind in ("vlm", "openai", "replay"):
        from visalign.benchmarks import vlm

        if not arg:
            raise ValueError(f"`spec` {spec!r} needs an argument after '{kind}:'")
        config = vlm.VLMJudgeConfig(**vlm_options)
        if kind == "vlm":
            backend = vlm.TransformersVLM.from_pretrained(arg, device=device)
        elif kind == "openai":
            model, _, url = arg.partition("@")
            backend = vlm.OpenAIServerVLM(url or "http://127.0.0.1:8000/v1", model, api_key=api_key, timeout=timeout)
        else:
            backend = vlm.ReplayVLM.from_jsonl(arg)
        return vlm.VLMJudge(backend, config)
    raise ValueError(
        f"unknown judge `spec` {spec!r}; use world, rules:world, geneval[:DETECTOR[@CLIP]], reward:NAME@THRESHOLD, "
        f"vlm:PATH, openai:MODEL@URL or replay:FILE"
    )
