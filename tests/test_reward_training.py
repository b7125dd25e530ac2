"""Reward-model training: the objectives against float64 hand computations, training runs of every head kind on tiny
CLIPs, round trips through `load_reward`, and the `visalign bench reward` accuracies with and without ties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from preference_helpers import hub_snapshot, red_blue_images, red_over_blue_pairs
from reward_helpers import TINY_OPEN_CLIP, save_clip_folder, save_hps

from visalign.benchmarks.reward_eval import correlations, evaluate_reward, pairwise_accuracy, reliability
from visalign.cli import main
from visalign.config import config_from_dict, load_config
from visalign.pipelines.pickapic import save_pairs
from visalign.pipelines.reward_data import load_pickapic
from visalign.pipelines.reward_training import (
    RewardConfig,
    RewardTrainer,
    bradley_terry_loss,
    fit_logit_scale,
    heatmap_loss,
    per_prompt_weights,
    regression_loss,
)
from visalign.reward_models.learned import LearnedReward
from visalign.rewards import load_reward

LEARNED = "visalign.reward_models.learned:LearnedReward"


# -- the objectives --------------------------------------------------------------------------------------------


def test_bradley_terry_loss_matches_hand_computed_pairs_with_ties():
    s0 = torch.tensor([2.0, 2.0, 1.0, 1.0, -0.5], dtype=torch.float64)
    s1 = torch.tensor([0.5, 0.5, 1.0, 2.5, 0.5], dtype=torch.float64)
    label = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    expected = [
        math.log1p(math.exp(-1.5)),  # image 0 preferred, d = 1.5: -log sigmoid(1.5)
        math.log1p(math.exp(1.5)),  # image 1 preferred: -log sigmoid(-1.5)
        0.0,  # a tie scored as a tie costs nothing (PickScore's + log 0.5)
        0.5 * (math.log1p(math.exp(1.5)) + math.log1p(math.exp(-1.5))) - math.log(2),  # a tie, d = -1.5
        math.log1p(math.exp(1.0)),  # image 0 preferred, d = -1
    ]
    loss = bradley_terry_loss(s0, s1, label)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(sum(expected) / 5, abs=1e-12)
    # PickScore's own form: cross-entropy of softmax([s0, s1]) against (l0, l1), plus log 0.5 for ties
    logits = torch.stack([s0, s1], -1)
    targets = torch.stack([label, 1 - label], -1)
    pickscore = -(targets * torch.log_softmax(logits, -1)).sum(-1) + (label == 0.5) * math.log(0.5)
    assert torch.allclose(bradley_terry_loss(s0, s1, label), pickscore.mean(), atol=1e-12)
    weight = torch.tensor([1.0, 1.0, 2.0, 0.0, 4.0], dtype=torch.float64)
    weighted = sum(w * e for w, e in zip(weight.tolist(), expected)) / weight.sum().item()
    assert bradley_terry_loss(s0, s1, label, weight).item() == pytest.approx(weighted, abs=1e-12)


def test_bradley_terry_soft_labels_are_the_kl_divergence():
    s0, s1 = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    y, p = 0.8, 1 / (1 + math.exp(-0.7))
    kl = y * math.log(y / p) + (1 - y) * math.log((1 - y) / (1 - p))
    assert bradley_terry_loss(s0, s1, torch.tensor([y], dtype=torch.float64)).item() == pytest.approx(kl, abs=1e-12)


@pytest.mark.parametrize(
    "s0, s1, label, match",
    [
        (torch.zeros(2), torch.zeros(3), torch.ones(2), "score_1"),
        (torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 1.5]), "label_0"),
        (torch.zeros(2), torch.zeros(2), torch.tensor([1.0, float("nan")]), "label_0"),
        (torch.zeros(0), torch.zeros(0), torch.zeros(0), "score_0"),
    ],
)
def test_bradley_terry_loss_rejects_bad_inputs(s0, s1, label, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry_loss(s0, s1, label)


def test_regression_and_heatmap_losses_match_float64_references():
    pred = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    target = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)
    assert regression_loss(pred, target).item() == pytest.approx((0.25 + 4.0) / 2)
    assert regression_loss(pred, torch.full_like(pred, float("nan"))).item() == 0
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]], dtype=torch.float64)
    target = torch.tensor([[[0.0, 1.0], [0.5, 1.0]]], dtype=torch.float64)
    sig = [[0.5, 1 / (1 + math.exp(-2))], [1 / (1 + math.exp(1)), 1 / (1 + math.exp(-3))]]
    flat = [(s, t) for row_s, row_t in zip(sig, target[0].tolist()) for s, t in zip(row_s, row_t)]
    mse = sum((s - t) ** 2 for s, t in flat) / 4
    bce = -sum(t * math.log(s) + (1 - t) * math.log(1 - s) for s, t in flat) / 4
    assert heatmap_loss(logits, target, "mse").item() == pytest.approx(mse, abs=1e-12)
    assert heatmap_loss(logits, target, "bce").item() == pytest.approx(bce, abs=1e-12)
    with pytest.raises(ValueError, match="target"):
        heatmap_loss(logits, target * 2)
    assert per_prompt_weights(["a", "b", "a"]).tolist() == [0.5, 1.0, 0.5]


def test_fit_logit_scale_recovers_the_bradley_terry_temperature():
    g = torch.Generator().manual_seed(0)
    cos_0, cos_1 = torch.rand(500, generator=g), torch.rand(500, generator=g)
    soft = torch.sigmoid(7.0 * (cos_0 - cos_1))  # labels that a scale of 7 explains exactly
    assert fit_logit_scale(cos_0, cos_1, soft) == pytest.approx(7.0, rel=0.01)
    hard = (torch.rand(500, generator=g) < soft).float()
    assert 4.0 < fit_logit_scale(cos_0, cos_1, hard) < 12.0


# -- the evaluation ----------------------------------------------------------------------------------------------


def test_pairwise_accuracy_with_and_without_ties():
    prob = [0.9, 0.2, 0.5, 0.6, 0.55, 0.3]
    label = [1.0, 1.0, 1.0, 0.5, 0.5, 0.0]
    out = pairwise_accuracy(prob, label)
    # without ties: pairs 0, 1, 2, 5 -> right, wrong, equal scores (1/2), right
    assert out["accuracy_without_ties"] == pytest.approx(2.5 / 4)
    assert out["ties"] == 2 and out["pairs"] == 6
    # with ties at threshold 0: predicted tie only for p = 0.5 (pair 2, labelled 1 -> 1/2); labelled ties get 1/2
    assert out["accuracy_with_ties"] == pytest.approx((1 + 0 + 0.5 + 0.5 + 0.5 + 1) / 6)
    # threshold 0.2: |2p - 1| <= 0.2 for pairs 2, 3, 4 -> 1/2, 1, 1
    assert pairwise_accuracy(prob, label, tie_threshold=0.2)["accuracy_with_ties"] == pytest.approx(4.5 / 6)
    assert out["accuracy_with_ties_calibrated"] >= 4.5 / 6
    assert math.isnan(pairwise_accuracy([0.7], [0.5])["accuracy_without_ties"])
    with pytest.raises(ValueError, match="label_0"):
        pairwise_accuracy([0.5], [0.7])


def test_reliability_and_correlations():
    table = reliability([0.95, 0.95, 0.05, 0.7], [1.0, 0.0, 0.0, 0.5], bins=10)
    assert table["symmetrized_pairs"] == 3
    top = table["bins"][9]
    assert top["count"] == 3 and top["frequency"] == pytest.approx(2 / 3)  # 0.95 (right), 0.95 (wrong), 1-0.05
    assert table["ece"] == pytest.approx(abs(2 / 3 - 0.95))
    c = correlations([1.0, 2.0, 3.0, 10.0], [1.0, 2.0, float("nan"), 3.0])
    assert c["spearman"] == pytest.approx(1.0) and c["count"] == 3
    assert c["pearson"] == pytest.approx(np.corrcoef([1, 2, 10], [1, 2, 3])[0, 1])


# -- training runs and round trips -----------------------------------------------------------------------------


@pytest.fixture
def clip_folder(tmp_path):
    return str(save_clip_folder(tmp_path / "clip"))


@pytest.fixture
def red_pairs(tmp_path):
    """Pick-a-Pic pairs on disk: the reddish image preferred, one pair a tie."""
    pairs = red_over_blue_pairs(24)
    pairs.labels[3] = 0.5
    return str(save_pairs(pairs, tmp_path / "pairs"))


def _config(tmp_path, **values) -> RewardConfig:
    base = dict(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3, seed=0
    )
    return config_from_dict(RewardConfig, base | values)


def _scores(reward, images, prompts):
    with torch.no_grad():
        return reward.score(images, prompts)


def test_cosine_head_full_finetune_learns_and_round_trips(tmp_path, clip_folder, red_pairs):
    config = _config(
        tmp_path, pretrained_model_name_or_path=clip_folder, train_data=red_pairs, eval_data=red_pairs, eval_steps=4
    )
    trainer = RewardTrainer.from_config(config)
    assert trainer.train_data.pairs.has_ties
    text_before = trainer.reward.model.text_projection.weight.detach().clone()
    red, blue = red_blue_images(6, seed=7)
    prompts = ["a red square"] * 6
    before = _scores(trainer.reward, red, prompts).score - _scores(trainer.reward, blue, prompts).score
    history = trainer.train()
    after = _scores(trainer.reward, red, prompts).score - _scores(trainer.reward, blue, prompts).score
    assert after.mean() > before.mean() + 0.5  # the reddish image now scores higher
    assert not torch.equal(text_before, trainer.reward.model.text_projection.weight)  # both towers trained
    assert history[-1]["eval/accuracy_without_ties"] == 1.0
    for loaded in (
        load_reward(LEARNED, pretrained=config.output_dir),
        load_reward("pickscore", pretrained=config.output_dir, processor=config.output_dir),
    ):
        expected = _scores(trainer.reward, red, prompts).score
        assert torch.allclose(_scores(loaded, red, prompts).score, expected, atol=1e-5)
    assert json.loads((tmp_path / "run" / "reward.json").read_text())["heads"]["head"] == "cosine"


def test_lora_on_the_vision_tower_keeps_the_text_tower_and_base_weights(tmp_path, clip_folder, red_pairs):
    config = _config(
        tmp_path,
        pretrained_model_name_or_path=clip_folder,
        train_data=red_pairs,
        use_lora=True,
        train_towers="vision",
        lora_rank=4,
    )
    trainer = RewardTrainer.from_config(config)
    model = trainer.reward.model
    text = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    q_proj = model.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    trained = [n for n, p in trainer.parts.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or n == "logit_scale" for n in trained)
    assert not any("text_model" in n for n in trained)
    red, _ = red_blue_images(4, seed=3)
    trainer.train()
    assert all(torch.equal(v, model.text_model.state_dict()[k]) for k, v in text.items())
    loaded = load_reward("world-clip", pretrained=config.output_dir)  # the merged weights, a plain CLIPModel folder
    assert not torch.allclose(loaded.model.vision_model.encoder.layers[0].self_attn.q_proj.weight, q_proj)
    prompts = ["a red square"] * 4
    assert torch.allclose(_scores(loaded, red, prompts).score, _scores(trainer.reward, red, prompts).score, atol=1e-4)
    assert (tmp_path / "run" / "final" / "reward_lora.safetensors").is_file()  # the engine's adapter export


def test_head_only_mlp_trains_the_head_only_and_loads_as_the_aesthetic_predictor(tmp_path, clip_folder, red_pairs):
    config = _config(
        tmp_path,
        pretrained_model_name_or_path=clip_folder,
        train_data=red_pairs,
        head="mlp",
        head_input="image",
        train_towers="none",
    )
    trainer = RewardTrainer.from_config(config)
    backbone = {k: v.clone() for k, v in trainer.reward.model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.reward.model.state_dict()[k]) for k, v in backbone.items())
    red, blue = red_blue_images(4, seed=5)
    prompts = ["a red square"] * 4
    ours = _scores(trainer.reward, red, prompts).score
    assert (ours > _scores(trainer.reward, blue, prompts).score).all()
    aesthetic = load_reward("aesthetic", pretrained=config.output_dir, clip=config.output_dir)
    assert torch.allclose(_scores(aesthetic, red, prompts).score, ours, atol=1e-5)
    assert "cosine" not in _scores(trainer.reward, red, prompts).aspects  # an image-only head never reads text


def test_a_prompt_reading_mlp_head_loads_as_learned_and_the_clip_loaders_refuse_it(tmp_path, clip_folder, red_pairs):
    """The CLIP loaders (PickScore, the world CLIP, HPSv2) serve the towers' cosine: on a folder whose trained head
    is an MLP they would silently drop it, so they name `reward.json` and the loader that serves it."""
    config = _config(tmp_path, pretrained_model_name_or_path=clip_folder, train_data=red_pairs, head="mlp")
    trainer = RewardTrainer.from_config(config)
    trainer.train()
    red, _ = red_blue_images(4, seed=5)
    prompts = ["a red square"] * 4
    loaded = load_reward("learned", pretrained=config.output_dir)
    assert torch.allclose(_scores(loaded, red, prompts).score, _scores(trainer.reward, red, prompts).score, atol=1e-5)
    for name, options in (("pickscore", {"processor": config.output_dir}), ("world-clip", {}), ("hpsv2.1", {})):
        with pytest.raises(ValueError, match=r"reward\.json describes a learned reward with a 'mlp' head.*learned"):
            load_reward(name, pretrained=config.output_dir, **options)


def test_open_clip_backbone_trains_with_lora_and_loads_as_hpsv2(tmp_path, red_pairs):
    save_hps(tmp_path / "hps")
    config = _config(
        tmp_path,
        pretrained_model_name_or_path=str(tmp_path / "hps" / "HPS_v2.1_compressed.pt"),
        architecture=TINY_OPEN_CLIP,
        checkpoint_key="state_dict",
        image_transform="hpsv2",
        score_scale=1.0,
        use_lora=True,
        lora_rank=4,
        train_data=red_pairs,
    )
    trainer = RewardTrainer.from_config(config)
    trainer.train()
    red, _ = red_blue_images(4, seed=2)
    prompts = ["a red square"] * 4
    hps = load_reward("hpsv2.1", pretrained=config.output_dir, architecture=TINY_OPEN_CLIP)
    ours = _scores(trainer.reward, red, prompts)
    assert torch.allclose(_scores(hps, red, prompts).score, ours.score, atol=1e-5)  # HPSv2 serves the plain cosine
    assert torch.allclose(ours.score, ours.aspects["cosine"])
    reloaded = load_reward(LEARNED, pretrained=config.output_dir)
    assert torch.allclose(_scores(reloaded, red, prompts).score, ours.score, atol=1e-5)


def _scored_dataset(folder, n: int = 12):
    """Labelled images: `alignment` = redness in [0, 1], `aesthetic` on half the rows, an `artifact` map marking the
    left half of the reddish images."""
    (folder / "images").mkdir(parents=True)
    red, blue = red_blue_images(n // 2, seed=11)
    rows = []
    for i, image in enumerate(torch.cat([red, blue])):
        is_red = i < n // 2
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"images/{i}.png")
        heat = np.zeros((32, 32), np.uint8)
        if is_red:
            heat[:, :16] = 255
        Image.fromarray(heat, mode="L").save(folder / f"images/{i}_artifact.png")
        aspects = {"alignment": 1.0 if is_red else 0.0}
        if i % 2:
            aspects["aesthetic"] = 0.5
        rows.append({"caption": "a red square", "image": f"images/{i}.png", "score": float(is_red)})
        rows[-1] |= {"aspects": aspects, "heatmaps": {"artifact": f"images/{i}_artifact.png"}}
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_aspects_with_learned_weights_and_a_heatmap_head_from_labelled_images(tmp_path, clip_folder):
    data = _scored_dataset(tmp_path / "scored")
    config = _config(
        tmp_path,
        pretrained_model_name_or_path=clip_folder,
        train_data=data,
        eval_data=data,
        data_format="scores",
        head="aspects",
        aspects=["alignment", "aesthetic"],
        heatmaps=["artifact"],
        heatmap_loss="bce",
        max_steps=12,
    )
    trainer = RewardTrainer.from_config(config)
    weights_before = trainer.reward.heads.aspect_weights().detach().clone()
    history = trainer.train()
    losses = [h["loss/heatmap/artifact"] for h in history if "loss/heatmap/artifact" in h]
    assert losses[-1] < losses[0]
    assert not torch.allclose(trainer.reward.heads.aspect_weights(), weights_before)  # learned from `score`
    assert history[-1]["eval/aspect/alignment/spearman"] > 0.5
    reloaded = load_reward(LEARNED, pretrained=config.output_dir)
    red, blue = red_blue_images(2, seed=4)
    images = torch.cat([red, blue])
    prompts = ["a red square"] * 4
    ours, theirs = _scores(trainer.reward, images, prompts), _scores(reloaded, images, prompts)
    assert set(theirs.aspects) == {"alignment", "aesthetic", "cosine"}
    assert theirs.heatmaps["artifact"].shape == (4, 32, 32)
    assert 0 <= theirs.heatmaps["artifact"].min() and theirs.heatmaps["artifact"].max() <= 1
    assert torch.allclose(theirs.heatmaps["artifact"], ours.heatmaps["artifact"], atol=1e-5)
    assert torch.allclose(theirs.score, ours.score, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        reloaded.score(torch.rand(1, 3, 32, 40), ["a red square"])


def test_aspect_preferences_with_fixed_weights(tmp_path, clip_folder):
    pairs = red_over_blue_pairs(16)
    folder = save_pairs(pairs, tmp_path / "pairs")
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["aspect_labels"] = {"alignment": 1} if i % 2 else {"alignment": 1, "aesthetic": 0.5}
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(
        tmp_path,
        pretrained_model_name_or_path=clip_folder,
        train_data=str(folder),
        head="aspects",
        aspects=["alignment", "aesthetic"],
        aspect_weights=[0.8, 0.2],
        train_towers="none",
        max_steps=10,
    )
    trainer = RewardTrainer.from_config(config)
    history = trainer.train()
    assert {"loss/aspect/alignment", "loss/aspect/aesthetic", "loss/bradley_terry"} <= set(history[-1])
    data = load_pickapic(folder, aspects=["alignment", "aesthetic"])
    metrics = evaluate_reward(load_reward(LEARNED, pretrained=config.output_dir), data)["metrics"]
    assert metrics["aspect/alignment/accuracy_without_ties"] > 0.9
    assert math.isnan(metrics["aspect/aesthetic/accuracy_without_ties"])  # every aesthetic label is a tie
    assert trainer.reward.heads.aspect_weights().tolist() == pytest.approx([0.8, 0.2])


def test_train_and_eval_data_read_their_own_split_of_a_sharded_dataset(tmp_path, clip_folder):
    root = str(hub_snapshot(tmp_path / "pickapic"))  # data/{split}-NNNNN-of-MMMMM-*.parquet, a tie ending each shard
    trainer = RewardTrainer.from_config(
        _config(tmp_path, pretrained_model_name_or_path=clip_folder, train_data=root, eval_data=root)
    )
    assert trainer.train_data.captions == [f"train {k} {r}" for k in (0, 1) for r in ("0", "1", "tie")]
    assert trainer.eval_data.captions == ["validation 0 0", "validation 0 1", "validation 0 tie"]  # the default
    splits = dict(split="test", eval_split="test_unique")
    trainer = RewardTrainer.from_config(
        _config(tmp_path / "b", pretrained_model_name_or_path=clip_folder, train_data=root, eval_data=root, **splits)
    )
    assert trainer.train_data.captions[0] == "test 0 0" and trainer.eval_data.captions[0] == "test_unique 0 0"


def test_config_errors_name_the_field(tmp_path, clip_folder):
    with pytest.raises(ValueError, match="use_lora"):
        _config(tmp_path, train_towers="none", use_lora=True)
    with pytest.raises(ValueError, match="label_noise"):
        _config(tmp_path, label_noise=0.5)
    with pytest.raises(ValueError, match="unknown RewardConfig key"):
        _config(tmp_path, learning_rat=1.0)
    with pytest.raises(ValueError, match="aspects"):
        RewardTrainer.from_config(
            _config(tmp_path, pretrained_model_name_or_path=clip_folder, head="aspects", train_data="x")
        )


def test_cli_trains_from_yaml_then_benchmarks_the_result(tmp_path, clip_folder, red_pairs, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"pretrained_model_name_or_path: {clip_folder}\ntrain_data: {red_pairs}\n"
        "per_device_train_batch_size: 8\nlearning_rate: 3e-3"
    )
    out = tmp_path / "cli_run"
    assert main(["train", "reward", "--config", str(recipe), "--set", "max_steps=6", f"output_dir={out}"]) == 0
    assert load_config(RewardConfig, out / "config.yaml").learning_rate == 3e-3
    code = main(["bench", "reward", "--model", LEARNED, "--pretrained", str(out), "--pairs", red_pairs])
    assert code == 0
    code = main(
        ["bench", "reward", "--model", "world-clip", "--pretrained", str(out), "--pairs", red_pairs]
        + ["--tie-threshold", "0.1", "--out", str(tmp_path / "eval")]
    )
    assert code == 0
    result = json.loads((tmp_path / "eval" / "reward_eval.json").read_text())
    assert result["metrics"]["ties"] == 1 and result["metrics"]["tie_threshold"] == 0.1
    assert (tmp_path / "eval" / "reliability.svg").read_text().startswith("<svg")
    assert "accuracy without ties" in (tmp_path / "eval" / "report.md").read_text()
    snapshot = str(hub_snapshot(tmp_path / "pickapic"))  # Pick-a-Pic shards: the test split unless told otherwise
    for split, pairs in (([], 3), (["--split", "train"], 6)):
        args = ["--model", LEARNED, "--pretrained", str(out), "--pairs", snapshot, "--out", str(tmp_path / "snap")]
        assert main(["bench", "reward", *args, *split]) == 0
        assert json.loads((tmp_path / "snap" / "reward_eval.json").read_text())["metrics"]["pairs"] == pairs
    assert main(["bench", "reward", "--model", "world-clip", "--pairs", str(tmp_path / "missing")]) == 2
    assert "no dataset" in capsys.readouterr().err


def test_learned_reward_needs_its_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.json"):
        LearnedReward.from_pretrained(str(tmp_path))
