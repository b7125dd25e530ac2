"""Pairwise judges and Pref-GRPO's group win-rate reward.

Pref-GRPO (Wang et al. 2025, arXiv 2508.20751) rewards each of the G samples of a prompt by its win rate in the
group: a judge sees two images of the same caption and says which is better, and
`w_i = sum_{j != i} P(i > j) / (G - 1)` (`visalign.pipelines.grpo.win_rates`), ties and failed judgments counting
1/2. With every pair judged the rates of a group sum to G / 2.

`PairwiseJudge` holds what every judge shares:

- `group(pixels, prompt)`: the schedule of comparisons and the win rates, all comparisons of the group sent to the
  judge in one batched `judge` call:
  - default, all pairs `i < j`, each judged once with `i` shown first (the reference's order): G(G-1)/2 calls;
  - `both_orders=True`: each pair judged in both orders, `P(i > j) = (P(i > j | i first) + 1 - P(j > i | j first))
    / 2`, which cancels a judge's constant preference for a position (the reference judges one order): twice the
    calls; `extras["position_bias"]` estimates that preference (`2 P(first wins) - 1`);
  - `opponents=k`: each sample meets k opponents on a random k-regular schedule (a circulant graph on a random
    permutation of the group) and `w_i` is the mean over its k games: Gk/2 calls. Regularity keeps
    `sum_i w_i = G / 2`; G * k must therefore be even.
- `compare(a, b, prompts)`: `P(a[i] > b[i])`, failures 0.5, with the same `both_orders` option.
- `score(pixels, prompts)`: the win rates within each prompt's samples of the batch (a prompt with a single sample
  gets 0.5, counted in `extras["singletons"]`; one with at most `opponents` samples is judged on all pairs), so
  that a judge plugs in wherever a reward does.
- accounting in `extras`: `calls`, `failures` (no verdict, counted as 0.5), `request_errors`, `parse_failures`,
  the judge's `texts`, the preference matrix `prefs` `[G, G]` (unjudged pairs 0.5) and the scheduled `pairs`.

Judges:

- `UnifiedRewardPairwise` [`unifiedreward-pairwise`]: a Qwen2-VL-class judge through transformers (default
  `CodeGoat24/UnifiedReward-qwen-7b`), asked with UnifiedReward's structure (two images, then the criteria and the
  caption; verdicts "Image 1 is better." / "Image 2 is better." / "Both images are equally good."). With
  `answer="probs"` (default) the verdict is read from token probabilities in one forward pass per pair, the answer
  prefix teacher-forced: `P(1 > 2) = (1 - t) r + t / 2` with `t = P(tie | verdict)` from the first answer token and
  `r = P("1") / (P("1") + P("2"))` at the digit; each image goes through the vision tower once per group, not once
  per pair. `answer="generate"` decodes greedily and parses the text (Think-style judges).
- `HTTPPairwiseJudge` [`pairwise-http`]: the same question to an OpenAI-compatible server (vLLM, sglang), requests
  in parallel threads, with timeouts and retries; a request that still fails, or an answer without a verdict,
  becomes 0.5 and is counted, never an exception in a training step.
- `BradleyTerryWinRate`: a pointwise reward seen pairwise, `P(i > j) = sigmoid((s_i - s_j) / temperature)`, from
  one forward pass per image.

Deviations: the prompt wording is ours (same structure and verdict sentences; pass `prompt_template` to use a
checkpoint's own training prompt verbatim); Pref-GRPO rounds win rates to 3 decimals (we do not); reading the
verdict from token probabilities is not in the reference, which parses generated text.
"""

from __future__ import annotations

import logging
import math
import re
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visalign.pipelines.grpo import win_rates
from visalign.reward_models.vlm import (
    QwenVL,
    VisionPatches,
    chat_body,
    chat_inputs,
    check_qwen_vl,
    generate_texts,
    image_data_url,
    load_qwen_vl,
    post_chat,
)
from visalign.rewards import RewardModel
from visalign.types import RewardOutput, check_pixels, check_prompts

logger = logging.getLogger(__name__)

UNIFIEDREWARD = "CodeGoat24/UnifiedReward-qwen-7b"
ANSWERS = ("Image 1 is better.", "Image 2 is better.", "Both images are equally good.")
PAIR_PROMPT = (
    "You will see a text caption and two images generated from it, Image 1 and Image 2. Compare them on two "
    "criteria:\n"
    "1. Caption alignment: how faithfully each image shows the objects, attributes and relations the caption "
    "describes.\n"
    "2. Image quality: sharpness, preserved detail, natural colors and overall visual appeal.\n"
    "Decide which image follows the caption better while also looking better, and end with exactly one of these "
    'sentences: "Image 1 is better.", "Image 2 is better." or "Both images are equally good."\n'
    "Text Caption: [{prompt}]"
)
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


@dataclass
class Judgments:
    """A judge's answers for P ordered pairs.

    Args:
        probs (`Tensor` `[P]`, float32): P(first image better), NaN where the judge gave no verdict.
        texts (`list`): the judge's text per pair (None for probability read-outs and failed requests).
        request_errors (`int`): pairs whose request failed (timeouts, HTTP errors, malformed responses).
        answer_mass (`Tensor` `[P]` or None): probability the judge put on the valid verdicts (probability mode).
    """

    probs: Tensor
    texts: list[str | None]
    request_errors: int = 0
    answer_mass: Tensor | None = None


def regular_schedule(g: int, opponents: int | None, generator: torch.Generator) -> Tensor:
    """Pairs `[P, 2]` (first shown, second shown) in which each of `g` samples meets `opponents` others.

    `None` (or `g - 1`): all pairs `i < j` in generation order. Otherwise a circulant graph on a random permutation
    of the samples: offsets `s` drawn from `1 .. (g - 1) // 2` (each adds 2 opponents) plus `g / 2` when the degree
    is odd (1 opponent), so every sample has exactly `opponents` distinct opponents.
    """
    if opponents is None or opponents == g - 1:
        return torch.combinations(torch.arange(g), 2)
    if opponents % 2 and g % 2:
        raise ValueError(
            f"`opponents`={opponents} with a group of {g}: an odd number of opponents needs an even group "
            f"(every sample must meet the same number of opponents); use an even `opponents`"
        )
    perm = torch.randperm(g, generator=generator).tolist()
    offsets = (torch.randperm((g - 1) // 2, generator=generator)[: opponents // 2] + 1).tolist()
    pairs = [(perm[t], perm[(t + s) % g]) for s in offsets for t in range(g)]
    if opponents % 2:
        pairs += [(perm[t], perm[t + g // 2]) for t in range(g // 2)]
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def scores_by_prompt(pixels: Tensor, prompts: list[str], group: Callable[[Tensor, str], RewardOutput]) -> RewardOutput:
    """`group(pixels[idx], prompt)` over the samples of each distinct prompt, reassembled in batch order.

    Singletons get 0.5 (`extras["singletons"]`); integer extras are summed, the rest listed per prompt in `groups`.
    """
    score = torch.full((pixels.shape[0],), 0.5, device=pixels.device)
    extras: dict[str, Any] = {"singletons": 0, "groups": []}
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        if len(idx) == 1:
            extras["singletons"] += 1
            continue
        out = group(pixels[idx], prompt)
        score[idx] = out.score.to(score.device)
        extras["groups"].append({"prompt": prompt, "index": idx, **out.extras})
        for key, value in out.extras.items():
            if isinstance(value, int):
                extras[key] = extras.get(key, 0) + value
    return RewardOutput(score, extras=extras)


class PairwiseJudge(RewardModel):
    """Base of judges that compare two images of one prompt; subclasses implement `judge`.

    Args:
        both_orders: judge each pair in both orders and average (removes position bias; twice the calls).
        opponents: each sample meets this many sampled opponents in `group` instead of all G - 1.
        seed: seed of the opponent schedules.
    """

    differentiable = False

    def __init__(self, *, both_orders: bool = False, opponents: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(both_orders, bool):
            raise ValueError(f"`both_orders` must be a bool, got {both_orders!r}")
        if opponents is not None and (not isinstance(opponents, int) or opponents < 1):
            raise ValueError(f"`opponents` must be a positive int or None (all pairs), got {opponents!r}")
        self.both_orders = both_orders
        self.opponents = opponents
        self.generator = torch.Generator().manual_seed(seed)

    def judge(self, images: Tensor, pairs: Tensor, prompts: list[str]) -> Judgments:
        """Judge ordered pairs of images.

        Args:
            images (`Tensor` `[M, 3, H, W]`, float in [0, 1]): the images the pairs index.
            pairs (`Tensor` `[P, 2]`, long): `(first, second)` indices into `images`, first shown as "Image 1".
            prompts (`list[str]` of length P): the caption of each pair.
        """
        raise NotImplementedError

    def judge_pairs(self, images: Tensor, pairs: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Any]]:
        """`P(first > second)` `[P]` for unordered pairs (failures 0.5, both orders averaged when asked) and counts."""
        ordered, asked = pairs, prompts
        if self.both_orders:
            ordered, asked = torch.cat([pairs, pairs.flip(1)]), prompts + prompts
        result = self.judge(images, ordered.to(images.device), asked)
        probs = result.probs.float().to(images.device)
        failed = torch.isnan(probs)
        probs = torch.where(failed, torch.full_like(probs, 0.5), probs)
        stats: dict[str, Any] = {
            "calls": len(ordered),
            "failures": int(failed.sum()),
            "request_errors": result.request_errors,
            "parse_failures": int(failed.sum()) - result.request_errors,
            "texts": result.texts,
        }
        if result.answer_mass is not None:
            stats["answer_mass"] = result.answer_mass
        if self.both_orders:
            forward, backward = probs.chunk(2)
            valid = ~(failed.chunk(2)[0] | failed.chunk(2)[1])
            stats["position_bias"] = float((forward + backward - 1)[valid].mean()) if valid.any() else float("nan")
            probs = (forward + 1 - backward) / 2
        if stats["failures"]:
            logger.warning(
                "%s: %d of %d judgments failed and count as ties", self.name, stats["failures"], len(ordered)
            )
        return probs, stats

    def compare(self, a: Tensor, b: Tensor, prompts: list[str]) -> Tensor:
        """P(`a[i]` judged better than `b[i]`) `[B]`; failures 0.5."""
        if a.shape != b.shape:
            raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        check_pixels(a, "a")
        check_pixels(b, "b")
        prompts = check_prompts(prompts, a.shape[0])
        n = a.shape[0]
        pairs = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1)
        return self.judge_pairs(torch.cat([a, b]), pairs, prompts)[0]

    def group(self, pixels: Tensor, prompt: str) -> RewardOutput:
        """Win rates `[G]` of G >= 2 images of one prompt (`pixels` `[G, 3, H, W]`), with the judge's accounting."""
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` must be a single string for a group, got {type(prompt).__name__}")
        check_pixels(pixels, "pixels")
        g = pixels.shape[0]
        if g < 2:
            raise ValueError(f"`pixels` must hold a group of at least 2 samples, got {g}")
        if self.opponents is not None and self.opponents > g - 1:
            raise ValueError(f"`opponents`={self.opponents} exceeds the {g - 1} possible opponents in a group of {g}")
        return self._group(pixels, prompt)

    def _group(self, pixels: Tensor, prompt: str) -> RewardOutput:
        g = pixels.shape[0]
        opponents = self.opponents if self.opponents is not None and self.opponents < g - 1 else None
        k = g - 1 if opponents is None else opponents
        pairs = regular_schedule(g, opponents, self.generator)
        probs, stats = self.judge_pairs(pixels, pairs, [prompt] * len(pairs))
        prefs = torch.full((g, g), 0.5, device=pixels.device)
        i, j = pairs.to(pixels.device).unbind(1)
        prefs[i, j], prefs[j, i] = probs, 1 - probs
        # the mean over the k judged games, written through Pref-GRPO's all-pairs formula on the filled matrix
        rates = (win_rates(prefs) * (g - 1) - 0.5 * (g - 1 - k)) / k
        return RewardOutput(rates, extras={**stats, "prefs": prefs, "pairs": pairs})

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        return scores_by_prompt(pixels, prompts, self._group)


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
    """A Qwen2-VL-class pairwise judge (UnifiedReward-qwen checkpoints) run through transformers.

    Args:
        model: a `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`.
        processor: its processor (tokenizer, image processor, chat template).
        answer: `"probs"` (verdict from token probabilities, one forward pass per pair) or `"generate"` (greedy
            decoding and `parse_pair_answer`).
        prompt_template: the question, with `{prompt}` for the caption (default `PAIR_PROMPT`).
        max_pixels: pixel budget per image (default: the processor's).
        max_new_tokens: generation length in `"generate"` mode.
        batch_size: pairs per forward pass.
        both_orders, opponents, seed: see `PairwiseJudge`.
    """

    name = "unifiedreward-pairwise"

    def __init__(
        self,
        model: QwenVL,
        processor: Any,
        *,
        answer: Literal["probs", "generate"] = "probs",
        prompt_template: str = PAIR_PROMPT,
        max_pixels: int | None = None,
        max_new_tokens: int = 512,
        batch_size: int = 8,
        both_orders: bool = False,
        opponents: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(both_orders=both_orders, opponents=opponents, seed=seed)
        check_qwen_vl(model, processor)
        if answer not in ("probs", "generate"):
            raise ValueError(f"`answer` must be 'probs' or 'generate', got {answer!r}")
        for arg, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` must be a positive int, got {value!r}")
        self.model = model
        self.processor = processor
        self.answer = answer
        self.prompt_template = check_template(prompt_template)
        self.vision = VisionPatches.from_processor(processor, max_pixels=max_pixels)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prefix, self.verdict_tokens = _answer_tokens(processor.tokenizer)

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, **options: Any
    ) -> UnifiedRewardPairwise:
        """Load a Qwen2-VL-class judge from a folder or Hub repo (default `CodeGoat24/UnifiedReward-qwen-7b`)."""
        model, processor = load_qwen_vl(pretrained or UNIFIEDREWARD, dtype, what="UnifiedReward pairwise judge")
        return cls(model, processor, **options).eval()

    def conversation(self, prompt: str) -> list[dict[str, Any]]:
        """The chat of one comparison: Image 1, Image 2, then the question."""
        question = format_prompt(self.prompt_template, prompt)
        return [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]}
        ]

    @torch.no_grad()
    def judge(self, images: Tensor, pairs: Tensor, prompts: list[str]) -> Judgments:
        device = self.device
        pixel_values, grid = self.vision(images.to(device)[:, None])  # every image once
        if self.answer == "probs":
            features = self.model.get_image_features(pixel_values, grid).pooler_output
        else:
            per_image = pixel_values.split(grid.prod(-1).tolist())
        probs, masses, texts = [], [], []
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
                encoded = BaseModelOutputWithPooling(pooler_output=tuple(features[k] for k in order))
                logits = self.model(
                    **inputs,
                    image_grid_thw=grid[order],
                    mm_encoder_outputs={"image": encoded},
                    logits_to_keep=len(self.prefix) + 1,
                ).logits
                p, mass = self.verdict_probability(logits)
                probs.append(p)
                masses.append(mass)
                texts += [None] * len(chunk)
            else:
                inputs |= {"pixel_values": torch.cat([per_image[k] for k in order]), "image_grid_thw": grid[order]}
                answers, _ = generate_texts(self.model, self.processor, inputs, self.max_new_tokens)
                parsed = [parse_pair_answer(t) for t in answers]
                probs.append(torch.tensor([math.nan if v is None else v for v in parsed], device=device))
                texts += answers
        mass = torch.cat(masses) if masses else None
        return Judgments(torch.cat(probs).float(), texts, answer_mass=mass)

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


class HTTPPairwiseJudge(PairwiseJudge):
    """A pairwise judge behind an OpenAI-compatible chat-completions server (vLLM, sglang, ...).

    Each comparison is one `POST {base_url}/chat/completions` with both images as PNG data URLs followed by the
    question; requests run in `max_workers` threads. A request is retried `max_retries` times with exponential
    backoff on connection errors, timeouts, HTTP 429 and 5xx and malformed responses (other 4xx are final). What
    still fails counts as a tie (`extras["request_errors"]`); answers without a verdict too (`parse_failures`).

    Args:
        base_url: the server's API root, e.g. `"http://localhost:8000/v1"`.
        model: the served model name.
        api_key: sent as a bearer token when given.
        prompt_template: the question, with `{prompt}` for the caption.
        timeout: seconds per request.
        max_retries: retries after the first attempt.
        backoff: seconds before the first retry, doubled each time (capped at 30).
        max_workers: concurrent requests.
        max_tokens, temperature: generation settings sent with each request.
        both_orders, opponents, seed: see `PairwiseJudge`.
    """

    name = "pairwise-http"

    def __init__(
        self,
        base_url: str,
        model: str = "UnifiedReward",
        *,
        api_key: str | None = None,
        prompt_template: str = PAIR_PROMPT,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_workers: int = 8,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        both_orders: bool = False,
        opponents: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(both_orders=both_orders, opponents=opponents, seed=seed)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"`base_url` must be an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        for arg, value in (("timeout", timeout), ("backoff", backoff), ("temperature", temperature)):
            if not isinstance(value, (int, float)) or not value >= 0 or (arg == "timeout" and not value > 0):
                raise ValueError(f"`{arg}` must be a number {'> 0' if arg == 'timeout' else '>= 0'}, got {value!r}")
        for arg, value in (("max_retries", max_retries), ("max_workers", max_workers), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or value < (0 if arg == "max_retries" else 1):
                raise ValueError(f"`{arg}` must be an int >= {0 if arg == 'max_retries' else 1}, got {value!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self.api_key = api_key
        self.prompt_template = check_template(prompt_template)
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_workers = max_workers
        self.max_tokens = max_tokens
        self.temperature = float(temperature)

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, **options: Any
    ) -> HTTPPairwiseJudge:
        """`pretrained` is the server's base URL; `dtype` is ignored (the server holds the model)."""
        if pretrained is None:
            raise ValueError(
                "pairwise-http: `pretrained` must be the server's base URL, e.g. http://localhost:8000/v1"
            )
        return cls(pretrained, **options)

    def judge(self, images: Tensor, pairs: Tensor, prompts: list[str]) -> Judgments:
        urls = [image_data_url(image) for image in images]  # every image encoded once
        settings = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        bodies = [
            chat_body(self.model_name, [urls[i], urls[j]], format_prompt(self.prompt_template, prompt), **settings)
            for (i, j), prompt in zip(pairs.tolist(), prompts)
        ]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            texts = list(pool.map(self.ask, bodies))
        parsed = [parse_pair_answer(t) for t in texts]
        probs = torch.tensor([math.nan if p is None else p for p in parsed], dtype=torch.float32)
        return Judgments(probs, texts, request_errors=sum(t is None for t in texts))

    def ask(self, body: dict[str, Any]) -> str | None:
        """The answer text of one request, or None once the retries are spent (never raises)."""
        for attempt in range(self.max_retries + 1):
            try:
                return post_chat(self.url, body, timeout=self.timeout, api_key=self.api_key)
            except urllib.error.HTTPError as e:
                final = 400 <= e.code < 500 and e.code != 429
                error = f"HTTP {e.code}"
            except Exception as e:  # timeouts, refused connections, malformed JSON: a failed judgment, not a crash
                final, error = False, f"{type(e).__name__}: {e}"
            if final or attempt == self.max_retries:
                logger.warning(
                    "pairwise-http: request to %s failed after %d attempts (%s)", self.url, attempt + 1, error
                )
                return None
            time.sleep(min(self.backoff * 2**attempt, 30.0))


class BradleyTerryWinRate(RewardModel):
    """A pointwise reward used pairwise: `P(i > j) = sigmoid((s_i - s_j) / temperature)` and Pref-GRPO's win rates.

    `group` scores the G images in one call (one forward pass per image, never per pair) and returns the win rates
    of the full preference matrix; `compare` is the reward's own Bradley-Terry `compare`.

    Args:
        reward: a pointwise image reward.
        temperature: `tau`; default the reward's `temperature`.
    """

    differentiable = False  # win rates are computed from detached preferences

    def __init__(self, reward: RewardModel, temperature: float | None = None) -> None:
        super().__init__()
        if not isinstance(reward, RewardModel) or isinstance(reward, PairwiseJudge):
            raise ValueError(f"`reward` must be a pointwise RewardModel, got {type(reward).__name__}")
        tau = reward.temperature if temperature is None else temperature
        if not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
        self.reward = reward
        self.temperature = float(tau)
        self.name = f"{reward.name}-winrate"
        self.modalities = reward.modalities

    def compare(self, a: Tensor, b: Tensor, prompts: list[str]) -> Tensor:
        return self.reward.compare(a, b, prompts)

    def group(self, pixels: Tensor, prompt: str) -> RewardOutput:
        if not isinstance(prompt, str):
            raise ValueError(f"`prompt` must be a single string for a group, got {type(prompt).__name__}")
        if pixels.shape[0] < 2:
            raise ValueError(f"`pixels` must hold a group of at least 2 samples, got {pixels.shape[0]}")
        return self._group(pixels, prompt)

    def _group(self, pixels: Tensor, prompt: str) -> RewardOutput:
        scores = self.reward.score(pixels, [prompt] * pixels.shape[0]).score.detach()
        prefs = torch.sigmoid((scores[:, None] - scores[None, :]) / self.temperature)
        return RewardOutput(win_rates(prefs), extras={"prefs": prefs, "scores": scores, "calls": pixels.shape[0]})

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        return scores_by_prompt(pixels, prompts, self._group)
