"""Every image reward family, loaded offline through `load_reward` from tiny checkpoints in the official layouts.

Per family: the score equals the published formula computed independently in float64, gradients reach the pixels,
a batch scores like its items, order does not matter, and reduced precision keeps the head and score in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import pytest
import torch
from reward_helpers import (
    PROMPTS,
    TINY_BLIP_VIT,
    TINY_OPEN_CLIP,
    bert_tokenizer,
    reference_clip_embeds,
    reference_cosine,
    reference_imagereward,
    save_aesthetic,
    save_clip_folder,
    save_hps,
    save_imagereward,
    tiny_clip,
)
from torch import Tensor

from visalign import RewardModel, load_reward
from visalign.testing import clip_tokenizer

FAMILIES = ["pickscore", "clipscore", "clipscore-open_clip", "hpsv2", "hpsv2.1", "aesthetic", "imagereward"]
Reference = Callable[[Tensor, list[str]], Tensor]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[tuple, dict, Reference]]:
    """family -> (load_reward args, options, float64 reference of the score from `pixel_values`)."""
    root = tmp_path_factory.mktemp("rewards")
    clip_folder = save_clip_folder(root / "clip")
    clip_model, clip_tok = tiny_clip(), clip_tokenizer()
    hps = {v: save_hps(root / "hps", v, seed=i) for i, v in enumerate(["v2.0", "v2.1"])}
    torch.manual_seed(3)
    open_clip_model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    torch.save(open_clip_model.state_dict(), root / "open_clip_pytorch_model.bin")
    aesthetic_head = save_aesthetic(root / "aesthetic")
    blip = save_imagereward(root / "imagereward")
    bert = bert_tokenizer(root / "bert")
    simple = open_clip.SimpleTokenizer()

    def hf_cos(pv: Tensor, p: list[str]) -> Tensor:
        return reference_cosine(clip_model, clip_tok, pv, p)

    return {
        "pickscore": (
            ("pickscore", str(clip_folder)),
            {"processor": str(clip_folder)},
            lambda pv, p: clip_model.logit_scale.double().exp() * hf_cos(pv, p),
        ),
        "clipscore": (("clipscore", str(clip_folder)), {"w": 100.0}, lambda pv, p: 100.0 * hf_cos(pv, p).clamp_min(0)),
        "clipscore-open_clip": (
            ("clipscore", str(root / "open_clip_pytorch_model.bin")),
            {"architecture": TINY_OPEN_CLIP},
            lambda pv, p: 2.5 * reference_cosine(open_clip_model, simple, pv, p).clamp_min(0),
        ),
        "hpsv2": (
            ("hpsv2", str(root / "hps")),
            {"architecture": TINY_OPEN_CLIP},
            lambda pv, p: reference_cosine(hps["v2.0"], simple, pv, p),
        ),
        "hpsv2.1": (
            ("hpsv2.1", str(root / "hps")),
            {"architecture": TINY_OPEN_CLIP},
            lambda pv, p: reference_cosine(hps["v2.1"], simple, pv, p),
        ),
        "aesthetic": (
            ("aesthetic", str(root / "aesthetic")),
            {"clip": str(root / "aesthetic" / "clip")},
            lambda pv, p: aesthetic_head.double()(reference_clip_embeds(tiny_clip(), pv)).squeeze(-1),
        ),
        "imagereward": (
            ("imagereward", str(root / "imagereward")),
            {"tokenizer": str(root / "bert"), "vision_config": TINY_BLIP_VIT},
            lambda pv, p: reference_imagereward(blip, pv, p, bert),
        ),
    }


_loaded: dict[tuple[str, torch.dtype | None], RewardModel] = {}


def load(checkpoints: dict, family: str, dtype: torch.dtype | None = None) -> RewardModel:
    if (family, dtype) not in _loaded:
        args, options, _ = checkpoints[family]
        _loaded[family, dtype] = load_reward(*args, dtype=dtype, **options)
    return _loaded[family, dtype]


def batch(n: int = 4, seed: int = 0) -> tuple[Tensor, list[str]]:
    """Non-square images (crop and pad paths both active) and prompts with a repeat (shared text encoding)."""
    pixels = torch.rand(n, 3, 40, 52, generator=torch.Generator().manual_seed(seed))
    return pixels, [PROMPTS[i % 3] for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_score_matches_float64_reference(checkpoints: dict, family: str) -> None:
    reward = load(checkpoints, family)
    pixels, prompts = batch()
    out = reward(pixels, prompts)
    expected = checkpoints[family][2](reward.transform(pixels), prompts)
    assert out.score.dtype == torch.float32 and out.score.shape == (4,)
    torch.testing.assert_close(out.score.double(), expected, rtol=1e-5, atol=1e-5)
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_pixels(checkpoints: dict, family: str) -> None:
    reward = load(checkpoints, family)
    pixels, prompts = batch(2)
    pixels.requires_grad_(True)
    out = reward(pixels, prompts)
    # CLIPScore's max(cos, 0) has no gradient where a random model's cosine is negative: its cosine aspect has one
    (out.score.sum() + sum(a.sum() for a in out.aspects.values())).backward()
    assert reward.differentiable
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_items_and_order_invariance(checkpoints: dict, family: str) -> None:
    reward = load(checkpoints, family)
    pixels, prompts = batch(4, seed=1)
    with torch.no_grad():
        together = reward(pixels, prompts).score
        alone = torch.cat([reward(pixels[i : i + 1], prompts[i : i + 1]).score for i in range(4)])
        order = [2, 0, 3, 1]
        shuffled = reward(pixels[order], [prompts[i] for i in order]).score
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, together[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_precision_keeps_heads_and_scores_float32(checkpoints: dict, family: str, dtype: torch.dtype) -> None:
    reward = load(checkpoints, family, dtype)
    float32 = {n for n, p in reward.named_parameters() if p.dtype == torch.float32}
    expected = {n for n, _ in reward.named_parameters() if n.startswith("head.") or n.endswith("logit_scale")}
    assert float32 == expected
    assert any(p.dtype == dtype for p in reward.parameters())
    pixels, prompts = batch(2)
    with torch.no_grad():
        low, full = reward(pixels, prompts).score, load(checkpoints, family)(pixels, prompts).score
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05 * float(full.abs().max()) + 0.02)


def test_registry_lists_the_families() -> None:
    from visalign import list_rewards

    assert {"pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "clipscore"} <= set(list_rewards())


def test_prompts_are_used(checkpoints: dict) -> None:
    """Text-conditioned families change with the prompt; the aesthetic predictor ignores it."""
    pixels, _ = batch(2)
    with torch.no_grad():
        for family in ["pickscore", "hpsv2.1", "imagereward", "aesthetic"]:
            reward = load(checkpoints, family)
            a, b = reward(pixels, PROMPTS[:2]).score, reward(pixels, PROMPTS[2:]).score
            assert torch.equal(a, b) == (family == "aesthetic"), family
