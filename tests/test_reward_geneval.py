"""GenEval without mmdetection: the official rules on hand-made detections, Flow-GRPO's strict/partial reward, the
Mask2Former + CLIP detector loaded from tiny random models in the official layout, the judge and the reward."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reward_helpers import save_clip_folder
from transformers import (
    CLIPModel,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    SwinConfig,
)

from visalign.benchmarks.judges import RuleJudge, Sample, build_judge
from visalign.benchmarks.prompts import PromptItem, TestPoint, load_prompt_set
from visalign.reward_models.geneval import (
    COLOR_TEMPLATES,
    GENEVAL_CLASSES,
    GenEvalDetector,
    GenEvalReward,
    instances_from_logits,
    resized_shape,
)
from visalign.reward_models.geneval_rules import (
    COLORS,
    Detection,
    Detector,
    GenEvalRules,
    check_geneval,
    geneval_reward,
    load_metadata,
)
from visalign.reward_models.preprocess import ImageTransform
from visalign.rewards import load_reward
from visalign.testing import clip_tokenizer

RULES = GenEvalRules()
META = load_metadata()  # GenEval's own evaluation_metadata.jsonl, bundled


def spec(prompt: str) -> dict:
    return META[prompt]


def box(x, y, s=10):
    return (x, y, x + s, y + s)


def det(label, x=0, y=0, score=0.95, color=None, s=10):
    return Detection(label, score, box(x, y, s), color)


# ---------------------------------------------------------------------------------------------------------------
# The rules, on GenEval's own metadata lines


def test_bundled_metadata_is_genevals_553_prompts_in_six_tags():
    tags = [m["tag"] for m in META.values()]
    assert len(META) == 553
    assert {t: tags.count(t) for t in set(tags)} == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100,
    }  # fmt: skip
    assert spec("a photo of two clocks") == {
        "tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
    }  # fmt: skip


def test_counting_overlapping_boxes_count_twice_and_the_exclusion_rule():
    two_clocks = spec("a photo of two clocks")
    overlapping = [det("clock", 0, 0), det("clock", 1, 1, score=0.93)]  # IoU ~0.7: no NMS by default
    assert check_geneval(two_clocks, overlapping, RULES) == (True, "all clauses hold")
    assert geneval_reward(two_clocks, overlapping, RULES)[:2] == (True, 1.0)
    assert check_geneval(two_clocks, overlapping, GenEvalRules(max_overlap=0.5))[0] is False
    # a third clock above 0.9 trips the exclude clause (count 3); one at 0.5 is below counting's 0.9 and is ignored
    three = overlapping + [det("clock", 40, 0, score=0.91)]
    ok, why = check_geneval(two_clocks, three, RULES)
    assert not ok and why == "expected clock<3, found 3"
    assert geneval_reward(two_clocks, three, RULES)[:2] == (False, 0.5)  # 1 - |2 - 3| / 2
    assert check_geneval(two_clocks, overlapping + [det("clock", 40, 0, score=0.5)], RULES)[0] is True
    # 0.9 itself is not above the counting threshold; 0.3 not above the default one
    assert check_geneval(two_clocks, [det("clock"), det("clock", 40, 0, score=0.9)], RULES)[0] is False
    assert check_geneval(spec("a photo of a bench"), [det("bench", score=0.3)], RULES)[0] is False


def test_more_objects_than_asked_pass_officially_and_drive_the_partial_score_negative():
    bench = spec("a photo of a bench")
    three = [det("bench", 20 * i, 0) for i in range(3)]
    assert check_geneval(bench, three, RULES)[0] is True  # include clauses ask for at least `count`
    strict, partial, why = geneval_reward(bench, three, RULES)
    assert strict is False and partial == pytest.approx(-1.0) and why == "expected bench==1, found 3"


def test_max_objects_per_class():
    many = [det("bench", 12 * i, 0, score=0.9 - i / 100) for i in range(20)]
    assert geneval_reward(spec("a photo of a bench"), many, RULES)[1] == pytest.approx(1 - 15)  # 16 kept
    assert geneval_reward(spec("a photo of a bench"), many, GenEvalRules(max_objects=3))[1] == pytest.approx(-1)


def test_color_attribution_uses_the_most_confident_objects():
    hydrant = spec("a photo of a blue fire hydrant")
    assert hydrant["include"] == [{"class": "fire hydrant", "count": 1, "color": "blue"}]
    blue, red = det("fire hydrant", color="blue"), det("fire hydrant", 30, 0, score=0.99, color="red")
    assert check_geneval(hydrant, [blue], RULES)[0] is True
    ok, why = check_geneval(hydrant, [blue, red], RULES)  # only the top-1 (red) is asked for its color
    assert not ok and why == "expected blue fire hydrant>=1, found colors red"
    assert geneval_reward(hydrant, [det("fire hydrant", color="red")], RULES)[:2] == (False, 0.5)
    attr = spec("a photo of a purple wine glass and a black apple")
    right = [det("wine glass", color="purple"), det("apple", 30, 0, color="black")]
    swapped = [det("wine glass", color="black"), det("apple", 30, 0, color="purple")]
    assert check_geneval(attr, right, RULES)[0] is True and check_geneval(attr, swapped, RULES)[0] is False
    assert geneval_reward(attr, swapped, RULES)[:2] == (False, 0.5)  # terms 1, 0, 1, 0
    # a color callback is asked with the class name and the objects it must classify
    asked = []
    check_geneval(attr, right, RULES, lambda objs, cls: asked.append((cls, len(objs))) or ["purple", "black"][:1])
    assert asked == [("wine glass", 1), ("apple", 1)]


def test_position_margins_and_the_partial_score_quirk():
    dog_right = spec("a photo of a dog right of a teddy bear")
    assert dog_right["include"][1] == {"class": "dog", "count": 1, "position": ["right of", 0]}
    teddy = det("teddy bear", 0, 0)
    # offset 6 shrinks by 0.1 * (10 + 10) = 2 to 4; 4 / 6 > 0.5: right of
    assert check_geneval(dog_right, [teddy, det("dog", 6, 0)], RULES)[0] is True
    # offset 4 shrinks to 2; 2 / 4 = 0.5 is not above 0.5: no relation
    ok, why = check_geneval(dog_right, [teddy, det("dog", 4, 0)], RULES)
    assert not ok and why == "expected dog right of target, found no relation"
    assert check_geneval(dog_right, [teddy, det("dog", 4, 0)], GenEvalRules(position_threshold=0.0))[0] is True
    # diagonal: both relations can hold at once
    ok, why = check_geneval(dog_right, [teddy, det("dog", -50, 60)], RULES)
    assert not ok and why == "expected dog right of target, found below and left of"
    assert geneval_reward(dog_right, [teddy, det("dog", 50, 0)], RULES)[:2] == (True, 1.0)
    # a wrong position appends 0.0 and then 1.0 (reward-server quirk): mean(1, 1, 0, 1)
    assert geneval_reward(dog_right, [teddy, det("dog", -50, 0)], RULES)[:2] == (False, 0.75)
    # no teddy bear: no target, the dog clause's count term and a 0
    ok, why = check_geneval(dog_right, [det("dog", 50, 0)], RULES)
    assert not ok and "no target for dog to be right of" in why
    assert geneval_reward(dog_right, [det("dog", 50, 0)], RULES)[:2] == (False, pytest.approx((0 + 1 + 0) / 3))


def test_rule_judge_abstains_without_metadata_and_resolves_colors_through_the_detector():
    class Fixed(Detector):
        name = "fixed"

        def detect(self, pixels):
            return [det("fire hydrant", 5, 5)]

        def classify_colors(self, pixels, objects, classname):
            return ["blue" if float(pixels[2].mean()) > 0.5 else "red" for _ in objects]

    hydrant = next(it for it in load_prompt_set("geneval").items if it.text == "a photo of a blue fire hydrant")
    plain = PromptItem("p", "a photo of a fire hydrant", test_points=(TestPoint("Style", "photo"),))
    blue, red = torch.zeros(3, 40, 30), torch.zeros(3, 24, 24)
    blue[2] = 1
    results = RuleJudge(Fixed()).judge([Sample(hydrant, 0, blue), Sample(hydrant, 1, red), Sample(plain, 0, red)])
    assert [r.verdicts[0].passed for r in results[:2]] == [True, False]
    assert results[2].verdicts[0].status == "abstain" and "no GenEval rule spec" in results[2].verdicts[0].reason


# ---------------------------------------------------------------------------------------------------------------
# The detector: tiny random Mask2Former and CLIP in their official layouts


def save_mask2former(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    swin = SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=12,
        id2label=dict(enumerate(GENEVAL_CLASSES)), label2id={n: i for i, n in enumerate(GENEVAL_CLASSES)},
    )  # fmt: skip
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("geneval")
    return save_mask2former(root / "detector"), save_clip_folder(root / "clip")


def test_resize_follows_mmdetections_test_pipeline():
    assert resized_shape(512, 512) == (800, 800)
    assert resized_shape(480, 640) == (800, 1067)
    assert resized_shape(200, 1000) == (267, 1333)  # the long edge binds


def test_instances_from_logits_boxes_scores_and_ranking():
    class_logits = torch.full((3, 81), -10.0)
    class_logits[0, 5], class_logits[1, 16], class_logits[2, 80] = 10.0, 2.0, 10.0  # query 2: no object
    mask_logits = torch.full((3, 20, 30), -4.0)
    mask_logits[0, 2:6, 3:9] = 3.0
    mask_logits[1, 10:20, 0:4] = 1.0
    labels, scores, boxes, masks = instances_from_logits(class_logits, mask_logits, max_per_image=100)
    assert scores.shape == (100,) and masks.shape == (100, 20, 30)  # the 100 best of 3 x 80 pairs
    best = scores.argmax()
    assert labels[best] == 5 and boxes[best].tolist() == [3, 2, 9, 6]  # x0, y0, x1 + 1, y1 + 1
    prob = torch.softmax(class_logits[0], -1)[5]
    assert scores[best] == pytest.approx(float(prob * torch.sigmoid(torch.tensor(3.0))), rel=1e-5)
    dog = (labels == 16) & (boxes[:, 0] == 0) & (boxes[:, 3] == 20)
    assert dog.any() and boxes[dog][0].tolist() == [0, 10, 4, 20]


def test_detector_loads_and_detects_images_of_any_size(folders):
    detector_dir, clip_dir = folders
    detector = GenEvalDetector.from_pretrained(str(detector_dir), color_model=str(clip_dir), min_score=0.0)
    assert detector.settings()["scale"] == [1333, 800] and detector.max_per_image == 100
    torch.manual_seed(0)
    for shape in ((2, 3, 40, 56), (1, 3, 37, 23)):
        found = detector.detect_batch(torch.rand(shape))
        assert len(found) == shape[0] and all(found)
        for dets in found:
            assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
            for d in dets:
                assert d.label in GENEVAL_CLASSES and d.mask.shape == shape[2:] and d.mask.dtype == torch.bool
                if d.mask.any():
                    ys, xs = d.mask.nonzero().T
                    assert d.box == (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
    pixels = torch.rand(2, 3, 40, 56)
    assert [len(d) for d in detector.detect_batch(pixels)] == [len(detector.detect(p)) for p in pixels]


def test_color_crops_on_grey_and_the_zero_shot_classifier_match_a_pil_reference(folders):
    detector_dir, clip_dir = folders
    detector = GenEvalDetector.from_pretrained(str(detector_dir), color_model=str(clip_dir))
    torch.manual_seed(1)
    pixels = (torch.rand(3, 30, 40) * 255).round() / 255
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[5:20, 8:30] = torch.rand(15, 22) > 0.3
    objects = [Detection("cat", 0.9, (8, 5, 30, 20), None, mask), Detection("cat", 0.8, (0, 0, 40, 30))]
    got = detector.color_scores([(pixels, objects, "cat")])[0]
    # reference: PIL composite over #999, crop to the box, open_clip's OpenAI transform, clip_benchmark's classifier
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = clip_tokenizer()
    image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    grey = Image.new("RGB", image.size, color="#999")
    crops = [
        Image.composite(image, grey, Image.fromarray(mask.numpy())).crop((8, 5, 30, 20)),
        image.crop((0, 0, 40, 30)),
    ]
    transform = ImageTransform(model.config.vision_config.image_size, "torchvision").reference_pipeline()
    texts = [t.format(c=c, classname="cat") for c in COLORS for t in COLOR_TEMPLATES]
    with torch.no_grad():  # CLIPModel.forward returns normalized image and text embeddings
        out = model(
            **tokenizer(texts, padding=True, return_tensors="pt"),
            pixel_values=torch.stack(list(map(transform, crops))),
        )
    emb = out.text_embeds.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
    expected = out.image_embeds @ torch.nn.functional.normalize(emb, dim=-1).T
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # uint8 PIL resampling vs float
    assert detector.classify_colors(pixels, objects, "cat") == [COLORS[i] for i in got.argmax(1).tolist()]
    # the grey background matters: without the mask the same box scores differently
    unmasked = detector.color_scores([(pixels, [Detection("cat", 0.9, (8, 5, 30, 20))], "cat")])[0]
    assert (unmasked - got[:1]).abs().max() > 1e-2


def test_geneval_judge_runs_on_the_geneval_set_and_abstains_without_metadata(folders):
    detector_dir, clip_dir = folders
    judge = build_judge(f"geneval:{detector_dir}@{clip_dir}")
    assert judge.name == "rules:geneval" and judge.settings()["threshold"] == 0.3
    items = load_prompt_set("geneval").items
    plain = PromptItem("p", "a cat", test_points=(TestPoint("Style", "photo"),))
    samples = [Sample(items[0], 0, torch.rand(3, 48, 64)), Sample(items[300], 0, torch.rand(3, 33, 21))]
    results = judge.judge(samples + [Sample(plain, 0, torch.rand(3, 48, 64))])
    assert [r.verdicts[0].status for r in results] == ["ok", "ok", "abstain"]
    assert results[2].verdicts[0].reason == "no GenEval rule spec for Style"


# ---------------------------------------------------------------------------------------------------------------
# The reward


class Scripted(Detector):
    """Detections given per image (by its mean brightness rank), colors as attached."""

    name = "scripted"

    def __init__(self, per_image):
        self.per_image = per_image

    def detect_batch(self, pixels):
        return [self.per_image[int(round(float(p.mean()) * 10))] for p in pixels]

    def detect(self, pixels):
        return self.detect_batch(pixels[None])[0]


def test_reward_strict_partial_and_official_accuracy_batched():
    per_image = {
        0: [det("bench", 0, 0), det("bench", 20, 0)],  # officially right, strictly wrong, partial 0
        1: [det("teddy bear"), det("dog", -50, 0)],  # position wrong: partial 0.75
        2: [det("fire hydrant", color="blue")],  # all right
    }
    prompts = ["a photo of a bench", "a photo of a dog right of a teddy bear", "a photo of a blue fire hydrant"]
    pixels = torch.stack([torch.full((3, 16, 16), v / 10) for v in range(3)])
    reward = GenEvalReward(Scripted(per_image))
    out = reward.score(pixels, prompts)
    assert out.score.tolist() == [0.0, 0.0, 1.0] and out.aspects["strict"].tolist() == [0.0, 0.0, 1.0]
    assert out.aspects["partial"].tolist() == pytest.approx([0.0, 0.75, 1.0])
    assert out.aspects["accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert out.extras["reasons"][0] == "expected bench==1, found 2"
    partial = GenEvalReward(Scripted(per_image), score="partial").score(pixels, prompts).score
    assert partial.tolist() == pytest.approx([0.0, 0.75, 1.0])
    # a JSON metadata line works as the prompt; a prompt without metadata is an error naming it
    line = json.dumps({"tag": "single_object", "include": [{"class": "bench", "count": 2}], "prompt": "two benches"})
    assert reward.score(pixels[:1], [line]).score.tolist() == [1.0]
    with pytest.raises(ValueError, match="'a sunset' has no GenEval metadata"):
        reward.score(pixels[:1], ["a sunset"])


def test_reward_loads_through_the_registry(folders, tmp_path):
    detector_dir, clip_dir = folders
    meta = tmp_path / "train_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}))
    reward = load_reward("geneval", str(detector_dir), color_model=str(clip_dir), metadata=str(meta))
    out = reward.score(torch.rand(3, 3, 24, 32), ["a cat"] * 3)
    assert out.score.shape == (3,) and set(out.aspects) == {"strict", "partial", "accuracy"}
    with pytest.raises(ValueError, match="lower its `min_score`"):
        GenEvalReward(reward.detector, rules=GenEvalRules(threshold=0.1))


def test_metadata_files_are_checked(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"tag": "single_object", "prompt": "a cat"}\n')
    with pytest.raises(ValueError, match="line 1 is not a GenEval metadata line"):
        load_metadata(bad)
    assert Path(str(resources.files("visalign.assets") / "prompts/GENEVAL_LICENSE.txt")).is_file()


def test_bench_run_geneval_reports_the_six_tags_and_their_mean(folders, tmp_path):
    from visalign import cli
    from visalign.benchmarks.run_folder import image_name, save_png

    detector_dir, clip_dir = folders
    passes = {"include": [], "exclude": [{"class": "cat", "count": 1}]}  # holds on an image without cats
    lines = [
        META["a photo of a bench"] | {"prompt": "a photo of a bench"},
        META["a photo of two clocks"] | {"prompt": "a photo of two clocks"},
        {"tag": "counting", "prompt": "no cat", **passes},
        META["a photo of a blue fire hydrant"] | {"prompt": "a photo of a blue fire hydrant"},
        META["a photo of a dog right of a teddy bear"] | {"prompt": "a photo of a dog right of a teddy bear"},
        {"tag": "color_attr", "prompt": "no cat either", **passes},
        {"tag": "two_object", "prompt": "a photo of a bench and a sports ball", "include": [
            {"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}]},
    ]  # fmt: skip
    set_file = tmp_path / "geneval6.jsonl"
    set_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    images = tmp_path / "images"
    images.mkdir()
    torch.manual_seed(0)
    for k in range(len(lines)):
        save_png(torch.rand(3, 48, 64), images / image_name(f"{k:05d}", 0))  # not GenEval's size: resized
    judge = f"geneval:{detector_dir}@{clip_dir}"
    args = ["bench", "run", "--images", str(images), "--judge", judge, "--images-per-prompt", "1", "--bootstrap", "0"]
    assert cli.main([*args, "--set", str(set_file), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    accuracy = {tag: cell["accuracy"] for tag, cell in summary["primary"].items()}
    assert accuracy == {
        "single_object": 0.0, "two_object": 0.0, "counting": 0.5, "colors": 0.0, "position": 0.0, "color_attr": 1.0,
    }  # fmt: skip
    assert summary["overall"]["accuracy"] == pytest.approx(1.5 / 6)  # the mean of the tags, not of the 7 images
    # the bundled set by name
    assert cli.main([*args, "--set", "geneval", "--limit", "3", "--out", str(tmp_path / "builtin")]) == 0
    record = json.loads((tmp_path / "builtin" / "record.json").read_text())
    assert record["judge"]["name"] == "rules:geneval" and record["prompt_set"]["name"] == "geneval"
