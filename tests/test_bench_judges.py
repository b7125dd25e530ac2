import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visalign.benchmarks.judges import (
    CompositeJudge,
    Detection,
    Detector,
    GenEvalRules,
    RewardJudge,
    RuleJudge,
    Sample,
    WorldDetector,
    WorldJudge,
    build_judge,
    check_geneval,
)
from visalign.benchmarks.prompts import PromptItem, TestPoint, world_spec
from visalign.benchmarks.vlm import (
    AnswerParseError,
    OpenAIServerVLM,
    ReplayVLM,
    TransformersVLM,
    VLMJudge,
    VLMJudgeConfig,
    checklist_prompt,
    parse_answer,
)
from visalign.testing_vlm import FakeChatServer
from visalign.world.scenes import parse_prompt, render_prompt

ITEM = PromptItem(
    "p-1",
    "three red apples on a <b>blue</b> plate",
    "Art",
    "Graphic Art",
    (TestPoint("Attribute - Quantity", "three red apples"), TestPoint("Attribute - Color", "blue plate")),
)
PIXELS = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))


def world_item(text: str, with_spec: bool = True) -> PromptItem:
    p = parse_prompt(text).to_dict()
    return PromptItem(
        text.replace(" ", "-") + ("-spec" if with_spec else ""),
        text,
        "Shapes World",
        p["category"],
        (TestPoint(p["category"], text, world_spec(p) if with_spec else None),),
        extras={"world": p},
    )


def world_image(text: str, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(render_prompt(parse_prompt(text), np.random.default_rng(seed)))


# ---------------------------------------------------------------------------------------------------------------
# VLM answers


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("<analysis>['three apples', 'the plate is green']</analysis>\n<score>[1, 0]</score>", [True, False]),
        ('Sure.\n<analysis>["ok", "ok"]</analysis> <score>[true, true]</score> Done.', [True, True]),  # JSON lists
        (
            "<analysis>[...]</analysis><score>[1, 0, ...]</score>\nNow my answer:\n"
            "<analysis>['a', 'b']</analysis><score>[0, 1]</score>",
            [False, True],
        ),  # template echoed first: last tags win
    ],
)
def test_parse_good_answers(answer, expected):
    scores, analysis = parse_answer(answer, 2)
    assert scores == expected and len(analysis) == 2


@pytest.mark.parametrize(
    "answer, message",
    [
        ("<analysis>['a', 'b']</analysis>", "no <score>"),
        ("<score>[1, 0]</score>", "no <analysis>"),
        ("<analysis>['a']</analysis><score>[1]</score>", "expected 2"),
        ("<analysis>['a', 'b']</analysis><score>[1, 2]</score>", "0 or 1"),
        ("<analysis>['a', 'b']</analysis><score>['1', '0']</score>", "0 or 1"),
        ("<analysis>['a', 'b']</analysis><score>[1.0, 0.0]</score>", "0 or 1"),
        ("<analysis>fine</analysis><score>[1, 0]</score>", "not a list"),
        ("<analysis>['a', 'b']</analysis><score>{'x': 1}</score>", "not a list"),
        ("<analysis>[1, 2]</analysis><score>[1, 0]</score>", "strings"),
    ],
)
def test_parse_rejects_malformed_answers(answer, message):
    with pytest.raises(AnswerParseError, match=message):
        parse_answer(answer, 2)


def test_checklist_prompt_lists_every_test_point():
    text = checklist_prompt(ITEM)
    assert ITEM.text in text and "three red apples" in text and "blue plate" in text
    assert "the exact number of entities" in text  # our definition of Attribute - Quantity
    assert "list of 2 entries" in text and "<score>" in text and "<analysis>" in text


def test_vlm_judge_counts_unparseable_and_missing_answers_as_errors():
    answers = {
        ("p-1", 0): "<analysis>['three', 'blue']</analysis><score>[1, 1]</score>",
        ("p-1", 1): "I think the image is fine.",
    }
    judge = VLMJudge(ReplayVLM(answers, "answers.jsonl"))
    good, bad, missing = judge.judge([Sample(ITEM, j, PIXELS) for j in range(3)])
    assert [v.passed for v in good.verdicts] == [True, True] and good.verdicts[1].reason == "blue"
    assert all(v.status == "error" and v.passed is False for v in bad.verdicts + missing.verdicts)
    assert bad.verdicts[0].reason.startswith("unparseable judge answer: no <score>")
    assert bad.raw == "I think the image is fine."  # the raw answer is kept for the report
    assert missing.verdicts[0].reason.startswith("judge request failed") and missing.raw is None
    assert judge.settings()["template"] == "visalign-checklist-v1" and judge.settings()["image_format"] == "png"


def test_replay_reads_a_run_file(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    path.write_text(
        json.dumps(
            {
                "prompt_id": "p-1",
                "image_id": 0,
                "raw": "<analysis>['a', 'b']</analysis><score>[0, 1]</score>",
                "test_points": [],
            }
        )
        + "\n"
    )
    result = build_judge(f"replay:{path}").judge([Sample(ITEM, 0, PIXELS)])[0]
    assert [v.passed for v in result.verdicts] == [False, True]
    path.write_text("{}\n")
    with pytest.raises(ValueError, match="line 1"):
        build_judge(f"replay:{path}")


def test_openai_server_backend_retries_with_the_next_seed():
    answers = ["<score>[1, 1]</score>", "<analysis>['x', 'y']</analysis><score>[0, 1]</score>"]
    with FakeChatServer(lambda n, body: (200, answers[n], 0.0)) as server:
        backend = OpenAIServerVLM(server.url, "QwenVL", api_key="k", seed=7)
        judge = VLMJudge(backend, VLMJudgeConfig(max_retries=1, max_new_tokens=256))
        result = judge.judge([Sample(ITEM, 0, PIXELS)])[0]
    assert [v.passed for v in result.verdicts] == [False, True]
    first, second = server.requests
    assert server.headers[0]["Authorization"] == "Bearer k"
    assert (first["temperature"], first["top_p"], first["max_tokens"], first["model"]) == (0.0, 1.0, 256, "QwenVL")
    assert (first["seed"], second["seed"]) == (7, 8)
    image_part, text_part = first["messages"][0]["content"]
    assert text_part["text"] == checklist_prompt(ITEM)
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))), np.float32) / 255
    assert np.abs(sent.transpose(2, 0, 1) - PIXELS.numpy()).max() <= 0.5 / 255 + 1e-6  # lossless PNG


def test_concurrent_requests_keep_sample_order_and_http_errors_are_reported():
    def script(n, body):  # the first requests answer last; request 2 fails
        answer = f"<analysis>['a', 'b']</analysis><score>[{body['seed'] % 2}, 1]</score>"
        return (500, b"overloaded", 0.0) if n == 2 else (200, answer, 0.3 if n < 2 else 0.0)

    with FakeChatServer(script) as server:
        judge = VLMJudge(OpenAIServerVLM(server.url, "QwenVL"), VLMJudgeConfig(max_workers=4))
        results = judge.judge([Sample(ITEM, j, PIXELS) for j in range(4)])
    assert sum(r.verdicts[0].status == "error" for r in results) == 1
    assert all(r.verdicts[1].passed for r in results if r.verdicts[0].status == "ok")
    assert "HTTP" in next(r for r in results if r.verdicts[0].status == "error").verdicts[0].reason
    assert judge.settings() == VLMJudge(OpenAIServerVLM(server.url, "QwenVL")).settings()  # same cache key
    with pytest.raises(ValueError, match="max_workers"):
        VLMJudge(TransformersVLM(torch.nn.Linear(1, 1), None), VLMJudgeConfig(max_workers=2))


def test_openai_server_unreachable_is_a_reported_error():
    judge = VLMJudge(OpenAIServerVLM("http://127.0.0.1:9/v1", "QwenVL", timeout=2))
    verdicts = judge.judge([Sample(ITEM, 0, PIXELS)])[0].verdicts
    assert all(v.status == "error" and "judge request failed" in v.reason for v in verdicts)


# ---------------------------------------------------------------------------------------------------------------
# GenEval rules


class FixedDetector(Detector):
    """A detector whose detections are given: stands in for a real one to exercise the rules."""

    name = "fixed"

    def __init__(self, detections):
        self.detections = detections

    def detect(self, pixels):
        return self.detections


def box(x, y, s=10):
    return (x, y, x + s, y + s)


RULES = GenEvalRules()
COUNT3 = {"tag": "counting", "include": [{"class": "cow", "count": 3}], "exclude": [{"class": "cow", "count": 4}]}


def test_counting_rule_uses_the_counting_threshold_and_the_exclude():
    cows = [Detection("cow", 0.95, box(20 * i, 0)) for i in range(3)]
    assert check_geneval(COUNT3, cows, RULES) == (True, "all clauses hold")
    ok, why = check_geneval(COUNT3, cows[:2] + [Detection("cow", 0.5, box(60, 0))], RULES)
    assert not ok and why == "expected cow>=3, found 2"  # 0.5 is above 0.3 but below counting's 0.9
    ok, why = check_geneval(COUNT3, cows + [Detection("cow", 0.99, box(80, 0))], RULES)
    assert not ok and "expected cow<4, found 4" in why


def test_color_and_position_rules():
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert check_geneval(red_car, [Detection("car", 0.8, box(0, 0), "red")], RULES)[0] is True
    assert check_geneval(red_car, [Detection("car", 0.8, box(0, 0), "blue")], RULES)[0] is False
    passed, why = check_geneval(red_car, [Detection("car", 0.8, box(0, 0))], RULES)
    assert passed is None and "no colors" in why
    cat_left_of_dog = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    }
    dog, cat = Detection("dog", 0.9, box(50, 0)), Detection("cat", 0.9, box(0, 2))
    assert check_geneval(cat_left_of_dog, [dog, cat], RULES)[0] is True
    ok, why = check_geneval(cat_left_of_dog, [dog, Detection("cat", 0.9, box(100, 0))], RULES)
    assert not ok and "found right of" in why
    ok, why = check_geneval(cat_left_of_dog, [cat], RULES)
    assert not ok and "no target" in why


def test_nms_merges_overlapping_boxes_when_enabled():
    two = {"tag": "counting", "include": [{"class": "cow", "count": 2}]}
    dets = [Detection("cow", 0.95, box(0, 0)), Detection("cow", 0.94, box(1, 1))]
    assert check_geneval(two, dets, RULES)[0] is True
    assert check_geneval(two, dets, GenEvalRules(max_overlap=0.5))[0] is False


def test_rule_judge_abstains_without_a_spec():
    judge = RuleJudge(FixedDetector([Detection("cow", 0.95, box(20 * i, 0)) for i in range(3)]))
    item = PromptItem(
        "c",
        "three cows",
        test_points=(TestPoint("Attribute - Quantity", "three cows", COUNT3), TestPoint("Style", "photo")),
    )
    counted, style = judge.judge([Sample(item, 0, PIXELS)])[0].verdicts
    assert counted.passed is True and counted.judge == "rules:fixed"
    assert style.status == "abstain" and style.passed is None


# ---------------------------------------------------------------------------------------------------------------
# The shapes world


WORLD_TEXTS = ["a red circle", "three triangles", "a blue square and a yellow triangle", "two green circles"]


def test_world_judges_agree_with_the_verifier_reward():
    from visalign.rewards import load_reward

    reward_judge = RewardJudge(load_reward("world-verifier"), threshold=1.0)
    samples = [Sample(world_item(t), 0, world_image(t)) for t in WORLD_TEXTS]
    swapped = [Sample(world_item(t), 0, world_image(WORLD_TEXTS[i - 1])) for i, t in enumerate(WORLD_TEXTS)]
    for judge in (WorldJudge(), RuleJudge(WorldDetector()), reward_judge):
        assert [r.verdicts[0].passed for r in judge.judge(samples)] == [True] * 4, judge.name
        assert [r.verdicts[0].passed for r in judge.judge(swapped)] == [False] * 4, judge.name
    why = WorldJudge().judge(swapped[:1])[0].verdicts[0].reason
    assert "FAIL" in why and "red circle" in why
    assert reward_judge.judge(samples[:1])[0].verdicts[0].reason == "world-verifier = 1 >= 1"


def test_world_judge_abstains_outside_the_world_and_composite_routes():
    outside = PromptItem("o", "a cat on a sofa", test_points=(TestPoint("Style", "photo"),))
    assert WorldJudge().judge([Sample(outside, 0, PIXELS)])[0].verdicts[0].status == "abstain"
    text = "a red circle"
    no_spec, with_spec = world_item(text, with_spec=False), world_item(text)
    seen = []

    class SeeingWorldJudge(WorldJudge):
        def judge(self, samples):
            seen.extend(s.item.id for s in samples)
            return super().judge(samples)

    judge = CompositeJudge([RuleJudge(WorldDetector()), SeeingWorldJudge()])
    results = judge.judge([Sample(no_spec, 0, world_image(text)), Sample(with_spec, 0, world_image(text))])
    assert [r.verdicts[0].judge for r in results] == ["world", "rules:world"]
    assert seen == [no_spec.id]  # the fallback judge sees only what the first one abstained on
    assert all(r.verdicts[0].passed for r in results)
    assert judge.settings()["judges"][0]["name"] == "rules:world"


def test_build_judge_specs_and_fingerprints():
    assert isinstance(build_judge("world"), WorldJudge)
    assert isinstance(build_judge("rules:world"), RuleJudge)
    a, b = build_judge("reward:world-verifier@1"), build_judge("reward:world-verifier@0.5")
    assert a.fingerprint() == build_judge("reward:world-verifier@1").fingerprint() != b.fingerprint()
    for spec, error in [
        ("reward:world-verifier", "THRESHOLD"),
        ("rules:yolo", "detector"),
        ("magic", "unknown"),
        ("vlm:", "argument"),
    ]:
        with pytest.raises(ValueError, match=error):
            build_judge(spec)
    with pytest.raises(FileNotFoundError):
        build_judge("replay:/no/such/file.jsonl")


def test_transformers_backend_runs_a_tiny_qwen25_vl(tmp_path):
    from visalign.testing_vlm import save_tiny_qwen_vl

    folder = save_tiny_qwen_vl(tmp_path / "judge", "qwen2_5_vl", corpus=[checklist_prompt(ITEM)])
    judge = build_judge(f"vlm:{folder}", max_new_tokens=8)  # AutoProcessor + AutoModelForImageTextToText
    first, again = judge.judge([Sample(ITEM, 0, PIXELS), Sample(ITEM, 0, PIXELS)])
    assert isinstance(first.raw, str) and first.raw == again.raw  # greedy decoding is deterministic
    assert all(v.status == "error" and v.reason.startswith("unparseable") for v in first.verdicts)  # random weights
    backend = judge.settings()["backend"]
    assert (backend["class"], backend["do_sample"], backend["num_beams"]) == (
        "Qwen2_5_VLForConditionalGeneration",
        False,
        1,
    )
