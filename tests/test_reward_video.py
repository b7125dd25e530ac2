"""Video rewards: frame aggregation of image rewards, and VideoReward: VideoAlign's official prompt and frame
sampling, and every released checkpoint format built from a tiny Qwen2-VL wrapped by peft as the official trainer
wraps it, checked against the processor's own path and the unmerged PEFT model."""

import copy
import hashlib
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2VLForConditionalGeneration

from visalign import load_reward
from visalign.reward_models.video import FrameAggregate, VideoReward, sample_frames, videoalign_frame_count
from visalign.reward_models.videoalign import REWARD_TOKENS, VIDEOALIGN_PROMPTS, VISALIGN_PROMPT_TOKENS
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


# ---------------------------------------------------------------- VideoReward: official prompt and frame sampling

# sha256 of prompt_template.py's DETAILED_PROMPT_WITH_SPECIAL_TOKEN and DETAILED_PROMPT (KwaiVGI/VideoAlign 219ab9d)
OFFICIAL_SHA256 = {
    "detailed_special": "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700",
    "detailed": "146adc781613460cfea4101d4986197dbddba11765bb72da4626175ad1a0c353",
}


def test_videoalign_prompts_are_the_official_text():
    for name, digest in OFFICIAL_SHA256.items():
        assert hashlib.sha256(VIDEOALIGN_PROMPTS[name].encode()).hexdigest() == digest, name
    special = VIDEOALIGN_PROMPTS["detailed_special"]
    assert special.startswith("\nYou are tasked with evaluating a generated video based on three distinct criteria")
    assert "**Visual Quality:**  \nEvaluate the overall visual quality" in special  # trailing spaces kept
    assert special.endswith(
        "Textual prompt - {text_prompt}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
    )
    assert VIDEOALIGN_PROMPTS["none"] == "{text_prompt}"


def test_videoalign_frame_count():
    assert videoalign_frame_count(81, video_fps=16) == 10  # a 5 s clip at 2 fps
    assert videoalign_frame_count(161, video_fps=16) == 20
    assert videoalign_frame_count(5, video_fps=16) == 4  # at least 4
    assert videoalign_frame_count(3, video_fps=16) == 2  # at most the video's even count
    assert videoalign_frame_count(4000, video_fps=1) == 768
    assert videoalign_frame_count(9, video_fps=4) == 4  # 4.5 -> round(2.25) * 2
    assert videoalign_frame_count(81, video_fps=16, num_frames=7) == 8  # round(3.5) * 2
    assert videoalign_frame_count(81, video_fps=16, num_frames=5) == 4  # round(2.5) * 2: halves to even
    assert videoalign_frame_count(5, video_fps=16, num_frames=9) == 5  # capped at the video
    with pytest.raises(ValueError, match="at least 2 frames"):
        videoalign_frame_count(1, video_fps=16)


# ---------------------------------------------------------------- VideoReward on a tiny Qwen2-VL


NORM = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 1.0}
TINY = {"min_pixels": 256}  # VideoAlign's floor (128 merged tokens) would upscale 32x32 frames to 96x96


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


def official_name(key):
    """A transformers 5 key of the (PEFT-wrapped) reward model -> the transformers 4 key the official code saves."""
    return key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


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
        model, processor, head, reward_tokens=reward_tokens, mean=mean, std=std, num_frames=4, max_pixels=1024, **TINY
    ).eval()


def write_config(folder, base, output_dim=1, special=True, lora=None, num_frames=4):
    config = {
        "model_config": {
            "model_name_or_path": str(base),
            "output_dim": output_dim,
            "use_special_tokens": special,
            "reward_token": "special" if special else "last",
        },
        "data_config": {
            "num_frames": num_frames,
            "max_frame_pixels": 1024,
            "fps": 2.0,
            "prompt_template_type": "detailed_special" if special else "detailed",
            "sample_type": "uniform",
        },
        "peft_lora_config": lora or {"lora_enable": False},
        "inference_config": NORM,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_qwen_vl(
        tmp_path_factory.mktemp("base"), "qwen2_vl", corpus=[VIDEOALIGN_PROMPTS["detailed_special"]]
    )


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


def reference_hidden(processor, model, texts, frames):
    """Last hidden states `[B, L, D]` and input ids through the processor's own path and the model's full forward."""
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]}] for t in texts]
    batch = processor(
        text=[processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats],
        videos=list(frames),
        videos_kwargs={"do_rescale": False, "do_sample_frames": False},
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    return model(**batch, output_hidden_states=True).hidden_states[-1], batch["input_ids"]


def at_reward_tokens(processor, hidden, ids):
    """The states at the three reward tokens, `[B, 3, D]` (VQ, MQ, TA order)."""
    token_ids = processor.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
    return hidden[torch.isin(ids, torch.tensor(token_ids))].view(len(ids), 3, -1)


def reference_raw(reward, videos, prompts, frames=(0, 1, 3, 4)):
    """Raw rewards of a one-output head through the processor's own path, not through VideoReward."""
    texts = [VIDEOALIGN_PROMPTS["detailed_special"].format(text_prompt=p) for p in prompts]  # official str.format
    hidden, ids = reference_hidden(reward.processor, reward.model, texts, videos[:, list(frames)])
    return reward.head(at_reward_tokens(reward.processor, hidden, ids))[..., 0]


def test_videoreward_defaults_are_official(base, video):
    reward = source_reward(base)
    assert reward.prompt_template == VIDEOALIGN_PROMPTS["detailed_special"] and reward.frame_sampling == "official"
    question = reward.conversation("a {red} square")[0]["content"][1]["text"]
    assert question == VIDEOALIGN_PROMPTS["detailed_special"].replace("{text_prompt}", "a {red} square")
    assert reward.vision.max_pixels == 1024 and reward.vision.min_pixels == 256
    model, processor, head = reward.model, reward.processor, reward.head
    plain = VideoReward(model, processor, head, max_pixels=1024)
    assert plain.vision.min_pixels == 128 * 8**2  # VIDEO_MIN_PIXELS = 128 * 28^2 at this model's 8-pixel factor
    assert plain.frame_indices(81).tolist() == torch.linspace(0, 80, 10).round().long().tolist()  # 16 fps, 5 s
    assert VideoReward(model, processor, head, frame_sampling="all").frame_indices(81).tolist() == list(range(81))
    assert VideoReward(model, processor, head, prompt_template="visalign").prompt_template == VISALIGN_PROMPT_TOKENS
    with pytest.raises(ValueError, match="text_prompt"):
        VideoReward(model, processor, head, prompt_template="Rate {prompt}. <|VQ_reward|><|MQ_reward|><|TA_reward|>")
    with pytest.raises(ValueError, match="`frame_sampling`"):
        VideoReward(model, processor, head, frame_sampling="uniform")
    with pytest.raises(ValueError, match="`video_fps`"):
        VideoReward(model, processor, head, video_fps=0)
    with pytest.raises(ValueError, match="`min_pixels`"):
        VideoReward(model, processor, head, min_pixels=10)


TRAINED = ("visual", "rm_head", "embed_tokens")  # the parts the official training updates besides LoRA


class RewardModelBT(Qwen2VLForConditionalGeneration):
    """The parameters of VideoAlign's `Qwen2VLRewardModelBT` (trainer.py): the VLM and a bias-free `rm_head`."""

    def __init__(self, config, output_dim=3):
        super().__init__(config)
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)


def official_peft_model(base, rslora):
    """The reward model wrapped as `create_model_and_processor` (train_reward.py) does with train.sh's settings:
    reward tokens added, LoRA on every Linear / Embedding whose name holds none of lm_head, rm_head, embed_tokens,
    visual (`find_target_linear_names`), then random weights as after training."""
    vlm, processor = load_qwen_vl(base, None, what="test")
    processor.tokenizer.add_tokens(list(REWARD_TOKENS), special_tokens=True)
    vlm.resize_token_embeddings(len(processor.tokenizer))
    model = RewardModelBT(vlm.config).eval()
    assert model.load_state_dict(vlm.state_dict(), strict=False).missing_keys == ["rm_head.weight"]
    exclude = ("lm_head", "rm_head", "embed_tokens", "visual")
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and not any(x in name for x in exclude)
    ]
    config = LoraConfig(
        target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM", use_rslora=rslora,
        bias="none", modules_to_save=None,
    )  # fmt: skip
    torch.manual_seed(11)
    with torch.no_grad():  # what training changes outside LoRA: vision tower, merger, head, embeddings
        for name, p in model.named_parameters():
            if any(x in name for x in TRAINED):
                p.add_(0.02 * torch.randn_like(p))
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    return peft_model, processor


@pytest.mark.parametrize("rslora", [False, True])
def test_videoreward_loads_every_released_format(base, tmp_path, generator, rslora):
    """The full PEFT `model.pth`, the adapter + `non_lora_state_dict.pth` pair and merged weights give equal scores,
    equal to the unmerged PEFT model's on the officially sampled frames."""
    peft_model, processor = official_peft_model(base, rslora)
    lora = {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": rslora}
    video = torch.rand(2, 9, 3, 32, 32, generator=generator)
    folders = {name: tmp_path / name for name in ("full", "adapter", "merged")}
    for folder in folders.values():
        write_config(folder, base, output_dim=3, lora=lora, num_frames=None)
        (folder / "checkpoint-7").mkdir()
    full = {official_name(k): v for k, v in peft_model.state_dict().items()}
    assert "base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight" in full
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight" in full
    torch.save(full, folders["full"] / "checkpoint-7" / "model.pth")
    peft_model.save_pretrained(tmp_path / "saved")
    adapter = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    adapter = {official_name(k): v for k, v in adapter.items()}
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in adapter
    save_file(adapter, folders["adapter"] / "checkpoint-7" / "adapter_model.safetensors")
    for name, p in peft_model.named_parameters():  # as train_reward.py sets them after wrapping
        p.requires_grad_("lora_" not in name and any(x in name for x in TRAINED))
    non_lora = {official_name(k): v.detach() for k, v in peft_model.named_parameters() if v.requires_grad}
    torch.save(non_lora, folders["adapter"] / "checkpoint-7" / "non_lora_state_dict.pth")
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    torch.save({official_name(k): v for k, v in merged.items()}, folders["merged"] / "checkpoint-7" / "model.pth")

    with torch.no_grad():
        texts = [VIDEOALIGN_PROMPTS["detailed_special"].format(text_prompt=p) for p in PROMPTS]
        inner = peft_model.base_model.model  # LoRA layers active, unmerged
        hidden, ids = reference_hidden(processor, inner, texts, video[:, [0, 3, 5, 8]])  # 9 frames at 4 fps -> 4
        expected = inner.rm_head(at_reward_tokens(processor, hidden, ids)).diagonal(dim1=1, dim2=2)
        for name, folder in folders.items():
            reward = load_reward("videoreward", str(folder), video_fps=4.0, **TINY)
            out = reward.score(video, PROMPTS)
            assert out.extras["frame_indices"].tolist() == [0, 3, 5, 8]
            torch.testing.assert_close(out.extras["raw"], expected, atol=1e-5, rtol=1e-4, msg=name)
    normalized = (expected - torch.tensor([0.5, -1.0, 0.0])) / torch.tensor([2.0, 0.5, 1.0])
    torch.testing.assert_close(out.score, normalized.sum(1), atol=1e-5, rtol=1e-4)


def test_videoreward_loads_videoalign_full_checkpoint(full_checkpoint, video):
    folder, source = full_checkpoint
    reward = load_reward("videoreward", str(folder), **TINY)
    assert isinstance(reward, VideoReward) and not reward.training and reward.num_frames == 4
    assert reward.vision.max_pixels == 1024 and reward.prompt_template == VIDEOALIGN_PROMPTS["detailed_special"]
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
    older = VideoReward.from_pretrained(str(folder), checkpoint_step=5, **TINY)
    assert not torch.equal(older.head.weight, reward.head.weight)


def test_videoreward_is_differentiable(full_checkpoint, video):
    reward = VideoReward.from_pretrained(str(full_checkpoint[0]), **TINY)
    x = video[:1].clone().requires_grad_(True)
    reward.score(x, PROMPTS[:1]).score.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in reward.parameters())


@pytest.mark.parametrize("rslora", [False, True])
def test_videoreward_merges_lora(base, tmp_path, rslora):
    """VideoAlign's LoRA layout: PEFT-named adapters merged into the base weights, trained parts loaded in full."""
    folder = tmp_path / "lora"
    write_config(folder, base, lora={"lora_enable": True, "lora_r": 2, "lora_alpha": 8, "use_rslora": rslora})
    checkpoint = folder / "checkpoint-3"
    checkpoint.mkdir()
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

    reward = VideoReward.from_pretrained(str(folder), **TINY)
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
        VideoReward.from_pretrained(str(folder), **TINY)
    save_file(
        {f"{target}.lora_A.weight": a[:1], f"{target}.lora_B.weight": b[:, :1].contiguous()},
        checkpoint / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match=r"r=2"):  # the rank disagrees with the config's
        VideoReward.from_pretrained(str(folder), **TINY)
    torch.save(
        {"base_model.model.visual.merger.mlp.0.weight": trained["visual.merger.mlp.0.weight"]},
        checkpoint / "non_lora_state_dict.pth",
    )
    save_file({f"{target}.lora_A.weight": a, f"{target}.lora_B.weight": b}, checkpoint / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="rm_head"):
        VideoReward.from_pretrained(str(folder), **TINY)
    write_config(folder, base)  # LoRA weights, but no LoRA settings anywhere
    with pytest.raises(ValueError, match="rank and alpha are unknown"):
        VideoReward.from_pretrained(str(folder), **TINY)


def test_videoreward_last_token_head(base, tmp_path, video):
    folder = tmp_path / "last"
    write_config(folder, base, output_dim=3, special=False)
    source = source_reward(base, output_dim=3, reward_tokens=False)
    (folder / "checkpoint-1").mkdir()
    torch.save({videoalign_name(k): v for k, v in source.state_dict().items()}, folder / "checkpoint-1" / "model.pth")
    reward = VideoReward.from_pretrained(str(folder), **TINY)
    assert reward.reward_tokens is False and reward.prompt_template == VIDEOALIGN_PROMPTS["detailed"]
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
        VideoReward.from_pretrained(str(folder), checkpoint_step=7, **TINY)
    empty = tmp_path / "empty"
    write_config(empty, base)
    with pytest.raises(FileNotFoundError, match="checkpoint-<step>"):
        VideoReward.from_pretrained(str(empty), **TINY)
    (empty / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pth"):
        VideoReward.from_pretrained(str(empty), **TINY)
    torch.save({"rm_head.weight": torch.zeros(1, 32)}, empty / "checkpoint-1" / "model.pth")
    with pytest.raises(ValueError, match="missing"):
        VideoReward.from_pretrained(str(empty), **TINY)
