"""Video rewards: frame aggregation of image rewards, and VideoReward loaded from VideoAlign's checkpoint layouts
(full state dict and LoRA) on a tiny Qwen2-VL, checked against the processor's own path."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visalign import load_reward
from visalign.reward_models.video import (
    REWARD_TOKENS,
    VIDEO_PROMPT_TOKENS,
    FrameAggregate,
    VideoReward,
    sample_frames,
)
from visalign.reward_models.vlm import load_qwen_vl
from visalign.testing_vlm import save_tiny_qwen_vl
from visalign.world.rewards import WorldDefectsReward, WorldVerifierReward

PROMPTS = ["a red square", "two blue circles"]


@pytest.fixture
def video(generator):
    return torch.rand(2, 5, 3, 32, 32, generator=generator)


@pytest.mark.parametrize("reduce", ["mean", "min", "median"])
@pytest.mark.parametrize("reward", [WorldDefectsReward(), WorldVerifierReward()])
def test_identical_frames_score_as_the_frame(reward, reduce, pixels):
    still = pixels[:, None].expand(-1, 6, -1, -1, -1)
    out = FrameAggregate(reward, num_frames=4, reduce=reduce).score(still, PROMPTS)
    frame = reward.score(pixels, PROMPTS)
    torch.testing.assert_close(out.score, frame.score)
    for name, value in frame.aspects.items():
        torch.testing.assert_close(out.aspects[name], value)
    for name, value in frame.heatmaps.items():
        torch.testing.assert_close(out.heatmaps[name], value)
    torch.testing.assert_close(out.aspects["temporal_consistency"], torch.ones(2))


def test_frame_aggregate_reduces_sampled_frames(video):
    reward = WorldDefectsReward()
    frames = video[:, [0, 2, 4]]
    per_frame = reward.score(frames.flatten(0, 1), [p for p in PROMPTS for _ in range(3)]).score.view(2, 3)
    for reduce, expected in [
        ("mean", per_frame.mean(1)),
        ("min", per_frame.min(1).values),
        ("median", per_frame.median(1).values),
    ]:
        out = FrameAggregate(reward, num_frames=3, reduce=reduce).score(video, PROMPTS)
        torch.testing.assert_close(out.score, expected)
        assert out.extras["frame_indices"].tolist() == [0, 2, 4]
    assert out.heatmaps["defects"].shape == (2, 32, 32)
    consistency = out.aspects["temporal_consistency"]
    assert ((consistency > 0) & (consistency < 1)).all()
    weighted = FrameAggregate(reward, num_frames=3, consistency_weight=0.5).score(video, PROMPTS)
    torch.testing.assert_close(weighted.score, per_frame.mean(1) + 0.5 * consistency)
    x = video.clone().requires_grad_(True)
    FrameAggregate(reward, num_frames=None, reduce="min").score(x, PROMPTS).score.sum().backward()
    assert x.grad.abs().sum() > 0
    black = torch.zeros(1, 3, 3, 8, 8)  # zero features: consistent, not NaN
    assert (
        FrameAggregate(reward, num_frames=None).score(black, ["a red square"]).aspects["temporal_consistency"].item()
        == 1.0
    )


def test_sample_frames():
    assert sample_frames(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_frames(10, 1).tolist() == [0] and sample_frames(3, None).tolist() == [0, 1, 2]
    for bad in (0, 11, 2.0):
        with pytest.raises(ValueError, match="`num_frames`"):
            sample_frames(10, bad)


def test_frame_aggregate_bad_inputs_and_registry(pixels, video):
    aggregate = FrameAggregate(WorldDefectsReward(), num_frames=8)
    with pytest.raises(ValueError, match="`pixels`"):
        aggregate.score(pixels, PROMPTS)  # images, not videos
    with pytest.raises(ValueError, match="`num_frames`"):
        aggregate.score(video, PROMPTS)  # 8 frames asked of 5
    with pytest.raises(ValueError, match="`reduce`"):
        FrameAggregate(WorldDefectsReward(), reduce="max")
    with pytest.raises(ValueError, match="`reward`"):
        FrameAggregate(aggregate)
    with pytest.raises(ValueError, match="`reward`"):
        load_reward("frame-aggregate")
    loaded = load_reward("frame-aggregate", reward="world-defects", num_frames=2, reduce="median")
    assert isinstance(loaded, FrameAggregate) and loaded.score(video, PROMPTS).score.shape == (2,)


# ---------------------------------------------------------------- VideoReward on a tiny Qwen2-VL


NORM = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 1.0}


def videoalign_name(key):
    """`VideoReward` key -> the reference `Qwen2VLRewardModelBT` key (transformers 4 names)."""
    if key == "head.weight":
        return "rm_head.weight"
    key = key.removeprefix("model.")
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key


def source_reward(base, output_dim=1, reward_tokens=True, seed=3):
    """A random VideoReward on the tiny base: reward tokens added, weights perturbed, a random head."""
    model, processor = load_qwen_vl(base, None, what="test")
    if reward_tokens:
        processor.tokenizer.add_tokens(list(REWARD_TOKENS), special_tokens=True)
        model.resize_token_embeddings(len(processor.tokenizer))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    head = nn.Linear(model.config.text_config.hidden_size, output_dim, bias=False)
    std = tuple(NORM[f"{s}_std"] for s in ("VQ", "MQ", "TA"))
    mean = tuple(NORM[f"{s}_mean"] for s in ("VQ", "MQ", "TA"))
    return VideoReward(
        model, processor, head, reward_tokens=reward_tokens, mean=mean, std=std, num_frames=4, max_pixels=1024
    ).eval()


def write_config(folder, base, output_dim=1, special=True, lora=None):
    config = {
        "model_config": {
            "model_name_or_path": str(base),
            "output_dim": output_dim,
            "use_special_tokens": special,
            "reward_token": "special" if special else "last",
        },
        "data_config": {"num_frames": 4, "max_frame_pixels": 1024, "fps": 2.0},
        "peft_lora_config": lora or {"lora_enable": False},
        "inference_config": NORM,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_qwen_vl(tmp_path_factory.mktemp("base"), "qwen2_vl", corpus=[VIDEO_PROMPT_TOKENS])


@pytest.fixture(scope="module")
def full_checkpoint(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoreward")
    write_config(folder, base)
    source = source_reward(base)
    for step, reward in [(5, source_reward(base, seed=9)), (12, source)]:
        (folder / f"checkpoint-{step}").mkdir()
        state = {videoalign_name(k): v for k, v in reward.state_dict().items()}
        torch.save(state, folder / f"checkpoint-{step}" / "model.pth")
    return folder, source


def reference_raw(reward, videos, prompts):
    """Raw rewards through the processor's own path and the model's full forward, not through VideoReward."""
    processor, model = reward.processor, reward.model
    texts = [
        processor.apply_chat_template(reward.conversation(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    frames = videos[:, sample_frames(videos.shape[1], reward.num_frames)]
    batch = processor(
        text=texts,
        videos=list(frames),
        videos_kwargs={"do_rescale": False, "do_sample_frames": False},
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    states = hidden[torch.isin(batch["input_ids"], torch.tensor(ids))].view(len(prompts), 3, -1)
    return reward.head(states)[..., 0]


def test_videoreward_loads_videoalign_full_checkpoint(full_checkpoint, video):
    folder, source = full_checkpoint
    reward = load_reward("videoreward", str(folder))
    assert isinstance(reward, VideoReward) and not reward.training and reward.num_frames == 4
    for (name, ours), theirs in zip(reward.state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(ours, theirs, msg=name)
    with torch.no_grad():
        out = reward.score(video, PROMPTS)
        raw = reference_raw(reward, video, PROMPTS)
    torch.testing.assert_close(out.extras["raw"], raw, atol=1e-5, rtol=1e-4)
    normalized = (raw - torch.tensor([0.5, -1.0, 0.0])) / torch.tensor([2.0, 0.5, 1.0])
    for k, name in enumerate(["visual_quality", "motion_quality", "text_alignment"]):
        torch.testing.assert_close(out.aspects[name], normalized[:, k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.score, normalized.sum(1), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        single = reward.score(video[1:], PROMPTS[1:])
    torch.testing.assert_close(single.score, out.score[1:], atol=1e-5, rtol=1e-4)
    older = VideoReward.from_pretrained(str(folder), checkpoint_step=5)
    assert not torch.equal(older.head.weight, reward.head.weight)


def test_videoreward_is_differentiable(full_checkpoint, video):
    reward = VideoReward.from_pretrained(str(full_checkpoint[0]))
    x = video[:1].clone().requires_grad_(True)
    reward.score(x, PROMPTS[:1]).score.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in reward.parameters())


@pytest.mark.parametrize("rslora", [False, True])
def test_videoreward_merges_lora(base, tmp_path, rslora):
    """VideoAlign's LoRA layout: PEFT-named adapters merged into the base weights, trained parts loaded in full."""
    folder = tmp_path / "lora"
    write_config(folder, base, lora={"lora_enable": True, "lora_r": 2, "lora_alpha": 8})
    checkpoint = folder / "checkpoint-3"
    checkpoint.mkdir()
    if rslora:
        (checkpoint / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8, "use_rslora": True}))
    base_model, processor = load_qwen_vl(base, None, what="test")
    vocab = len(processor.tokenizer) + len(REWARD_TOKENS)
    torch.manual_seed(0)
    trained = {
        "rm_head.weight": torch.randn(1, 32),
        "visual.merger.mlp.0.weight": torch.randn(64, 64),
        "model.embed_tokens.weight": torch.randn(vocab, 32),
        "lm_head.weight": torch.randn(vocab, 32),
    }
    torch.save({f"base_model.model.{k}": v for k, v in trained.items()}, checkpoint / "non_lora_state_dict.pth")
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    target = "base_model.model.model.layers.1.self_attn.q_proj"
    save_file({f"{target}.lora_A.weight": a, f"{target}.lora_B.weight": b}, checkpoint / "adapter_model.safetensors")

    reward = VideoReward.from_pretrained(str(folder))
    model = reward.model.model
    torch.testing.assert_close(reward.head.weight, trained["rm_head.weight"])
    torch.testing.assert_close(model.visual.merger.mlp[0].weight, trained["visual.merger.mlp.0.weight"])
    torch.testing.assert_close(model.language_model.embed_tokens.weight, trained["model.embed_tokens.weight"])
    scaling = 8 / (2**0.5 if rslora else 2)
    q_proj = base_model.model.language_model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(model.language_model.layers[1].self_attn.q_proj.weight, q_proj + scaling * b @ a)
    k_proj = base_model.model.language_model.layers[1].self_attn.k_proj.weight
    torch.testing.assert_close(model.language_model.layers[1].self_attn.k_proj.weight, k_proj)

    stray = {
        f"{target}.lora_A.weight": a,
        f"{target}.lora_B.weight": b,
        "base_model.model.nowhere.lora_A.weight": a.clone(),
    }
    save_file(stray, checkpoint / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="nowhere"):
        VideoReward.from_pretrained(str(folder))
    torch.save(
        {"base_model.model.visual.merger.mlp.0.weight": trained["visual.merger.mlp.0.weight"]},
        checkpoint / "non_lora_state_dict.pth",
    )
    with pytest.raises(ValueError, match="rm_head"):
        VideoReward.from_pretrained(str(folder))


def test_videoreward_last_token_head(base, tmp_path, video):
    folder = tmp_path / "last"
    write_config(folder, base, output_dim=3, special=False)
    source = source_reward(base, output_dim=3, reward_tokens=False)
    (folder / "checkpoint-1").mkdir()
    torch.save({videoalign_name(k): v for k, v in source.state_dict().items()}, folder / "checkpoint-1" / "model.pth")
    reward = VideoReward.from_pretrained(str(folder))
    assert reward.reward_tokens is False and "<|VQ_reward|>" not in reward.prompt_template
    with torch.no_grad():
        out = reward.score(video, PROMPTS)
        single = reward.score(video[:1], PROMPTS[:1])  # right padding: the last real token, not a pad
    assert out.extras["raw"].shape == (2, 3)
    torch.testing.assert_close(single.extras["raw"], out.extras["raw"][:1], atol=1e-5, rtol=1e-4)


def test_videoreward_loading_errors(base, full_checkpoint, tmp_path):
    folder, _ = full_checkpoint
    with pytest.raises(FileNotFoundError, match="offline|Hub"):
        VideoReward.from_pretrained("some-org/not-cached-videoreward")
    with pytest.raises(ValueError, match="`checkpoint_step`"):
        VideoReward.from_pretrained(str(folder), checkpoint_step=7)
    empty = tmp_path / "empty"
    write_config(empty, base)
    with pytest.raises(FileNotFoundError, match="checkpoint-<step>"):
        VideoReward.from_pretrained(str(empty))
    (empty / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pth"):
        VideoReward.from_pretrained(str(empty))
    torch.save({"rm_head.weight": torch.zeros(1, 32)}, empty / "checkpoint-1" / "model.pth")
    with pytest.raises(ValueError, match="missing"):
        VideoReward.from_pretrained(str(empty))
