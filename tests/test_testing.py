import json

import pytest
import torch

from visalign.testing import FAMILIES, clip_tokenizer, load_tiny, save_tiny, t5_tokenizer, tiny_pipeline

CALL = dict(num_inference_steps=2, height=32, width=32, output_type="pt")


def generate(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe(prompts, generator=torch.Generator().manual_seed(0), **CALL).images


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_generates_deterministically_and_round_trips(family, prompts, tmp_path):
    pipe = tiny_pipeline(family, seed=0)
    images = generate(pipe, prompts)
    assert images.shape == (2, 3, 32, 32)
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert images.std() > 0.01, "a constant image would hide a broken pipeline"
    assert torch.equal(images, generate(pipe, prompts))
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))

    folder = save_tiny(pipe, tmp_path / family)
    assert (folder / "model_index.json").exists()
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    reloaded = load_tiny(family, folder)
    assert type(reloaded) is type(pipe)
    assert torch.equal(images, generate(reloaded, prompts))


def test_seed_sets_weights():
    a, b, c = tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=0), tiny_pipeline("sd", seed=1)
    w = [p.unet.conv_in.weight for p in (a, b, c)]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_full_layout_sd3_and_flux_carry_t5():
    sd3, flux = tiny_pipeline("sd3"), tiny_pipeline("flux")
    assert type(sd3.text_encoder_3).__name__ == "T5EncoderModel" and sd3.tokenizer_3 is not None
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"


def test_sd3_without_t5_reloads(prompts, tmp_path):
    pipe = tiny_pipeline("sd3")
    pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, prompts)
    folder = save_tiny(pipe, tmp_path / "sd3")
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    assert torch.equal(images, generate(load_tiny("sd3", folder), prompts))


def test_unknown_family_lists_families():
    with pytest.raises(ValueError, match="family.*sd, sdxl, sd3, flux"):
        tiny_pipeline("dalle")


def test_save_tiny_rejects_other_objects(tmp_path):
    with pytest.raises(ValueError, match="pipeline_or_model"):
        save_tiny(torch.nn.Linear(2, 2), tmp_path)


def test_clip_tokenizer_matches_open_clip():
    text = "a red square on the left"
    ids = clip_tokenizer(num_merges=48894)(text).input_ids
    assert ids == [49406, 320, 736, 3999, 525, 518, 1823, 49407]
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.get_tokenizer("ViT-B-32")([text, "A Painting of a squirrel, eating a burger!"])
    for row, sentence in zip(reference, [text, "A Painting of a squirrel, eating a burger!"]):
        assert clip_tokenizer(num_merges=48894)(sentence).input_ids == row[row != 0].tolist()


def test_tiny_clip_tokenizer():
    tok = clip_tokenizer()
    assert len(tok) == 1000 and tok.bos_token_id == 998 and tok.eos_token_id == tok.pad_token_id == 999
    ids = tok(["a red square"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[0] == 998 and max(ids) <= 999
    with pytest.raises(ValueError, match="num_merges"):
        clip_tokenizer(num_merges=-1)


def test_t5_tokenizer_survives_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tok = t5_tokenizer()
    assert len(tok) == 1000 and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    text = ["a red square on the left", "two blue circles"]
    ids = tok(text, padding="max_length", max_length=16, truncation=True).input_ids
    assert all(len(row) == 16 for row in ids) and ids[0][:7].count(2) == 0  # no unknown pieces in plain English
    assert tok.decode(ids[1], skip_special_tokens=True) == "two blue circles"
    reloaded = AutoTokenizer.from_pretrained(save_tiny(tok, tmp_path / "t5"))
    assert type(reloaded) is type(tok)
    assert reloaded(text, padding="max_length", max_length=16, truncation=True).input_ids == ids


@pytest.mark.parametrize("vocab_size", [10, 10**6])
def test_t5_tokenizer_rejects_impossible_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        t5_tokenizer(vocab_size)
