"""Image preprocessing for reward models as differentiable torch ops, and the reference pipelines it reproduces.

Reward backbones take normalized `pixel_values` `[B, 3, S, S]`; generators produce `pixels` `[B, 3, H, W]` in
[0, 1]. The reference implementations go through PIL one image at a time, which cuts the gradient and costs a
device round trip. `ImageTransform` does the same geometry with `torch.nn.functional.interpolate(mode="bicubic",
antialias=True)` (PyTorch's PIL-compatible kernel, a = -0.5) on the whole batch, on the pixels' device. Three
reference styles exist among the models we wrap:

- `"transformers"`: `CLIPImageProcessor` (PickScore, CLIP models from transformers): shortest edge to S with PIL
  bicubic, center crop with offset `(H - S) // 2`, uint8 in between.
- `"torchvision"`: `Resize(S, BICUBIC) -> CenterCrop(S)` on a PIL image (OpenAI CLIP, ImageReward, LAION
  aesthetic): the same, except that the crop offset is `round((H - S) / 2)`.
- `"hpsv2"`: HPSv2's `ToTensor -> ResizeMaxSize(S) -> Normalize`: longest side to S (`round(side * S / max)`) on
  the float tensor, then zero padding (black, before normalization) to S x S, left/top getting `pad // 2`.

Deviations: the PIL styles quantize to uint8 after each resize pass; we stay in float and only clamp to [0, 1]
(the parity tests state the resulting tolerance). HPSv2's `ResizeMaxSize` skips resize *and* padding when the
longest side already equals S, returning a non-square image; we always pad to S x S.
`reference_pipeline()` returns the reference itself (built from the transformers/torchvision classes) for parity
tests and for the reference-style path of the scoring benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from visalign.rewards import RewardModel
from visalign.types import RewardOutput, check_prompts, check_scores

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STYLES = ("transformers", "torchvision", "hpsv2")


@dataclass(frozen=True)
class ImageTransform:
    """Pixels `[B, 3, H, W]` in [0, 1] -> normalized `pixel_values` `[B, 3, size, size]` float32, differentiable.

    Args:
        size: side S of the model input.
        style: which reference pipeline to reproduce (see the module docstring).
        mean, std: per-channel normalization (OpenAI CLIP's by default).
    """

    size: int = 224
    style: Literal["transformers", "torchvision", "hpsv2"] = "transformers"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"`size` must be a positive int, got {self.size!r}")
        if self.style not in STYLES:
            raise ValueError(f"`style` must be one of {STYLES}, got {self.style!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"`mean` and `std` need 3 values each, got {self.mean} and {self.std}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """`(h, w)` after the resize step: shortest edge to S (truncating) or longest side to S (rounding)."""
        if self.style == "hpsv2":
            scale = self.size / max(height, width)
            return round(height * scale), round(width * scale)
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, pixels: Tensor) -> Tensor:
        x = pixels.float()
        h, w = self.resized_shape(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        if self.style == "hpsv2":
            pad_h, pad_w = self.size - h, self.size - w
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        else:
            x = x.clamp(0.0, 1.0)  # the references hold uint8 images here
            if self.style == "transformers":
                top, left = (h - self.size) // 2, (w - self.size) // 2
            else:
                top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            x = x[..., top : top + self.size, left : left + self.size]
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def reference_pipeline(self) -> Callable[[Image.Image], Tensor]:
        """The reference preprocessing this transform reproduces: PIL image -> `[3, S, S]` float32 tensor."""
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        if self.style == "transformers":
            from transformers import CLIPImageProcessorPil

            processor = CLIPImageProcessorPil(
                size={"shortest_edge": self.size},
                crop_size={"height": self.size, "width": self.size},
                image_mean=list(self.mean),
                image_std=list(self.std),
            )
            return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]
        if self.style == "torchvision":
            return T.Compose(
                [
                    T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(self.size),
                    T.ToTensor(),
                    T.Normalize(self.mean, self.std),
                ]
            )

        def resize_max_size(x: Tensor) -> Tensor:  # HPSv2's ResizeMaxSize, on the float tensor
            height, width = x.shape[-2:]
            scale = self.size / max(height, width)
            if scale == 1.0:
                return x
            h, w = round(height * scale), round(width * scale)
            x = TF.resize(x, [h, w], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
            pad_h, pad_w = self.size - h, self.size - w
            return TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)

        return T.Compose([T.ToTensor(), resize_max_size, T.Normalize(self.mean, self.std)])


class PixelValuesReward(RewardModel):
    """A reward whose network reads normalized `pixel_values` made by `self.transform` (an `ImageTransform`).

    Subclasses implement `score_pixel_values`; `score(pixels, prompts)` validates, moves the pixels to the model's
    device, preprocesses them there and returns tensors on the caller's device.
    """

    transform: ImageTransform

    def score_pixel_values(self, pixel_values: Tensor, prompts: list[str]) -> RewardOutput:
        """Score already preprocessed inputs.

        Args:
            pixel_values (`Tensor` `[B, 3, S, S]`): normalized model input on the model's device, as made by
                `self.transform` or by `self.transform.reference_pipeline()`.
            prompts (`list[str]` of length B).
        """
        raise NotImplementedError

    def check_pixel_values(self, pixel_values: Tensor, prompts: list[str]) -> list[str]:
        """Validate `score_pixel_values` inputs; returns the prompts as a list."""
        s = self.transform.size
        if (
            not isinstance(pixel_values, Tensor)
            or pixel_values.ndim != 4
            or tuple(pixel_values.shape[1:]) != (3, s, s)
        ):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must have shape [B, 3, {s}, {s}], got {shape}")
        return check_prompts(prompts, pixel_values.shape[0])

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        out = self.score_pixel_values(self.transform(pixels.to(self.device)), prompts)
        device = pixels.device
        return RewardOutput(
            out.score.to(device), {k: v.to(device) for k, v in out.aspects.items()}, out.heatmaps, out.extras
        )


def score_sharing_preprocessing(
    rewards: Mapping[str, RewardModel], pixels: Tensor, prompts: list[str]
) -> dict[str, Tensor]:
    """Each reward's score `[B]` (float32) on already validated `pixels`, keyed like `rewards`.

    `PixelValuesReward`s with equal transforms on one device share one preprocessing pass (and one autograd node
    through it), as ReNO preprocesses once for all its rewards; every other reward goes through its `score`.
    """
    shared: dict[tuple[ImageTransform, torch.device], Tensor] = {}
    scores = {}
    for name, reward in rewards.items():
        if isinstance(reward, PixelValuesReward):
            key = (reward.transform, reward.device)
            if key not in shared:
                shared[key] = reward.transform(pixels.to(reward.device))
            score = reward.score_pixel_values(shared[key], prompts).score.to(pixels.device)
        else:
            score = reward.score(pixels, prompts).score
        scores[name] = check_scores(score, pixels.shape[0], name).float()
    return scores
