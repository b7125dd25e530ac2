"""Tiny pipelines, rewards and data for the trainer tests (Flow-GRPO, Diffusion-DPO, Diffusion-DRO, PRDP) and
synthetic Pick-a-Pic files (a parquet file, a hub snapshot of split shards)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from visalign.pipelines.preference_data import PreferencePairs
from visalign.rewards import RewardModel
from visalign.testing import tiny_pipeline

LORA = dict(lora_rank=8, lora_alpha=8, lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def sharp_tiny_pipeline(family: str = "sd", seed: int = 0):
    """`tiny_pipeline(family)` whose random VAE behaves like a trained one for the image-based objectives.

    A random `AutoencoderKL` has a wide posterior (its sampling noise is as large as the difference between two
    images) and latents far below unit variance; a trained VAE has a sharp posterior and a `scaling_factor` that makes
    latents unit-variance. Here the log-variance head is set to -30 (std 3e-7) and the scaling factor measured.
    """
    pipe = tiny_pipeline(family, seed)
    vae = pipe.vae
    with torch.no_grad():
        conv = vae.quant_conv
        half = conv.out_channels // 2
        conv.weight[half:] = 0
        conv.bias[half:] = -30
        z = vae.encode(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1).latent_dist
        vae.register_to_config(scaling_factor=float(1 / z.mean.std()), shift_factor=0.0)
    return pipe


def red_blue_images(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` reddish and `n` bluish noisy images `[n, 3, size, size]` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    red = torch.rand(n, 3, size, size, generator=g) * 0.3
    blue = torch.rand(n, 3, size, size, generator=g) * 0.3
    red[:, 0] += 0.6
    blue[:, 2] += 0.6
    return red, blue


def red_over_blue_pairs(n: int, seed: int = 0) -> PreferencePairs:
    """Pairs of one prompt where the reddish image is preferred."""
    red, blue = red_blue_images(n, seed)
    return PreferencePairs.from_tensors(["a red square"] * n, red, blue)


class Redness(RewardModel):
    """Mean red minus mean blue: a reward the tiny models can move."""

    name = "redness"

    def _score(self, pixels, prompts):
        return pixels[:, 0].mean(dim=(1, 2)) - pixels[:, 2].mean(dim=(1, 2))


class Brightness(RewardModel):
    """Mean pixel value."""

    name = "brightness"

    def _score(self, pixels, prompts):
        return pixels.mean(dim=(1, 2, 3))


class CrashingBrightness(Brightness):
    """Brightness that fails on its `crash_at`-th call, as a job killed mid-run (mid-iteration, mid-epoch)."""

    def __init__(self, crash_at: int):
        super().__init__()
        self.calls, self.crash_at = 0, crash_at

    def _score(self, pixels, prompts):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        return super()._score(pixels, prompts)


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.engine.named_parameters}


# -- synthetic Pick-a-Pic files ---------------------------------------------------------------------------------------


def png(color, size=8):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_parquet(path, rows, row_group_size=None):
    """Rows of (caption, jpg_0, jpg_1, label_0[, are_different]) in the Pick-a-Pic column layout."""
    table = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "are_different": []}
    for caption, a, b, label, *different in rows:
        table["caption"].append(caption)
        table["jpg_0"].append(a)
        table["jpg_1"].append(b)
        table["label_0"].append(float(label))
        table["label_1"].append(1 - float(label))
        table["are_different"].append(different[0] if different else True)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path, row_group_size=row_group_size)
    return path


SPLITS = {"train": 2, "validation": 1, "validation_unique": 1, "test": 1, "test_unique": 1}


def hub_snapshot(root, rows_per_shard=3):
    """A snapshot of a Pick-a-Pic-like hub dataset: `data/{split}-NNNNN-of-MMMMM-{hash}.parquet`, captions
    `"{split} {shard} {row}"`, row groups of 2 rows, a tie as each shard's last row."""
    colors = [png((40 * k, 255 - 40 * k, 7 * k)) for k in range(rows_per_shard + 1)]
    for split, n in SPLITS.items():
        for k in range(n):
            rows = [(f"{split} {k} {r}", colors[r], colors[r + 1], r % 2) for r in range(rows_per_shard - 1)]
            rows.append((f"{split} {k} tie", colors[0], colors[1], 0.5))
            pickapic_parquet(root / "data" / f"{split}-{k:05d}-of-{n:05d}-{k}a7f3.parquet", rows, row_group_size=2)
    (root / "README.md").write_text("---\nlicense: unknown\n---\n")
    return root
