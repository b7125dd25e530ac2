"""GenEval without mmdetection: a Mask2Former detector through transformers with CLIP colors (`GenEvalDetector`), and
GenEval as a reward (`GenEvalReward`, Flow-GRPO's reward server). The rules are `visalign.reward_models.geneval_rules`.

The detector reproduces mmdetection 2.x's test pipeline and Mask2Former post-processing
(`mask2former_r50_lsj_8x2_50e_coco.py` test pipeline; `MaskFormerFusionHead.instance_postprocess`): resize keeping
the aspect ratio into 1333 x 800 (any input size), normalize, zero-pad to a multiple of 32; mask logits upsampled to
the padded input, cropped, upsampled to the original size (bilinear); the 100 best (query, class) pairs by softmax
probability (no-object left out); a pixel belongs to a mask when its logit is positive; score = class probability x
mean mask probability inside the mask; box = the mask's extent `(x0, y0, x1 + 1, y1 + 1)`.
Deviations: transformers' checkpoint (`facebook/mask2former-swin-small-coco-instance`) is the Meta release of the
same architecture, not mmdetection's LSJ training, so scores are close, not equal; resizing runs on float pixels
(mmcv resizes uint8 with OpenCV); images are quantized to 8 bits first, as a saved PNG would be, but not
JPEG-compressed as Flow-GRPO's client does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visalign.reward_models.geneval_rules import (
    COLORS,
    Detection,
    Detector,
    GenEvalRules,
    check_geneval,
    color_requests,
    geneval_reward,
    load_metadata,
)
from visalign.reward_models.loading import cast_backbone, load_transformers_model, resolve_folder
from visalign.reward_models.preprocess import ImageTransform
from visalign.rewards import RewardModel
from visalign.types import RewardOutput

logger = logging.getLogger(__name__)

DETECTOR = "facebook/mask2former-swin-small-coco-instance"
CLIP = "openai/clip-vit-large-patch14"
# GenEval's `object_names.txt`: the 80 COCO classes in COCO order, matched to the detector's labels by index
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# other spellings of the same COCO classes in detector configs (compared after dropping case and non-letters)
_COCO_ALIASES = {
    "mouse": "computermouse", "remote": "tvremote", "keyboard": "computerkeyboard", "tvmonitor": "tv",
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "pottedplant": "pottedplant",
    "diningtable": "diningtable", "hairdryer": "hairdrier",
}  # fmt: skip
COLOR_TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")
BACKGROUND = 0x99 / 255  # GenEval's crop background "#999"


# ---------------------------------------------------------------------------------------------------------------
# Mask2Former through transformers, and CLIP colors


def resized_shape(height: int, width: int, scale: tuple[int, int] = (1333, 800)) -> tuple[int, int]:
    """mmcv's `rescale_size` with `keep_ratio`: the largest size within `scale` (long, short) edges."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def instances_from_logits(
    class_logits: Tensor,
    mask_logits: Tensor,
    max_per_image: int = 100,
    min_score: float = 0.0,
    resize: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mmdetection's Mask2Former instance post-processing on one image (`instance_postprocess`).

    Args:
        class_logits (`Tensor` `[Q, C + 1]`): per-query class logits, the last being "no object".
        mask_logits (`Tensor` `[Q, h, w]`): per-query mask logits.
        max_per_image: how many of the best (query, class) pairs by class probability are kept.
        min_score: pairs whose class probability is at or below it are dropped before the masks are computed
            (their score, probability x mean mask probability, cannot exceed it).
        resize: maps the selected mask logits `[K, h, w]` to the image's size `[K, H, W]` (None: as they are).
    Returns: labels `[K]`, scores `[K]`, boxes `[K, 4]` (`x0, y0, x1 + 1, y1 + 1` of each mask, zeros for an empty
    one), masks `[K, H, W]` bool.
    """
    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1].flatten()
    probs, top = probs.topk(min(max_per_image, probs.numel()), sorted=False)
    keep = probs > min_score
    probs, top = probs[keep], top[keep]
    labels, pairs = top % num_classes, top // num_classes
    if not len(pairs):  # nothing can pass `min_score`
        size = resize(mask_logits[:1].float()).shape[1:] if resize is not None else mask_logits.shape[1:]
        return labels, probs, probs.new_zeros(0, 4), torch.zeros(0, *size, dtype=torch.bool, device=probs.device)
    queries, pair_query = pairs.unique(return_inverse=True)  # mask statistics once per query
    logits = mask_logits[queries].float()
    logits = resize(logits) if resize is not None else logits
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    cols, rows = masks.any(1), masks.any(2)  # [K, W], [K, H]
    w, h = cols.shape[1], rows.shape[1]
    ar_w, ar_h = torch.arange(w, device=masks.device), torch.arange(h, device=masks.device)
    x0, x1 = torch.where(cols, ar_w, w).amin(1, keepdim=True), torch.where(cols, ar_w, -1).amax(1, keepdim=True) + 1
    y0, y1 = torch.where(rows, ar_h, h).amin(1, keepdim=True), torch.where(rows, ar_h, -1).amax(1, keepdim=True) + 1
    boxes = torch.cat([x0, y0, x1, y1], 1).float() * cols.any(1, keepdim=True)  # an empty mask: zeros
    return labels, probs * mask_scores[pair_query], boxes[pair_query], masks[pair_query]


class GenEvalDetector(nn.Module, Detector):
    """GenEval's detector: a transformers `Mask2FormerForUniversalSegmentation` (COCO instance, 80 classes) plus a
    CLIP model for colors (`color_model`, a `CLIPScorer` whose encoders are used; None gives no colors).

    Args:
        model: the Mask2Former; its label `i` is GenEval's class `i`.
        color_model: a `visalign.reward_models.clip.CLIPScorer` with open_clip's OpenAI preprocessing
            (`ImageTransform(224, "torchvision")`), or None.
        image_mean, image_std: the detector's normalization (ImageNet's, as mmdetection's config).
        min_score: detections scoring at or below this are dropped at once (GenEval never keeps them: `> 0.3`).
        scale, size_divisor, max_per_image: mmdetection's test pipeline and `test_cfg`.
    """

    name = "geneval"

    def __init__(
        self,
        model: nn.Module,
        color_model: nn.Module | None = None,
        *,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        min_score: float = 0.3,
        scale: tuple[int, int] = (1333, 800),
        size_divisor: int = 32,
        max_per_image: int = 100,
    ) -> None:
        super().__init__()
        num_labels = model.config.num_labels
        if num_labels != len(GENEVAL_CLASSES):
            raise ValueError(f"`model` must have GenEval's {len(GENEVAL_CLASSES)} COCO classes, got {num_labels}")
        names = [model.config.id2label[i] for i in range(num_labels)]
        if not all(n.startswith("LABEL_") for n in names):
            key = [re.sub("[^a-z]", "", n.lower()) for n in names]
            odd = [
                f"{i}: {n!r}"
                for i, (n, k) in enumerate(zip(names, key))
                if _COCO_ALIASES.get(k, k) != re.sub("[^a-z]", "", GENEVAL_CLASSES[i])
            ]
            if odd:
                logger.warning("detector labels that differ from GenEval's classes (matched by index): %s", odd)
        self.model = model.eval().requires_grad_(False)
        self.color_model = color_model
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.min_score, self.scale, self.size_divisor = float(min_score), tuple(scale), size_divisor
        self.max_per_image = max_per_image
        self._text: dict[str, Tensor] = {}  # per class name: [10, D] normalized color text embeddings

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        color_model: str | None = CLIP,
        dtype: torch.dtype | None = None,
        min_score: float = 0.3,
    ) -> GenEvalDetector:
        """A Mask2Former COCO-instance folder or Hub repo (default `facebook/mask2former-swin-small-coco-instance`)
        and a transformers CLIP for colors (default `openai/clip-vit-large-patch14`, open_clip's `ViT-L-14`/`openai`
        weights; None: no colors). The image processor's mean and std are used when its config is there."""
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        what = "GenEval detector"
        folder = resolve_folder(
            pretrained or DETECTOR, ["*.json", "*.safetensors"], required=["config.json"], what=what
        )
        model = load_transformers_model(Mask2FormerForUniversalSegmentation, folder, what=what)
        norm = {}
        if (folder / "preprocessor_config.json").is_file():
            processor = Mask2FormerImageProcessor.from_pretrained(folder)
            norm = {"image_mean": processor.image_mean, "image_std": processor.image_std}
        clip = None
        if color_model is not None:
            from visalign.reward_models.clip import CLIPScorer, load_clip_tokenizer, load_transformers_clip

            clip_model = load_transformers_clip(color_model, dtype, what="GenEval color CLIP")
            clip = CLIPScorer(
                clip_model,
                load_clip_tokenizer(color_model, what="GenEval color CLIP"),
                transform=ImageTransform(clip_model.config.vision_config.image_size, "torchvision"),
                name="geneval-color",
            )
        return cls(cast_backbone(model, dtype), clip, min_score=min_score, **norm)

    def settings(self) -> dict:
        return {
            "detector": self.model.config.name_or_path,
            "color_model": None if self.color_model is None else self.color_model.model.config.name_or_path,
            "min_score": self.min_score,
            "scale": list(self.scale),
            "size_divisor": self.size_divisor,
            "max_per_image": self.max_per_image,
        }

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def detect(self, pixels: Tensor) -> list[Detection]:
        return self.detect_batch(pixels[None])[0]

    @torch.no_grad()
    def detect_batch(self, pixels: Tensor) -> list[list[Detection]]:
        """Detections with masks for each image of `pixels` (`[B, 3, H, W]` in [0, 1], any size), boxes and masks
        at the input size, sorted by descending score."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"`pixels` must have shape [B, 3, H, W], got {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        x = (pixels.to(self.device).float().clamp(0, 1) * 255).round() / 255  # an 8-bit image, as read from a file
        h, w = resized_shape(height, width, self.scale)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        ph, pw = -(-h // self.size_divisor) * self.size_divisor, -(-w // self.size_divisor) * self.size_divisor
        x = F.pad(x, (0, pw - w, 0, ph - h))
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x.to(dtype))
        results = []

        def resize(m: Tensor) -> Tensor:  # padded input size, crop the image, original size (mmdetection)
            m = F.interpolate(m[None], size=(ph, pw), mode="bilinear", align_corners=False)
            return F.interpolate(m[..., :h, :w], size=(height, width), mode="bilinear", align_corners=False)[0]

        for class_logits, mask_logits in zip(out.class_queries_logits, out.masks_queries_logits):
            labels, scores, boxes, masks = instances_from_logits(
                class_logits, mask_logits, self.max_per_image, self.min_score, resize
            )
            keep = (scores > self.min_score).nonzero().flatten()
            keep = keep[scores[keep].argsort(descending=True)]
            results.append(
                [
                    Detection(
                        GENEVAL_CLASSES[int(labels[k])], float(scores[k]), tuple(boxes[k].tolist()), None, masks[k]
                    )
                    for k in keep.tolist()
                ]
            )
        return results

    def _color_text(self, classname: str) -> Tensor:
        """clip_benchmark's zero-shot classifier: per color, the templates' normalized embeddings averaged and
        re-normalized, `[10, D]`."""
        key = f"{classname}@{self.device}"
        if key not in self._text:
            texts = [t.format(c=c, classname=classname) for c in COLORS for t in COLOR_TEMPLATES]
            emb = F.normalize(self.color_model.encode_text(texts).float(), dim=-1)
            emb = emb.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._text[key] = F.normalize(emb, dim=-1)
        return self._text[key]

    @torch.no_grad()
    def color_scores(self, requests: Sequence[tuple[Tensor, Sequence[Detection], str]]) -> list[Tensor]:
        """Cosine of each object's crop with each color's text embedding (`[n_objects, 10]` per request); each
        request is (pixels `[3, H, W]`, objects, class name).

        Each object is pasted on grey through its mask, cropped to its box, preprocessed as open_clip's OpenAI
        transform (shortest edge to 224 bicubic, center crop) and compared with the zero-shot classifier of its
        class (GenEval's `ImageCrops` and `color_classification`).
        """
        if self.color_model is None:
            raise ValueError("this GenEvalDetector has no `color_model`")
        crops, owners = [], []
        for r, (pixels, objects, _) in enumerate(requests):
            image = (pixels.to(self.device).float().clamp(0, 1) * 255).round() / 255
            for d in objects:
                x0, y0, x1, y1 = (int(round(v)) for v in d.box)
                pasted = image if d.mask is None else torch.where(d.mask.to(self.device), image, BACKGROUND)
                crop = pasted[:, max(y0, 0) : y1, max(x0, 0) : x1]
                if crop.shape[1] == 0 or crop.shape[2] == 0:
                    raise ValueError(f"`objects` hold a {d.label} with an empty box {d.box}")
                crops.append(self.color_model.transform(crop[None]))
                owners.append(r)
        out = [torch.zeros(0, len(COLORS), device=self.device) for _ in requests]
        if not crops:
            return out
        images = F.normalize(self.color_model.encode_image(torch.cat(crops)).float(), dim=-1)
        owners_t = torch.tensor(owners, device=self.device)
        for r, (_, _, classname) in enumerate(requests):
            out[r] = images[owners_t == r] @ self._color_text(classname).T
        return out

    def classify_colors_many(self, requests: Sequence[tuple[Tensor, Sequence[Detection], str]]) -> list[list]:
        """The argmax color of `color_scores` per object; None for every object without a color model."""
        if self.color_model is None:
            return [[None] * len(objects) for _, objects, _ in requests]
        return [[COLORS[i] for i in s.argmax(1).tolist()] for s in self.color_scores(requests)]

    def classify_colors(self, pixels: Tensor, objects: Sequence[Detection], classname: str) -> list:
        return self.classify_colors_many([(pixels, objects, classname)])[0]


# ---------------------------------------------------------------------------------------------------------------
# The reward


class GenEvalReward(RewardModel):
    """GenEval as a reward (Flow-GRPO's reward server): per image, strict correctness, the partial score and the
    official verdict.

    `score` is `aspects[score]` (default `"strict"`, 1 or 0; `"partial"` is what Flow-GRPO trains on). Aspects:
    `strict`, `partial` (mean of the clause terms, may be negative) and `accuracy` (GenEval's official verdict).
    `extras["reasons"]` holds the strict check's reason per image.

    A prompt is looked up in `metadata` (`{prompt: {"tag", "include", "exclude"}}`; default GenEval's 553 prompts)
    or is itself a JSON metadata object (a line of GenEval's metadata file).
    """

    name = "geneval"
    differentiable = False
    aspect_names = ("strict", "partial", "accuracy")

    def __init__(
        self,
        detector: Detector,
        metadata: Mapping[str, dict] | None = None,
        rules: GenEvalRules | None = None,
        score: str = "strict",
    ) -> None:
        super().__init__()
        if score not in self.aspect_names:
            raise ValueError(f"`score` must be one of {self.aspect_names}, got {score!r}")
        self.detector = detector
        self.metadata = dict(load_metadata() if metadata is None else metadata)
        self.rules = rules or GenEvalRules()
        if min(self.rules.threshold, self.rules.counting_threshold) < detector.min_score:
            raise ValueError(
                f"`rules` keep detections above {min(self.rules.threshold, self.rules.counting_threshold)}, but the "
                f"detector drops those at or below {detector.min_score}; lower its `min_score`"
            )
        self.score_name = score

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        color_model: str = CLIP,
        metadata: str | None = None,
        score: str = "strict",
    ) -> GenEvalReward:
        """`pretrained`: the Mask2Former folder or Hub repo (default `facebook/mask2former-swin-small-coco-instance`);
        `color_model`: the CLIP; `metadata`: a GenEval-format JSONL of the training prompts (default: GenEval's)."""
        detector = GenEvalDetector.from_pretrained(pretrained, color_model=color_model, dtype=dtype)
        return cls(detector, load_metadata(metadata), score=score).eval()

    def spec_of(self, prompt: str) -> dict:
        """The GenEval metadata of `prompt`: a JSON metadata object, or the metadata table's entry."""
        if prompt.lstrip().startswith("{"):
            try:
                spec = json.loads(prompt)
                spec["include"]
                return spec
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
        if prompt not in self.metadata:
            raise ValueError(
                f"prompt {prompt!r} has no GenEval metadata: pass a prompt of the metadata file "
                f"({len(self.metadata)} prompts) or a JSON metadata line"
            )
        return self.metadata[prompt]

    @torch.no_grad()
    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        specs = [self.spec_of(p) for p in prompts]
        detections = self.detector.detect_batch(pixels)
        # every color the rules will ask for, classified in one pass
        requests = [
            (i, objects)
            for i, (spec, dets) in enumerate(zip(specs, detections))
            for objects in color_requests(spec, dets, self.rules)
        ]
        colors = self.detector.classify_colors_many([(pixels[i], objs, objs[0].label) for i, objs in requests])
        known = {(i, tuple(id(d) for d in objs)): c for (i, objs), c in zip(requests, colors)}
        strict, partial, accuracy, reasons = [], [], [], []
        for i, (spec, dets) in enumerate(zip(specs, detections)):

            def lookup(objects: Sequence[Detection], classname: str, i: int = i) -> list:
                return known[(i, tuple(id(d) for d in objects))]

            s, p, why = geneval_reward(spec, dets, self.rules, lookup)
            official, _ = check_geneval(spec, dets, self.rules, lookup)
            strict.append(float(s))
            partial.append(p)
            accuracy.append(float(bool(official)))
            reasons.append(why)
        aspects = {
            name: torch.tensor(values, dtype=torch.float32, device=pixels.device)
            for name, values in (("strict", strict), ("partial", partial), ("accuracy", accuracy))
        }
        return RewardOutput(aspects[self.score_name], aspects, extras={"reasons": reasons})
