"""The shapes world: captions, renderer/verifier agreement, prompt splits, world rewards, the training command."""

import json

import numpy as np
import pytest
import torch

import visalign
from visalign.world.evaluate import accuracy, heldout_prompts
from visalign.world.scenes import (
    CATEGORIES,
    Obj,
    Placed,
    Prompt,
    all_prompts,
    parse_prompt,
    prompt_split,
    render,
    render_prompt,
)
from visalign.world.verifier import Detection, detect, exact_fraction, partial_score, verify


def test_captions_parse_back_exactly():
    prompts = all_prompts()
    assert {p.category for p in prompts.values()} == set(CATEGORIES)
    for p in list(prompts.values())[::37]:
        assert parse_prompt(p.text) == p
        assert parse_prompt(p.text.upper() + ".") == p
    assert parse_prompt("two red circles") == Prompt("two red circles", "counting", (Obj("circle", "red", 2),))
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_prompt("a photo of a cat")


def test_splits_are_disjoint_and_heldout_covers_every_category():
    train = {p.text for ps in prompt_split("train").values() for p in ps}
    test = {p.text for ps in prompt_split("test").values() for p in ps}
    assert train and test and not train & test
    held = heldout_prompts()
    assert len(held) >= 200
    assert {p.category for p in held} == set(CATEGORIES)
    assert all(p.text in test for p in held)
    with pytest.raises(ValueError, match="split"):
        prompt_split("val")


def test_verifier_agrees_with_renderer():
    """Renders of a prompt pass; renders judged against another prompt of the same category mostly fail."""
    rng = np.random.default_rng(0)
    prompts = list(all_prompts().values())
    own, other = [], []
    for _ in range(300):
        p = prompts[rng.integers(len(prompts))]
        image = render_prompt(p, rng)
        own.append(verify(image, p).correct)
        same_cat = [q for q in prompts[::7] if q.category == p.category and q.objects != p.objects]
        q = same_cat[rng.integers(len(same_cat))]
        other.append(verify(image, q).correct)
    own_acc, false_pass = float(np.mean(own)), float(np.mean(other))
    print(f"verifier accuracy on own renders {own_acc:.3f}, pass rate against other prompts {false_pass:.3f}")
    assert own_acc >= 0.97
    assert false_pass <= 0.25


def test_detection_reads_shape_color_and_position():
    image = render([Placed("triangle", "green", 8, 20, 5), Placed("square", "purple", 24, 10, 4)])
    found = sorted(detect(image), key=lambda d: d.x)
    assert [(d.shape, d.color) for d in found] == [("triangle", "green"), ("square", "purple")]
    assert found[0].x < found[1].x and found[0].y > found[1].y
    assert verify(image, parse_prompt("a green triangle to the left of a purple square")).correct
    assert not verify(image, parse_prompt("a green triangle above a purple square")).correct


def test_world_verifier_reward_through_registry():
    reward = visalign.load_reward("world-verifier")
    assert not reward.differentiable
    rng = np.random.default_rng(1)
    texts = ["two red circles", "a blue square above a green triangle"]
    pixels = torch.from_numpy(np.stack([render_prompt(parse_prompt(t), rng) for t in texts]))
    out = reward(pixels, texts)
    assert out.score.tolist() == [1.0, 1.0]
    assert out.aspects["correct"].tolist() == [1.0, 1.0]
    swapped = reward(pixels, texts[::-1])
    assert swapped.score.max() < 1.0 and "FAIL" in swapped.extras["reasons"][0]
    assert torch.equal(reward(pixels[:1], texts[:1]).score, out.score[:1])  # batch equals items
    with pytest.raises(ValueError, match="pixels"):
        reward(pixels * 3, texts)
    with pytest.raises(ValueError, match="prompts"):
        reward(pixels, texts[:1])
    with pytest.raises(ValueError, match="shapes-world"):
        reward(pixels, ["a cat", "a dog"])


def test_partial_score_equals_flow_grpos_geneval_reward_on_the_same_detections():
    """The world's partial score against `geneval_reward` (Flow-GRPO's reward server, tested on its own) on random
    detections, the world prompt written as GenEval metadata: same strict-count terms, color and position terms.
    Objects sit on one row or one column, where GenEval's relations and the world's margins agree."""
    from visalign.reward_models.geneval_rules import Detection as GenEvalDetection
    from visalign.reward_models.geneval_rules import GenEvalRules, geneval_reward

    relations = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}

    def as_spec(p: Prompt) -> dict:
        clauses = [{"class": o.shape, "count": o.count} | ({"color": o.color} if o.color else {}) for o in p.objects]
        if p.relation is not None:  # GenEval lists the target first, the subject with its position second
            clauses = [clauses[1], clauses[0] | {"position": [relations[p.relation], 0]}]
        return {"tag": p.category, "include": clauses}

    rng = np.random.default_rng(0)
    prompts = list(all_prompts().values())
    seen = set()
    for _ in range(600):
        p = prompts[rng.integers(len(prompts))]
        shapes = [o.shape for o in p.objects] + ["circle", "square", "triangle"]
        colors = [o.color or "red" for o in p.objects] + ["red", "blue", "green"]
        slots = rng.permutation(8)[: rng.integers(0, 6)]
        row = rng.random() < 0.5
        dets = [
            Detection(
                shapes[rng.integers(len(shapes))],
                colors[rng.integers(len(colors))],
                *((4 * k, 16) if row else (16, 4 * k)),
                9,
            )
            for k in slots
        ]
        theirs = [GenEvalDetection(d.shape, 1.0, (d.x - 1, d.y - 1, d.x + 1, d.y + 1), d.color) for d in dets]
        strict, expected, _ = geneval_reward(as_spec(p), theirs, GenEvalRules())
        assert partial_score(dets, p) == pytest.approx(expected, abs=1e-12), (p.text, dets)
        # the exact clause fraction: all clauses hold iff GenEval's strict rule holds (prompts naming a shape
        # twice aside: GenEval's reward then wants one of that shape per clause, never satisfiable)
        if len({o.shape for o in p.objects}) == len(p.objects):
            assert (exact_fraction(dets, p) == 1.0) == strict, (p.text, dets)
        seen.add((p.category, strict, expected < 0))
    assert {c for c, _, _ in seen} == set(CATEGORIES) and {s for _, s, _ in seen} == {True, False}
    assert any(negative for _, _, negative in seen)


def test_world_verifier_partial_score_punishes_extra_objects_that_the_fraction_accepts():
    reward, partial = visalign.load_reward("world-verifier"), visalign.load_reward("world-verifier-partial")
    one = render([Placed("circle", "red", 10, 16, 4)])
    two = render([Placed("circle", "red", 8, 16, 4), Placed("circle", "red", 24, 16, 4)])
    pixels, texts = torch.from_numpy(np.stack([one, two])), ["a red circle"] * 2
    assert reward(pixels, texts).score.tolist() == [1.0, 1.0]  # GenEval's rule: at least one
    assert partial(pixels, texts).score.tolist() == [1.0, 0.0]  # Flow-GRPO's: exactly one (count 0, color 0)
    assert torch.equal(partial(pixels, texts).aspects["correct"], reward(pixels, texts).aspects["correct"])
    assert visalign.load_reward("world-verifier-exact")(pixels, texts).score.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="score"):
        visalign.load_reward("world-verifier", score="strict")


def test_world_verifier_tidy_costs_extra_objects_without_outweighing_a_clause():
    tidy = visalign.load_reward("world-verifier-tidy")
    corners = [(6, 6), (6, 26), (26, 6), (26, 26), (16, 16)]
    images = [
        render([Placed("circle", "red", 10, 16, 4)]),
        render([Placed("circle", "red", 8, 16, 4), Placed("circle", "red", 24, 16, 4)]),
        render([Placed("circle", "red", x, y, 3) for x, y in corners]),  # four extras, three counted
        render([Placed("circle", "blue", 10, 16, 4)]),
    ]
    out = tidy(torch.from_numpy(np.stack(images)), ["a red circle"] * 4)
    assert out.score.tolist() == pytest.approx([1.0, 0.9, 0.7, 0.0])
    assert out.aspects["correct"].tolist() == [1.0, 1.0, 1.0, 0.0]  # the judge's verdicts are unchanged


def test_world_verifier_bonus_doubles_the_credit_of_an_image_the_judge_passes():
    bonus, fraction = visalign.load_reward("world-verifier-bonus"), visalign.load_reward("world-verifier")
    circle, square = Placed("circle", "red", 8, 16, 4), Placed("square", "blue", 24, 16, 4)
    images = [
        render([circle, square]),  # the red circle left of the blue square: every clause
        render([Placed("circle", "red", 24, 16, 4), Placed("square", "blue", 8, 16, 4)]),  # both, relation wrong
        render([circle]),  # one object
        render([]),
    ]
    pixels, texts = torch.from_numpy(np.stack(images)), ["a red circle to the left of a blue square"] * 4
    assert fraction(pixels, texts).score.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert bonus(pixels, texts).score.tolist() == pytest.approx([1.0, 1 / 3, 1 / 6, 0.0])
    assert torch.equal(bonus(pixels, texts).aspects["correct"], fraction(pixels, texts).aspects["correct"])


def test_world_defects_heatmap_is_dense_and_differentiable():
    reward = visalign.load_reward("world-defects")
    clean = torch.from_numpy(render([Placed("circle", "red", 16, 16, 5)]))[None]
    wrong = torch.from_numpy(render([Placed("circle", "blue", 16, 16, 5)]))[None]
    pixels = torch.cat([clean, wrong]).requires_grad_(True)
    out = reward(pixels, ["a red circle", "a red circle"])
    heat = out.heatmaps["defects"]
    assert heat.shape == (2, 32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert heat[0].sum() < 0.25 * heat[1].sum() and heat[1].mean() > 0.05
    assert out.score[0] > out.score[1]
    out.score.sum().backward()
    assert pixels.grad is not None and pixels.grad[1].abs().sum() > 0
    # prompts without a color allow every palette color
    assert reward(wrong, ["a circle"]).score.item() > 0.97  # only anti-aliased edges are off-palette


def test_world_clip_loads_through_the_pickscore_loader(tmp_path):
    from visalign.world.models import build_clip, world_tokenizer

    tok = world_tokenizer()
    torch.manual_seed(0)
    clip = build_clip(len(tok)).eval()
    clip.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reward = visalign.load_reward("world-clip", pretrained=str(tmp_path))
    pixels = torch.rand(3, 3, 32, 32, requires_grad=True)
    texts = ["a red circle", "two blue squares", "a circle"]
    out = reward(pixels, texts)
    ids = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        o = clip(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=(pixels - mean) / std)
        expected = o.logits_per_image.diagonal().double()
    torch.testing.assert_close(out.score.double(), expected, atol=1e-4, rtol=1e-4)
    out.score.sum().backward()
    assert pixels.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="train-base"):
        visalign.load_reward("world-clip", pretrained=str(tmp_path / "missing"))


def test_world_tokenizer_spells_world_words_as_single_tokens():
    from visalign.world.models import TOKENS, world_tokenizer

    tok = world_tokenizer()
    assert tok.tokenize("a purple triangle is to the right of a yellow circle") == [
        w + "</w>" for w in "a purple triangle is to the right of a yellow circle".split()
    ]
    assert max(len(tok(p.text).input_ids) for p in all_prompts().values()) <= TOKENS


def test_accuracy_is_per_category_mean():
    rng = np.random.default_rng(0)
    ps = [parse_prompt("a red circle"), parse_prompt("a red circle"), parse_prompt("three squares")]
    images = torch.from_numpy(
        np.stack([render_prompt(ps[0], rng), np.zeros((3, 32, 32), np.float32), render_prompt(ps[2], rng)])
    )
    acc = accuracy(images, ps)
    assert acc["per_category"] == {"colors": 0.5, "counting": 1.0}
    assert acc["overall"] == 0.75
    with pytest.raises(ValueError, match="prompts"):
        accuracy(images, ps[:2])


def test_train_base_smoke(tmp_path):
    """The whole recipe at toy size: every stage runs and the saved pipelines load through diffusers."""
    from visalign.loading import load_generator
    from visalign.world.models import generation_kwargs
    from visalign.world.train import TrainBaseConfig, train_base

    cfg = TrainBaseConfig(
        out=str(tmp_path),
        num_images=128,
        per_device_train_batch_size=8,
        vae_steps=2,
        vae_per_device_train_batch_size=8,
        clip_steps=2,
        clip_per_device_train_batch_size=16,
        sd_steps=2,
        sd3_steps=2,
        eval_steps=2,
        eval_per_category=1,
    )
    results = train_base(cfg)
    assert set(results) == {"vae", "clip", "sd", "sd3"}
    record = json.loads((tmp_path / "training_record.json").read_text())
    assert record["sd3"]["steps"] == 2 and record["sd"]["curve"][0]["step"] == 2
    for family in ("sd", "sd3"):
        pipe = load_generator(str(tmp_path / family))[0]
        kw = generation_kwargs(tmp_path / family) | {"num_inference_steps": 2, "output_type": "pt"}
        images = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
        assert images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="stages"):
        train_base(cfg, ("vae", "gan"))


def test_adaln_zero_makes_every_sd3_block_the_identity_and_the_output_zero():
    """adaLN-Zero (DiT): gates 0 -> blocks are the identity; final projection 0 -> the velocity is 0; grads flow."""
    from visalign.world.models import build_transformer
    from visalign.world.train import adaln_zero_

    torch.manual_seed(0)
    model = adaln_zero_(build_transformer(num_layers=2, num_heads=2))
    assert model.config.num_layers == 2 and model.config.caption_projection_dim == 32
    x = torch.randn(2, 4, 16, 16)
    kw = dict(encoder_hidden_states=torch.randn(2, 8, 128), pooled_projections=torch.randn(2, 128))
    out = model(hidden_states=x, timestep=torch.tensor([10.0, 900.0]), **kw).sample
    assert torch.equal(out, torch.zeros_like(out))
    block = model.transformer_blocks[0]
    hidden = model.pos_embed(x)
    temb = model.time_text_embed(torch.tensor([10.0, 900.0]), kw["pooled_projections"])
    ctx = model.context_embedder(kw["encoder_hidden_states"])
    ctx_out, hidden_out = block(hidden_states=hidden, encoder_hidden_states=ctx, temb=temb)
    torch.testing.assert_close(hidden_out, hidden)
    torch.testing.assert_close(ctx_out, ctx)
    out.sum().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_sd3_recipe_config_and_lr_schedule():
    from visalign.config import config_from_dict
    from visalign.world.train import TrainBaseConfig, _lr_factor

    cfg = config_from_dict(TrainBaseConfig, {"sd3_learning_rate": "3e-4", "sd3_adaln_zero": "no", "sd3_layers": "6"})
    assert cfg.sd3_learning_rate == 3e-4 and cfg.sd3_adaln_zero is False and cfg.sd3_layers == 6
    default = TrainBaseConfig()  # the shipped flow model's recipe
    assert (default.sd3_learning_rate, default.sd3_adaln_zero, default.sd3_layers) == (1e-3, True, 10)
    assert default.sd3_steps == 2400 and default.sd3_lr_schedule == "constant"
    assert config_from_dict(TrainBaseConfig, {"sd3_learning_rate": None}).sd3_learning_rate is None
    assert _lr_factor(0, 1000, False) == 1 / 200 and _lr_factor(999, 1000, False) == 1.0
    assert _lr_factor(200, 1000, True) == pytest.approx(1.0) and _lr_factor(1000, 1000, True) == pytest.approx(0.1)
    for bad in ({"sd3_learning_rate": 0.0}, {"sd3_layers": 0}, {"sd3_lr_schedule": "linear"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config_from_dict(TrainBaseConfig, bad)


def test_load_generator_loads_a_trained_lora_into_the_world_model(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from visalign.loading import load_generator

    trained = load_generator("world:sd")[0]
    torch.manual_seed(0)
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=state)

    base, loaded = load_generator("world:sd")[0], load_generator("world:sd", lora=tmp_path / "lora")[0]
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    text = torch.randn(1, 16, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = [p.unet(x, t, text).sample for p in (trained, loaded, base)]
    torch.testing.assert_close(outputs[1], outputs[0])
    assert not torch.allclose(outputs[1], outputs[2])


def test_exact_fraction_counts_a_shape_asked_for_twice_and_fails_only_the_overdrawn_clause():
    p = parse_prompt("a red circle to the left of a blue circle")
    left, right = Detection("circle", "red", 8, 16, 9), Detection("circle", "blue", 24, 16, 9)
    extra = Detection("circle", "red", 16, 28, 9)
    assert exact_fraction([left, right], p) == 1.0
    assert exact_fraction([left, right, extra], p) == pytest.approx(1 / 3)  # both circle clauses over, relation ok
    assert exact_fraction([right, Detection("circle", "red", 30, 16, 9)], p) == pytest.approx(2 / 3)  # red right
    assert exact_fraction([left, right, Detection("square", "red", 16, 4, 9)], p) == 1.0  # other shapes are free
