"""The OCR reward of Flow-GRPO (Liu et al., 2025; `flow_grpo/ocr.py`, `OcrScorer`): how well an image renders the
text its prompt quotes.

For a prompt `... "Spring Collection 2024" ...` the target `t` is the text between the first pair of double quotes;
the OCR text `r` of the image and `t` both lose every space and are lower-cased (punctuation kept). Then

    reward = 1                                   if t is a substring of r,
    reward = 1 - min(Levenshtein(r, t), |t|) / |t|   otherwise,

in [0, 1]. The reference feeds PaddleOCR (`use_angle_cls=False, lang="en"`) the image as uint8 HWC (`x * 255`
rounded and clamped) and joins the text of the lines recognized with confidence above 0.

Engines: `TransformersOCR` over a transformers model (default GOT-OCR 2.0, `stepfun-ai/GOT-OCR-2.0-hf`, in plain
text mode: it reads a whole scene without a separate text detector; TrOCR, e.g. `microsoft/trocr-base-printed`, reads
one text line per image) and `PaddleOCR` when the optional `paddleocr` package is installed (the reference's
engine). No engine reproduces another's numbers: the reward records which one ran (`extras["engine"]`).
Deviations: a prompt without a quoted text is an error naming it (the reference fails with an IndexError); an empty
quoted text is an error too (the reference divides by zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from visalign.files import to_uint8
from visalign.reward_models.loading import load_transformers_model, resolve_folder
from visalign.rewards import RewardModel
from visalign.types import RewardOutput

OCR_MODEL = "stepfun-ai/GOT-OCR-2.0-hf"
ENGINES = ("transformers", "paddle")


def ocr_target(prompt: str) -> str:
    """The text between the first pair of double quotes of `prompt` (Flow-GRPO: `prompt.split('"')[1]`)."""
    parts = prompt.split('"')
    if len(parts) < 3:
        raise ValueError(f'prompt {prompt!r} has no text in double quotes ("...") for the OCR reward to look for')
    if not parts[1].replace(" ", ""):
        raise ValueError(f"prompt {prompt!r} quotes an empty text; the OCR reward needs a target")
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ocr_reward(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward of `recognized` text for `target` (both stripped of spaces and lower-cased)."""
    r, t = recognized.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not t:
        raise ValueError("`target` is empty once spaces are removed")
    dist = 0 if t in r else min(levenshtein(r, t), len(t))
    return 1.0 - dist / len(t)


class Recognizer(Protocol):
    """An OCR engine: the text of each uint8 `[H, W, 3]` RGB image."""

    name: str

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]: ...


class TransformersOCR:
    """A transformers OCR model: GOT-OCR 2.0 (`GotOcr2ForConditionalGeneration` + `GotOcr2Processor`, plain text
    mode, `model.generate(..., stop_strings="<|im_end|>")` as its model card) or TrOCR (`VisionEncoderDecoderModel`
    + `TrOCRProcessor`). Greedy decoding, the whole batch at once."""

    def __init__(self, model: Any, processor: Any, *, max_new_tokens: int = 64, name: str = "transformers") -> None:
        kind = model.config.model_type
        if kind not in ("vision-encoder-decoder", "got_ocr2"):
            raise ValueError(f"`model` must be a TrOCR or GOT-OCR 2.0 model, got model_type {kind!r}")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
        self.model, self.processor, self.kind = model.eval().requires_grad_(False), processor, kind
        self.max_new_tokens, self.name = max_new_tokens, name

    @classmethod
    def from_pretrained(cls, pretrained: str | Path | None = None, *, max_new_tokens: int = 64) -> TransformersOCR:
        """Model and processor from one folder or Hub repo (default `stepfun-ai/GOT-OCR-2.0-hf`)."""
        from transformers import AutoConfig, AutoProcessor, GotOcr2ForConditionalGeneration, VisionEncoderDecoderModel

        what = "OCR reward"
        source = pretrained or OCR_MODEL
        folder = resolve_folder(source, ["*.json", "*.safetensors", "*.txt", "*.model"], required=[], what=what)
        kind = AutoConfig.from_pretrained(folder).model_type
        classes = {"vision-encoder-decoder": VisionEncoderDecoderModel, "got_ocr2": GotOcr2ForConditionalGeneration}
        if kind not in classes:
            raise ValueError(f"{what}: {folder} holds a {kind!r} model; expected TrOCR or GOT-OCR 2.0")
        model = load_transformers_model(classes[kind], folder, what=what)
        return cls(model, AutoProcessor.from_pretrained(folder), max_new_tokens=max_new_tokens, name=str(source))

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        device = self.model.device
        if self.kind == "vision-encoder-decoder":
            pixel_values = self.processor(images=list(images), return_tensors="pt").pixel_values
            ids = self.model.generate(
                pixel_values.to(device, self.model.dtype), max_new_tokens=self.max_new_tokens, do_sample=False
            )
            return self.processor.batch_decode(ids, skip_special_tokens=True)
        inputs = self.processor(list(images), return_tensors="pt").to(device)
        ids = self.model.generate(
            **inputs,
            do_sample=False,
            tokenizer=self.processor.tokenizer,
            stop_strings="<|im_end|>",
            max_new_tokens=self.max_new_tokens,
        )
        return self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class PaddleOCR:
    """PaddleOCR as Flow-GRPO runs it (`use_angle_cls=False, lang="en"`, no angle classifier): the text of every
    line recognized with confidence above 0, joined. Needs the optional `paddleocr` package."""

    name = "paddleocr"

    def __init__(self, use_gpu: bool = False) -> None:
        try:
            from paddleocr import PaddleOCR as Engine
        except ImportError as e:
            raise ImportError("the paddle OCR engine needs the optional packages paddleocr and paddlepaddle") from e
        self.engine = Engine(use_angle_cls=False, lang="en", use_gpu=use_gpu, show_log=False)

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        out = []
        for image in images:
            lines = self.engine.ocr(image, cls=False)[0] or []
            out.append("".join(text for _, (text, confidence) in lines if confidence > 0))
        return out


class OCRReward(RewardModel):
    """Flow-GRPO's OCR reward (module docstring) over a `Recognizer`; `extras["recognized"]` holds each image's
    text and `extras["engine"]` the engine's name."""

    name = "ocr"
    differentiable = False

    def __init__(self, recognizer: Recognizer) -> None:
        super().__init__()
        if not callable(recognizer):
            raise ValueError(f"`recognizer` must be callable on a list of images, got {type(recognizer).__name__}")
        self.recognizer = recognizer
        # a transformers engine's model is a submodule, so it moves with the reward (`.to(device)`)
        self.model = recognizer.model if isinstance(recognizer, TransformersOCR) else None

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        engine: str = "transformers",
        max_new_tokens: int = 64,
    ) -> OCRReward:
        """`engine="transformers"`: a GOT-OCR 2.0 or TrOCR folder or Hub repo (`pretrained`, default
        `stepfun-ai/GOT-OCR-2.0-hf`); `engine="paddle"`: PaddleOCR on the CPU, as the reference."""
        if engine not in ENGINES:
            raise ValueError(f"`engine` must be one of {ENGINES}, got {engine!r}")
        if engine == "paddle":
            if pretrained is not None:
                raise ValueError("`pretrained` does not apply to the paddle engine (it uses its own models)")
            return cls(PaddleOCR()).eval()
        recognizer = TransformersOCR.from_pretrained(pretrained, max_new_tokens=max_new_tokens)
        if dtype is not None:
            recognizer.model.to(dtype)
        return cls(recognizer).eval()

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        targets = [ocr_target(p) for p in prompts]  # a prompt without a target fails before any OCR runs
        recognized = self.recognizer(list(to_uint8(pixels)))  # uint8 [H, W, 3] each, as Flow-GRPO passes them
        if len(recognized) != len(targets):
            raise RuntimeError(f"the OCR engine returned {len(recognized)} texts for {len(targets)} images")
        score = torch.tensor([ocr_reward(r, t) for r, t in zip(recognized, targets)], device=pixels.device)
        return RewardOutput(score, extras={"recognized": recognized, "engine": self.recognizer.name})
