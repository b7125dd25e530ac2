"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL plumbing shared by the VLM rewards (pairwise judge, ImageDoctor, VideoReward).

- `load_qwen_vl`: a frozen `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration` (picked by the
  folder's `model_type`; `classes=JUDGE_VL_CLASSES` admits `Qwen3VLForConditionalGeneration` too, the class of
  UnifiedReward-Think-qwen3vl and UnifiedReward-2.0-qwen3vl) and its processor, from a folder or Hub repo, through
  `visalign.reward_models.loading` (strict keys, clear offline errors).
- `VisionPatches`: pixels in [0, 1] -> the flat patch layout of `Qwen2VLImageProcessor` / `Qwen2VLVideoProcessor`
  (`pixel_values` `[sum_i t_i h_i w_i, 3 * temporal_patch * patch^2]` and `grid_thw` `[N, 3]`) as torch ops on
  the pixels' device, differentiable: bicubic antialiased resize to the `smart_resize` size, normalization,
  patchify. Deviation: the processors resize uint8 images; we resize in float and clamp to [0, 1]. Without a resize
  the two agree exactly (tested).
- `chat_inputs`: conversations -> `input_ids`, `attention_mask` and `mm_token_type_ids`, each `<|image_pad|>` /
  `<|video_pad|>` of the chat template expanded to one pad per merged patch, padded on the side asked for.
- `generate_texts`: greedy decoding and the decoded new text, for judges whose answer is text.
- `image_data_url`, `chat_body`, `post_chat`, `post_chat_choice`: one request to an OpenAI-compatible
  chat-completions server (vLLM, sglang) with images as PNG (lossless) or JPEG data URLs, and its answer text (and
  `finish_reason`).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import threading
import urllib.error
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.files import to_pil
from visalign.reward_models.loading import cast_backbone, load_transformers_model, read_json, resolve_folder

if TYPE_CHECKING:  # transformers' model and processor modules import accelerate: loaded when a model is
    from transformers import (
        ProcessorMixin,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    QwenVL = Qwen2VLForConditionalGeneration | Qwen2_5_VLForConditionalGeneration | Qwen3VLForConditionalGeneration

# model_type -> the transformers class (a class, or its name in `transformers`, resolved when a model is loaded)
QWEN_VL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
JUDGE_VL_CLASSES = QWEN_VL_CLASSES | {"qwen3_vl": "Qwen3VLForConditionalGeneration"}  # the generative judges
VLM_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # weights, configs, tokenizer, chat template
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def load_qwen_vl(
    pretrained: str | Path,
    dtype: torch.dtype | None,
    *,
    what: str,
    classes: Mapping[str, type[QwenVL] | str] = QWEN_VL_CLASSES,
) -> tuple[QwenVL, ProcessorMixin]:
    """A frozen Qwen2-VL-class model (strictly loaded, cast to `dtype`) and its processor from a folder or Hub repo.

    `classes` maps the folder's `model_type` to the class to build: a subclass whose
    `_keys_to_ignore_on_load_unexpected` names extra checkpoint keys (ImageDoctor's heatmap head) loads strictly too.
    """
    folder = resolve_folder(pretrained, VLM_FILES, required=["config.json"], what=what)
    model_type = read_json(folder / "config.json", what=what).get("model_type")
    if model_type not in classes:
        raise ValueError(f"{what}: {folder} holds a {model_type!r} model; expected one of {sorted(classes)}")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise FileNotFoundError(f"{what}: {folder} has no processor config ({' or '.join(PROCESSOR_FILES)})")
    if not any(all((folder / n).is_file() for n in names) for names in TOKENIZER_FILES):
        raise FileNotFoundError(f"{what}: {folder} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    from transformers import AutoProcessor

    model = load_transformers_model(_vl_class(classes[model_type]), folder, what=what)
    processor = AutoProcessor.from_pretrained(folder)
    return cast_backbone(model, dtype).requires_grad_(False), processor


def _vl_class(cls: type[QwenVL] | str) -> type[QwenVL]:
    """A class of `QWEN_VL_CLASSES`-style mappings: the class itself, or its name in `transformers`."""
    if isinstance(cls, str):
        import transformers

        return getattr(transformers, cls)
    return cls


def check_qwen_vl(model: Any, processor: Any, classes: Mapping[str, type[QwenVL] | str] = QWEN_VL_CLASSES) -> None:
    """Raise `ValueError` unless `model` is an instance of one of `classes` (default Qwen2-VL and Qwen2.5-VL) and
    `processor` has a tokenizer and a template."""
    from transformers import ProcessorMixin

    types = tuple(_vl_class(cls) for cls in classes.values())
    if not isinstance(model, types):
        names = " or ".join(sorted({cls.__name__ for cls in types}))
        raise ValueError(f"`model` must be a {names}, got {type(model).__name__}")
    if not isinstance(processor, ProcessorMixin) or processor.chat_template is None:
        raise ValueError("`processor` must be the model's transformers processor, with a chat template")


@dataclass(frozen=True)
class VisionPatches:
    """Pixels -> Qwen2-VL vision input, as the model's image (or video) processor lays it out.

    Args:
        patch_size, temporal_patch_size, merge_size: the vision tower's patching.
        mean, std: per-channel normalization.
        min_pixels, max_pixels: the pixel budget of `smart_resize` (sizes become multiples of
            `patch_size * merge_size`).
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_processor(
        cls, processor: ProcessorMixin, *, video: bool = False, max_pixels: int | None = None
    ) -> VisionPatches:
        """The layout of `processor.image_processor` (or `video_processor`), optionally with a smaller budget."""
        source = processor.video_processor if video else processor.image_processor
        budget = source.size.longest_edge if max_pixels is None else max_pixels
        if not isinstance(budget, int) or budget < source.size.shortest_edge:
            raise ValueError(f"`max_pixels` must be an int >= {source.size.shortest_edge}, got {max_pixels!r}")
        return cls(
            source.patch_size,
            source.temporal_patch_size,
            source.merge_size,
            tuple(source.image_mean),
            tuple(source.image_std),
            source.size.shortest_edge,
            budget,
        )

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` the processor resizes a `height x width` input to."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def __call__(self, frames: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Patchify `frames` (`[N, T, 3, H, W]` in [0, 1]; images are T = 1) resized to `size` (default `size_for`).

        Returns `pixel_values` `[N * t * h * w, 3 * temporal_patch * patch^2]` float32 and `grid_thw` `[N, 3]` long,
        where `(t, h, w)` is the patch grid (T rounded up to a multiple of the temporal patch by repeating the last
        frame, as the processors do).
        """
        n, t, c, height, width = frames.shape
        h, w = size if size is not None else self.size_for(height, width)
        x = frames.reshape(n * t, c, height, width).float()
        if (h, w) != (height, width):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, c, 1, 1)
        x = ((x - mean) / std).view(n, t, c, h, w)
        if pad := -t % self.temporal_patch_size:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = x.shape[1] // tp, h // p, w // p
        x = x.view(n, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        grid = torch.tensor([[gt, gh, gw]] * n, dtype=torch.long, device=x.device)
        return x.reshape(n * gt * gh * gw, c * tp * p * p), grid


def chat_inputs(
    processor: ProcessorMixin,
    conversations: Sequence[list[dict[str, Any]]],
    *,
    image_grids: Sequence[Tensor] | None = None,
    video_grids: Sequence[Tensor] | None = None,
    suffix: Sequence[int] = (),
    padding_side: str = "left",
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """Token inputs for a batch of chats with `add_generation_prompt=True`.

    Args:
        conversations: one chat per sample, with `{"type": "image"}` / `{"type": "video"}` content items.
        image_grids, video_grids: per sample, the `grid_thw` `[k, 3]` of its k images / videos, in order.
        suffix: token ids appended to every sample after the generation prompt (a forced answer prefix).
        padding_side: `"left"` (generation, last-position logits) or `"right"`.

    Returns:
        `input_ids`, `attention_mask`, `mm_token_type_ids`, each `[B, L]` long.
    """
    merge = processor.image_processor.merge_size**2
    texts = []
    for i, conversation in enumerate(conversations):
        text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        for token, grids in ((processor.image_token, image_grids), (processor.video_token, video_grids)):
            parts = text.split(token)
            counts = [] if grids is None else [int(g.prod()) // merge for g in grids[i]]
            if len(parts) - 1 != len(counts):
                raise ValueError(f"sample {i} has {len(parts) - 1} {token} placeholders but {len(counts)} grids")
            text = parts[0] + "".join(token * k + part for k, part in zip(counts, parts[1:]))
        texts.append(text)
    tokenizer = processor.tokenizer
    ids = [row + list(suffix) for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    types = processor.create_mm_token_type_ids(ids)
    length = max(len(row) for row in ids)
    out = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
    for row, kind in zip(ids, types):
        pad = length - len(row)
        for key, values, fill in (("input_ids", row, tokenizer.pad_token_id), ("attention_mask", [1] * len(row), 0)):
            out[key].append([fill] * pad + values if padding_side == "left" else values + [fill] * pad)
        out["mm_token_type_ids"].append([0] * pad + kind if padding_side == "left" else kind + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in out.items()}


@torch.no_grad()
def generate_texts(
    model: QwenVL, processor: ProcessorMixin, inputs: dict[str, Tensor], max_new_tokens: int
) -> tuple[list[str], Tensor]:
    """Greedy decoding from left-padded `inputs`; returns the decoded new text and the new ids `[B, T_new]`."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return texts, new


IMAGE_FORMATS = ("PNG", "JPEG")


def image_data_url(image: Tensor, image_format: str = "PNG", quality: int = 95) -> str:
    """A `[3, H, W]` image in [0, 1] (uint8, rounded) as a PNG (lossless) or JPEG data URL.

    JPEG is written as Pillow's `save(format="JPEG", quality=quality)` of the RGB image (UnifiedReward's and
    Pref-GRPO's vLLM clients send JPEG at quality 95); `quality` is ignored for PNG.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"`image_format` must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"`quality` must be an int in [1, 100], got {quality!r}")
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format == "JPEG" else {}
    to_pil(image).save(buffer, format=image_format, **options)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_body(model: str, image_urls: Sequence[str], text: str, **settings: Any) -> dict[str, Any]:
    """A chat-completions request: one user turn with the images, then the text; `settings` such as `max_tokens`."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **settings}


def post_chat(url: str, body: dict[str, Any], *, timeout: float, api_key: str | None = None) -> str:
    """The answer text of one `POST url` (`.../chat/completions`); see `post_chat_choice`."""
    return post_chat_choice(url, body, timeout=timeout, api_key=api_key)[0]


def post_chat_choice(
    url: str, body: dict[str, Any], *, timeout: float, api_key: str | None = None
) -> tuple[str, str | None]:
    """The answer text of one `POST url` (`.../chat/completions`) and its `finish_reason` (`"stop"`, `"length"`
    when the answer was cut at `max_tokens`, or None when the server sends none).

    `timeout` bounds the whole request (connect, send, read), not each read. Raises `urllib.error.HTTPError` for an
    error status, `TimeoutError` past the deadline, `ChatTransportError` (an `OSError`) when no complete HTTP answer
    came (refused, reset, cut short, not HTTP), `ValueError` for a response that is not a chat completion with text
    content: a caller that catches `OSError` and `ValueError` sees every failure, each with its reason.
    """
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    payload = post_bytes(url, json.dumps(body).encode(), headers, timeout=timeout)
    try:
        answer = json.loads(payload)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"the answer is not JSON: {payload[:200]!r}") from None
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat completion: {str(answer)[:200]}") from e
    if not isinstance(content, str):
        raise ValueError(f"the message content is {type(content).__name__}, not text")
    reason = answer["choices"][0].get("finish_reason")
    return content, reason if isinstance(reason, str) else None


class ChatTransportError(ConnectionError):
    """A request that got no complete HTTP answer: refused, reset, cut short, or bytes that are not HTTP."""


def post_bytes(url: str, data: bytes, headers: dict[str, str], *, timeout: float) -> bytes:
    """The body of a 2xx answer to `POST url` with `data`, all of it within `timeout` seconds (connect + send + read).

    A per-socket timeout alone bounds each read, so a server trickling a byte at a time could stall the caller for
    as long as it likes; a watchdog shuts the socket down at the deadline instead. Errors: see `post_chat_choice`.
    Servers are reached directly (no proxy).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"`url` must be an http:// or https:// URL, got {url!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read, which then fails
            except OSError:
                pass

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), data, headers)
        response = connection.getresponse()
        payload = response.read()
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, TimeoutError):
            raise TimeoutError(f"{url}: no complete answer within {timeout:g} s") from None
        raise ChatTransportError(f"{url}: {_transport_problem(e)}") from None
    finally:
        watchdog.cancel()
        connection.close()
    if not 200 <= response.status < 300:
        reason = f"{response.reason}: {payload[:200].decode('utf-8', 'replace')}"
        raise urllib.error.HTTPError(url, response.status, reason, response.headers, io.BytesIO(payload))
    return payload


def _transport_problem(error: Exception) -> str:
    if isinstance(error, http.client.IncompleteRead):
        return f"the answer was cut short ({len(error.partial)} bytes read, {error.expected} more expected)"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    if isinstance(error, (http.client.BadStatusLine, http.client.LineTooLong, http.client.HTTPException)):
        return f"the answer is not HTTP ({type(error).__name__}: {str(error)[:100]})"
    return f"{type(error).__name__}: {error}"
