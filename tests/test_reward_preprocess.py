"""`ImageTransform` against the reference preprocessing of each model (transformers' PIL `CLIPImageProcessor`,
torchvision on PIL, HPSv2's tensor `ResizeMaxSize`).

Stated tolerance, in [0, 1] pixel units (differences of normalized values times std):
- HPSv2 style: exact up to float rounding (1e-6); the reference also resizes float tensors.
- PIL styles on natural (smooth) images: max 1.5/255, mean 0.5/255 (the references round to uint8 after each of
  PIL's two separable passes); on white noise, the worst case for that intermediate clipping, max 10/255.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import Tensor

from visalign.reward_models.preprocess import ImageTransform

STYLES = ["transformers", "torchvision", "hpsv2"]


def smooth_image(h: int, w: int, seed: int = 0) -> Tensor:
    """A natural-looking image `[3, h, w]` quantized to uint8 levels: low-frequency noise, bilinearly upsampled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (x * 255).round() / 255


def noise_image(h: int, w: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed)) / 255


def to_pil(x: Tensor) -> Image.Image:
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def pixel_error(transform: ImageTransform, image: Tensor) -> Tensor:
    """|ours - reference| in [0, 1] pixel units, `[3, S, S]`."""
    ours = transform(image[None])[0]
    reference = transform.reference_pipeline()(to_pil(image))
    assert ours.shape == reference.shape == (3, transform.size, transform.size)
    return (ours - reference).abs() * torch.tensor(transform.std).view(3, 1, 1)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(100, 150), (150, 100), (37, 91), (256, 227), (20, 30), (64, 67), (48, 48)])
def test_parity_with_reference_on_natural_images(style: str, shape: tuple[int, int]) -> None:
    error = pixel_error(ImageTransform(48, style), smooth_image(*shape))
    if style == "hpsv2":
        assert error.max() < 1e-6
    else:
        assert error.max() <= 1.5 / 255 and error.mean() <= 0.5 / 255


@pytest.mark.parametrize("style", STYLES)
def test_parity_with_reference_on_noise(style: str) -> None:
    error = pixel_error(ImageTransform(64, style), noise_image(100, 150))
    assert error.max() <= (1e-6 if style == "hpsv2" else 10 / 255) and error.mean() <= 0.5 / 255


def test_crop_offset_follows_each_reference() -> None:
    """64 x 67 -> crop 64: transformers starts at column (67 - 64) // 2 = 1, torchvision at round(1.5) = 2."""
    image = smooth_image(64, 67)
    a, b = ImageTransform(64, "transformers"), ImageTransform(64, "torchvision")
    assert torch.equal(a(image[None]), a(image[None, :, :, 1:65]))
    assert torch.equal(b(image[None]), a(image[None, :, :, 2:66]))
    assert pixel_error(a, image).max() < 1e-6 and pixel_error(b, image).max() < 1e-6


def test_hpsv2_resizes_the_longest_side_and_pads_black() -> None:
    transform = ImageTransform(32, "hpsv2")
    assert transform.resized_shape(40, 80) == (16, 32)
    out = transform(torch.ones(1, 3, 40, 80))
    black = (-torch.tensor(transform.mean) / torch.tensor(transform.std)).view(3, 1, 1)
    white = ((1 - torch.tensor(transform.mean)) / torch.tensor(transform.std)).view(3, 1, 1)
    torch.testing.assert_close(out[0, :, :8], black.expand(3, 8, 32))
    torch.testing.assert_close(out[0, :, 24:], black.expand(3, 8, 32))
    torch.testing.assert_close(out[0, :, 8:24], white.expand(3, 16, 32))


@pytest.mark.parametrize("style", STYLES)
def test_square_input_at_size_is_only_normalized(style: str) -> None:
    transform = ImageTransform(32, style)
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(transform.mean).view(3, 1, 1), torch.tensor(transform.std).view(3, 1, 1)
    torch.testing.assert_close(transform(pixels), (pixels - mean) / std)


@pytest.mark.parametrize("style", STYLES)
def test_differentiable_batched_and_float32(style: str) -> None:
    pixels = torch.rand(3, 3, 50, 70, dtype=torch.float64, requires_grad=True)
    out = ImageTransform(32, style)(pixels)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    out.square().sum().backward()
    assert pixels.grad.abs().sum() > 0
    torch.testing.assert_close(ImageTransform(32, style)(pixels[1:2]), out[1:2])


def test_upsampling_small_images() -> None:
    """32 x 32 world images scored by a 64 x 64 model: PIL-style bicubic upsampling."""
    assert pixel_error(ImageTransform(64, "transformers"), smooth_image(32, 32)).max() <= 1.5 / 255


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": 0}, "`size`"), ({"style": "squash"}, "`style`"), ({"mean": (0.5, 0.5)}, "`mean` and `std`")],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageTransform(**kwargs)
