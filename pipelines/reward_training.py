"""Reward-model training: learn a scalar, multi-aspect or dense reward from preferences and labels.

Papers: PickScore (Kirstain et al. 2023, arXiv 2305.01569), HPSv2 (Wu et al. 2023, arXiv 2306.09341), ImageReward
(Xu et al. 2023, arXiv 2304.05977), the LAION aesthetic predictor (Schuhmann 2022), ImageDoctor (Guo et al. 2025,
arXiv 2510.01010), MJ-VIDEO (Tong et al. 2025, arXiv 2502.01719), Rich Human Feedback (Liang et al. 2024,
arXiv 2312.10240).

The model is a `visalign.reward_models.learned.LearnedReward`: a CLIP with a cosine (PickScore, HPSv2), MLP
(aesthetic predictor) or multi-aspect head and an optional dense heatmap head. The objectives are the pure functions
below: `bradley_terry_loss` (PickScore's softmax over the pair, ties as 0.5 / 0.5), `regression_loss` (MSE on scores
and per-aspect labels, as the aesthetic predictor) and `heatmap_loss` (MSE or BCE on per-patch maps, RichHF's and
HPSv2's regional heads). A pair batch trains the score with Bradley-Terry and, when rows carry `aspect_labels`, each
aspect with its own Bradley-Terry term; a batch of scored images trains scores, aspects and maps by regression.

`RewardTrainer` runs them on the shared `visalign.engine.Engine`: the whole reward is one frozen component and the
trained parameters (`TrainedParts`: the chosen towers, the heads, the logit scale) another, trained whole or with
LoRA on the towers' linear layers (heads and logit scale then still train fully). At the end the reward is written
into `output_dir` next to the engine's files, in the loaders' layouts (`visalign.reward_models.learned`), so
`load_reward("world-clip", pretrained=output_dir)` (a transformers cosine reward) or
`load_reward("learned", pretrained=output_dir)` (any kind) serves it.

    visalign train reward --config configs/world_reward.yaml

Deviations: before training, the cosine head's `logit_scale` is set to its Bradley-Terry maximum-likelihood value on
training pairs (`calibrate_logit_scale`; PickScore starts from CLIP's 100: see `RewardTrainer.calibrate_logit_scale`
for why). PickScore weights each example by `1 / (examples of its prompt)` over the dataset (`weight_by_prompt`,
kept); HPSv2 clamps `logit_scale` to `[0, ln 100]` after each step (done here for the cosine head); PickScore has no
LoRA and no frozen tower (options here); soft labels other than 0, 0.5 and 1 are accepted, their entropy subtracted
(the KL form of PickScore's `+ log 0.5` for ties).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPModel

from visalign.config import TrainConfig
from visalign.engine import Engine
from visalign.lifecycle import TrainingLoop
from visalign.loading import load_generator
from visalign.pipelines.preference_data import IndexSampler
from visalign.pipelines.reward_data import WORLD_HELDOUT, WORLD_TRAIN, RewardPairs, ScoredImages, load_reward_data
from visalign.reward_models.heatmaps import to_latent_grid
from visalign.reward_models.learned import LearnedReward, build_reward, load_backbone, save_reward
from visalign.reward_models.preprocess import ImageTransform

logger = logging.getLogger(__name__)

TOWERS = {"both": ("vision", "text"), "vision": ("vision",), "text": ("text",), "none": ()}
LORA_FILE = "reward_lora.safetensors"
VISION_CHILDREN = ("vision_model", "visual_projection", "visual")  # transformers / open_clip image tower
SCALE_PARAMETERS = ("logit_scale", "logit_bias")
LORA_TARGETS = {"transformers": ["q_proj", "k_proj", "v_proj", "out_proj"], "open_clip": ["c_fc", "c_proj"]}
MAX_LOGIT_SCALE = math.log(100)  # CLIP's and HPSv2's clamp of the learned temperature


# ---------------------------------------------------------------------------------------------------------------
# The objectives


def bradley_terry_loss(score_0: Tensor, score_1: Tensor, label_0: Tensor, weight: Tensor | None = None) -> Tensor:
    """PickScore's pair loss (Kirstain et al. 2023, `trainer/criterions/clip_criterion.py`).

    With `p = softmax([s_0, s_1])` (a Bradley-Terry model on the logits, `p_0 = sigmoid(s_0 - s_1)`) and the target
    `(label_0, 1 - label_0)`, each pair costs the cross-entropy minus the target's entropy, i.e. `KL(target || p)`:
    for labels 1 and 0 that is `-log p_winner`; for a tie (0.5 / 0.5) it is PickScore's
    `-(0.5 log p_0 + 0.5 log p_1) + log 0.5`, zero when `s_0 = s_1`. The batch mean is weighted by `weight`
    (PickScore: `1 / examples of the prompt`, normalized to sum to 1); None is the plain mean.

    Args:
        score_0, score_1 (`Tensor` `[B]`): the logits of image 0 and image 1 (`exp(logit_scale) * cos` for CLIP).
        label_0 (`Tensor` `[B]`): the probability that image 0 is preferred, in [0, 1] (Pick-a-Pic: 1, 0, 0.5).
        weight (`Tensor` `[B]`, *optional*): non-negative example weights.
    Returns a scalar in the inputs' float dtype (float64 when an input is).
    """
    for name, t in {"score_0": score_0, "score_1": score_1, "label_0": label_0}.items():
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] == 0 or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a non-empty 1-D float tensor [B]")
        if t.shape != score_0.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, `score_0` has {tuple(score_0.shape)}")
    if not torch.all((label_0 >= 0) & (label_0 <= 1)):
        raise ValueError(f"`label_0` must lie in [0, 1], got {label_0.tolist()}")
    dtype = torch.float64 if torch.float64 in (score_0.dtype, score_1.dtype, label_0.dtype) else torch.float32
    d = score_0.to(dtype) - score_1.to(dtype)
    y = label_0.to(dtype)
    cross_entropy = -(y * F.logsigmoid(d) + (1 - y) * F.logsigmoid(-d))
    entropy = -(torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y))
    losses = cross_entropy - entropy
    if weight is None:
        return losses.mean()
    if weight.shape != d.shape or not torch.all(weight >= 0) or not weight.sum() > 0:
        raise ValueError("`weight` must be a non-negative [B] tensor with a positive sum")
    w = weight.to(dtype)
    return (losses * w).sum() / w.sum()


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the finite entries of `target` (NaN marks a missing label); 0 when none is finite.

    The aesthetic predictor's objective (MSE on ratings), used here for scores and per-aspect labels.
    `prediction` and `target` have the same shape; float64 when either is.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"`prediction` {tuple(prediction.shape)} and `target` {tuple(target.shape)} differ in shape")
    dtype = torch.float64 if torch.float64 in (prediction.dtype, target.dtype) else torch.float32
    present = torch.isfinite(target)
    if not present.any():
        return prediction.sum().to(dtype) * 0  # keeps the graph (DDP expects every head to get a gradient)
    diff = prediction.to(dtype)[present] - target.to(dtype)[present]
    return (diff**2).mean()


def heatmap_loss(logits: Tensor, target: Tensor, kind: Literal["mse", "bce"] = "mse") -> Tensor:
    """Dense loss between predicted per-patch `logits` `[B, h, w]` and a target map `[B, h, w]` in [0, 1].

    `"mse"`: `mean (sigmoid(logits) - target)^2` (RichHF's heatmap regression; HPSv2's regional head);
    `"bce"`: binary cross-entropy with logits against the soft target. Float64 when an input is.
    """
    if kind not in ("mse", "bce"):
        raise ValueError(f"`kind` must be 'mse' or 'bce', got {kind!r}")
    if logits.shape != target.shape or logits.ndim != 3:
        raise ValueError(f"`logits` {tuple(logits.shape)} and `target` {tuple(target.shape)} must both be [B, h, w]")
    if not torch.all((target >= 0) & (target <= 1)):
        raise ValueError("`target` values must lie in [0, 1]")
    dtype = torch.float64 if torch.float64 in (logits.dtype, target.dtype) else torch.float32
    x, y = logits.to(dtype), target.to(dtype)
    if kind == "mse":
        return ((torch.sigmoid(x) - y) ** 2).mean()
    return F.binary_cross_entropy_with_logits(x, y)


def fit_logit_scale(cosine_0: Tensor, cosine_1: Tensor, label_0: Tensor, *, max_scale: float = 100.0) -> float:
    """The Bradley-Terry maximum-likelihood scale `a` of `p_0 = sigmoid(a (cos_0 - cos_1))` on labelled pairs.

    `bradley_terry_loss` is minimized over 512 scales spaced evenly in `log a` on `[1, max_scale]` (CLIP's range);
    the loss is convex in `a`, so the grid's best point is within 1% of the optimum.
    """
    scales = torch.exp(torch.linspace(0.0, math.log(max_scale), 512, dtype=torch.float64))
    d = (cosine_0.double() - cosine_1.double())[None] * scales[:, None]
    losses = [bradley_terry_loss(row, torch.zeros_like(row), label_0.double()) for row in d]
    return float(scales[int(torch.stack(losses).argmin())])


def per_prompt_weights(captions: Sequence[str]) -> Tensor:
    """PickScore's example weights: `1 / (number of examples with the same caption)`, `[N]` float32."""
    counts = Counter(captions)
    return torch.tensor([1.0 / counts[c] for c in captions])


# ---------------------------------------------------------------------------------------------------------------
# What the engine trains


class TrainedParts(nn.Module):
    """The parameters of a `LearnedReward` that train, as the one module the engine optimizes.

    It holds the chosen towers (`"vision"`: the image tower and its projection; `"text"`: the rest of the CLIP but
    the logit scale), the heads and, for the cosine head, `logit_scale`: the same module and parameter objects as
    the reward's, so training them trains the reward. Its forward is the reward's `outputs`, so a DDP wrapper of it
    synchronizes their gradients.
    """

    def __init__(self, reward: LearnedReward, towers: str = "both") -> None:
        super().__init__()
        if towers not in TOWERS:
            raise ValueError(f"`towers` must be one of {sorted(TOWERS)}, got {towers!r}")
        if towers == "none" and reward.heads.head == "cosine":
            raise ValueError(
                "the cosine head has nothing to train with frozen towers: train a tower or use head='mlp'"
            )
        if "text" in TOWERS[towers] and not reward.heads.needs_text:
            raise ValueError("head_input='image' never reads the text tower: train 'vision' or 'none'")
        self._reward = (reward,)  # a tuple hides it from module registration: only what trains is a child
        model = reward.model
        tower_of = lambda name: "vision" if name in VISION_CHILDREN else "text"  # noqa: E731
        chosen = TOWERS[towers]
        self.backbone = nn.ModuleDict({n: m for n, m in model.named_children() if tower_of(n) in chosen})
        self.backbone_parameters = nn.ParameterDict(
            {
                n: p
                for n, p in model.named_parameters(recurse=False)
                if n not in SCALE_PARAMETERS and tower_of(n) in chosen
            }
        )
        self.heads = reward.heads
        if reward.heads.head == "cosine":
            self.logit_scale = model.logit_scale

    def forward(self, pixel_values: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return self._reward[0].outputs(pixel_values, prompts)

    def add_adapter(self, config: LoraConfig) -> None:
        """LoRA on the trained towers' `config.target_modules`; heads (and the logit scale) train fully."""
        if not len(self.backbone):
            raise ValueError("no tower trains (train_towers='none'), so LoRA has nothing to adapt: set use_lora=false")
        inject_adapter_in_model(config, self.backbone)
        self.peft_config = self.backbone.peft_config  # read by the engine's adapter export
        self.heads.requires_grad_(True)
        if self._reward[0].heads.head == "cosine":
            self.logit_scale.requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        model = self._reward[0].model
        if isinstance(model, CLIPModel):
            model.gradient_checkpointing_enable()
        else:
            model.set_grad_checkpointing(True)

    def save_pretrained(self, folder: str | Path) -> None:
        """The trained parameters as `trained.safetensors` (the engine's full fine-tuning export)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        trained = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}
        save_file(trained, Path(folder) / "trained.safetensors")


class RewardComponents:
    """What the engine reads of a pipeline, for a reward: `components` (the whole reward, frozen, and the
    `TrainedParts`, trained) and `save_lora_weights` (its adapter export)."""

    def __init__(self, reward: LearnedReward, parts: TrainedParts) -> None:
        self.components = {"reward": reward, "trained": parts}

    @staticmethod
    def save_lora_weights(
        folder: str | Path, trained_lora_layers: dict[str, Tensor], trained_lora_adapter_metadata: dict
    ) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in trained_lora_layers.items()}, Path(folder) / LORA_FILE)
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in trained_lora_adapter_metadata.items()}
        (Path(folder) / "reward_lora_config.json").write_text(json.dumps(metadata, indent=2, default=str))


@dataclass
class RewardConfig(TrainConfig):
    """`visalign train reward`: fine-tune a CLIP scorer or train heads from preference pairs or labelled images."""

    output_dir: str = field(default="runs/reward", metadata={"help": "The engine's files and the trained reward."})
    pretrained_model_name_or_path: str = field(
        default="world:clip",
        metadata={
            "help": "The backbone: a transformers CLIPModel folder or hub id (`world:clip` = the shapes world's), or "
            "with `architecture` an open_clip checkpoint file."
        },
    )
    architecture: str | dict[str, Any] | None = field(
        default=None, metadata={"help": "An open_clip model name or config dict: the backbone is open_clip (HPSv2)."}
    )
    checkpoint_key: str | None = field(
        default=None, metadata={"help": "open_clip: the entry holding the state dict (HPS files: state_dict)."}
    )
    image_transform: Literal["transformers", "torchvision", "hpsv2"] | None = field(
        default=None, metadata={"help": "Preprocessing style; None = the backbone's default (CLIPScorer)."}
    )
    head: Literal["cosine", "mlp", "aspects"] = field(
        default="cosine", metadata={"help": "cosine (PickScore/HPSv2), mlp (aesthetic), aspects (multi-aspect)."}
    )
    head_input: Literal["image", "image_text"] = field(
        default="image_text", metadata={"help": "Features of the mlp and aspects heads: image, or image and text."}
    )
    head_hidden: int = field(default=256, metadata={"help": "Hidden width of the aspects MLP."})
    score_scale: float | None = field(
        default=None, metadata={"help": "Cosine head: served score = this * cos; None = exp(logit_scale) (PickScore)."}
    )
    train_towers: Literal["both", "vision", "text", "none"] = field(
        default="both", metadata={"help": "CLIP towers that train (none = head-only on frozen embeddings)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the trained towers (else full fine-tuning)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Linear layers with adapters; empty = q/k/v/out_proj (transformers), c_fc/c_proj (open_clip)."
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    adam_weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    aspects: list[str] = field(default_factory=list, metadata={"help": "Aspect names (head: aspects)."})
    aspect_weights: list[float] = field(
        default_factory=list, metadata={"help": "Fixed aspect weights in the score; empty = learned (softmax)."}
    )
    aspect_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the per-aspect terms."})
    heatmaps: list[str] = field(default_factory=list, metadata={"help": "Dense map names (a heatmap head)."})
    heatmap_loss: Literal["mse", "bce"] = field(default="mse", metadata={"help": "Dense loss: mse or bce."})
    heatmap_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the dense term."})
    train_data: str = field(
        default="world:pairs",
        metadata={"help": "Pairs (Pick-a-Pic parquet/jsonl/folder, HPDv2 .json), scored images, or world:pairs."},
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data (same forms, world:heldout-pairs)."})
    split: str = field(
        default="train", metadata={"help": "Pick-a-Pic shards or hub dataset: the split of `train_data`."}
    )
    eval_split: str = field(
        default="validation", metadata={"help": "Pick-a-Pic shards or hub dataset: the split of `eval_data`."}
    )
    data_format: Literal["auto", "pickapic", "hpdv2", "scores"] = field(
        default="auto", metadata={"help": "auto: .json is HPDv2, else Pick-a-Pic pairs; scores: labelled images."}
    )
    image_root: str | None = field(default=None, metadata={"help": "HPDv2: the image folder (default: the json's)."})
    resolution: int | None = field(default=None, metadata={"help": "Resize and center-crop file images to this."})
    ties: Literal["keep", "drop"] = field(default="keep", metadata={"help": "Tied pairs: train on them, or drop."})
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "Bad rows: raise, or skip them."})
    weight_by_prompt: bool = field(default=True, metadata={"help": "PickScore's 1 / (examples of the prompt)."})
    calibrate_logit_scale: bool = field(
        default=True, metadata={"help": "Cosine head on pairs: start from the logit scale fitted on training pairs."}
    )
    calibration_pairs: int = field(default=1024, metadata={"help": "Training pairs the starting scale is fitted on."})
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Pairs (or images) per micro-batch and process."}
    )
    eval_steps: int = field(
        default=100,
        metadata={"help": "Evaluate every this many steps; always at the start and the end (0: only then)."},
    )
    eval_batch_size: int = field(default=128, metadata={"help": "Pairs per evaluation batch."})
    world_pairs: int = field(default=10000, metadata={"help": "world:pairs: how many training pairs."})
    world_eval_pairs: int = field(default=1000, metadata={"help": "world:heldout-pairs: how many (clean, no ties)."})
    label_noise: float = field(default=0.1, metadata={"help": "world:pairs: probability of flipping a label."})
    world_generator: str | None = field(
        default=None, metadata={"help": "world pairs: a pipeline (world:sd3) whose samples join the renders."}
    )
    world_generated_fraction: float = field(
        default=0.3, metadata={"help": "world pairs: the fraction of pairs made of generated images."}
    )
    world_num_inference_steps: int = field(default=10, metadata={"help": "world pairs: sampling steps."})
    report_to: str = field(default="none", metadata={"help": "accelerate tracker: tensorboard, wandb, all, none."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "eval_batch_size",
            "head_hidden",
            "world_pairs",
            "world_eval_pairs",
            "calibration_pairs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"`label_noise` must be in [0, 0.5), got {self.label_noise}")
        if not 0 <= self.world_generated_fraction <= 1:
            raise ValueError(f"`world_generated_fraction` must be in [0, 1], got {self.world_generated_fraction}")
        if self.train_towers == "none" and self.use_lora:
            raise ValueError("head-only training (train_towers='none') has no tower to adapt: set use_lora=false")
        if self.aspect_weights and any(w < 0 for w in self.aspect_weights):
            raise ValueError(f"`aspect_weights` must be >= 0, got {self.aspect_weights}")
        if self.score_scale is not None and not self.score_scale > 0:
            raise ValueError(f"`score_scale` must be > 0 or null, got {self.score_scale}")


class RewardTrainer(TrainingLoop):
    """Train a `LearnedReward` on pairs (`RewardPairs`) or labelled images (`ScoredImages`) with the engine; the loop
    is `visalign.lifecycle.TrainingLoop.train`.

    Args:
        config (`RewardConfig`): the recipe.
        reward (`LearnedReward`): the model; its `TrainedParts` (from `config.train_towers`) train.
        train_data: `visalign.pipelines.reward_data.RewardPairs` or `ScoredImages`.
        eval_data: the same kinds, evaluated at the start, every `eval_steps` steps and at the end.
    """

    def __init__(
        self,
        config: RewardConfig,
        reward: LearnedReward,
        train_data: RewardPairs | ScoredImages,
        eval_data: RewardPairs | ScoredImages | None = None,
    ) -> None:
        if not isinstance(train_data, (RewardPairs, ScoredImages)):
            raise ValueError(f"`train_data` must be RewardPairs or ScoredImages, got {type(train_data).__name__}")
        self._check_labels(reward, train_data)
        self.config = config
        self.reward = reward
        self.parts = TrainedParts(reward, config.train_towers)
        targets = config.lora_target_modules or LORA_TARGETS[reward.backend]
        engine_config = dataclasses.replace(config, lora_target_modules=list(targets))
        self.engine = Engine(engine_config, RewardComponents(reward, self.parts), component="trained")
        cast_training_params(self.parts, torch.float32)  # full fine-tuning under mixed precision trains float32
        self.train_data, self.eval_data = train_data, eval_data
        self.is_pairs = isinstance(train_data, RewardPairs)
        self.weights = per_prompt_weights(train_data.captions) if config.weight_by_prompt else None
        self.sampler = IndexSampler(len(train_data), config.seed)

    @staticmethod
    def _check_labels(reward: LearnedReward, data: RewardPairs | ScoredImages) -> None:
        """Every head that trains needs a label for it in `data`."""
        heads = reward.heads
        missing_aspects = [a for a in heads.aspect_names if a not in data.aspect_names]
        if heads.heatmap_names and sorted(data.heatmap_names) != sorted(heads.heatmap_names):
            raise ValueError(f"the heatmap heads {list(heads.heatmap_names)} need maps of those names in the data")
        if heads.aspect_logits is not None and not data.has_overall:
            raise ValueError("learned aspect weights need overall labels (pairs, or a `score` per image)")
        if missing_aspects and not data.has_overall:
            raise ValueError(f"the data has no labels for the aspects {missing_aspects} and no overall label")

    @classmethod
    def from_config(cls, config: RewardConfig) -> RewardTrainer:
        """Build the backbone, the heads and the data the config names (what `visalign train reward` runs)."""
        torch.manual_seed(config.seed)
        model, tokenizer, architecture = load_backbone(
            config.pretrained_model_name_or_path, config.architecture, config.checkpoint_key
        )
        transform = None
        if config.image_transform is not None:
            size = (
                model.config.vision_config.image_size if isinstance(model, CLIPModel) else model.visual.image_size[0]
            )
            transform = ImageTransform(size, config.image_transform)
        reward = build_reward(
            model,
            tokenizer,
            head=config.head,
            head_input=config.head_input,
            aspects=config.aspects,
            aspect_weights=config.aspect_weights,
            heatmaps=config.heatmaps,
            hidden=config.head_hidden,
            transform=transform,
            scale=config.score_scale,
            architecture=architecture,
        )
        pipe = None
        if config.world_generator is not None and {WORLD_TRAIN, WORLD_HELDOUT} & {config.train_data, config.eval_data}:
            pipe = load_generator(config.world_generator)[0]
            pipe.set_progress_bar_config(disable=True)
        train = load_reward_data(config.train_data, config, split=config.split, pipe=pipe)
        evaluation = None
        if config.eval_data:
            evaluation = load_reward_data(config.eval_data, config, split=config.eval_split, pipe=pipe)
        return cls(config, reward, train, evaluation)

    @property
    def evaluates(self) -> bool:
        return self.eval_data is not None

    def begin(self, state: dict[str, Any] | None) -> None:
        """Resume the data order, or (a fresh run) fit the cosine head's starting logit scale; then train mode."""
        if state is not None:
            self.load_state_dict(state)
        elif self.config.calibrate_logit_scale and self.is_pairs and self.reward.heads.head == "cosine":
            self.calibrate_logit_scale()
        self.reward.train()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` rows
        per process; the cosine head's logit scale is clamped after it (HPSv2)."""
        engine, c = self.engine, self.config
        micro = c.per_device_train_batch_size * engine.num_processes  # one micro-batch, all processes
        drawn = self.sampler.draw(micro * c.gradient_accumulation_steps)
        sums: dict[str, float] = {}
        for m in range(c.gradient_accumulation_steps):
            indices = drawn[m * micro : (m + 1) * micro][engine.process_index :: engine.num_processes]
            with engine.accumulate(sync=m == c.gradient_accumulation_steps - 1), engine.autocast():
                loss, metrics = self.loss(indices)
                engine.backward(loss / c.gradient_accumulation_steps)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / c.gradient_accumulation_steps
        sums |= engine.optimizer_step()
        if self.reward.heads.head == "cosine":
            with torch.no_grad():
                self.reward.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return engine.mean_across_processes(sums)

    def export(self) -> None:
        """The trained reward in the loaders' layouts, in `output_dir` (EMA weights when on)."""
        self.reward.eval()
        if self.engine.is_main_process:
            with self.engine.ema_weights():
                save_reward(self.reward, self.engine.output_dir)

    @torch.no_grad()
    def calibrate_logit_scale(self) -> float:
        """Set `logit_scale` to `fit_logit_scale` on the first `calibration_pairs` training pairs; returns the scale.

        A pretrained CLIP's scale (about 100, or the shapes world's 23) makes it confident on every pair, so under
        label noise each flipped pair's gradient is large; one scalar trained at the backbone's learning rate moves
        too slowly to follow, and the features bend instead (measured on the world: held-out accuracy 97.6% -> 89%
        after 300 steps at 10% noise, 96-97% with the fitted start).
        """
        batch = self.train_data.batch(range(min(self.config.calibration_pairs, len(self.train_data))))
        images = torch.cat([batch["images_0"], batch["images_1"]]).to(self.engine.device)
        cosine = self.reward.outputs(self.reward.transform(images), batch["captions"] * 2)["cosine"]
        scale = fit_logit_scale(*cosine.chunk(2), batch["label_0"])
        self.reward.model.logit_scale.fill_(math.log(scale))
        logger.info("logit scale fitted on %d training pairs: %.3g", len(batch["captions"]), scale)
        return scale

    def forward(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """The heads' outputs on `images` `[N, 3, H, W]` in [0, 1] through the engine's (DDP) module."""
        pixel_values = self.reward.transform(images.to(self.engine.device))
        return self.engine.model(pixel_values, prompts)

    def loss(self, indices: list[int]) -> tuple[Tensor, dict[str, float]]:
        """The objective on the rows `indices` of the training data, and its terms as metrics."""
        batch = self.train_data.batch(indices)
        device, c = self.engine.device, self.config
        weight = None if self.weights is None else self.weights[indices].to(device)
        terms: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        if self.is_pairs:
            out = self.forward(torch.cat([batch["images_0"], batch["images_1"]]), batch["captions"] * 2)
            label = batch["label_0"].to(device)
            logits_0, logits_1 = out["logits"].chunk(2)
            terms["bradley_terry"] = bradley_terry_loss(logits_0, logits_1, label, weight)
            decided = label != 0.5
            if decided.any():
                metrics["train_accuracy"] = float(((logits_0 > logits_1) == (label > 0.5))[decided].float().mean())
            for k, name in enumerate(self.reward.heads.aspect_names):
                if name in self.train_data.aspect_names:
                    target = batch["aspect_labels"][:, self.train_data.aspect_names.index(name)].to(device)
                    present = torch.isfinite(target)
                    a_0, a_1 = out["aspects"][:, k].chunk(2)
                    terms[f"aspect/{name}"] = c.aspect_loss_weight * (
                        bradley_terry_loss(a_0[present], a_1[present], target[present])
                        if present.any()
                        else a_0.sum() * 0
                    )
        else:
            out = self.forward(batch["images"], batch["captions"])
            if self.train_data.has_overall:
                terms["score"] = regression_loss(out["score"], batch["score"].to(device))
            for k, name in enumerate(self.reward.heads.aspect_names):
                if name in self.train_data.aspect_names:
                    target = batch["aspects"][:, self.train_data.aspect_names.index(name)].to(device)
                    terms[f"aspect/{name}"] = c.aspect_loss_weight * regression_loss(out["aspects"][:, k], target)
            for m, name in enumerate(self.reward.heads.heatmap_names):
                logits = out["heatmap_logits"][:, m]
                target = to_latent_grid(batch["heatmaps"][name].to(device), tuple(logits.shape[-2:]))
                terms[f"heatmap/{name}"] = c.heatmap_loss_weight * heatmap_loss(logits, target, c.heatmap_loss)
        loss = torch.stack(list(terms.values())).sum()
        metrics |= {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        metrics["loss"] = float(loss.detach())
        if self.reward.heads.head == "cosine":
            metrics["logit_scale"] = float(self.reward.model.logit_scale.detach().exp())
        return loss, metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (EMA weights when on): pair accuracies, or score / aspect correlations."""
        from visalign.benchmarks.reward_eval import evaluate_reward

        self.reward.eval()
        with self.engine.ema_weights():
            result = evaluate_reward(self.reward, self.eval_data, batch_size=self.config.eval_batch_size)
        self.reward.train()
        return {f"eval/{k}": v for k, v in result["metrics"].items()}
