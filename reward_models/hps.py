"""HPSv2 and HPSv2.1 (Wu et al., 2023, "Human Preference Score v2"): a fine-tuned open_clip ViT-H-14.

`score = cos(E_img(x), E_txt(p))` with L2-normalized features (no logit scale); the HPSv2 benchmark tables
multiply by 100. The two versions are different fine-tunes whose scores are not comparable with each other.

Reference (tgxs002/HPSv2 `hpsv2/img_score.py`): `create_model_and_transforms('ViT-H-14', ...)` on a vendored fork of
open_clip, then `model.load_state_dict(torch.load(cp)['state_dict'])` from `HPS_v2_compressed.pt` or
`HPS_v2.1_compressed.pt` (Hub repo `xswu/HPSv2`); `light_augmentation=True` gives the eval transform
`ToTensor -> ResizeMaxSize(224) -> Normalize`: longest side to 224 and zero padding, not a crop
(`ImageTransform(style="hpsv2")`); open_clip's `SimpleTokenizer`, 77 tokens.

Here: upstream open_clip's `CLIP` built from the same config (its module tree, hence its key names, is the fork's),
the state dict read with `weights_only=True` and loaded with `strict=True` through the identity key map.
Deviations: the reference runs under CUDA fp16 autocast; here the backbone runs in `dtype` and the cosine in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import open_clip
import torch

from visalign.reward_models.clip import CLIPScorer, load_open_clip
from visalign.reward_models.loading import refuse_learned_head, resolve_file
from visalign.reward_models.preprocess import ImageTransform

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(CLIPScorer):
    """HPSv2 / HPSv2.1: the cosine of an open_clip CLIP, about 0.25-0.30 on generated images.

    Args:
        model: an open_clip `CLIP` holding the HPS weights.
        tokenizer: open_clip's `SimpleTokenizer`.
        version: `"v2.0"` or `"v2.1"` (reported as the name `hpsv2` / `hpsv2.1`).
        transform: default: longest side to the model's image size, zero padding (HPSv2's eval transform).
    """

    name = "hpsv2"

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer: Any,
        *,
        version: str = "v2.1",
        transform: ImageTransform | None = None,
    ) -> None:
        if version not in HPS_FILES:
            raise ValueError(f"`version` must be one of {sorted(HPS_FILES)}, got {version!r}")
        if not isinstance(model, open_clip.CLIP):
            raise ValueError(f"`model` must be an open_clip CLIP, got {type(model).__name__}")
        transform = transform if transform is not None else ImageTransform(model.visual.image_size[0], "hpsv2")
        name = "hpsv2" if version == "v2.0" else "hpsv2.1"
        super().__init__(model, tokenizer, transform=transform, scale=1.0, name=name)
        self.version = version

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        version: str = "v2.1",
        architecture: str | Mapping[str, Any] = "ViT-H-14",
    ) -> HPSv2:
        """Load `HPS_v2_compressed.pt` (v2.0) or `HPS_v2.1_compressed.pt` (v2.1).

        Args:
            pretrained: the `.pt` file, a folder holding it, or a Hub repo id (default `xswu/HPSv2`).
            dtype: backbone precision (the cosine stays float32).
            version: `"v2.0"` or `"v2.1"`.
            architecture: the open_clip model name or config dict the weights belong to (tests use tiny configs).
        """
        if version not in HPS_FILES:
            raise ValueError(f"`version` must be one of {sorted(HPS_FILES)}, got {version!r}")
        what = f"HPS{version}"
        refuse_learned_head(pretrained, what=what)
        path = resolve_file(pretrained or HPS_REPO, HPS_FILES[version], what=what)
        model, tokenizer = load_open_clip(path, architecture, dtype, key="state_dict", what=what)
        return cls(model, tokenizer, version=version).eval()
