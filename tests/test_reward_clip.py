"""`CLIPScorer` built in memory (the path `world-clip` takes), PickScore / CLIPScore loading and its failures."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from reward_helpers import PROMPTS, TINY_OPEN_CLIP, save_clip_folder, tiny_clip
from safetensors.torch import load_file, save_file

from visalign import load_reward
from visalign.reward_models.clip import CLIPScore, CLIPScorer, PickScore, build_open_clip
from visalign.reward_models.preprocess import ImageTransform
from visalign.testing import clip_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_clip_folder(tmp_path_factory.mktemp("pickscore"))


def edited_copy(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of the CLIP folder whose safetensors state dict went through `edit(state) -> state`."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    save_file(edit(load_file(copy / "model.safetensors")), copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_in_memory_scorer_for_small_images() -> None:
    """A 32 x 32 world scored at its own resolution: the transform only normalizes; score = s * cos."""
    model = tiny_clip(image_size=32)
    scorer = CLIPScorer(model, clip_tokenizer(), transform=ImageTransform(32), scale=10.0, name="world-clip")
    pixels = torch.rand(3, 3, 32, 32)
    out = scorer(pixels, PROMPTS[:3])
    assert scorer.name == "world-clip" and out.score.shape == (3,)
    torch.testing.assert_close(out.score, 10.0 * out.aspects["cosine"])
    learned = CLIPScorer(model, clip_tokenizer())(pixels, PROMPTS[:3])
    torch.testing.assert_close(learned.score, model.logit_scale.exp() * learned.aspects["cosine"])


def test_generic_loader_for_a_small_world_clip(folder: Path) -> None:
    """How a world's CLIP folder registers: `("...clip:CLIPScorer", {"reward_name": ..., "image_size": ...})`."""
    target = "visalign.reward_models.clip:CLIPScorer"
    reward = load_reward(target, str(folder), reward_name="world-clip", image_size=32)
    assert isinstance(reward, CLIPScorer) and reward.name == "world-clip" and reward.transform.size == 32
    assert reward(torch.rand(2, 3, 32, 32), PROMPTS[:2]).score.shape == (2,)
    with pytest.raises(ValueError, match="`pretrained`"):
        CLIPScorer.from_pretrained()


def test_default_transform_follows_the_backend() -> None:
    hf = CLIPScorer(tiny_clip(image_size=32), clip_tokenizer())
    oc = CLIPScorer(open_clip.CLIP(**TINY_OPEN_CLIP), open_clip.SimpleTokenizer())
    assert hf.transform == ImageTransform(32, "transformers") and oc.transform == ImageTransform(32, "torchvision")


def test_constructor_errors() -> None:
    model = tiny_clip()
    with pytest.raises(ValueError, match="`model` must be"):
        CLIPScorer(torch.nn.Linear(2, 2), clip_tokenizer())
    with pytest.raises(ValueError, match="`tokenizer` must be a transformers tokenizer"):
        CLIPScorer(model, open_clip.SimpleTokenizer())
    with pytest.raises(ValueError, match="`scale`"):
        CLIPScorer(model, clip_tokenizer(), scale=0.0)


def test_clipscore_clips_at_zero_and_prefixes_prompts() -> None:
    model, tokenizer = tiny_clip(), clip_tokenizer()
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = CLIPScore(model, tokenizer, w=2.5)(pixels, PROMPTS)
    torch.testing.assert_close(out.score, 2.5 * out.aspects["cosine"].clamp_min(0))
    prefixed = CLIPScore(model, tokenizer, prefix="A photo depicts ")(pixels, PROMPTS).aspects["cosine"]
    manual = CLIPScore(model, tokenizer)(pixels, ["A photo depicts " + p for p in PROMPTS]).aspects["cosine"]
    torch.testing.assert_close(prefixed, manual)


def test_score_pixel_values_checks_its_input() -> None:
    scorer = CLIPScorer(tiny_clip(), clip_tokenizer())
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \[B, 3, 32, 32\]"):
        scorer.score_pixel_values(torch.rand(1, 3, 224, 224), ["a"])
    with pytest.raises(ValueError, match="`prompts` has 2 items"):
        scorer.score_pixel_values(torch.rand(1, 3, 32, 32), ["a", "b"])


def test_pickscore_accepts_legacy_position_ids(folder: Path, tmp_path: Path) -> None:
    """PickScore_v1's safetensors were written by transformers 4.2x with `position_ids` buffers in them."""

    def add_buffers(state: dict) -> dict:
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        return state

    PickScore.from_pretrained(str(edited_copy(folder, tmp_path, add_buffers)), processor=str(folder))


def test_pickscore_keeps_logit_scale_float32(folder: Path) -> None:
    full = PickScore.from_pretrained(str(folder), processor=str(folder))
    half = PickScore.from_pretrained(str(folder), processor=str(folder), dtype=torch.bfloat16)
    assert half.model.logit_scale.dtype == torch.float32 and torch.equal(
        half.model.logit_scale, full.model.logit_scale
    )
    assert half.model.text_projection.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_weights_are_named(folder: Path, tmp_path: Path) -> None:
    def edit(state: dict) -> dict:
        del state["visual_projection.weight"]
        state["text_model.extra.weight"] = torch.zeros(1)
        return state

    with pytest.raises(
        ValueError, match=r"missing \(1\): visual_projection.weight; unexpected \(1\): text_model.extra"
    ):
        PickScore.from_pretrained(str(edited_copy(folder, tmp_path, edit)), processor=str(folder))


def test_corrupt_weights(folder: Path, tmp_path: Path) -> None:
    copy = edited_copy(folder, tmp_path, lambda s: s)
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="PickScore: could not load a CLIPModel from"):
        PickScore.from_pretrained(str(copy), processor=str(folder))


def test_missing_tokenizer_files(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files \(tokenizer.json or vocab.json \+ merges.txt\)"):
        PickScore.from_pretrained(str(folder), processor=str(tmp_path))


def test_offline_hub_ids_name_the_files_and_repos(folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"yuvalkirstain/PickScore_v1.*offline mode is on"):
        PickScore.from_pretrained()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        PickScore.from_pretrained(str(folder))
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-base-patch32"):
        CLIPScore.from_pretrained()


def test_clipscore_open_clip_needs_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="`pretrained`"):
        CLIPScore.from_pretrained(architecture="ViT-B-32")
    with pytest.raises(ValueError, match="`architecture` 'ViT-Nope' is not an open_clip model name"):
        build_open_clip("ViT-Nope")
