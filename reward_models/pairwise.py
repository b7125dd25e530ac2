"""Pairwise judges and Pref-GRPO's group win-rate reward.

Pref-GRPO (Wang et al. 2025, arXiv 2508.20751) rewards each of the G samples of a prompt by its win rate in the
group: a judge sees two images of the same caption and says which is better, and
`w_i = sum_{j != i} P(i > j) / (G - 1)` (`win_rates`), ties and failed judgments counting
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
  the judge's `texts`, the cause of each error verdict `errors` (None where there was a verdict), the preference
  matrix `prefs` `[G, G]` (unjudged pairs 0.5) and the scheduled `pairs`.

Questions and answer rules: `prompt_template` names a preset of `visalign.reward_models.unifiedreward.PAIR_PROMPTS`
(the official prompts, quoted verbatim there with their sources) or is a template with `{prompt}`:
- `"unifiedreward"` (default): UnifiedReward's pair-ranking prompt, read by its substring rule (`rank_verdict`);
- `"unifiedreward-think"`: UnifiedReward-Think-qwen3vl's prompt, which Pref-GRPO judges with; reasoning in
  `<think>`, verdict in `<answer>`, read by Pref-GRPO's rule (`think_verdict`); `"unifiedreward-think-qwen2.5"`:
  the Qwen2.5-VL Think checkpoint's prompt, same rule;
- `"visalign"`: our own wording, read by `parse_pair_answer` (case-insensitive, last verdict, 2.0's relative scores).
`answer_rule` overrides the rule (a custom template gets `"unifiedreward"`). An answer with no verdict under the rule,
or cut at the token limit, is an error verdict: scored 0.5 (the reference's value), counted in `failures`, its cause
in `extras["errors"]`.

Judges:

- `UnifiedRewardPairwise` [`unifiedreward-pairwise`, in `pairwise_vlm.py`]: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL
  judge through transformers (default `CodeGoat24/UnifiedReward-qwen-7b`;
  `CodeGoat24/UnifiedReward-Think-qwen3vl-8b` with `prompt_template="unifiedreward-think"`). With
  `answer="probs"` (default for ranking prompts) the verdict is read from token probabilities in one forward pass
  per pair, the answer prefix teacher-forced:
  `P(1 > 2) = (1 - t) r + t / 2` with `t = P(tie | verdict)` from the first answer token and
  `r = P("1") / (P("1") + P("2"))` at the digit; each image goes through the vision tower once per group, not once
  per pair. `answer="generate"` (default, and the only mode, for Think prompts) decodes greedily (`max_new_tokens`:
  512 as the official scripts, 4096 for Think as the official vLLM clients) and reads the text with the rule.
- `HTTPPairwiseJudge` [`pairwise-http`]: the same question to an OpenAI-compatible server (vLLM, sglang), requests
  in parallel threads, with timeouts and retries; a request that still fails, an answer without a verdict, or one
  cut at `max_tokens` (`finish_reason` "length") becomes 0.5 and is counted, never an exception in a training step.
  Defaults follow the official vLLM clients (UnifiedReward `vllm_qwen/vllm_request.py`, Pref-GRPO
  `vllm_utils/vllm_request.py`): images as JPEG quality 95, `max_tokens` 4096, no temperature sent (the server's
  generation config decides; the clients' `"do_sample": False` is not an OpenAI field), all overridable.
- `BradleyTerryWinRate`: a pointwise reward seen pairwise, `P(i > j) = sigmoid((s_i - s_j) / temperature)`, from
  one forward pass per image.

Deviations: Pref-GRPO rounds win rates to 3 decimals (we do not); reading the verdict from token probabilities (the
in-process default for ranking prompts: one forward pass per pair instead of a decoded answer, and a soft verdict) is
not in the reference, which parses generated text: pass `answer="generate"` for the reference's reading; in-process
decoding is greedy (`do_sample=False`) where the official scripts keep the checkpoint's generation config; the
in-process judge takes pixels resized within the processor's pixel budget as float tensors, where the official
scripts pass PIL images and the HTTP clients JPEG files; an answer cut at the token limit is an error verdict even
when it already holds a verdict sentence (the reference reads whatever text came back), since a cut reasoning is not
the judgment the checkpoint was trained to give.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from visalign.reward_models.unifiedreward import (
    PAIR_RANK_PROMPT,
    format_prompt,
    read_verdict,
    resolve_prompt,
)
from visalign.reward_models.unifiedreward import answer_block as answer_block  # re-exported: used by ImageDoctor
from visalign.reward_models.unifiedreward import check_template as check_template
from visalign.reward_models.unifiedreward import parse_pair_answer as parse_pair_answer
from visalign.reward_models.vlm import (
    chat_body,
    image_data_url,
    post_chat_choice,
)
from visalign.rewards import RewardModel
from visalign.types import RewardOutput, check_pixels, check_prompts

logger = logging.getLogger(__name__)

PAIR_PROMPT = PAIR_RANK_PROMPT  # the default question: UnifiedReward's official pair-ranking prompt


def win_rates(prefs: Tensor) -> Tensor:
    """Pref-GRPO's reward (Wang et al. 2025, arXiv 2508.20751): each sample's mean win probability in its group.

    `w_i = sum_{j != i} prefs[i, j] / (G - 1)`, the diagonal ignored. When the judge is consistent
    (`prefs[i, j] + prefs[j, i] = 1`) the rates of a group sum to `G / 2` and average 0.5, whatever the samples:
    log an external metric to see progress.

    Args:
        prefs (`Tensor` `[..., G, G]`): `prefs[..., i, j]` = P(sample i beats sample j), in [0, 1]; G >= 2.

    Returns:
        `Tensor` `[..., G]`, float32 (float64 when `prefs` is).
    """
    if not isinstance(prefs, Tensor) or prefs.ndim < 2 or prefs.shape[-1] != prefs.shape[-2]:
        raise ValueError("`prefs` must be a square matrix [G, G] (or a batch [..., G, G]) of win probabilities")
    g = prefs.shape[-1]
    if g < 2:
        raise ValueError(f"`prefs` needs a group of at least 2 samples, got G={g}")
    dtype = torch.float64 if prefs.dtype == torch.float64 else torch.float32
    off_diagonal = ~torch.eye(g, dtype=torch.bool, device=prefs.device)
    p = torch.where(off_diagonal, prefs.detach().to(dtype), torch.zeros((), dtype=dtype, device=prefs.device))
    values = p[..., off_diagonal]
    if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError("`prefs` off-diagonal entries must be probabilities in [0, 1]")
    return p.sum(dim=-1) / (g - 1)


@dataclass
class Judgments:
    """A judge's answers for P ordered pairs.

    Args:
        probs (`Tensor` `[P]`, float32): P(first image better), NaN where the judge gave no verdict.
        texts (`list`): the judge's text per pair (None for probability read-outs and failed requests).
        request_errors (`int`): pairs whose request failed (timeouts, HTTP errors, malformed responses).
        answer_mass (`Tensor` `[P]` or None): probability the judge put on the valid verdicts (probability mode).
        errors (`list` or None): per pair, the cause of an error verdict (None where the judge gave a verdict).
    """

    probs: Tensor
    texts: list[str | None]
    request_errors: int = 0
    answer_mass: Tensor | None = None
    errors: list[str | None] | None = None


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
            "errors": result.errors if result.errors is not None else [None] * len(ordered),
        }
        if result.answer_mass is not None:
            stats["answer_mass"] = result.answer_mass
        if self.both_orders:
            forward, backward = probs.chunk(2)
            valid = ~(failed.chunk(2)[0] | failed.chunk(2)[1])
            stats["position_bias"] = float((forward + backward - 1)[valid].mean()) if valid.any() else float("nan")
            probs = (forward + 1 - backward) / 2
        if stats["failures"]:
            causes = sorted({e for e in stats["errors"] if e is not None})
            logger.warning(
                "%s: %d of %d judgments failed and count as ties (%s)",
                self.name,
                stats["failures"],
                len(ordered),
                "; ".join(causes) or "no cause given",
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


class HTTPPairwiseJudge(PairwiseJudge):
    """A pairwise judge behind an OpenAI-compatible chat-completions server (vLLM, sglang, ...).

    Each comparison is one `POST {base_url}/chat/completions` with both images as data URLs followed by the question
    (the official clients' message layout); requests run in `max_workers` threads. A request is retried
    `max_retries` times with exponential backoff on connection errors, timeouts, HTTP 429 and 5xx and malformed
    responses (other 4xx are final). What still fails counts as a tie (`extras["request_errors"]`); answers without a
    verdict or cut at `max_tokens` too (`parse_failures`), each with its cause in `extras["errors"]`.

    Args:
        base_url: the server's API root, e.g. `"http://localhost:8000/v1"`.
        model: the served model name (the official scripts serve as `UnifiedReward`).
        api_key: sent as a bearer token when given.
        prompt_template, answer_rule: see `UnifiedRewardPairwise` (`"unifiedreward-think"` for Pref-GRPO's judge).
        image_format: `"JPEG"` (default, as the official clients) or `"PNG"` (lossless).
        jpeg_quality: JPEG quality (official: 95).
        timeout: seconds per request.
        max_retries: retries after the first attempt.
        backoff: seconds before the first retry, doubled each time (capped at 30).
        max_workers: concurrent requests.
        max_tokens: the answer's token limit (official: 4096; a reasoning cut short is an error verdict).
        temperature: sent only when given (default: the server's generation config decides, as in the reference).
        both_orders, opponents, seed: see `PairwiseJudge`.
    """

    name = "pairwise-http"

    def __init__(
        self,
        base_url: str,
        model: str = "UnifiedReward",
        *,
        api_key: str | None = None,
        prompt_template: str = "unifiedreward",
        answer_rule: str | None = None,
        image_format: str = "JPEG",
        jpeg_quality: int = 95,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_workers: int = 8,
        max_tokens: int = 4096,
        temperature: float | None = None,
        both_orders: bool = False,
        opponents: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(both_orders=both_orders, opponents=opponents, seed=seed)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"`base_url` must be an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        for arg, value in (("timeout", timeout), ("backoff", backoff), ("temperature", temperature)):
            if arg == "temperature" and value is None:
                continue
            if not isinstance(value, (int, float)) or not value >= 0 or (arg == "timeout" and not value > 0):
                raise ValueError(f"`{arg}` must be a number {'> 0' if arg == 'timeout' else '>= 0'}, got {value!r}")
        for arg, value in (("max_retries", max_retries), ("max_workers", max_workers), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or value < (0 if arg == "max_retries" else 1):
                raise ValueError(f"`{arg}` must be an int >= {0 if arg == 'max_retries' else 1}, got {value!r}")
        image_data_url(torch.zeros(3, 1, 1), image_format, jpeg_quality)  # validates the format and the quality
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self.api_key = api_key
        self.prompt_template, self.answer_rule = resolve_prompt(prompt_template, answer_rule)
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_workers = max_workers
        self.max_tokens = max_tokens
        self.temperature = None if temperature is None else float(temperature)

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
        urls = [image_data_url(image, self.image_format, self.jpeg_quality) for image in images]  # each once
        settings: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        bodies = [
            chat_body(self.model_name, [urls[i], urls[j]], format_prompt(self.prompt_template, prompt), **settings)
            for (i, j), prompt in zip(pairs.tolist(), prompts)
        ]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            answers = list(pool.map(self.ask, bodies))
        texts = [text for text, _ in answers]
        verdicts = [  # `extra` is the finish_reason of an answer, the error of a failed request
            read_verdict(text, self.answer_rule, extra == "length") if text is not None else (math.nan, extra)
            for text, extra in answers
        ]
        probs = torch.tensor([p for p, _ in verdicts], dtype=torch.float32)
        errors = [cause for _, cause in verdicts]
        return Judgments(probs, texts, request_errors=sum(t is None for t in texts), errors=errors)

    def ask(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """`(answer text, finish_reason)` of one request, or `(None, error)` once the retries are spent (never
        raises)."""
        for attempt in range(self.max_retries + 1):
            try:
                return post_chat_choice(self.url, body, timeout=self.timeout, api_key=self.api_key)
            except urllib.error.HTTPError as e:
                final = 400 <= e.code < 500 and e.code != 429
                error = f"HTTP {e.code}"
            except Exception as e:  # timeouts, refused connections, malformed JSON: a failed judgment, not a crash
                final, error = False, f"{type(e).__name__}: {e}"
            if final or attempt == self.max_retries:
                logger.warning(
                    "pairwise-http: request to %s failed after %d attempts (%s)", self.url, attempt + 1, error
                )
                return None, f"request failed after {attempt + 1} attempts: {error}"
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
