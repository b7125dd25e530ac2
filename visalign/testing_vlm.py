"""Tiny offline Qwen2-VL / Qwen2.5-VL components for tests and benchmarks of the VLM rewards.

Everything is real except the weights and the vocabulary size: a `Qwen2Tokenizer` (Qwen2's byte-level BPE
pipeline) whose merges are learned here from a few sentences with the `tokenizers` trainer, the real processor
classes (`Qwen2VLImageProcessor`, `Qwen2VLVideoProcessor`, `Qwen2VLProcessor` / `Qwen2_5_VLProcessor`) with a
Qwen-style chat template, and random models of a few ten thousand parameters built after `torch.manual_seed(seed)`.
`save_tiny_qwen_vl` writes the official layout (`config.json`, `model.safetensors`, `tokenizer.json`,
`processor_config.json`, `chat_template.jinja`), which the loaders read exactly as they read a Hub snapshot:

    folder = save_tiny_qwen_vl(tmp_path / "judge", "qwen2_5_vl", corpus=[PAIR_PROMPT])
    judge = UnifiedRewardPairwise.from_pretrained(str(folder))

Patches are 4 pixels merged 2x2, so a 32x32 image is an 8x8 patch grid and 16 language-model tokens.
`save_tiny_qwen3_vl` does the same for `Qwen3VLForConditionalGeneration` (deepstack vision features, interleaved
M-RoPE) with the real `Qwen3VLProcessor`: the class of the UnifiedReward-Think-qwen3vl judges.

`FakeChatServer` is an OpenAI-compatible chat-completions endpoint on 127.0.0.1 with scripted answers, status codes
and delays, for the HTTP judge's tests and benchmark.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

VERSIONS = ("qwen2_vl", "qwen2_5_vl")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PATCH_SIZE = 4
MERGE_SIZE = 2
# The structure of Qwen2-VL's template (no default system message): images and videos become
# `<|vision_start|><|image_pad|><|vision_end|>`, expanded later to one pad per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BASE_CORPUS = (
    "Image 1 is better. Image 2 is better. Both images are equally good.",
    "a red square, two blue circles on the left, a green triangle, three yellow stars",
    "user assistant system",
)


def qwen_tokenizer(
    corpus: Sequence[str] = (), vocab_size: int = 512, extra_special_tokens: Sequence[str] = ()
) -> Qwen2Tokenizer:
    """A real `Qwen2Tokenizer` whose byte-level BPE merges are learned from `BASE_CORPUS` + `corpus`.

    Id 0 is `<|endoftext|>` (unk, eos and pad, as in Qwen2); the Qwen-VL specials and `extra_special_tokens` follow
    the learned vocabulary. Any text tokenizes (the 256 byte symbols are always in the vocabulary); text from the
    corpus tokenizes into few tokens.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator([*BASE_CORPUS, *corpus], trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=learned["vocab"], merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in (*SPECIAL_TOKENS, *extra_special_tokens)])
    return tokenizer


def qwen_processor(
    tokenizer: Qwen2Tokenizer, version: str = "qwen2_5_vl", min_pixels: int = 16 * 16, max_pixels: int = 64 * 64
) -> Qwen2VLProcessor:
    """The real processor of `version` around `tokenizer`, with 4-pixel patches merged 2x2."""
    if version not in VERSIONS:
        raise ValueError(f"`version` must be one of {VERSIONS}, got {version!r}")
    sizes = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2)
    sizes |= dict(min_pixels=min_pixels, max_pixels=max_pixels)
    cls = Qwen2_5_VLProcessor if version == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen_vl(
    tokenizer: Qwen2Tokenizer, version: str = "qwen2_5_vl", seed: int = 0, hidden_size: int = 32
) -> Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration:
    """A random `...ForConditionalGeneration` of `version` for `tokenizer`'s vocabulary, in eval mode."""
    if version not in VERSIONS:
        raise ValueError(f"`version` must be one of {VERSIONS}, got {version!r}")
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    vision = dict(depth=2, num_heads=2, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2)
    torch.manual_seed(seed)
    if version == "qwen2_5_vl":
        vision |= dict(hidden_size=16, intermediate_size=32, out_hidden_size=hidden_size, window_size=16)
        vision |= dict(fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_token_ids(ids))
        return Qwen2_5_VLForConditionalGeneration(config).eval()
    vision |= dict(embed_dim=16, hidden_size=hidden_size, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **_token_ids(ids))
    return Qwen2VLForConditionalGeneration(config).eval()


def _token_ids(ids: list[int]) -> dict[str, int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return dict(zip(names, ids))


def save_tiny_qwen_vl(
    folder: Path,
    version: str = "qwen2_5_vl",
    seed: int = 0,
    corpus: Sequence[str] = (),
    extra_special_tokens: Sequence[str] = (),
) -> Path:
    """A tiny model, tokenizer and processor of `version` saved in the official layout in `folder`."""
    tokenizer = qwen_tokenizer(corpus, extra_special_tokens=extra_special_tokens)
    processor = qwen_processor(tokenizer, version)
    tiny_qwen_vl(tokenizer, version, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


class FakeChatServer:
    """`POST /v1/chat/completions` on 127.0.0.1 (a free port, `url` is the API root), answered by a script.

    `script(n, body)` gets the request's index and JSON body and returns `(status, payload, delay)`: the reply is sent
    after `delay` seconds, `payload` a str (wrapped as the answer of a chat completion) or bytes (sent as they are).
    `requests` and `headers` record what arrived. Use as a context manager, or call `close()`.
    """

    def __init__(self, script: Callable[[int, dict[str, Any]], tuple[int, str | bytes, float]]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        lock, server = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                status, payload, delay = script(n, body)
                time.sleep(delay)
                if isinstance(payload, str):
                    payload = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": payload}}]}
                    ).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # handlers still sleeping after a client timeout do not block closing
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeChatServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- Qwen3-VL (UnifiedReward-Think-qwen3vl judges)


def qwen3_processor(
    tokenizer: Qwen2Tokenizer, min_pixels: int = 16 * 16, max_pixels: int = 64 * 64
) -> Qwen3VLProcessor:
    """The real `Qwen3VLProcessor` around `tokenizer` (Qwen3-VL's image processor is Qwen2-VL's; its video processor
    is `Qwen3VLVideoProcessor`), with the same 4-pixel patches merged 2x2 as `qwen_processor`."""
    sizes = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2)
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, **pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(**sizes, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen3_vl(tokenizer: Qwen2Tokenizer, seed: int = 0, hidden_size: int = 32) -> Qwen3VLForConditionalGeneration:
    """A random `Qwen3VLForConditionalGeneration` for `tokenizer`'s vocabulary, in eval mode: a 2-block vision tower
    with learned position embeddings on a 4x4 grid (interpolated to the image's) and one deepstack layer, and a
    2-layer Qwen3 text model with interleaved M-RoPE."""
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        pad_token_id=0,
    )
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    torch.manual_seed(seed)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_token_ids(ids))
    return Qwen3VLForConditionalGeneration(config).eval()


def save_tiny_qwen3_vl(
    folder: Path, seed: int = 0, corpus: Sequence[str] = (), extra_special_tokens: Sequence[str] = ()
) -> Path:
    """A tiny Qwen3-VL model, tokenizer and processor saved in the official layout in `folder`."""
    tokenizer = qwen_tokenizer(corpus, extra_special_tokens=extra_special_tokens)
    tiny_qwen3_vl(tokenizer, seed).save_pretrained(folder)
    qwen3_processor(tokenizer).save_pretrained(folder)
    return Path(folder)
