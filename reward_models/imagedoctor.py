"""ImageDoctor: a multi-aspect VLM scorer with dense misalignment and artifact heatmaps.

ImageDoctor (Guo et al. 2025, arXiv 2510.01010; EthanG97/ImageDoctor, weights `GYX97/ImageDoctor`) is a
Qwen2.5-VL-3B fine-tuned to "look, think, predict": it reasons in `<think>`, then answers inside `<answer>` with four
scores in [0, 1] (semantic alignment, aesthetics, plausibility, overall impression) and flaw locations. Two special
tokens it emits (`misalignment_token_id`, `artifact_token_id` in its config) prompt a SAM-style mask decoder:

- the last-layer hidden state that predicts the special token -> `text_hidden_fcs` -> a sparse prompt;
- the merged visual tokens -> `image_hidden_fcs` -> an image embedding on the merged patch grid (18 x 18 at 504^2);
- SAM's two-way transformer (depth 2, 8 heads) with a single mask token, a convolutional upsampler x16
  (`HeatmapPredictor`) and a hypernetwork MLP -> logits -> sigmoid: a heatmap of 288 x 288 at 504^2
  (`visalign.reward_models.doctor_head`).

`ImageDoctor` [`imagedoctor`] returns `aspects` `plausibility`, `semantic_alignment`, `aesthetics`, `overall`, and,
when the checkpoint holds the head, `heatmaps` `misalignment` and `artifact` resized to the input resolution (a map
whose token was not generated is zeros, counted in `extras["heatmap_missing"]`).

Official by default (EthanG97/ImageDoctor, commit f541579):
- prompt: `build_messages` of inference.py (the released model's inference script), verbatim in `DOCTOR_PROMPT`
  (its f-string placeholder `{task_prompt}` written `{prompt}`, typos and the `\\”` kept); `"official-reward"` is
  `DoctorScorer_hp.task` of modify/flow_grpo/flow_grpo/doctor_hp.py (the RL reward's shorter prompt, no reasoning
  asked); `"visalign"` is our earlier wording.
- parsing: `extract_scores` (doctor_hp.py): the first `<answer>...</answer>` block (else the whole text), the first
  `<label> score: x` per aspect with labels `semantic alignment`, `aesthetic`, `plausibility`, `overall impression`;
  values clamped to [0, 1], a missing one filled with 0. `parsing="visalign"` is our earlier stricter reading (the
  last `<answer>` block, also `x%` and `x/y`, out-of-range values rejected and filled).
- `score`: the RL reward of `combine_scores` (doctor_hp.py), `0.8 semantic_alignment + 0.1 aesthetics +
  0.1 plausibility`; `score_weights="overall"` gives the overall impression alone.
- Accounting in `extras`: `missing` (`[B, 4]` bool), per-aspect `missing_counts` / `out_of_range_counts`,
  `parse_failures` (samples with any aspect missing or out of range) and the judge's `texts`.

Deviations, and why: images are resized straight to `image_size` squared in torch, as the reward scorer
(doctor_hp.py resizes to 512 x 512 with PIL, then the processor to 504 x 504); inference.py keeps the aspect ratio at
an area of 512^2, but its heatmap reshape to 18 x 18 holds only for square inputs. Captions are used as given, as in
inference.py (doctor_hp.py strips trailing punctuation). Decoding is greedy and batched with left padding (the
references decode one image at a time with the checkpoint's generation config), for speed and determinism;
`max_new_tokens` is 2048 as in doctor_hp.py (inference.py allows 20000). The heatmap uses the first occurrence of
each special token, including one at the first generated position (the reference skips that position).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visalign.reward_models.doctor_head import HEAD_PREFIXES, DoctorHeatmapHead, load_doctor_head
from visalign.reward_models.loading import resolve_folder
from visalign.reward_models.pairwise import answer_block
from visalign.reward_models.vlm import (
    VLM_FILES,
    VisionPatches,
    chat_inputs,
    check_qwen_vl,
    generate_texts,
    load_qwen_vl,
)
from visalign.rewards import RewardModel
from visalign.types import RewardOutput

IMAGEDOCTOR = "GYX97/ImageDoctor"
ASPECTS = ("plausibility", "semantic_alignment", "aesthetics", "overall")
HEATMAPS = ("misalignment", "artifact")
DOCTOR_PROMPT = (
    "Given a caption and an image generated based on this caption, please analyze the provided image in detail. "
    "Evaluate it on various dimensions including Semantic Alignment (How well the image content corresponds to "
    "the caption), Aesthetics (composition, color usage, and overall artistic quality), Plausibility (realism and "
    "attention to detail), and Overall Impression (General subjective assessment of the image's quality). For "
    "each evaluation dimension, provide a score between 0-1 and provide a concise rationale for the score. Use a "
    "chain-of-thought process to detail your reasoning steps, and enclose all potential important areas and "
    "detailed reasoning within <think> and </think> tags. The important areas are represented in following "
    "format: \\” I need to focus on the bounding box area. Proposed regions (xyxy): ..., which is an enumerated "
    "list in the exact format:1.[x1,y1,x2,y2];\n"
    "2.[x1,y1,x2,y2];\n"
    "3.[x1,y1,x2,y2]… Here, x1,y1 is the top-left corner, and x2,y2 is the bottom-right corner. Then, within the "
    '<answer> and </answer> tags, summarize your assessment in the following format: "Semantic Alignment score: '
    "... \n"
    "Misalignment Locations: ...\n"
    "Aesthetic score: ...\n"
    "Plausibility score: ... nArtifact Locations: ...\n"
    'Overall Impression score: ...". No additional text is allowed in the answer section.\n'
    "\n"
    " Your actual evaluation should be based on the quality of the provided image.**\n"
    "\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
DOCTOR_REWARD_PROMPT = (
    "Given a caption and an image generated based on this caption, please analyze the provided image in detail. "
    "Evaluate it on various dimensions including Semantic Alignment (How well the image content corresponds to "
    "the caption), Aesthetics (composition, color usage, and overall artistic quality), Plausibility (realism and "
    "attention to detail), and Overall Impression (General subjective assessment of the image's quality). For "
    "each evaluation dimension, provide a score between 0-1. Within the <answer> and </answer> tags, summarize "
    'your assessment in the following format: "Semantic Alignment score: ...\n'
    "Misalignment Locations: ...\n"
    "Aesthetic score: ...\n"
    "Plausibility score: ...\n"
    "Artifact Locations: ...\n"
    'Overall Impression score: ...". No additional text is allowed in the answer section.\n'
    "\n"
    " Your actual evaluation should be based on the quality of the provided image.**\n"
    "\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
VISALIGN_DOCTOR_PROMPT = (
    "Here is a caption and an image generated from it. Examine the image closely and rate it on four dimensions, "
    "each with a score between 0 and 1: Semantic Alignment (how faithfully the image shows what the caption "
    "describes), Aesthetics (composition, use of color, artistic quality), Plausibility (realism, absence of "
    "artifacts and distortions) and Overall Impression (your general judgment of its quality). Reason step by step "
    "inside <think> and </think>, naming the regions that matter as boxes [x1,y1,x2,y2]. Then give your assessment "
    "inside <answer> and </answer>, exactly in this form, one item per line:\n"
    "Semantic Alignment score: ...\nMisalignment Locations: ...\nAesthetic score: ...\nPlausibility score: ...\n"
    "Artifact Locations: ...\nOverall Impression score: ...\n"
    "Text Caption: [{prompt}]"
)
DOCTOR_PROMPTS = {
    "official": DOCTOR_PROMPT,
    "official-reward": DOCTOR_REWARD_PROMPT,
    "visalign": VISALIGN_DOCTOR_PROMPT,
}
REWARD_WEIGHTS = {"semantic_alignment": 0.8, "aesthetics": 0.1, "plausibility": 0.1}  # doctor_hp.py combine_scores
SCORE_WEIGHTS = {"reward": REWARD_WEIGHTS, "overall": {"overall": 1.0}}
PARSINGS = ("official", "visalign")


def _score_patterns(labels: dict[str, str], tail: str) -> dict[str, re.Pattern[str]]:
    """Per aspect, `<label> score` followed by `tail` (which captures the number), case-insensitive."""
    return {name: re.compile(rf"{label}\s*score{tail}", re.IGNORECASE) for name, label in labels.items()}


# extract_scores (doctor_hp.py): its labels, `:` and number pattern
_OFFICIAL_SCORES = _score_patterns(
    {"plausibility": "plausibility", "semantic_alignment": r"semantic\s*alignment"}
    | {"aesthetics": "aesthetic", "overall": r"overall\s*impression"},
    r"\s*:\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)",
)
_OFFICIAL_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# our earlier reading: more label forms, markdown bold, `=`, `x%` and `x/y`
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_SCORES = _score_patterns(
    {"plausibility": "plausibility", "semantic_alignment": r"semantic\s*alignment"}
    | {"aesthetics": "aesthetics?", "overall": r"overall(?:\s*impression)?"},
    rf"\s*\**\s*[:=]\s*\**\s*{_NUMBER}(\s*%|\s*/\s*{_NUMBER})?",
)


def parse_doctor_answer(text: str | None, parsing: Literal["official", "visalign"] = "official") -> dict[str, float]:
    """Each aspect's number as read from an ImageDoctor answer (not yet clamped), NaN when there is none.

    `"official"` (`extract_scores`, doctor_hp.py): the first `<answer>...</answer>` block, else the whole text; the
    first `<label> score: x`. `"visalign"`: the last `<answer>` block (the text without `<think>` when there is
    none), the last match, `x%` and `x/y` read as fractions (`x/0` is NaN).
    """
    if parsing not in PARSINGS:
        raise ValueError(f"`parsing` must be one of {PARSINGS}, got {parsing!r}")
    text = text if isinstance(text, str) else ""
    result = {}
    if parsing == "official":
        block = m.group(1).strip() if (m := _OFFICIAL_ANSWER.search(text)) else text
        for name, pattern in _OFFICIAL_SCORES.items():
            m = pattern.search(block)
            result[name] = float(m.group(1)) if m else math.nan
        return result
    block = answer_block(text)
    for name, pattern in _SCORES.items():
        matches = pattern.findall(block)
        if not matches:
            result[name] = math.nan
            continue
        number, suffix, denominator = matches[-1]
        value = float(number)
        if suffix.strip() == "%":
            value /= 100
        elif denominator:
            value = value / float(denominator) if float(denominator) > 0 else math.nan
        result[name] = value
    return result


def collect_aspects(
    texts: Sequence[str | None],
    parsing: Literal["official", "visalign"] = "official",
    fill: Literal["mean"] | float = 0.0,
    device: torch.device | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Aspect tensors `[B]` (float32) from B answers, and the parse accounting.

    A value outside [0, 1] is clamped (`"official"`, as `extract_scores`) or treated as missing (`"visalign"`); a
    missing value becomes `fill`: a number (official: 0) or `"mean"`, the batch's mean of that aspect's valid values
    (0.5 if none).
    """
    parsed = [parse_doctor_answer(t, parsing) for t in texts]
    aspects, missing_counts, out_of_range = {}, {}, {}
    filled = torch.zeros(len(texts), len(ASPECTS), dtype=torch.bool)
    outside = torch.zeros(len(texts), len(ASPECTS), dtype=torch.bool)
    for k, name in enumerate(ASPECTS):
        read = [p[name] for p in parsed]
        outside[:, k] = torch.tensor([not math.isnan(v) and not 0.0 <= v <= 1.0 for v in read])
        if parsing == "official":
            values = [min(max(v, 0.0), 1.0) for v in read]  # NaN (absent) stays NaN
        else:
            values = [math.nan if bad else v for v, bad in zip(read, outside[:, k].tolist())]
        ok = [v for v in values if not math.isnan(v)]
        default = (sum(ok) / len(ok) if ok else 0.5) if fill == "mean" else float(fill)
        aspects[name] = torch.tensor([default if math.isnan(v) else v for v in values], device=device)
        filled[:, k] = torch.tensor([math.isnan(v) for v in values])
        missing_counts[name] = sum(math.isnan(v) for v in read)
        out_of_range[name] = int(outside[:, k].sum())
    extras = {
        "texts": list(texts),
        "missing": filled,
        "missing_counts": missing_counts,
        "out_of_range_counts": out_of_range,
        "parse_failures": int((filled | outside).any(dim=1).sum()),
    }
    return aspects, extras


class ImageDoctorQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that loads ImageDoctor checkpoints strictly: the head's keys are read by `load_doctor_head`."""

    _keys_to_ignore_on_load_unexpected = [rf"^{re.escape(p)}" for p in HEAD_PREFIXES]


# transformers renames Qwen2.5-VL checkpoint keys (`visual.*`, `model.*`) per class, and skips classes defined outside
# the library: give the subclass its parent's renaming.
register_checkpoint_conversion_mapping(
    ImageDoctorQwen2_5_VL.__name__,
    get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__),
    overwrite=True,
)


class ImageDoctor(RewardModel):
    """ImageDoctor's four aspect scores (and heatmaps when the head is given); `score` is the paper's RL reward.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration` (the checkpoint's VLM).
        processor: its processor.
        head: the heatmap head, or None (no heatmaps).
        misalignment_token_id, artifact_token_id: the special tokens that prompt the head (required with `head`).
        prompt_template: `"official"` (inference.py), `"official-reward"` (doctor_hp.py), `"visalign"` (ours), or a
            question with `{prompt}` for the caption.
        image_size: images are resized to `image_size` x `image_size` (then to the processor's multiple of 28).
        max_new_tokens: generation length (the answer comes after the reasoning).
        batch_size: images per generation batch.
        parsing: `"official"` (clamp to [0, 1]) or `"visalign"` (reject out-of-range values); see the module docstring.
        fill: the value of a missing aspect: a number in [0, 1] (official: 0) or `"mean"` (the batch's mean).
        score_weights: `"reward"` (`0.8 semantic_alignment + 0.1 aesthetics + 0.1 plausibility`), `"overall"`, or
            a mapping from aspect names to weights.
    """

    name = "imagedoctor"
    differentiable = False
    aspect_names = ASPECTS

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: Any,
        head: DoctorHeatmapHead | None = None,
        *,
        misalignment_token_id: int | None = None,
        artifact_token_id: int | None = None,
        prompt_template: str = "official",
        image_size: int = 512,
        max_new_tokens: int = 2048,
        batch_size: int = 4,
        parsing: Literal["official", "visalign"] = "official",
        fill: Literal["mean"] | float = 0.0,
        score_weights: str | Mapping[str, float] = "reward",
    ) -> None:
        super().__init__()
        check_qwen_vl(model, processor)
        if head is not None:
            if not isinstance(head, DoctorHeatmapHead):
                raise ValueError(f"`head` must be a DoctorHeatmapHead or None, got {type(head).__name__}")
            ids = (misalignment_token_id, artifact_token_id)
            if not all(isinstance(i, int) and 0 <= i < len(processor.tokenizer) for i in ids):
                raise ValueError(f"`misalignment_token_id` and `artifact_token_id` must be token ids, got {ids}")
        for arg, value in (("image_size", image_size), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be a positive int, got {value!r}")
        if fill != "mean" and not (isinstance(fill, (int, float)) and 0 <= fill <= 1):
            raise ValueError(f"`fill` must be 'mean' or a number in [0, 1], got {fill!r}")
        if parsing not in PARSINGS:
            raise ValueError(f"`parsing` must be one of {PARSINGS}, got {parsing!r}")
        weights = SCORE_WEIGHTS.get(score_weights, score_weights) if isinstance(score_weights, str) else score_weights
        if (
            not isinstance(weights, Mapping)
            or not weights
            or not set(weights) <= set(ASPECTS)
            or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights.values())
        ):
            raise ValueError(
                f"`score_weights` must be one of {sorted(SCORE_WEIGHTS)} or a mapping from aspects {ASPECTS} to "
                f"finite weights, got {score_weights!r}"
            )
        self.model = model
        self.processor = processor
        self.head = head
        self.special_tokens = dict(zip(HEATMAPS, (misalignment_token_id, artifact_token_id)))
        self.heatmap_names = HEATMAPS if head is not None else ()
        template = DOCTOR_PROMPTS.get(prompt_template, prompt_template) if isinstance(prompt_template, str) else None
        if template is None or "{prompt}" not in template:
            raise ValueError(
                f"`prompt_template` must be one of {sorted(DOCTOR_PROMPTS)} or a string with the placeholder "
                f"{{prompt}}, got {prompt_template!r}"
            )
        self.prompt_template = template
        self.vision = VisionPatches.from_processor(processor)
        self.size = self.vision.size_for(image_size, image_size)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.parsing = parsing
        self.fill = fill
        self.score_weights = {name: float(w) for name, w in weights.items()}

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, num_heads: int = 8, **options: Any
    ) -> ImageDoctor:
        """Load from a folder or Hub repo (default `GYX97/ImageDoctor`); the head loads when its keys are present.

        `num_heads`: attention heads of the head's two-way transformer (8 in the release; not stored in the weights).
        """
        what = "ImageDoctor"
        folder = resolve_folder(pretrained or IMAGEDOCTOR, VLM_FILES, required=["config.json"], what=what)
        model, processor = load_qwen_vl(folder, dtype, what=what, classes={"qwen2_5_vl": ImageDoctorQwen2_5_VL})
        head = load_doctor_head(folder, num_heads, what=what)
        config = model.config.to_dict()
        ids = {f"{name}_token_id": config.get(f"{name}_token_id") for name in HEATMAPS} if head is not None else {}
        return cls(model, processor, head, **ids, **options).eval()

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        question = self.prompt_template.replace("{prompt}", prompt)  # not str.format: captions may hold braces
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    @torch.no_grad()
    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        texts, maps, absent = [], {name: [] for name in self.heatmap_names}, dict.fromkeys(self.heatmap_names, 0)
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size].to(self.device)
            pixel_values, grid = self.vision(chunk[:, None], self.size)
            inputs = chat_inputs(
                self.processor,
                [self.conversation(p) for p in prompts[start : start + self.batch_size]],
                image_grids=[grid[i : i + 1] for i in range(len(chunk))],
                device=self.device,
            )
            vision = {"pixel_values": pixel_values, "image_grid_thw": grid}
            answers, new_ids = generate_texts(self.model, self.processor, inputs | vision, self.max_new_tokens)
            texts += answers
            if self.head is not None:
                for name, (heat, found) in self.heatmaps(inputs, pixel_values, grid, new_ids).items():
                    maps[name].append(F.interpolate(heat[:, None], size=pixels.shape[-2:], mode="bilinear")[:, 0])
                    absent[name] += int((~found).sum())
        aspects, extras = collect_aspects(texts, self.parsing, self.fill, device=pixels.device)
        heatmaps = {name: torch.cat(m).clamp(0, 1).to(pixels.device) for name, m in maps.items()}
        if self.head is not None:
            extras["heatmap_missing"] = absent
        score = sum(w * aspects[name] for name, w in self.score_weights.items())  # doctor_hp.py combine_scores
        return RewardOutput(score, aspects, heatmaps, extras)

    def heatmaps(
        self, inputs: dict[str, Tensor], pixel_values: Tensor, grid: Tensor, new_ids: Tensor
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per map name, heatmaps `[B, s h, s w]` (zeros where the token was not generated) and a found mask `[B]`.

        One teacher-forced pass over prompt + answer gives the last-layer state before each special token's first
        occurrence (the state that generated it); each image goes through the vision tower once.
        """
        features = self.model.get_image_features(pixel_values, grid).pooler_output  # per image [h w, D_vision]
        ids = torch.cat([inputs["input_ids"], new_ids], dim=1)
        ones = torch.ones_like(new_ids)
        hidden = self.model.model(
            input_ids=ids,
            attention_mask=torch.cat([inputs["attention_mask"], ones], dim=1),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * ones], dim=1),
            image_grid_thw=grid,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
        ).last_hidden_state
        merge = self.vision.merge_size
        h, w = (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)  # every image has the same size here
        out = {}
        for name, token in self.special_tokens.items():
            hits = new_ids == token
            found = hits.any(dim=1)
            first = inputs["input_ids"].shape[1] + hits.float().argmax(dim=1)
            scale = 2 ** len(self.head.config.widths)
            heat = torch.zeros(len(new_ids), scale * h, scale * w, device=hidden.device)
            rows = found.nonzero().flatten()
            if len(rows):
                states = hidden[rows, first[rows] - 1]
                heat[rows] = self.head(states, torch.stack([features[r] for r in rows.tolist()]), (h, w))
            out[name] = (heat, found)
        return out
