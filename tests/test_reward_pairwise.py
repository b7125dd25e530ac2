"""Pairwise judges: answer parsing, win-rate schedules and their properties, the tiny Qwen-VL judge loaded from the
official layout, the HTTP judge against a local fake server, and pointwise rewards used pairwise."""

import base64
import hashlib
import io
import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.reward_models import pairwise
from visalign.reward_models.pairwise import (
    PAIR_PROMPT,
    BradleyTerryWinRate,
    HTTPPairwiseJudge,
    Judgments,
    PairwiseJudge,
    parse_pair_answer,
    regular_schedule,
)
from visalign.reward_models.pairwise_vlm import UnifiedRewardPairwise
from visalign.reward_models.unifiedreward import (
    PAIR_PROMPTS,
    PAIR_RANK_PROMPT,
    THINK_PROMPT,
    THINK_QWEN25_PROMPT,
    VISALIGN_PAIR_PROMPT,
    read_verdict,
    resolve_prompt,
)
from visalign.reward_models.vlm import VisionPatches, image_data_url
from visalign.rewards import load_reward
from visalign.testing_vlm import FakeChatServer, save_tiny_qwen3_vl, save_tiny_qwen_vl
from visalign.world.rewards import WorldDefectsReward


class CannedJudge(PairwiseJudge):
    """A judge whose text answer for (first, second) comes from `answer(first_index, second_index)`."""

    name = "canned"

    def __init__(self, answer, **options):
        super().__init__(**options)
        self.answer = answer

    def judge(self, images, pairs, prompts):
        texts = [self.answer(i, j) for i, j in pairs.tolist()]
        parsed = [parse_pair_answer(t) for t in texts]
        return Judgments(torch.tensor([float("nan") if p is None else p for p in parsed]), texts)


def first_wins(i, j):
    return "Image 1 is better."


def by_index(i, j):  # a consistent judge: the lower index is better
    return "Image 1 is better." if i < j else "Image 2 is better."


def noisy(i, j):  # wins, losses, ties, malformed, empty and adversarial answers
    answers = [
        "Image 1 is better.",
        "Image 2 is better.",
        "Both images are equally good.",
        "I cannot tell.",
        "",
        "Image 1 is better? No: Image 2 is better.",
        "<think>Image 1 is better lit</think><answer>Image 2 is better.</answer>",
    ]
    return answers[(3 * i + 5 * j) % len(answers)]


@pytest.fixture
def group8(generator):
    return torch.rand(8, 3, 32, 32, generator=generator)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Image 1 is better.", 1.0),
        ("after careful thought, image 2 is BETTER", 0.0),
        ("Both images are equally good.", 0.5),
        ("Image 1 is better than image 2 in color, but overall Image 2 is better.", 0.0),
        ("<think>Image 1 is better lit</think><answer>Image 2 is better.</answer>", 0.0),
        ("<think>long reasoning</think><answer> Image 1 is better", 1.0),
        ("Image 1 is not better.", None),
        ("Image 3 is better.", None),
        ("", None),
        ("   ", None),
        (None, None),
        (42, None),
        ("<think>Image 1 is better, surely</think> no verdict after thinking", None),
        ("Alignment Score:\n Image 1: 0.25\n Image 2: 0.75\n\nStyle Score:\n Image 1: 0.75\n Image 2: 0.25", 0.5),
        ("Coherence Score:\n Image 1: 0.8\n Image 2: 0.2", 0.8),
        ("Image 1: 0\n Image 2: 0", None),
    ],
)
def test_parse_pair_answer(text, expected):
    result = parse_pair_answer(text)
    assert result == (pytest.approx(expected) if expected is not None else None)


# ---------------------------------------------------------------- official prompts and answer rules

# sha256 of each prompt as the official code builds it, `{prompt}` left in place of the caption (computed from
# CodeGoat24/UnifiedReward ff6f520 and CodeGoat24/Pref-GRPO 3e787f6, see `visalign.reward_models.unifiedreward`)
OFFICIAL_SHA256 = {
    "unifiedreward": "0fd2f5c43a06516503fde3e64ffc98fff6f3a8815b5eac8dc5f0d81cee686614",
    "unifiedreward-think": "a8a0d80818246406b783d5cca630336c5fdf1264fef13f09d09bd94d61a139d5",
    "unifiedreward-think-qwen2.5": "342f6a4bd0efdae0ca754259d78404e534aae5f1c5527dd47f6062028305e3ff",
}


def test_default_prompts_are_the_official_texts():
    for name, digest in OFFICIAL_SHA256.items():
        assert hashlib.sha256(PAIR_PROMPTS[name].template.encode()).hexdigest() == digest, name
    assert PAIR_PROMPT == PAIR_RANK_PROMPT == PAIR_PROMPTS["unifiedreward"].template
    assert PAIR_RANK_PROMPT.startswith("You are given a text caption and two generated images based on that caption.")
    assert PAIR_RANK_PROMPT.endswith(
        'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and "Both images are equally '
        'good."\nYour task is provided as follows:\nText Caption: [{prompt}]'
    )
    assert "The caption for the generated images is: 「{prompt}」." in THINK_PROMPT
    assert THINK_PROMPT.endswith("but be based on the given caption and images.\n        ")
    assert THINK_QWEN25_PROMPT.startswith("Given a caption and two images generated based on this caption")
    assert THINK_QWEN25_PROMPT.endswith("Text Caption: [{prompt}]")
    # each default and its rule
    assert resolve_prompt("unifiedreward", None) == (PAIR_RANK_PROMPT, "unifiedreward")
    assert resolve_prompt("unifiedreward-think", None) == (THINK_PROMPT, "unifiedreward-think")
    assert resolve_prompt("visalign", None) == (VISALIGN_PAIR_PROMPT, "visalign")
    assert resolve_prompt("Rate {prompt}", None) == ("Rate {prompt}", "unifiedreward")
    assert resolve_prompt("visalign", "unifiedreward-think") == (VISALIGN_PAIR_PROMPT, "unifiedreward-think")
    for bad, arg in [(("no placeholder", None), "prompt_template"), (("visalign", "strict"), "answer_rule")]:
        with pytest.raises(ValueError, match=f"`{arg}`"):
            resolve_prompt(*bad)


THINK = "<think>\n1. Semantic consistency:\n    Image 1 (9/10) - ...;\n    Image 2 (7/10) - ...\n</think>\n"


@pytest.mark.parametrize(
    "rule, text, expected, cause",
    [
        # Pref-GRPO's rule: the first <answer> block, "Image 1 is better" checked first, else a tie
        ("unifiedreward-think", THINK + "<answer>Image 1 is better</answer>", 1.0, None),
        ("unifiedreward-think", THINK + "<answer>Image 2 is better</answer>", 0.0, None),
        ("unifiedreward-think", "Image 2 is better", None, "no <answer>...</answer> block"),  # no tags
        ("unifiedreward-think", THINK + "<answer>image 2 is better</answer>", None, "names no verdict"),  # lower case
        ("unifiedreward-think", THINK + "<answer>Image 2 is better, Image 1 is better</answer>", 1.0, None),  # both
        (
            "unifiedreward-think",
            THINK + "<answer>Image 2 is better</answer><answer>Image 1 is better</answer>",
            0.0,
            None,
        ),
        ("unifiedreward-think", "<think>Image 1 (9/10) - sharp; Image 2 (", None, "never ended"),  # cut in <think>
        ("unifiedreward-think", THINK + "<answer>Image 1 is bet", None, "<answer> never closed"),
        ("unifiedreward-think", "", None, "empty answer"),
        ("unifiedreward-think", None, None, "empty answer"),
        # UnifiedReward's pair-ranking rule: case-sensitive substrings, image 1 first
        ("unifiedreward", "Image 1 is better.", 1.0, None),
        ("unifiedreward", "Both images are equally good.", 0.5, None),
        ("unifiedreward", "image 2 is better.", None, "no verdict sentence"),  # lower case
        ("unifiedreward", "Image 2 is better than before, but Image 1 is better.", 1.0, None),  # both named
        ("unifiedreward", "<answer>Image 2 is better</answer>", 0.0, None),  # tags are not needed
        # our lenient rule
        ("visalign", "image 2 is BETTER", 0.0, None),
        ("visalign", "Image 1 is better than image 2 in color, but overall Image 2 is better.", 0.0, None),
        ("visalign", "I cannot tell.", None, "no verdict"),
    ],
)
def test_answer_rules_read_as_the_reference(rule, text, expected, cause):
    p, error = read_verdict(text, rule)
    if expected is None:
        assert math.isnan(p) and cause in error
    else:
        assert p == expected and error is None


def test_a_truncated_answer_is_an_error_verdict_even_with_a_verdict_sentence():
    p, error = read_verdict(THINK + "<answer>Image 1 is better</answer>", "unifiedreward-think", truncated=True)
    assert math.isnan(p) and "truncated" in error and "length" in error


@pytest.mark.parametrize("answer", [first_wins, by_index, noisy])
@pytest.mark.parametrize("options", [{}, {"both_orders": True}, {"opponents": 4}, {"opponents": 3}])
def test_win_rates_of_any_judge_sum_to_half_the_group(group8, answer, options):
    out = CannedJudge(answer, **options).group(group8, "a red square")
    assert out.score.shape == (8,)
    assert float(out.score.sum()) == pytest.approx(4.0, abs=1e-5)
    assert ((out.score >= 0) & (out.score <= 1)).all()


def test_call_counts_of_the_schedules(group8):
    count = {}
    for label, options in [("all", {}), ("both", {"both_orders": True}), ("k4", {"opponents": 4})]:
        count[label] = CannedJudge(by_index, **options).group(group8, "p").extras["calls"]
    assert count == {"all": 28, "both": 56, "k4": 16}


def test_both_orders_cancels_a_judge_that_always_prefers_the_first_image(group8):
    biased = CannedJudge(first_wins).group(group8, "p")
    assert biased.score[0] == 1.0 and biased.score[-1] == 0.0  # the reference's order favors early samples
    fair = CannedJudge(first_wins, both_orders=True).group(group8, "p")
    torch.testing.assert_close(fair.score, torch.full((8,), 0.5))
    assert fair.extras["position_bias"] == pytest.approx(1.0)


def test_consistent_judge_ranks_and_failures_are_counted_as_ties(group8):
    out = CannedJudge(by_index).group(group8, "p")
    torch.testing.assert_close(out.score, torch.linspace(1, 0, 8))
    assert out.extras["failures"] == 0 and out.extras["prefs"].shape == (8, 8)
    noisy_out = CannedJudge(noisy).group(group8, "p")
    texts = noisy_out.extras["texts"]
    assert noisy_out.extras["failures"] == sum(parse_pair_answer(t) is None for t in texts) > 0
    assert noisy_out.extras["parse_failures"] == noisy_out.extras["failures"]
    assert noisy_out.extras["request_errors"] == 0


def test_regular_schedule_meets_k_distinct_opponents():
    gen = torch.Generator().manual_seed(0)
    for g, k in [(8, 1), (8, 2), (8, 3), (8, 7), (16, 4), (16, 5), (7, 2), (7, 4)]:
        pairs = regular_schedule(g, k, gen)
        assert len(pairs) == g * k // 2
        assert (pairs[:, 0] != pairs[:, 1]).all()
        assert len({tuple(sorted(p)) for p in pairs.tolist()}) == len(pairs)
        assert torch.bincount(pairs.flatten(), minlength=g).tolist() == [k] * g
    with pytest.raises(ValueError, match="`opponents`"):
        regular_schedule(7, 3, gen)


def test_opponent_rates_are_means_over_the_games(group8):
    out = CannedJudge(by_index, opponents=2, seed=3).group(group8, "p")
    pairs = out.extras["pairs"]
    for i in range(8):
        games = [(a, b) for a, b in pairs.tolist() if i in (a, b)]
        wins = sum((a == i) == (a < b) for a, b in games)
        assert float(out.score[i]) == pytest.approx(wins / 2)


def test_score_groups_the_batch_by_prompt(generator):
    pixels = torch.rand(5, 3, 32, 32, generator=generator)
    prompts = ["a", "b", "a", "a", "c"]
    out = CannedJudge(by_index).score(pixels, prompts)
    torch.testing.assert_close(out.score, torch.tensor([1.0, 0.5, 0.5, 0.0, 0.5]))
    assert out.extras["singletons"] == 2 and out.extras["calls"] == 3


def test_compare_and_bad_inputs(group8):
    judge = CannedJudge(first_wins, both_orders=True)
    torch.testing.assert_close(judge.compare(group8[:3], group8[3:6], ["p"] * 3), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="`prompt`"):
        judge.group(group8, ["p"] * 8)
    with pytest.raises(ValueError, match="`pixels`"):
        judge.group(group8[:1], "p")
    with pytest.raises(ValueError, match="`pixels`"):
        judge.group(group8 * 2, "p")
    with pytest.raises(ValueError, match="`a` and `b`"):
        judge.compare(group8[:2], group8[:3], ["p"] * 2)
    with pytest.raises(ValueError, match="`prompts`"):
        judge.compare(group8[:2], group8[2:4], ["p"])
    with pytest.raises(ValueError, match="`opponents`"):
        CannedJudge(first_wins, opponents=8).group(group8, "p")
    for options in [{"opponents": 0}, {"opponents": 2.0}, {"both_orders": "yes"}]:
        with pytest.raises(ValueError, match=f"`{next(iter(options))}`"):
            CannedJudge(first_wins, **options)


# ---------------------------------------------------------------- the Qwen2-VL-class judge, tiny and random


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("judge"), "qwen2_5_vl", corpus=[PAIR_PROMPT])


def test_vision_patches_match_the_processors(judge_folder, generator):
    judge = UnifiedRewardPairwise.from_pretrained(str(judge_folder))
    images = torch.rand(3, 3, 32, 32, generator=generator)
    values, grid = judge.vision(images[:, None])
    reference = judge.processor.image_processor(images=list(images), do_rescale=False, return_tensors="pt")
    torch.testing.assert_close(values, reference["pixel_values"], rtol=0, atol=0)
    assert grid.tolist() == reference["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    video = VisionPatches.from_processor(judge.processor, video=True)
    clips = torch.rand(2, 3, 3, 32, 32, generator=generator)  # 3 frames: padded to 4 by repeating the last
    values, grid = video(clips)
    reference = judge.processor.video_processor(
        videos=list(clips), do_rescale=False, do_sample_frames=False, return_tensors="pt"
    )
    torch.testing.assert_close(values, reference["pixel_values_videos"], rtol=0, atol=0)
    assert grid.tolist() == reference["video_grid_thw"].tolist()
    big = torch.rand(1, 1, 3, 128, 64, generator=generator, requires_grad=True)
    values, grid = judge.vision(big)  # resized to 88 x 40 within the 64 x 64 pixel budget, gradients flow
    assert grid.tolist() == [[1, 22, 10]]
    values.sum().backward()
    assert big.grad.abs().sum() > 0


@pytest.mark.parametrize("version", ["qwen2_5_vl", "qwen2_vl"])
def test_tiny_judge_loads_and_reads_verdict_probabilities(version, tmp_path, generator):
    folder = save_tiny_qwen_vl(tmp_path / version, version, corpus=[PAIR_PROMPT])
    judge = UnifiedRewardPairwise.from_pretrained(str(folder), batch_size=4)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    pixels = torch.rand(5, 3, 32, 32, generator=generator)
    with mock.patch.object(judge.model.model.visual, "forward", wraps=judge.model.model.visual.forward) as visual:
        out = judge.group(pixels, "a red square")
    assert visual.call_count == 1  # each image through the vision tower once per group, not once per pair
    assert float(out.score.sum()) == pytest.approx(2.5, abs=1e-5)
    assert out.extras["calls"] == 10 and out.extras["failures"] == 0
    assert ((out.extras["answer_mass"] > 0) & (out.extras["answer_mass"] <= 1)).all()
    batched = judge.compare(pixels[:3], pixels[2:], ["a red square"] * 3)
    single = torch.cat([judge.compare(pixels[i : i + 1], pixels[i + 2 : i + 3], ["a red square"]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_tiny_qwen3_vl_judge_loads_and_judges(tmp_path, generator):
    folder = save_tiny_qwen3_vl(tmp_path / "qwen3", corpus=[PAIR_PROMPT])
    judge = UnifiedRewardPairwise.from_pretrained(str(folder), batch_size=4)
    assert type(judge.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert judge.vision.mean == (0.5, 0.5, 0.5)  # Qwen3-VL's normalization, read from its processor
    pixels = torch.rand(4, 3, 32, 32, generator=generator)
    with mock.patch.object(judge.model.model.visual, "forward", wraps=judge.model.model.visual.forward) as visual:
        out = judge.group(pixels, "a red square")
    assert visual.call_count == 1 and out.extras["failures"] == 0
    assert float(out.score.sum()) == pytest.approx(2.0, abs=1e-5)
    # the cached image features (with the deepstack features) give what a forward pass on the pixels gives
    pair = torch.tensor([[1, 3]])
    cached = judge.judge(pixels, pair, ["a red square"]).probs
    inputs = judge.processor(
        text=[judge.processor.apply_chat_template(judge.conversation("a red square"), add_generation_prompt=True)],
        images=[pixels[1], pixels[3]],
        do_rescale=False,
        return_tensors="pt",
    )
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([judge.prefix])], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(judge.prefix))], 1).long()
    with torch.no_grad():
        logits = judge.model(**inputs).logits[:, -len(judge.prefix) - 1 :]
    torch.testing.assert_close(cached, judge.verdict_probability(logits)[0], atol=1e-5, rtol=1e-4)
    generated = UnifiedRewardPairwise(judge.model, judge.processor, answer="generate", max_new_tokens=2)
    out = generated.group(pixels[:2], "a red square")  # real decoding on Qwen3-VL; a random model gives no verdict
    assert out.extras["failures"] == 1 and out.score.tolist() == [0.5, 0.5]


def test_think_judge_decodes_reads_answer_tags_and_flags_truncation(tmp_path, generator):
    folder = save_tiny_qwen3_vl(tmp_path / "think", corpus=[THINK_PROMPT])
    judge = UnifiedRewardPairwise.from_pretrained(str(folder), prompt_template="unifiedreward-think")
    assert (judge.answer, judge.max_new_tokens, judge.answer_rule) == ("generate", 4096, "unifiedreward-think")
    assert judge.prompt_template == THINK_PROMPT
    tokenizer = judge.processor.tokenizer
    replies = [
        tokenizer(THINK + "<answer>Image 1 is better</answer>")["input_ids"] + [tokenizer.eos_token_id],
        tokenizer(THINK + "<answer>image 2 is better</answer>")["input_ids"] + [tokenizer.eos_token_id],
        tokenizer("<think>" + "Image 1 (9/10) - sharp; " * 40)["input_ids"],  # never ends
    ]
    limit = max(len(r) for r in replies[:2]) + 3
    replies[2] = replies[2][:limit]
    judge.max_new_tokens = limit

    def fake_generate(input_ids, max_new_tokens, **kwargs):  # row k of the batch answers replies[k]
        assert max_new_tokens == limit
        new = [r + [tokenizer.pad_token_id] * (limit - len(r)) for r in replies]
        return torch.cat([input_ids, torch.tensor(new)], dim=1)

    pixels = torch.rand(3, 3, 32, 32, generator=generator)
    with mock.patch.object(judge.model, "generate", side_effect=fake_generate):
        out = judge.group(pixels, "a red square")  # pairs (0, 1), (0, 2), (1, 2)
    errors = out.extras["errors"]
    assert errors[0] is None and "names no verdict" in errors[1] and "truncated" in errors[2]
    assert out.extras["failures"] == out.extras["parse_failures"] == 2
    torch.testing.assert_close(out.score, torch.tensor([0.75, 0.25, 0.5]))
    with pytest.raises(ValueError, match="`answer`='probs'"):
        UnifiedRewardPairwise(judge.model, judge.processor, prompt_template="unifiedreward-think", answer="probs")
    registered = load_reward("unifiedreward-think", str(folder))  # the registry name of Pref-GRPO's judge
    assert isinstance(registered, UnifiedRewardPairwise) and registered.prompt_template == THINK_PROMPT
    http = load_reward("unifiedreward-think-http", "http://127.0.0.1:9/v1")
    assert isinstance(http, HTTPPairwiseJudge) and http.answer_rule == "unifiedreward-think"
    with pytest.raises(FileNotFoundError, match="UnifiedReward-Think-qwen3vl-8b"):  # its default checkpoint
        UnifiedRewardPairwise.from_pretrained(prompt_template="unifiedreward-think")


def test_verdict_probability_formula(judge_folder):
    judge = UnifiedRewardPairwise.from_pretrained(str(judge_folder))
    one, two, tie = judge.verdict_tokens
    start = judge.prefix[0]
    logits = torch.zeros(3, len(judge.prefix) + 1, len(judge.processor.tokenizer))
    logits[0, 0, start], logits[0, -1, one] = 30.0, 30.0  # "Image" then "1": image 1 better
    logits[1, 0, start], logits[1, -1, two] = 30.0, 30.0  # image 2 better
    logits[2, 0, tie] = 30.0  # "Both ...": a tie, whatever the digit says
    logits[2, -1, one] = 30.0
    probs, mass = judge.verdict_probability(logits)
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(mass, torch.ones(3), atol=1e-6, rtol=0)


def test_tiny_judge_generate_mode_counts_parse_failures(judge_folder, generator):
    judge = UnifiedRewardPairwise.from_pretrained(str(judge_folder), answer="generate", max_new_tokens=2)
    pixels = torch.rand(2, 3, 32, 32, generator=generator)
    out = judge.group(pixels, "a red square")  # a random model says nothing parseable: a tie, counted
    assert out.score.tolist() == [0.5, 0.5]
    assert out.extras["parse_failures"] == 1 and len(out.extras["texts"]) == 1


def test_judge_loading_errors(judge_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="offline|Hub"):
        UnifiedRewardPairwise.from_pretrained("some-org/not-cached-judge")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="'clip' model"):
        UnifiedRewardPairwise.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text((judge_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="processor"):
        UnifiedRewardPairwise.from_pretrained(str(tmp_path))
    judge = UnifiedRewardPairwise.from_pretrained(str(judge_folder))
    for options, arg in [({"answer": "logits"}, "answer"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ValueError, match=f"`{arg}`"):
            UnifiedRewardPairwise(judge.model, judge.processor, **options)
    with pytest.raises(ValueError, match="`prompt_template`"):
        UnifiedRewardPairwise(judge.model, judge.processor, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="`model`"):
        UnifiedRewardPairwise(torch.nn.Linear(2, 2), judge.processor)


# ---------------------------------------------------------------- the HTTP judge against a local fake server


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(FakeChatServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def caption_judge(n, body):
    """Prefers the image with more red, read back from the PNG data URLs: a real round trip of the images."""
    content = body["messages"][0]["content"]
    reds = []
    for item in content[:2]:
        data = base64.b64decode(item["image_url"]["url"].split(",", 1)[1])
        reds.append(np.asarray(Image.open(io.BytesIO(data)))[..., 0].mean())
    return 200, f"<think>comparing</think><answer>Image {1 if reds[0] > reds[1] else 2} is better.</answer>", 0.0


def test_http_judge_round_trip(serve):
    server = serve(caption_judge)
    judge = HTTPPairwiseJudge.from_pretrained(server.url, model="judge", api_key="k", max_workers=4)
    pixels = torch.zeros(4, 3, 8, 8)
    pixels[:, 0] = torch.tensor([0.1, 0.9, 0.5, 0.3]).view(4, 1, 1)
    out = judge.group(pixels, "a {red} square")
    torch.testing.assert_close(out.score, torch.tensor([0.0, 1.0, 2 / 3, 1 / 3]))
    assert len(server.requests) == out.extras["calls"] == 6 and out.extras["failures"] == 0
    body = server.requests[0]
    # the official clients' settings: JPEG quality 95, max_tokens 4096, no temperature (the server's config decides)
    assert body["model"] == "judge" and body["max_tokens"] == 4096 and "temperature" not in body
    content = body["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
    assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    # requests arrive in any order from 4 workers: each of the 6 pairs is sent once, as the JPEG-95 data URLs
    urls = [image_data_url(p, "JPEG", 95) for p in pixels]
    sent = {frozenset(c["image_url"]["url"] for c in r["messages"][0]["content"][:2]) for r in server.requests}
    assert sent == {frozenset((urls[i], urls[j])) for i in range(4) for j in range(i + 1, 4)}
    assert content[2]["text"] == PAIR_RANK_PROMPT.replace("{prompt}", "a {red} square")
    assert server.headers[0]["Authorization"] == "Bearer k"


def completion(content, finish_reason):
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"message": message, "finish_reason": finish_reason}]}).encode()


def test_http_think_judge_reads_answers_and_names_truncation(serve):
    replies = [
        completion(THINK + "<answer>Image 1 is better</answer>", "stop"),
        completion("<think>1. Semantic consistency:\n    Image 1 (9/10) - the", "length"),  # cut at max_tokens
        completion("Image 2 is better", "stop"),  # no tags: the reference's rule gives no verdict
    ]
    server = serve(lambda n, body: (200, replies[n], 0.0))
    judge = HTTPPairwiseJudge(
        server.url, prompt_template="unifiedreward-think", max_workers=1, max_tokens=512, temperature=0.0
    )
    with mock.patch.object(pairwise.logger, "warning") as warning:
        out = judge.group(torch.rand(3, 3, 8, 8), "a cat")
    torch.testing.assert_close(out.score, torch.tensor([0.75, 0.25, 0.5]))
    errors = out.extras["errors"]
    assert errors[0] is None and "truncated" in errors[1] and "length" in errors[1] and "<answer>" in errors[2]
    assert out.extras["parse_failures"] == 2 and out.extras["request_errors"] == 0
    assert "truncated" in str(warning.call_args)  # the warning names the causes
    body = server.requests[0]
    assert (body["max_tokens"], body["temperature"]) == (512, 0.0)  # overridable, sent only when given
    assert body["messages"][0]["content"][2]["text"] == THINK_PROMPT.replace("{prompt}", "a cat")


def test_http_judge_image_formats(serve, generator):
    server = serve(lambda n, body: (200, "Image 1 is better.", 0.0))
    pixels = torch.rand(2, 3, 16, 16, generator=generator)
    for options, prefix in [({}, "data:image/jpeg;base64,"), ({"image_format": "PNG"}, "data:image/png;base64,")]:
        HTTPPairwiseJudge(server.url, **options).compare(pixels[:1], pixels[1:], ["p"])
        url = server.requests[-1]["messages"][0]["content"][0]["image_url"]["url"]
        assert url.startswith(prefix)
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert decoded.format == prefix[11:15].upper().rstrip(";") and decoded.size == (16, 16)
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(image_data_url(pixels[0], "PNG").split(",")[1]))))
    assert np.array_equal(png, (pixels[0].permute(1, 2, 0) * 255).round().byte().numpy())  # PNG is lossless
    low, high = (len(image_data_url(pixels[0], "JPEG", q)) for q in (10, 95))
    assert low < high  # the quality reaches the encoder
    for kwargs, arg in [({"image_format": "WEBP"}, "image_format"), ({"jpeg_quality": 0}, "quality")]:
        with pytest.raises(ValueError, match=f"`{arg}`"):
            HTTPPairwiseJudge(server.url, **kwargs)


def test_http_judge_retries_transient_errors(serve):
    server = serve(lambda n, body: (500, b"busy", 0.0) if n < 2 else (200, "Image 1 is better.", 0.0))
    judge = HTTPPairwiseJudge(server.url, max_workers=1, backoff=0.0)
    p = judge.compare(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), ["p"])
    assert p.tolist() == [1.0] and len(server.requests) == 3


@pytest.mark.parametrize(
    "script, attempts",
    [
        (lambda n, body: (400, b'{"error": "bad request"}', 0.0), 1),  # final: not retried
        (lambda n, body: (503, b"down", 0.0), 3),
        (lambda n, body: (200, b"{not json", 0.0), 3),
        (lambda n, body: (200, b'{"choices": []}', 0.0), 3),
        (lambda n, body: (200, b'{"choices": [{"message": {"content": null}}]}', 0.0), 3),
        (lambda n, body: (200, "Image 1 is better.", 1.0), 3),  # slower than the timeout
    ],
)
def test_http_judge_failures_become_counted_ties(serve, script, attempts):
    server = serve(script)
    judge = HTTPPairwiseJudge(server.url, timeout=0.2, max_retries=2, backoff=0.0, max_workers=2)
    out = judge.group(torch.rand(3, 3, 8, 8), "p")  # never raises inside a training step
    torch.testing.assert_close(out.score, torch.full((3,), 0.5))
    assert out.extras["request_errors"] == out.extras["failures"] == 3 and out.extras["parse_failures"] == 0
    assert len(server.requests) == 3 * attempts


def test_http_judge_unreachable_server_and_bad_arguments():
    judge = HTTPPairwiseJudge("http://127.0.0.1:9/v1", timeout=0.5, max_retries=1, backoff=0.0)
    out = judge.group(torch.rand(2, 3, 8, 8), "p")
    assert out.score.tolist() == [0.5, 0.5] and out.extras["request_errors"] == 1
    with pytest.raises(ValueError, match="`pretrained`"):
        HTTPPairwiseJudge.from_pretrained(None)
    for kwargs, arg in [
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_workers": 0}, "max_workers"),
        ({"backoff": -1.0}, "backoff"),
    ]:
        with pytest.raises(ValueError, match=f"`{arg}`"):
            HTTPPairwiseJudge(**{"base_url": "http://127.0.0.1:9/v1", **kwargs})


# ---------------------------------------------------------------- pointwise rewards used pairwise


def test_pointwise_reward_used_pairwise_scores_each_image_once(group8):
    reward = WorldDefectsReward()
    judge = BradleyTerryWinRate(reward, temperature=0.1)
    with mock.patch.object(reward, "_score", wraps=reward._score) as scored:
        out = judge.group(group8, "a red square")
    assert scored.call_count == 1 and scored.call_args.args[0].shape[0] == 8
    assert float(out.score.sum()) == pytest.approx(4.0, abs=1e-5)
    ranks = reward.score(group8, ["a red square"] * 8).score.argsort()
    assert (out.score[ranks].diff() >= 0).all()  # win rates order the group as the scores do
    with mock.patch.object(reward, "_score", wraps=reward._score) as scored:
        reward.compare(group8[:4], group8[4:], ["a red square"] * 4)
    assert scored.call_count == 1 and scored.call_args.args[0].shape[0] == 8
    with pytest.raises(ValueError, match="`reward`"):
        BradleyTerryWinRate(CannedJudge(first_wins))
    with pytest.raises(ValueError, match="`temperature`"):
        BradleyTerryWinRate(reward, temperature=0.0)
