"""Rewards of the shapes world, served through the normal registry (`load_reward("world-verifier")`, ...).

- `world-verifier`: the fraction of the prompt's clauses that hold (not differentiable). Aspects: `correct`
  (all clauses hold) and one per clause kind (`object`, `color`, `count`, `position`): the fraction of that kind
  that holds, 1 when the prompt has none of that kind (nothing to violate). `score="partial"` (registered as
  `world-verifier-partial`) scores Flow-GRPO's partial GenEval score instead (`verifier.partial_score`: exact
  counts, so extra objects of a requested shape cost reward), the score Flow-GRPO trains on; on the shipped
  world model Flow-GRPO and Diffusion-DPO lose held-out accuracy on it (`benchmarks/results/README.md`).
  `score="exact"` (`world-verifier-exact`) keeps the binary clauses and takes only the exact counts
  (`verifier.exact_fraction`: an object clause fails when more objects of its shape are drawn than asked for).
  `score="tidy"` (`world-verifier-tidy`) is the fraction less 0.1 for each object beyond those asked for (at most
  three; `verifier.tidy_fraction`): among images that satisfy as many clauses, the one with fewer extras wins.
  `score="bonus"` (`world-verifier-bonus`) is `(fraction + correct) / 2`: the clauses' partial credit, and as much
  again for an image the judge passes whole (the held-out judge counts only those), so a relation or a second color
  got right weighs more than one more object present; Flow-GRPO and Diffusion-DPO gain less on it than on the
  fraction.
- `world-defects`: a dense, differentiable map of pixels whose color belongs to no requested object (a soft
  nearest-color test), as `heatmaps["defects"]`; score = 1 - mean of the map over the image.
- `world-clip`: the world's CLIP (trained by `visalign world train-base`), scored like PickScore; a CLIP reward, so
  it lives in the reward layer (`visalign.reward_models.clip.WorldCLIPReward`); `world_clip_folder` finds its folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from visalign.rewards import RewardModel
from visalign.types import RewardOutput
from visalign.world.scenes import BACKGROUND, COLORS, parse_prompt
from visalign.world.verifier import exact_fraction, partial_score, tidy_fraction, verify

CLAUSE_KINDS = ("object", "color", "count", "position")


class WorldVerifierReward(RewardModel):
    """Verifiable reward: fraction of satisfied clauses of a world prompt (`score="fraction"`), the same with exact
    counts (`score="exact"`), less a cost for extra objects (`score="tidy"`), with a bonus for a correct image
    (`score="bonus"`), or Flow-GRPO's partial GenEval score on the world's detections (`score="partial"`)."""

    name = "world-verifier"
    differentiable = False
    aspect_names = ("correct", *CLAUSE_KINDS)
    scores = ("fraction", "exact", "tidy", "bonus", "partial")

    def __init__(self, score: str = "fraction") -> None:
        super().__init__()
        if score not in self.scores:
            raise ValueError(f"`score` must be one of {self.scores}, got {score!r}")
        self.score_name = score

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, score: str = "fraction"
    ) -> RewardModel:
        if pretrained is not None:
            raise ValueError("`pretrained` must be None: the world verifier has no weights")
        return cls(score)

    @torch.no_grad()
    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        parsed = [parse_prompt(p) for p in prompts]
        verdicts = [verify(img, p) for img, p in zip(pixels.float().cpu().numpy(), parsed)]
        aspects = {"correct": [float(v.correct) for v in verdicts]}
        for kind in CLAUSE_KINDS:
            aspects[kind] = [
                sum(ok for k, ok, _ in v.clauses if k == kind) / max(1, sum(k == kind for k, _, _ in v.clauses))
                if any(k == kind for k, _, _ in v.clauses)
                else 1.0
                for v in verdicts
            ]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=pixels.device)  # noqa: E731
        if self.score_name == "partial":
            score = [partial_score(v.detections, p) for v, p in zip(verdicts, parsed)]
        elif self.score_name == "exact":
            score = [exact_fraction(v.detections, p) for v, p in zip(verdicts, parsed)]
        elif self.score_name == "tidy":
            score = [tidy_fraction(v, p) for v, p in zip(verdicts, parsed)]
        elif self.score_name == "bonus":
            score = [(v.fraction + v.correct) / 2 for v in verdicts]
        else:
            score = [v.fraction for v in verdicts]
        return RewardOutput(
            as_tensor(score),
            {k: as_tensor(v) for k, v in aspects.items()},
            extras={"reasons": [v.reason for v in verdicts]},
        )


class WorldDefectsReward(RewardModel):
    """Dense reward: soft map of foreground pixels whose color is none of the prompt's requested colors.

    For a pixel p, `fg(p) = sigmoid((||p - background|| - 0.2) / 0.03)` and
    `match(p) = max over allowed colors c of exp(-||p - c||^2 / (2 * width^2))`; the defect map is
    `fg(p) * (1 - match(p))`. Prompts that name no color allow every palette color, so only off-palette
    foreground counts.
    """

    name = "world-defects"
    heatmap_names = ("defects",)

    def __init__(self, width: float = 0.15):
        super().__init__()
        if width <= 0:
            raise ValueError(f"`width` must be positive, got {width}")
        self.width = width
        self.register_buffer("palette", torch.tensor(list(COLORS.values())), persistent=False)
        self.register_buffer("background", torch.tensor(BACKGROUND), persistent=False)

    @classmethod
    def from_pretrained(
        cls, pretrained: str | None = None, *, dtype: torch.dtype | None = None, width: float = 0.15
    ) -> RewardModel:
        if pretrained is not None:
            raise ValueError("`pretrained` must be None: the world defects map has no weights")
        return cls(width)

    def allowed(self, prompts: list[str]) -> Tensor:
        """`[B, n_colors]` mask of the palette colors each prompt allows."""
        names = list(COLORS)
        rows = []
        for text in prompts:
            wanted = {o.color for o in parse_prompt(text).objects}
            rows.append([c in wanted or None in wanted for c in names])
        return torch.tensor(rows, device=self.palette.device)

    def _score(self, pixels: Tensor, prompts: list[str]) -> RewardOutput:
        px = pixels.float().permute(0, 2, 3, 1)  # [B, H, W, 3]
        fg = torch.sigmoid(((px - self.background).norm(dim=-1) - 0.2) / 0.03)
        d2 = (px[..., None, :] - self.palette).pow(2).sum(-1)  # [B, H, W, C]
        match = torch.exp(-d2 / (2 * self.width**2)) * self.allowed(prompts)[:, None, None, :]
        defects = fg * (1 - match.amax(-1))
        return RewardOutput(1 - defects.mean(dim=(1, 2)), heatmaps={"defects": defects})


def world_clip_folder(pretrained: str | Path | None) -> Path:
    """The world CLIP folder (the shipped one when `pretrained` is None)."""
    from visalign.world.models import default_model_dir

    folder = Path(pretrained) if pretrained is not None else default_model_dir("clip")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"no world CLIP at {folder} (config.json, model.safetensors and the tokenizer files are expected); "
            f"`visalign world train-base --stages vae,clip` makes it"
        )
    return folder
