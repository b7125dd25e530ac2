"""ImageDoctor: the official prompts (pinned), the official answer parsing (clamp and fill) and ours, the paper's RL
reward as the score, the tiny Qwen2.5-VL scorer loaded from the official layout with its heatmap head, and the head's
checkpoint names."""

import hashlib
import json
import re
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from visalign.reward_models.doctor_head import (
    DoctorHeatmapHead,
    HeadConfig,
    PositionEmbeddingRandom,
    TwoWayTransformer,
)
from visalign.reward_models.imagedoctor import (
    ASPECTS,
    DOCTOR_PROMPT,
    DOCTOR_REWARD_PROMPT,
    REWARD_WEIGHTS,
    VISALIGN_DOCTOR_PROMPT,
    ImageDoctor,
    collect_aspects,
    parse_doctor_answer,
)
from visalign.testing_vlm import save_tiny_qwen_vl

GOOD = (
    "<think>The cat is fine. I need to focus on the bounding box area: 1.[0,0,10,10]</think><answer>"
    "Semantic Alignment score: 0.8\nMisalignment Locations: none\nAesthetic score: 0.6\nPlausibility score: 0.7\n"
    "Artifact Locations: [1,2,3,4]\nOverall Impression score: 0.75</answer>"
)
TINY_HEAD = HeadConfig(
    text_size=32, vision_size=32, dim=16, depth=2, num_heads=2, mlp_dim=32, stem=(16, 8), widths=(16, 8, 8, 4)
)
# SAM prompt-encoder parts the released checkpoint holds and the score never uses
UNUSED_SAM_KEYS = {
    "prompt_encoder.point_embeddings.0.weight": (1, 16),
    "prompt_encoder.not_a_point_embed.weight": (1, 16),
    "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
    "prompt_encoder.mask_downscaling.6.weight": (16, 16, 1, 1),
}


# sha256 of inference.py's `build_messages` text (placeholder `{task_prompt}`) and doctor_hp.py's
# `DoctorScorer_hp.task` (placeholder `{prompt}`), EthanG97/ImageDoctor f541579
OFFICIAL_SHA256 = "e6546f1f353678e72c5a3f0808381794bb37296dd0dd9c75412fed8d91664505"
REWARD_SHA256 = "4b3c378695b66454779f04dd38daa7ca89c1b74e9a04365132e2199d4f891e1b"


def test_prompts_are_the_official_text():
    official = DOCTOR_PROMPT.replace("{prompt}", "{task_prompt}")
    assert hashlib.sha256(official.encode()).hexdigest() == OFFICIAL_SHA256
    assert hashlib.sha256(DOCTOR_REWARD_PROMPT.encode()).hexdigest() == REWARD_SHA256
    assert DOCTOR_PROMPT.startswith("Given a caption and an image generated based on this caption, please analyze")
    assert "format: \\\u201d I need to focus" in DOCTOR_PROMPT and "score: ... nArtifact Locations" in DOCTOR_PROMPT
    assert DOCTOR_PROMPT.endswith("Your task is provided as follows:\nText Caption: [{prompt}]")
    assert DOCTOR_PROMPT.count("{prompt}") == DOCTOR_REWARD_PROMPT.count("{prompt}") == 1
    assert REWARD_WEIGHTS == {"semantic_alignment": 0.8, "aesthetics": 0.1, "plausibility": 0.1}


MISSING = float("nan")


@pytest.mark.parametrize(
    "text, official, ours",
    [
        (GOOD, [0.7, 0.8, 0.6, 0.75], [0.7, 0.8, 0.6, 0.75]),  # plausibility, semantic alignment, aesthetics, overall
        (  # the official labels only: "Aesthetics score" and "Overall score" are not read; x% and x/y are numbers
            "**Semantic Alignment score:** 0.9 Aesthetics score: 85% Plausibility score: 7/10 Overall score: .5",
            [7.0, MISSING, MISSING, MISSING],
            [0.7, 0.9, 0.85, 0.5],
        ),
        (  # the first <answer> block and the first match (ours: the last of each)
            "<answer>Overall Impression score: 0.2 Overall Impression score: 0.3</answer> <answer>"
            "Overall Impression score: 0.9</answer>",
            [MISSING, MISSING, MISSING, 0.2],
            [MISSING, MISSING, MISSING, 0.9],
        ),
        (  # no closed block: the whole text, reasoning included (ours: the reasoning removed)
            "<think>Aesthetic score: 0.9</think><answer>Aesthetic score: 0.3 semantic alignment SCORE : 1e-1",
            [MISSING, 0.1, 0.9, MISSING],
            [MISSING, 0.1, 0.3, MISSING],
        ),
        ("Semantic Alignment score: 1.5\nAesthetic score: -0.2\nPlausibility score: 0/0", [0.0, 1.5, -0.2, MISSING],
         [MISSING, 1.5, -0.2, MISSING]),
        ("Semantic Alignment score: high", [MISSING] * 4, [MISSING] * 4),
        ("", [MISSING] * 4, [MISSING] * 4),
        (None, [MISSING] * 4, [MISSING] * 4),
    ],
)  # fmt: skip
def test_parse_doctor_answer(text, official, ours):
    for parsing, expected in (("official", official), ("visalign", ours)):
        result = parse_doctor_answer(text, parsing)
        assert list(result) == list(ASPECTS)
        assert list(result.values()) == pytest.approx(expected, nan_ok=True), parsing


def test_collect_aspects_clamps_fills_and_accounts():
    texts = [GOOD, "Overall Impression score: 0.25\nAesthetic score: 3\nPlausibility score: -1", None]
    aspects, extras = collect_aspects(texts)  # official: clamp to [0, 1], fill with 0
    assert set(aspects) == set(ASPECTS) and all(v.shape == (3,) and v.dtype == torch.float32 for v in aspects.values())
    torch.testing.assert_close(aspects["overall"], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(aspects["aesthetics"], torch.tensor([0.6, 1.0, 0.0]))
    torch.testing.assert_close(aspects["plausibility"], torch.tensor([0.7, 0.0, 0.0]))
    torch.testing.assert_close(aspects["semantic_alignment"], torch.tensor([0.8, 0.0, 0.0]))
    assert extras["parse_failures"] == 2 and extras["missing"].tolist() == [[False] * 4, [False, True, False, False],
                                                                            [True] * 4]  # fmt: skip
    assert extras["out_of_range_counts"] == {"plausibility": 1, "semantic_alignment": 0, "aesthetics": 1, "overall": 0}
    assert extras["missing_counts"] == {"plausibility": 1, "semantic_alignment": 2, "aesthetics": 1, "overall": 1}
    ours, extras = collect_aspects(texts, "visalign", fill="mean")  # out of range: rejected, then filled
    torch.testing.assert_close(ours["overall"], torch.tensor([0.75, 0.25, 0.5]))  # the batch mean of valid values
    torch.testing.assert_close(ours["aesthetics"], torch.tensor([0.6, 0.6, 0.6]))
    assert extras["missing"][1].tolist() == [True, True, True, False] and extras["parse_failures"] == 2
    constant, _ = collect_aspects([None, None], fill=0.5)
    assert all(v.tolist() == [0.5, 0.5] for v in constant.values())
    only_failures, _ = collect_aspects(["no scores"], fill="mean")
    assert all(v.tolist() == [0.5] for v in only_failures.values())
    with pytest.raises(ValueError, match="`parsing`"):
        parse_doctor_answer(GOOD, "strict")


def save_tiny_doctor(folder, head=True, drop=None):
    """A tiny ImageDoctor checkpoint: Qwen2.5-VL with two special tokens in its config and the head's tensors
    (plus SAM's unused prompt-encoder tensors) in the same `model.safetensors`, as the release stores them."""
    save_tiny_qwen_vl(
        folder, "qwen2_5_vl", corpus=[DOCTOR_PROMPT, GOOD], extra_special_tokens=["[misalignment]", "[artifact]"]
    )
    vocab = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    config = json.loads((folder / "config.json").read_text())
    config |= {"misalignment_token_id": ids["[misalignment]"], "artifact_token_id": ids["[artifact]"]}
    (folder / "config.json").write_text(json.dumps(config))
    if head:
        torch.manual_seed(1)
        module = DoctorHeatmapHead(TINY_HEAD)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
        state = {k: v.clone() for k, v in module.state_dict().items()}
        state |= {k: torch.randn(shape) for k, shape in UNUSED_SAM_KEYS.items()}
        state.pop(drop, None)
        weights = load_file(folder / "model.safetensors")
        save_file(weights | state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, ids


@pytest.fixture(scope="module")
def doctor_folder(tmp_path_factory):
    return save_tiny_doctor(tmp_path_factory.mktemp("doctor"))


def test_head_keys_are_the_checkpoint_names():
    keys = set(DoctorHeatmapHead(TINY_HEAD).state_dict())
    assert {
        "text_hidden_fcs.0.0.weight",
        "text_hidden_fcs.0.2.weight",
        "image_hidden_fcs.0.2.bias",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.no_mask_embed.weight",
        "heatmap.mask_tokens.weight",
        "heatmap.transformer.layers.0.self_attn.q_proj.weight",
        "heatmap.transformer.layers.1.cross_attn_image_to_token.out_proj.bias",
        "heatmap.transformer.layers.0.mlp.lin1.weight",
        "heatmap.transformer.layers.1.norm4.weight",
        "heatmap.transformer.final_attn_token_to_image.k_proj.weight",
        "heatmap.transformer.norm_final_attn.bias",
        "heatmap.output_upscaling.conv_layers.0.weight",
        "heatmap.output_upscaling.conv_layers.5.scale",
        "heatmap.output_upscaling.deconv_layers.3.0.weight",
        "heatmap.output_upscaling.deconv_layers.3.1.scale",
        "heatmap.output_upscaling.conv_layers2.2.4.scale",
        "heatmap.output_upscaling.last_conv1.weight",
        "heatmap.output_hypernetworks_mlps.0.layers.2.weight",
    } <= keys
    assert HeadConfig.from_state_dict(DoctorHeatmapHead(TINY_HEAD).state_dict(), 2) == TINY_HEAD


def canned_generation(texts, token_ids):
    """Replaces greedy decoding: the answers `texts`, and new ids that hold `token_ids[i]` at position 3."""

    def generate(model, processor, inputs, max_new_tokens):
        new = torch.full((len(inputs["input_ids"]), 6), 5, dtype=torch.long)
        for i, tokens in enumerate(token_ids[: len(new)]):
            for k, token in enumerate(tokens):
                new[i, 3 + k] = token
        return texts[: len(new)], new

    return mock.patch("visalign.reward_models.imagedoctor.generate_texts", side_effect=generate)


def test_tiny_doctor_scores_and_heatmaps(doctor_folder, generator):
    folder, ids = doctor_folder
    doctor = ImageDoctor.from_pretrained(str(folder), num_heads=2, image_size=32)
    assert doctor.heatmap_names == ("misalignment", "artifact") and not doctor.training
    pixels = torch.rand(3, 3, 40, 24, generator=generator)
    both, art = [ids["[misalignment]"], ids["[artifact]"]], [ids["[artifact]"]]
    with canned_generation([GOOD, "no scores at all", GOOD], [both, [], art]):
        out = doctor.score(pixels, ["a cat", "a dog", "a cat"])
    torch.testing.assert_close(out.score, torch.tensor([0.77, 0.0, 0.77]))  # 0.8 * 0.8 + 0.1 * 0.6 + 0.1 * 0.7
    assert out.aspects["plausibility"].tolist() == pytest.approx([0.7, 0.0, 0.7])
    assert out.aspects["overall"].tolist() == pytest.approx([0.75, 0.0, 0.75])
    assert out.extras["parse_failures"] == 1 and out.extras["heatmap_missing"] == {"misalignment": 2, "artifact": 1}
    for name in ("misalignment", "artifact"):
        heat = out.heatmaps[name]
        assert heat.shape == (3, 40, 24) and heat.min() >= 0 and heat.max() <= 1
    assert out.heatmaps["misalignment"][0].max() > 0 and out.heatmaps["artifact"][2].max() > 0
    assert out.heatmaps["misalignment"][1:].max() == 0 and out.heatmaps["artifact"][1].max() == 0
    with canned_generation([GOOD], [art]):  # a sample's heatmap does not depend on the rest of the batch
        alone = doctor.score(pixels[2:], ["a cat"])
    torch.testing.assert_close(alone.heatmaps["artifact"][0], out.heatmaps["artifact"][2], atol=1e-5, rtol=1e-4)


def test_tiny_doctor_generates_and_counts_failures(doctor_folder, generator):
    folder, _ = doctor_folder
    doctor = ImageDoctor.from_pretrained(str(folder), num_heads=2, image_size=32, max_new_tokens=3)
    out = doctor.score(torch.rand(2, 3, 32, 32, generator=generator), ["a cat", "a dog"])
    assert out.extras["parse_failures"] == 2 and len(out.extras["texts"]) == 2  # a random model answers nonsense
    assert out.score.tolist() == [0.0, 0.0] and set(out.aspects) == set(ASPECTS)
    assert all(out.heatmaps[name].shape == (2, 32, 32) for name in ("misalignment", "artifact"))


def test_doctor_without_head_and_loading_errors(tmp_path, doctor_folder, generator):
    folder, _ = save_tiny_doctor(tmp_path / "plain", head=False)
    doctor = ImageDoctor.from_pretrained(str(folder), image_size=32)
    assert doctor.head is None and doctor.heatmap_names == ()
    pixels = torch.rand(1, 3, 32, 32, generator=generator)
    with canned_generation([GOOD], [[]]):
        out = doctor.score(pixels, ["a cat"])
    assert out.heatmaps == {} and out.score.tolist() == pytest.approx([0.77])
    assert doctor.prompt_template == DOCTOR_PROMPT and doctor.conversation("a {cat}")[0]["content"][1]["text"] == (
        DOCTOR_PROMPT.replace("{prompt}", "a {cat}")
    )
    for options, score in [({"score_weights": "overall"}, 0.75), ({"score_weights": {"aesthetics": 2.0}}, 1.2)]:
        with canned_generation([GOOD], [[]]):
            out = ImageDoctor(doctor.model, doctor.processor, image_size=32, **options).score(pixels, ["a cat"])
        assert out.score.tolist() == pytest.approx([score])
    reward = ImageDoctor(doctor.model, doctor.processor, prompt_template="official-reward")
    assert reward.prompt_template == DOCTOR_REWARD_PROMPT
    assert ImageDoctor(doctor.model, doctor.processor, prompt_template="visalign").prompt_template == (
        VISALIGN_DOCTOR_PROMPT
    )
    broken, _ = save_tiny_doctor(tmp_path / "broken", drop="heatmap.transformer.layers.1.norm4.weight")
    with pytest.raises(ValueError, match="norm4"):
        ImageDoctor.from_pretrained(str(broken), num_heads=2)
    with pytest.raises(ValueError, match="`num_heads`"):
        ImageDoctor.from_pretrained(str(doctor_folder[0]), num_heads=3)
    qwen2 = save_tiny_qwen_vl(tmp_path / "qwen2", "qwen2_vl")
    with pytest.raises(ValueError, match="'qwen2_vl' model"):
        ImageDoctor.from_pretrained(str(qwen2))


def test_doctor_bad_arguments(doctor_folder):
    doctor = ImageDoctor.from_pretrained(str(doctor_folder[0]), num_heads=2)
    model, processor, head = doctor.model, doctor.processor, doctor.head
    with pytest.raises(ValueError, match="`misalignment_token_id`"):
        ImageDoctor(model, processor, head)
    for options, arg in [
        ({"fill": "median"}, "fill"),
        ({"fill": 2.0}, "fill"),
        ({"image_size": 0}, "image_size"),
        ({"parsing": "strict"}, "parsing"),
        ({"score_weights": "mean"}, "score_weights"),
        ({"score_weights": {"realism": 1.0}}, "score_weights"),
        ({"prompt_template": "Rate {caption}"}, "prompt_template"),
    ]:
        with pytest.raises(ValueError, match=f"`{arg}`"):
            ImageDoctor(model, processor, **options)
    with pytest.raises(ValueError, match="`pixels`"):
        doctor.score(torch.rand(1, 3, 32), ["a cat"])


def test_two_way_transformer_and_positions_match_transformers_sam(generator):
    """The head's SAM parts against transformers' independent SAM implementation, weights copied by name."""
    from transformers import SamMaskDecoderConfig, SamVisionConfig
    from transformers.models.sam.modeling_sam import SamPositionalEmbedding, SamTwoWayTransformer

    torch.manual_seed(0)
    ours = TwoWayTransformer(depth=2, dim=16, num_heads=2, mlp_dim=32).eval()
    config = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2)
    theirs = SamTwoWayTransformer(SamMaskDecoderConfig(**{**config.to_dict(), "layer_norm_eps": 1e-5})).eval()
    theirs.load_state_dict({re.sub(r"(^|\.)norm", r"\1layer_norm", k): v for k, v in ours.state_dict().items()})
    image, pe = torch.randn(3, 16, 4, 5, generator=generator), torch.randn(1, 16, 4, 5, generator=generator)
    tokens = torch.randn(3, 2, 16, generator=generator)
    queries, keys = ours(image, pe.expand(3, -1, -1, -1), tokens)
    with torch.no_grad():
        ref_queries, ref_keys = theirs(tokens[:, None], image, pe.expand(3, -1, -1, -1), attention_similarity=None)
    torch.testing.assert_close(queries, ref_queries[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, ref_keys[:, 0], atol=1e-5, rtol=1e-5)

    ours_pe = PositionEmbeddingRandom(8)
    theirs_pe = SamPositionalEmbedding(SamVisionConfig(num_pos_feats=8))
    theirs_pe.positional_embedding.data = ours_pe.positional_encoding_gaussian_matrix.clone()
    h, w = 3, 5
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    centers = torch.stack([xs / w, ys / h], dim=-1)[None]
    torch.testing.assert_close(ours_pe((h, w)), theirs_pe(centers)[0].permute(2, 0, 1))
