"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann, `sac+logos+ava1-l14-linearMSE.pth`).

`score = MLP(E_img(x) / ||E_img(x)||)` with `E_img` the projected image embedding of OpenAI CLIP ViT-L/14 and MLP the
linear head 768-1024-128-64-16-1 (dropouts between, the ReLUs commented out in the reference, so it is affine),
trained with MSE on AVA, SAC and logo ratings: about 1-10.

Reference (christophschuhmann/improved-aesthetic-predictor `simple_inference.py`): `clip.load("ViT-L/14")` and
its preprocess (`Resize(224, bicubic) -> CenterCrop(224)` on PIL, OpenAI normalization), the embedding normalized in
float, `MLP(768)` loaded from the `.pth` state dict (keys `layers.{0,2,4,6,7}.{weight,bias}`).
Here: the CLIP ViT-L/14 weights come from the transformers folder `openai/clip-vit-large-patch14` (the same OpenAI
weights, as in flow_grpo's scorer), image tower only; the head stays float32 whatever the backbone dtype.
The same MLP is ImageReward's head (`visalign.reward_models.imagereward`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPVisionModelWithProjection

from visalign.reward_models.loading import (
    cast_backbone,
    load_checkpoint,
    load_mapped_state_dict,
    load_transformers_model,
    read_json,
    resolve_file,
    resolve_folder,
)
from visalign.reward_models.preprocess import ImageTransform, PixelValuesReward
from visalign.types import RewardOutput

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SOURCE = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
CLIP_L14 = "openai/clip-vit-large-patch14"


class CLIPImageTower(CLIPVisionModelWithProjection):
    """CLIP's image tower and projection, loadable from a full `CLIPModel` folder (the text tower is skipped)."""

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]


class AestheticMLP(nn.Module):
    """The aesthetic predictor's head: `[B, input_size]` -> `[B]`, Linear 1024-128-64-16-1 with dropouts only.

    Module indices follow the reference `nn.Sequential`, so its state dict keys are `layers.{0,2,4,6,7}.*`.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.to(self.layers[0].weight.dtype)).squeeze(-1)


class LAIONAesthetic(PixelValuesReward):
    """LAION aesthetic score of each image (the prompt is ignored).

    Args:
        vision: a transformers `CLIPVisionModelWithProjection` (CLIP ViT-L/14 for the released head).
        head: the `AestheticMLP` over its L2-normalized `image_embeds`.
        transform: default: the vision model's image size with OpenAI CLIP's (torchvision) geometry.
    """

    name = "aesthetic"

    def __init__(
        self, vision: CLIPVisionModelWithProjection, head: AestheticMLP, *, transform: ImageTransform | None = None
    ) -> None:
        super().__init__()
        if head.layers[0].in_features != vision.visual_projection.out_features:
            raise ValueError(
                f"`head` takes {head.layers[0].in_features} features but `vision` projects to "
                f"{vision.visual_projection.out_features}"
            )
        self.vision = vision
        self.head = head
        self.transform = (
            transform if transform is not None else ImageTransform(vision.config.image_size, "torchvision")
        )

    def score_pixel_values(self, pixel_values: Tensor, prompts: list[str]) -> RewardOutput:
        self.check_pixel_values(pixel_values, prompts)
        x = pixel_values.to(self.vision.vision_model.embeddings.patch_embedding.weight.dtype)
        embedding = F.normalize(self.vision(pixel_values=x).image_embeds.float(), dim=-1)
        return RewardOutput(self.head(embedding).float())

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        clip: str = CLIP_L14,
        filename: str = AESTHETIC_FILE,
    ) -> LAIONAesthetic:
        """Load the head from `pretrained` and the CLIP image tower from `clip`.

        Args:
            pretrained: the head's `.pth` file, a folder holding `filename`, or a Hub repo id holding it. The file is
                released in the GitHub repo christophschuhmann/improved-aesthetic-predictor, not on the Hub.
            dtype: precision of the CLIP image tower (the head stays float32).
            clip: a transformers `CLIPModel` folder or Hub repo; only its image tower is loaded.
            filename: the head's file name inside a folder or repo.
        """
        if pretrained is None:
            raise FileNotFoundError(
                f"LAION aesthetic: pass `pretrained`, the path of {filename} (download it from {AESTHETIC_SOURCE})"
            )
        path = resolve_file(pretrained, filename, what="LAION aesthetic")
        state = load_checkpoint(path, what="LAION aesthetic")
        folder = resolve_folder(
            clip, ["*.json", "*.safetensors"], required=["config.json"], what="LAION aesthetic (clip)"
        )
        model_type = read_json(folder / "config.json", what="LAION aesthetic (clip)").get("model_type")
        if model_type != "clip":
            raise ValueError(
                f"LAION aesthetic: `clip` {clip!r} is not a transformers CLIPModel folder ({model_type=})"
            )
        config = CLIPConfig.from_pretrained(folder)
        config.vision_config.projection_dim = config.projection_dim  # the image tower alone, projection included
        vision = load_transformers_model(
            CLIPImageTower, folder, what="LAION aesthetic (clip)", config=config.vision_config
        )
        head = AestheticMLP(vision.visual_projection.out_features)
        load_mapped_state_dict(head, state, lambda k: k, what="LAION aesthetic", source=str(Path(path)))
        vision = cast_backbone(vision, dtype)
        return cls(vision, head.eval()).requires_grad_(False).eval()
