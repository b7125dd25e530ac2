"""The in-process pairwise judge: a UnifiedReward(-Think) Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint through
transformers (`unifiedreward-pairwise`).

The schedules, win rates and accounting are `visalign.reward_models.pairwise.PairwiseJudge`'s; this file holds what
needs the model: the chat of one comparison, the batched forward passes, and the two ways of reading a verdict.
- `answer="probs"` (default for ranking prompts): one forward pass per pair with the answer prefix teacher-forced;
  `P(1 > 2) = (1 - t) r + t / 2` with `t = P(tie | verdict)` from the first answer token and
  `r = P("1") / (P("1") + P("2"))` at the digit; each image goes through the vision tower once per group.
- `answer="generate"` (default, and the only mode, for Think prompts): greedy decoding, read by the answer rule;
  an answer cut at `max_new_tokens` is an error verdict (0.5, counted).
Deviations from the reference scripts are listed in `visalign.reward_models.pairwise`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.utils import ModelOutput

from visalign.reward_models.pairwise import Judgments, PairwiseJudge
from visalign.reward_models.unifiedreward import THINK_RULES, format_prompt, read_verdict, resolve_prompt
from visalign.reward_models.vlm import (
    JUDGE_VL_CLASSES,
    VisionPatches,
    chat_inputs,
    check_qwen_vl,
    generate_texts,
    load_qwen_vl,
)

if TYPE_CHECKING:
    from visalign.reward_models.vlm import QwenVL

UNIFIEDREWARD = "CodeGoat24/UnifiedReward-qwen-7b"
UNIFIEDREWARD_THINK = "CodeGoat24/UnifiedReward-Think-qwen3vl-8b"  # Pref-GRPO's judge (its vLLM server script)
ANSWERS = ("Image 1 is better.", "Image 2 is better.", "Both images are equally good.")


def _answer_tokens(tokenizer: Any) -> tuple[list[int], tuple[int, int, int]]:
    """The teacher-forced answer prefix (common to both image verdicts) and the tokens that decide the verdict:
    `(image-1 token, image-2 token, tie token)`, the first two after the prefix, the tie token at the first position
    (or all three at the first position when the prefix is empty)."""
    one, two, tie = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ANSWERS)
    n = 0
    while n < min(len(one), len(two)) and one[n] == two[n]:
        n += 1
    if n == min(len(one), len(two)) or (n and tie[0] == one[0]) or (not n and len({one[0], two[0], tie[0]}) < 3):
        raise ValueError(f"the tokenizer does not separate the verdicts {ANSWERS} at single tokens")
    return one[:n], (one[n], two[n], tie[0])


class UnifiedRewardPairwise(PairwiseJudge):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL pairwise judge (UnifiedReward(-Think) checkpoints) run through transformers.

    Args:
        model: a `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` or
            `Qwen3VLForConditionalGeneration`.
        processor: its processor (tokenizer, image processor, chat template).
        prompt_template: a preset of `PAIR_PROMPTS` (default `"unifiedreward"`, the official pair-ranking prompt) or
            a question with `{prompt}` for the caption.
        answer_rule: how answers are read (`ANSWER_RULES`); default the preset's.
        answer: `"probs"` (verdict from token probabilities, one forward pass per pair) or `"generate"` (greedy
            decoding and the answer rule); default `"generate"` for Think rules (which only decode), else `"probs"`.
        max_pixels: pixel budget per image (default: the processor's).
        max_new_tokens: generation length in `"generate"` mode; default 4096 for Think rules, else 512.
        batch_size: pairs per forward pass.
        both_orders, opponents, seed: see `PairwiseJudge`.
    """

    name = "unifiedreward-pairwise"

    def __init__(
        self,
        model: QwenVL,
        processor: Any,
        *,
        prompt_template: str = "unifiedreward",
        answer_rule: str | None = None,
        answer: Literal["probs", "generate"] | None = None,
        max_pixels: int | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 8,
        both_orders: bool = False,
        opponents: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(both_orders=both_orders, opponents=opponents, seed=seed)
        check_qwen_vl(model, processor, JUDGE_VL_CLASSES)
        self.prompt_template, self.answer_rule = resolve_prompt(prompt_template, answer_rule)
        think = self.answer_rule in THINK_RULES
        answer = answer if answer is not None else ("generate" if think else "probs")
        if answer not in ("probs", "generate"):
            raise ValueError(f"`answer` must be 'probs' or 'generate', got {answer!r}")
        if answer == "probs" and think:
            raise ValueError(
                f"`answer`='probs' reads the first answer tokens, but the {self.answer_rule!r} rule's verdict follows "
                f"a reasoning: use answer='generate'"
            )
        max_new_tokens = max_new_tokens if max_new_tokens is not None else (4096 if think else 512)
        for arg, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be a positive int, got {value!r}")
        self.model = model
        self.processor = processor
        self.answer = answer
        self.vision = VisionPatches.from_processor(processor, max_pixels=max_pixels)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        if answer == "probs":
            self.prefix, self.verdict_tokens = _answer_tokens(processor.tokenizer)

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, **options: Any
    ) -> UnifiedRewardPairwise:
        """Load a Qwen2/2.5/3-VL judge from a folder or Hub repo (default `CodeGoat24/UnifiedReward-qwen-7b`, or
        `CodeGoat24/UnifiedReward-Think-qwen3vl-8b` for `prompt_template="unifiedreward-think"`)."""
        if pretrained is None:
            think = options.get("prompt_template") == "unifiedreward-think"
            pretrained = UNIFIEDREWARD_THINK if think else UNIFIEDREWARD
        model, processor = load_qwen_vl(
            pretrained, dtype, what="UnifiedReward pairwise judge", classes=JUDGE_VL_CLASSES
        )
        return cls(model, processor, **options).eval()

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        """The chat of one comparison: Image 1, Image 2, then the question (the official message layout)."""
        question = format_prompt(self.prompt_template, prompt)
        return [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}
        ]

    @torch.no_grad()
    def judge(self, images: Tensor, pairs: Tensor, prompts: list[str]) -> Judgments:
        device = self.device
        pixel_values, grid = self.vision(images.to(device)[:, None])  # every image once
        if self.answer == "probs":
            features = self.model.get_image_features(pixel_values, grid)
        else:
            per_image = pixel_values.split(grid.prod(-1).tolist())
        probs, masses, texts, errors = [], [], [], []
        pairs = pairs.tolist()
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            order = [k for pair in chunk for k in pair]
            inputs = chat_inputs(
                self.processor,
                [self.conversation(p) for p in prompts[start : start + self.batch_size]],
                image_grids=[grid[pair] for pair in chunk],
                suffix=self.prefix if self.answer == "probs" else (),
                device=device,
            )
            if self.answer == "probs":
                logits = self.model(
                    **inputs,
                    image_grid_thw=grid[order],
                    mm_encoder_outputs={"image": select_images(features, order)},
                    logits_to_keep=len(self.prefix) + 1,
                ).logits
                p, mass = self.verdict_probability(logits)
                probs.append(p)
                masses.append(mass)
                texts += [None] * len(chunk)
                errors += [None] * len(chunk)
            else:
                inputs |= {"pixel_values": torch.cat([per_image[k] for k in order]), "image_grid_thw": grid[order]}
                answers, new = generate_texts(self.model, self.processor, inputs, self.max_new_tokens)
                verdicts = [read_verdict(t, self.answer_rule, cut) for t, cut in zip(answers, self.truncated(new))]
                probs.append(torch.tensor([p for p, _ in verdicts], device=device))
                errors += [cause for _, cause in verdicts]
                texts += answers
        mass = torch.cat(masses) if masses else None
        return Judgments(torch.cat(probs).float(), texts, answer_mass=mass, errors=errors)

    def truncated(self, new: Tensor) -> list[bool]:
        """Per row of generated ids `[B, T_new]`: whether decoding stopped at `max_new_tokens` before an end token
        (finished rows are padded with the pad or end token)."""
        config = self.model.generation_config
        ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        stops = torch.tensor([t for t in [*ends, config.pad_token_id] if t is not None], device=new.device)
        if new.shape[1] < self.max_new_tokens:
            return [False] * new.shape[0]
        return (~torch.isin(new, stops).any(dim=1)).tolist()

    def verdict_probability(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """`P(image 1 better)` `[N]` and the probability mass on valid verdicts `[N]` from the kept logits
        `[N, len(prefix) + 1, V]` (position 0 predicts the first answer token, the last one the digit)."""
        one, two, tie = self.verdict_tokens
        first = logits[:, 0].float().log_softmax(-1)
        if not self.prefix:
            three = first[:, [one, two, tie]]
            w = three.softmax(-1)
            return w[:, 0] + 0.5 * w[:, 2], three.exp().sum(-1)
        start = self.prefix[0]
        tie_given_verdict = torch.sigmoid(first[:, tie] - first[:, start])
        digit = logits[:, -1].float().log_softmax(-1)
        r = torch.sigmoid(digit[:, one] - digit[:, two])
        return (1 - tie_given_verdict) * r + 0.5 * tie_given_verdict, (first[:, tie].exp() + first[:, start].exp())


def select_images(features: ModelOutput, order: list[int]) -> ModelOutput:
    """The vision tower's output (`get_image_features`, split per image) for the images `order`, in that order: the
    merged embeddings and, for Qwen3-VL, the deepstack features injected into the first decoder layers."""
    fields = {"pooler_output": tuple(features.pooler_output[k] for k in order)}
    if isinstance(features, BaseModelOutputWithDeepstackFeatures):
        fields["deepstack_features"] = [tuple(layer[k] for k in order) for layer in features.deepstack_features]
    return type(features)(**fields)
