"""Flow-GRPO's OCR reward: the target and the formula on injected recognitions, the uint8 images the engine sees,
and a tiny random TrOCR in the official layout loaded through the registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GotOcr2Config,
    GotOcr2ForConditionalGeneration,
    GotOcr2ImageProcessor,
    GotOcr2Processor,
    Qwen2Tokenizer,
    RobertaTokenizer,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)

from visalign.reward_models.ocr import OCRReward, levenshtein, ocr_reward, ocr_target
from visalign.rewards import load_reward
from visalign.testing import _bytes_to_unicode


def test_target_is_the_first_quoted_text():
    assert ocr_target('A neon sign that says "Open 24 Hours" above a "diner"') == "Open 24 Hours"
    with pytest.raises(ValueError, match="prompt 'a red bus' has no text in double quotes"):
        ocr_target("a red bus")
    with pytest.raises(ValueError, match="has no text in double quotes"):
        ocr_target('a sign with one " quote')
    with pytest.raises(ValueError, match="quotes an empty text"):
        ocr_target('a blank sign " "')


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("same", "same") == 0


def test_formula_containment_edit_distance_and_empty_text():
    assert ocr_reward("WELCOME to the Spring Collection 2024 sale!", "Spring Collection 2024") == 1.0  # contained
    assert ocr_reward("springcolection2024", "Spring Collection 2024") == pytest.approx(1 - 1 / 20)  # one deletion
    assert ocr_reward("Forevr Yuors", "Forever Yours") == pytest.approx(1 - 3 / 12)
    assert ocr_reward("", "Forever Yours") == 0.0  # nothing read: distance = length
    assert ocr_reward("a completely different and much longer text", "Hi") == 0.0  # distance clipped at length
    assert ocr_reward("h i", "HI") == 1.0  # spaces removed, case ignored
    assert ocr_reward("hi.", "hi!") == pytest.approx(1 - 1 / 3)  # punctuation kept


class Injected:
    """An OCR engine whose readings are given; records the images it was shown."""

    name = "injected"

    def __init__(self, texts):
        self.texts, self.seen = texts, []

    def __call__(self, images):
        self.seen.append(images)
        return self.texts[: len(images)]


def test_reward_is_batched_and_sees_uint8_images():
    prompts = ['a shop sign reading "Fresh Bread"', 'a poster: "Step Goal Achieved"', 'a mug with "Forever Yours"']
    engine = Injected(["FRESH BREAD daily", "Step Gaol Achieved", ""])
    pixels = torch.rand(3, 3, 20, 24)
    out = OCRReward(engine).score(pixels, prompts)
    assert out.score.tolist() == pytest.approx([1.0, 1 - 2 / 16, 0.0])
    assert out.extras == {"recognized": engine.texts, "engine": "injected"}
    (images,) = engine.seen
    assert len(images) == 3 and images[0].dtype == np.uint8 and images[0].shape == (20, 24, 3)
    expected = (pixels[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(images[1], expected)


def test_a_prompt_without_quotes_fails_before_the_engine_runs():
    engine = Injected(["x", "y"])
    with pytest.raises(ValueError, match="prompt 'a cat on a mat' has no text in double quotes"):
        OCRReward(engine).score(torch.rand(2, 3, 8, 8), ['a "cat"', "a cat on a mat"])
    assert engine.seen == []


def save_trocr(folder: Path, seed: int = 0) -> Path:
    """A tiny random TrOCR (ViT encoder + TrOCR decoder) with a byte-level RoBERTa tokenizer, saved as released."""
    torch.manual_seed(seed)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *_bytes_to_unicode(), "<mask>"])}
    tokenizer = RobertaTokenizer(vocab, [])
    encoder = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    decoder = TrOCRConfig(
        vocab_size=len(tokenizer), d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2
    VisionEncoderDecoderModel(config).save_pretrained(folder)
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    TrOCRProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def test_tiny_trocr_through_the_registry(tmp_path):
    folder = save_trocr(tmp_path / "trocr")
    reward = load_reward("ocr", str(folder), max_new_tokens=6)
    prompts = ['a sign "ab"', 'a label "Hello World"', 'text "xyz"']
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 40, 56)
    out = reward.score(pixels, prompts)
    assert out.extras["engine"] == str(folder) and len(out.extras["recognized"]) == 3
    expected = [ocr_reward(r, ocr_target(p)) for r, p in zip(out.extras["recognized"], prompts)]
    assert out.score.tolist() == pytest.approx(expected) and ((out.score >= 0) & (out.score <= 1)).all()
    # batch equals items, and the model moves with the reward
    singles = [reward.score(pixels[i : i + 1], prompts[i : i + 1]).extras["recognized"][0] for i in range(3)]
    assert singles == out.extras["recognized"]
    assert reward.model is reward.recognizer.model and reward.device == torch.device("cpu")


GOT_SPECIALS = ["<|im_start|>", "<img>", "</img>", "<imgpad>", "<ref>", "</ref>", "<box>", "</box>"]


def save_got_ocr2(folder: Path, seed: int = 0) -> Path:
    """A tiny random GOT-OCR 2.0 (SAM-style ViT, Qwen2 decoder) with a byte-level Qwen2 tokenizer holding GOT's
    special tokens, saved as released; 256 x 256 input, patch 4: 256 image tokens, as the real 1024 / 16 model."""
    torch.manual_seed(seed)
    tokenizer = Qwen2Tokenizer(
        {c: i for i, c in enumerate(_bytes_to_unicode())}, [], unk_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": GOT_SPECIALS})
    vision = {"hidden_size": 32, "output_channels": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"image_size": 256, "patch_size": 4, "window_size": 8, "global_attn_indexes": [], "mlp_dim": 64}
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512}
    image_token = tokenizer.convert_tokens_to_ids("<imgpad>")
    config = GotOcr2Config(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=256)
    model = GotOcr2ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(folder)
    image_processor = GotOcr2ImageProcessor(size={"height": 256, "width": 256})
    GotOcr2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_tiny_got_ocr2_the_default_engine_class(tmp_path):
    folder = save_got_ocr2(tmp_path / "got")
    reward = load_reward("ocr", str(folder), max_new_tokens=4)
    assert reward.recognizer.kind == "got_ocr2"
    prompts = ['a sign "ab"', 'a label "Hello"']
    out = reward.score(torch.rand(2, 3, 30, 50), prompts)
    texts = out.extras["recognized"]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert out.score.tolist() == pytest.approx([ocr_reward(r, ocr_target(p)) for r, p in zip(texts, prompts)])


def test_engine_choice_is_checked():
    with pytest.raises(ValueError, match="`engine` must be one of"):
        OCRReward.from_pretrained(engine="tesseract")
    if importlib.util.find_spec("paddleocr") is None:
        with pytest.raises(ImportError, match="optional packages paddleocr"):
            OCRReward.from_pretrained(engine="paddle")
