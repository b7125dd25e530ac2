"""UnifiedReward's official pairwise prompts and its answer rules, quoted from the official inference code.

UnifiedReward (Wang et al. 2025, arXiv 2503.05236) and UnifiedReward-Think (arXiv 2505.03318) are generative VLM
judges: they read two images and a caption and answer in text. A judge gives the scores it was trained to give only
when it is asked with its training prompt, so the prompts below are verbatim (the placeholder `{prompt}` stands where
the official code formats the caption), and the rules below read answers as the official code does.

Prompts (sources at CodeGoat24/UnifiedReward ff6f520 and CodeGoat24/Pref-GRPO 3e787f6):
- `PAIR_RANK_PROMPT`: UnifiedReward pair ranking (`UnifiedReward-qwen-*`, `UnifiedReward-2.0-qwen*`), the `text` of
  the user message in `inference_qwen/image_generation/qwen_pair_rank_image_generation.py` (module-level script);
  the same text is in UnifiedReward-Think's GenAI-Bench-Image evaluation (`test_qwen25_answer_genAI_bench_image.py`).
- `THINK_PROMPT`: UnifiedReward-Think on Qwen3-VL (`UnifiedReward-Think-qwen3vl-*`), the `problem` of
  `UnifiedReward-Think/inference_qwen/UnifiedReward-Think-qwen3-inference/qwen3_infer_cot_image_generation.py`, and
  the same text as Pref-GRPO's judge prompt (`fastvideo/rewards/templates.py: get_unifiedreward_think_image_template`,
  formatted with `.format(prompt=...)` in `fastvideo/rewards/dispatcher.py`). Reasoning in `<think>`, verdict in
  `<answer>`.
- `THINK_QWEN25_PROMPT`: UnifiedReward-Think on Qwen2.5-VL (`UnifiedReward-Think-qwen-7b`), the `text` of
  `UnifiedReward-Think/inference_qwen/image_generation/qwen_infer_cot_image_generation.py`.
- `VISALIGN_PAIR_PROMPT`: our own wording of the pair-ranking question (same structure and verdict sentences);
  not a training prompt of any checkpoint.

Answer rules (the official ones, as functions of the answer text; `None` marks "no verdict"):
- `rank_verdict`: the pair-ranking rule of UnifiedReward's evaluation code (`test_qwen25_answer_genAI_bench_video.py`
  and siblings: `if 'Video 1 is better' in output ... elif 'Video 2 is better' in output ... else same`): a
  case-sensitive substring test, "Image 1 is better" first, then "Image 2 is better"; "Both images are equally good"
  is a tie; anything else is no verdict, which the reference also scores as a tie.
- `think_verdict`: Pref-GRPO's rule (`fastvideo/rewards/unifiedreward_think.py: _extract_answer` and
  `_pairwise_win_rate`): the first `<answer>...</answer>` block (case-sensitive tags); without one, no verdict (a tie
  in the reference); inside it "Image 1 is better" wins over "Image 2 is better" (so an answer naming both goes to
  image 1), a lower-case or other answer is a tie.
- `parse_pair_answer` (rule `"visalign"`): ours, lenient (case-insensitive, the last verdict sentence, the text
  inside the last `<answer>` or outside `<think>`, UnifiedReward-2.0's relative scores).
`read_verdict(text, rule)` applies a rule; the judges count "no verdict" as a failure with its cause and score it 0.5,
the value the reference gives it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PAIR_RANK_PROMPT = (
    "You are given a text caption and two generated images based on that caption. Your task is to evaluate "
    "and compare these images based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well each image aligns with the provided caption. Consider "
    "the accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of each image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\n"
    "Compare both images using the above criteria and select the one that better aligns with the caption "
    "while exhibiting superior visual quality.\n"
    'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and "Both images are '
    'equally good."\n'
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
THINK_PROMPT = (
    "You are an objective and precise evaluator for image quality comparison. I will provide you with a "
    "text caption and two images generated based on this caption. You must analyze the two images "
    "carefully and determine which image is better.\n"
    "\n"
    "        Evaluation procedure:\n"
    "\n"
    "        1. The caption for the generated images is: 「{prompt}」. You must evaluate the two images "
    "across these core dimensions:\n"
    "        - Semantic consistency (how closely the image content aligns with the caption)\n"
    "        - Aesthetics (composition, color usage, artistic expression)\n"
    "        - Authenticity (realism and attention to detail)\n"
    "\n"
    "        2. You are also encouraged to add up to two additional evaluation dimensions if they are "
    "relevant to the specific caption or images (e.g., creativity, spatial layout, fine-grained detail). "
    "If no extra dimensions are relevant, just keep the three core dimensions.\n"
    "\n"
    "        3. For each evaluation dimension:\n"
    "        - Provide a score between 1–10 for both Image 1 and Image 2\n"
    "        - Provide a short rationale for each score (2–5 short sentences)\n"
    "        - The evaluation must follow exactly this format with line breaks and indentation:\n"
    "            Dimension name: \n"
    "                Image 1 (x/10) - rationale; \n"
    "                Image 2 (y/10) - rationale\n"
    "\n"
    "        4. After evaluating all dimensions, calculate the total score for each image and show the "
    "calculation explicitly, following this exact format:\n"
    "            Total score:\n"
    "            Image 1: x+x+x=total\n"
    "            Image 2: y+y+y=total\n"
    "\n"
    "        5. Wrap all reasoning and scoring strictly within <think> and </think> tags.\n"
    "\n"
    "        6. After </think>, output the final judgment strictly inside <answer> and </answer> tags, "
    "containing only one of:\n"
    "        - Image 1 is better\n"
    "        - Image 2 is better\n"
    "\n"
    "        Constraints:\n"
    "        - You must strictly follow the line breaks, indentation, and formatting shown in the example below.\n"
    "        - Do not merge multiple dimensions into one line. Each dimension must follow the 3-line block "
    "format shown below.\n"
    "        - Do not use Markdown formatting, bullet points, bold text, or headings.\n"
    "        - Do not output explanations outside <think> and <answer>.\n"
    "        - The <answer> tag must contain only the final string with no extra words.\n"
    "\n"
    "        Required output format:\n"
    "\n"
    "        <think>\n"
    "        1. Semantic consistency: \n"
    "            Image 1 (9/10) - ...; \n"
    "            Image 2 (7/10) - ...\n"
    "        2. Aesthetics: \n"
    "            Image 1 (8/10) - ...; \n"
    "            Image 2 (8/10) - ...\n"
    "        3. Authenticity: \n"
    "            Image 1 (8/10) - ...; \n"
    "            Image 2 (5/10) - ...\n"
    "        [Additional dimension if any]: \n"
    "            Image 1 (7/10) - ...; \n"
    "            Image 2 (8/10) - ...\n"
    "        [Additional dimension if any]: \n"
    "            Image 1 (6/10) - ...; \n"
    "            Image 2 (7/10) - ...\n"
    "        Total score:\n"
    "        Image 1: 9+8+8+7+6=38\n"
    "        Image 2: 7+8+5+8+7=35\n"
    "        </think>\n"
    "        <answer>Image 1 is better</answer>\n"
    "\n"
    "        Note: The example above is only to illustrate the exact format (line breaks, indentation, "
    "symbols, and style). Your actual evaluation must follow this format exactly, but be based on the "
    "given caption and images.\n"
    "        "
)
THINK_QWEN25_PROMPT = (
    "Given a caption and two images generated based on this caption, please analyze in detail the two "
    "provided images. Evaluate them on various dimensions such as semantic consistency (how closely the "
    "image content aligns with the caption), aesthetics (composition, color usage, artistic expression), "
    "authenticity (realism and attention to detail), and any other factors you deem relevant. For each "
    "evaluation dimension, provide a score between 1-10 for both images (e.g., Image 1: 8/10, Image 2: "
    "6/10) and provide a concise rationale for the score. Calculate the total score for each image by "
    "summing all dimension scores. Use a chain-of-thought process to detail your reasoning steps, and "
    "enclose all your detailed reasoning within <think> and </think> tags. Then, in the <answer> tag, "
    "output exactly one of the following strings: 'Image 1 is better' or 'Image 2 is better' based on the "
    "total scores. No additional text is allowed in the <answer> section.\n"
    "\n"
    "Example output format:\n"
    "<think>\n"
    "1. Semantic consistency: Image 1 (9/10) - ...; Image 2 (7/10) - ...\n"
    "2. Aesthetics: Image 2 (8/10) - ...; Image 1 (8/10) - ...\n"
    "3. Authenticity: Image 1 (8/10) - ...; Image 2 (5/10) - ...\n"
    "[Additional dimensions if any]: Image 2 (8/10) - ...; Image 1 (6/10) - ...\n"
    "Total score:\n"
    "Image 1: 9+8+8+6=31\n"
    "Image 2: 7+8+5+8=28\n"
    "</think>\n"
    "<answer>Image 1 is better</answer>\n"
    "**Note: In the example above, scores and the final answer are placeholders meant only to demonstrate "
    "the format. Your actual evaluation should be based on the quality of two given images.**\n"
    "\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
VISALIGN_PAIR_PROMPT = (
    "You will see a text caption and two images generated from it, Image 1 and Image 2. Compare them on two "
    "criteria:\n"
    "1. Caption alignment: how faithfully each image shows the objects, attributes and relations the caption "
    "describes.\n"
    "2. Image quality: sharpness, preserved detail, natural colors and overall visual appeal.\n"
    "Decide which image follows the caption better while also looking better, and end with exactly one of these "
    'sentences: "Image 1 is better.", "Image 2 is better." or "Both images are equally good."\n'
    "Text Caption: [{prompt}]"
)

RANK_VERDICTS = ("Image 1 is better", "Image 2 is better", "Both images are equally good")
THINK_RULES = ("unifiedreward-think",)  # rules whose verdict follows a reasoning: decoded, never read from logits
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class PairPrompt:
    """A named judge question: its `template` (with `{prompt}`) and the answer `rule` (a key of `ANSWER_RULES`)
    that reads the replies."""

    template: str
    rule: str


PAIR_PROMPTS = {
    "unifiedreward": PairPrompt(PAIR_RANK_PROMPT, "unifiedreward"),
    "unifiedreward-think": PairPrompt(THINK_PROMPT, "unifiedreward-think"),
    "unifiedreward-think-qwen2.5": PairPrompt(THINK_QWEN25_PROMPT, "unifiedreward-think"),
    "visalign": PairPrompt(VISALIGN_PAIR_PROMPT, "visalign"),
}


def rank_verdict(text: str) -> tuple[float | None, str | None]:
    """`(P(image 1 better), None)` from a pair-ranking answer, or `(None, cause)`: UnifiedReward's substring rule."""
    for sentence, p in zip(RANK_VERDICTS, (1.0, 0.0, 0.5)):
        if sentence in text:
            return p, None
    return None, f"no verdict sentence ({', '.join(repr(v) for v in RANK_VERDICTS)})"


def think_verdict(text: str) -> tuple[float | None, str | None]:
    """`(P(image 1 better), None)` from a Think answer, or `(None, cause)`: Pref-GRPO's `<answer>` rule."""
    match = _ANSWER.search(text)
    if match is None:
        if "<think>" in text and "</think>" not in text:
            return None, "no <answer> block: the reasoning in <think> never ended (truncated?)"
        if "<answer>" in text:
            return None, "no <answer> block: <answer> never closed (truncated?)"
        return None, "no <answer>...</answer> block"
    answer = match.group(1).strip()
    p, _ = rank_verdict(answer)
    return (p, None) if p is not None else (None, f"the <answer> block names no verdict: {answer[:80]!r}")


# ---------------------------------------------------------------- our lenient rule, and reading under a named rule

_VERDICT = re.compile(r"image\s*([12])\s+is\s+(?:the\s+)?better|both\s+images\s+are\s+equally\s+good", re.IGNORECASE)
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_SCORE_PAIR = re.compile(rf"image\s*1\s*[:=]\s*{_NUMBER}\s*[\r\n,;]+\s*image\s*2\s*[:=]\s*{_NUMBER}", re.IGNORECASE)


def answer_block(text: str) -> str:
    """The part of a judge's answer that holds the verdict: the last `<answer>` block (to the end when the tag is left
    open), else the text without its `<think>...</think>` reasoning (an unclosed `<think>` runs to the end)."""
    blocks = re.split(r"<answer>", text, flags=re.IGNORECASE)
    if len(blocks) > 1:
        return re.split(r"</answer>", blocks[-1], flags=re.IGNORECASE)[0]
    return re.sub(r"<think>.*?(?:</think>|$)", " ", text, flags=re.DOTALL | re.IGNORECASE)


def parse_pair_answer(text: str | None) -> float | None:
    """P(image 1 better) from a judge's text, or None when it holds no verdict.

    The last verdict sentence of the answer block decides ("Image 1 is better" -> 1, "Image 2 ..." -> 0, "Both images
    are equally good" -> 0.5; negations such as "is not better" are not verdicts). Without one, UnifiedReward-2.0's
    relative scores (`Image 1: x` then `Image 2: y`, one pair per dimension) give `sum x / (sum x + sum y)`.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    block = answer_block(text)
    verdicts = list(_VERDICT.finditer(block))
    if verdicts:
        digit = verdicts[-1].group(1)
        return {"1": 1.0, "2": 0.0, None: 0.5}[digit]
    pairs = [(float(a), float(b)) for a, b in _SCORE_PAIR.findall(block)]
    total = sum(a + b for a, b in pairs)
    if not pairs or not math.isfinite(total) or total <= 0:
        return None
    return sum(a for a, _ in pairs) / total


def format_prompt(template: str, prompt: str) -> str:
    """`template` with `{prompt}` replaced by the caption (no `str.format`: captions and templates may hold braces)."""
    return template.replace("{prompt}", prompt)


def check_template(template: Any) -> str:
    if not isinstance(template, str) or "{prompt}" not in template:
        raise ValueError("`prompt_template` must be a string containing the placeholder {prompt}")
    return template


def visalign_verdict(text: str) -> tuple[float | None, str | None]:
    """`parse_pair_answer` as an answer rule."""
    p = parse_pair_answer(text)
    return (p, None) if p is not None else (None, "no verdict")


ANSWER_RULES: dict[str, Callable[[str], tuple[float | None, str | None]]] = {
    "unifiedreward": rank_verdict,
    "unifiedreward-think": think_verdict,
    "visalign": visalign_verdict,
}


def read_verdict(text: str | None, rule: str, truncated: bool = False) -> tuple[float, str | None]:
    """`(P(image 1 better), None)` from a judge's answer under `rule` (a key of `ANSWER_RULES`), or `(nan, cause)`
    for an error verdict: no answer, no verdict under the rule, or an answer cut at the token limit (`truncated`)."""
    if not isinstance(text, str) or not text.strip():
        return math.nan, "empty answer"
    if truncated:
        return math.nan, "truncated: the answer hit the token limit before it ended (finish_reason 'length')"
    p, cause = ANSWER_RULES[rule](text)
    return (math.nan, cause) if p is None else (p, None)


def resolve_prompt(prompt_template: Any, answer_rule: Any) -> tuple[str, str]:
    """`(template, rule)` for a preset name of `PAIR_PROMPTS` or a template with `{prompt}`, the rule defaulting to
    the preset's (`"unifiedreward"` for a custom template)."""
    if isinstance(prompt_template, str) and prompt_template in PAIR_PROMPTS:
        preset = PAIR_PROMPTS[prompt_template]
        template, rule = preset.template, preset.rule
    elif isinstance(prompt_template, str) and "{prompt}" in prompt_template:
        template, rule = prompt_template, "unifiedreward"
    else:
        raise ValueError(
            f"`prompt_template` must be one of {sorted(PAIR_PROMPTS)} or a string containing the placeholder "
            f"{{prompt}}, got {str(prompt_template)[:80]!r}"
        )
    if answer_rule is not None:
        if answer_rule not in ANSWER_RULES:
            raise ValueError(f"`answer_rule` must be one of {sorted(ANSWER_RULES)} or None, got {answer_rule!r}")
        rule = answer_rule
    return template, rule
