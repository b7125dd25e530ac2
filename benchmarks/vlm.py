"""The VLM judge: one checklist request per image, strict answer parsing, deterministic decoding.

The protocol follows UniGenBench's (arXiv 2508.20751, `eval/` of CodeGoat24/UniGenBench), in our own wording: the
request gives the prompt, the list of test points with a one-line definition of each criterion and the span of the
prompt it concerns, asks for a 0/1 decision per test point from visible content only, and asks for the answer as
two tagged Python lists, `<analysis>[...]</analysis>` and `<score>[...]</score>`, of one entry per test point (the
format UniGenBench's released evaluation models were trained to write).

Deviations from the upstream scorer, on purpose:
- parsing is strict: both tags, lists of the right length, scores exactly 0 or 1 (ints or booleans);
- an answer that does not parse (after `max_retries` further attempts) makes every test point of the image an
  `"error"` verdict, which counts as a failure and is reported; upstream drops such rows from the denominators;
- decoding is greedy (`do_sample=False` locally, `temperature=0, top_p=1` and a fixed `seed` on a server) and
  recorded in the judge's settings; images are sent as lossless PNG by default (`image_format="jpeg"` sends
  JPEG quality 95, as upstream's vLLM client does).

Backends: `TransformersVLM` (a local Qwen2.5-VL-class checkpoint through `AutoModelForImageTextToText`),
`OpenAIServerVLM` (an OpenAI-compatible `/chat/completions` server such as vLLM or sglang serving the UniGenBench
evaluation models), `ReplayVLM` (answers recorded earlier, for re-scoring and tests).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from visalign.benchmarks import taxonomy
from visalign.benchmarks.judges import Judge, JudgeResult, Sample, Verdict
from visalign.benchmarks.prompts import PromptItem
from visalign.files import read_text, to_pil
from visalign.reward_models.vlm import chat_body, post_chat

logger = logging.getLogger(__name__)

TEMPLATE = "visalign-checklist-v1"


def checklist_prompt(item: PromptItem) -> str:
    """The judge request for one image of `item` (template `visalign-checklist-v1`)."""
    lines = [
        "You are checking an image made by a text-to-image model against a checklist derived from its prompt.",
        "Judge only what is visible in the image.",
        "",
        f"Prompt: «{item.text}»",
        "",
        f"Checklist ({len(item.test_points)} items):",
    ]
    for k, tp in enumerate(item.test_points, 1):
        meaning = taxonomy.definition(tp.criterion)
        lines.append(f"{k}. {tp.criterion}" + (f" (checks {meaning})" if meaning else ""))
        lines.append(f"   In this prompt: «{tp.span or item.text}»")
    n = len(item.test_points)
    lines += [
        "",
        "For each item, in order, decide whether the image meets the requirement: 1 if it clearly does, 0 if it does",
        "not or if you cannot tell. Judge each item on its own. Describe only what you see; do not guess at what is",
        "hidden, implied or off-frame.",
        "",
        f"Answer with exactly these two tags, each holding a Python list of {n} entries in checklist order:",
        "<analysis>['one or two sentences on item 1', ...]</analysis>",
        "<score>[1, 0, ...]</score>",
    ]
    return "\n".join(lines)


class AnswerParseError(ValueError):
    """A judge answer that does not follow the required format."""


def _last_tag(text: str, tag: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
    if not found:
        raise AnswerParseError(f"no <{tag}>...</{tag}>")
    return found[-1].strip()


def _as_list(body: str, tag: str) -> list:
    for parse in (ast.literal_eval, json.loads):
        try:
            value = parse(body)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, (list, tuple)):
            return list(value)
        raise AnswerParseError(f"<{tag}> holds a {type(value).__name__}, not a list")
    raise AnswerParseError(f"<{tag}> is not a list literal: {body[:80]!r}")


def parse_answer(text: str, n: int) -> tuple[list[bool], list[str]]:
    """Scores (as booleans) and analyses from a judge answer with `n` test points; `AnswerParseError` otherwise."""
    scores = _as_list(_last_tag(text, "score"), "score")
    analysis = _as_list(_last_tag(text, "analysis"), "analysis")
    if len(scores) != n or len(analysis) != n:
        raise AnswerParseError(f"expected {n} scores and analyses, got {len(scores)} and {len(analysis)}")
    bad = [s for s in scores if type(s) not in (int, bool) or s not in (0, 1)]
    if bad:
        raise AnswerParseError(f"scores must be 0 or 1, got {bad[0]!r}")
    if not all(isinstance(a, str) for a in analysis):
        raise AnswerParseError("analyses must be strings")
    return [bool(s) for s in scores], analysis


@dataclass
class VLMRequest:
    """One request: the image (encoded), the checklist text, and which attempt this is (0 = first)."""

    prompt_id: str
    image_id: int
    text: str
    image: bytes
    mime: str
    attempt: int
    max_new_tokens: int

    def pil(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image)).convert("RGB")


class JudgeRequestError(RuntimeError):
    """A backend could not answer (connection refused, HTTP error, no recorded answer)."""


class VLMBackend(ABC):
    """Answers one `VLMRequest`. `concurrent`: whether `complete` may run in several threads at once."""

    name: str = "vlm"
    concurrent: bool = False

    def settings(self) -> dict:
        return {}

    @abstractmethod
    def complete(self, request: VLMRequest) -> str:
        """The model's answer text; `JudgeRequestError` when no answer could be had."""


@dataclass
class VLMJudgeConfig:
    max_new_tokens: int = field(default=1024, metadata={"help": "answer length limit"})
    max_retries: int = field(
        default=0,
        metadata={
            "help": "extra attempts after an unparseable or failed answer (a server gets seed + attempt; a "
            "greedy local model would repeat itself, so only request failures are worth retrying there)"
        },
    )
    image_format: str = field(default="png", metadata={"help": "png (lossless) or jpeg (quality 95)"})
    max_workers: int = field(default=1, metadata={"help": "requests in flight at once (server backends only)"})
    backoff: float = field(default=1.0, metadata={"help": "seconds before retrying a failed request, doubling"})

    def __post_init__(self):
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"`image_format` must be 'png' or 'jpeg', got {self.image_format!r}")
        if self.max_retries < 0 or self.max_new_tokens < 1 or self.max_workers < 1 or self.backoff < 0:
            raise ValueError(
                "`max_retries` and `backoff` must be >= 0, `max_new_tokens` and `max_workers` >= 1; got "
                f"{self.max_retries}, {self.backoff}, {self.max_new_tokens}, {self.max_workers}"
            )


def encode_image(pixels: torch.Tensor, image_format: str = "png") -> tuple[bytes, str]:
    """`[3, H, W]` float pixels in [0, 1] as PNG or JPEG (quality 95) bytes, and the MIME type."""
    buf = io.BytesIO()
    to_pil(pixels).save(buf, format=image_format.upper(), **({"quality": 95} if image_format == "jpeg" else {}))
    return buf.getvalue(), f"image/{image_format}"


class VLMJudge(Judge):
    """A VLM answering the checklist of each image; see the module docstring for the protocol."""

    def __init__(self, backend: VLMBackend, config: VLMJudgeConfig | None = None):
        self.backend, self.config = backend, config or VLMJudgeConfig()
        if self.config.max_workers > 1 and not backend.concurrent:
            raise ValueError(f"`max_workers` must be 1 for the {type(backend).__name__} backend (one model, one call)")
        self.name = f"vlm:{backend.name}"

    def settings(self) -> dict:
        """The template, decoding and image settings and the backend's; not `max_workers`/`backoff` (no effect on
        the verdicts, so changing them keeps cached verdicts valid)."""
        config = {k: v for k, v in asdict(self.config).items() if k not in ("max_workers", "backoff")}
        return {"template": TEMPLATE, **config, "backend": self.backend.settings()}

    def judge(self, samples: Sequence[Sample]) -> list[JudgeResult]:
        if self.config.max_workers == 1:
            return [self._judge_one(s) for s in samples]
        with ThreadPoolExecutor(self.config.max_workers) as pool:
            return list(pool.map(self._judge_one, samples))

    def _judge_one(self, sample: Sample) -> JudgeResult:
        item, n = sample.item, len(sample.item.test_points)
        if n == 0:
            return JudgeResult([])
        image, mime = encode_image(sample.pixels, self.config.image_format)
        text, raw, problem = checklist_prompt(item), None, ""
        for attempt in range(self.config.max_retries + 1):
            request = VLMRequest(item.id, sample.image_id, text, image, mime, attempt, self.config.max_new_tokens)
            try:
                raw = self.backend.complete(request)
                passed, analysis = parse_answer(raw, n)
                return JudgeResult([Verdict(p, a, judge=self.name) for p, a in zip(passed, analysis)], raw)
            except JudgeRequestError as e:
                problem = f"judge request failed: {e}"
                if attempt < self.config.max_retries:
                    time.sleep(min(self.config.backoff * 2**attempt, 30.0))
            except AnswerParseError as e:
                problem = f"unparseable judge answer: {e}"
        logger.warning("%s, image %s_%d: %s", self.name, item.id, sample.image_id, problem)
        return JudgeResult([Verdict.error(problem, self.name) for _ in range(n)], raw)


# ---------------------------------------------------------------------------------------------------------------
# Backends


class TransformersVLM(VLMBackend):
    """A local chat VLM (Qwen2.5-VL class) with greedy decoding; `model` and `processor` are built objects."""

    def __init__(self, model: Any, processor: Any, name_or_path: str = ""):
        self.model, self.processor = model.eval(), processor
        self.name = name_or_path or type(model).__name__

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | None = None, dtype: torch.dtype | str = "auto"
    ) -> TransformersVLM:
        """Load a checkpoint folder or hub id with `AutoProcessor` and `AutoModelForImageTextToText`."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        if device is not None:
            model.to(device)
        return cls(model, processor, str(path))

    def settings(self) -> dict:
        import transformers

        return {
            "backend": "transformers",
            "model": self.name,
            "class": type(self.model).__name__,
            "dtype": str(self.model.dtype),
            "do_sample": False,
            "num_beams": 1,
            "transformers": transformers.__version__,
        }

    @torch.no_grad()
    def complete(self, request: VLMRequest) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.text}]}]
        chat = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[chat], images=[request.pil()], return_tensors="pt").to(self.model.device)
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=request.max_new_tokens)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


class OpenAIServerVLM(VLMBackend):
    """An OpenAI-compatible chat-completions server (vLLM, sglang, ...): `POST {base_url}/chat/completions`."""

    concurrent = True

    def __init__(
        self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 300.0, seed: int = 0
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"`base_url` must start with http:// or https://, got {base_url!r}")
        if not model:
            raise ValueError("`model` is empty: give the served model name (e.g. QwenVL)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}")
        self.base_url, self.model, self.api_key, self.timeout, self.seed = (
            base_url.rstrip("/"),
            model,
            api_key,
            timeout,
            seed,
        )
        self.name = model

    def settings(self) -> dict:
        return {
            "backend": "openai",
            "base_url": self.base_url,
            "model": self.model,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": self.seed,
        }

    def complete(self, request: VLMRequest) -> str:
        url = f"data:{request.mime};base64,{base64.b64encode(request.image).decode()}"
        settings = {"max_tokens": request.max_new_tokens, "temperature": 0.0, "top_p": 1.0}
        body = chat_body(self.model, [url], request.text, **settings, seed=self.seed + request.attempt)
        try:  # `timeout` bounds the whole request; every transport failure is an OSError or a ValueError
            return post_chat(f"{self.base_url}/chat/completions", body, timeout=self.timeout, api_key=self.api_key)
        except (OSError, ValueError) as e:
            raise JudgeRequestError(f"{self.base_url}: {type(e).__name__}: {e}") from e


class ReplayVLM(VLMBackend):
    """Answers recorded earlier, keyed by (prompt id, image id); a missing answer, or a recorded answer that is not
    text, is a request error (an error verdict naming the record), never a crash."""

    concurrent = True

    def __init__(self, answers: dict[tuple[str, int], Any], source: str = "", lines: dict | None = None):
        self.answers, self.source, self.lines = dict(answers), source, dict(lines or {})
        self.name = f"replay:{Path(source).name}" if source else "replay"

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ReplayVLM:
        """Read lines `{"prompt_id", "image_id", "raw"}` (a run's `verdicts.jsonl` has them); a line that is not such
        an object is an error naming the file and line."""
        path = Path(path)
        answers, lines = {}, {}
        for n, line in enumerate(read_text(path, "replay file").splitlines(), 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    key = (str(d["prompt_id"]), int(d["image_id"]))
                    answers[key], lines[key] = d["raw"], n
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}: line {n} is not a recorded answer ({type(e).__name__}: {e})") from None
        return cls(answers, str(path), lines)

    def settings(self) -> dict:
        return {"backend": "replay", "source": self.source, "answers": len(self.answers)}

    def complete(self, request: VLMRequest) -> str:
        key = (request.prompt_id, request.image_id)
        answer = self.answers.get(key)
        record = f"the record of image {request.prompt_id}_{request.image_id}" + (
            f" ({self.source}, line {self.lines[key]})" if key in self.lines else ""
        )
        if answer is None:
            raise JudgeRequestError(f"no recorded answer for image {request.prompt_id}_{request.image_id}")
        if not isinstance(answer, str):
            raise JudgeRequestError(f"{record} holds a {type(answer).__name__} as its answer, not text")
        return answer
