"""TempFlow-GRPO (He et al. 2025, arXiv 2508.04324, ICLR 2026): Flow-GRPO with credit assigned per timestep.

Flow-GRPO gives every step of a trajectory the trajectory's advantage. TempFlow-GRPO changes two things, here as
read in the official code (Shredded-Pork/TempFlow-GRPO `scripts/train_sd3_pr.py`,
`sd3_pipeline_with_logprob_perstep.py`) and the authors' answers (issues #1, #3, #11):

1. Trajectory branching (`GeneratorAdapter.branch`): each seed follows the deterministic ODE; at a branch step k,
   `group_size` children (K = 6 in the paper) leave the seed's state x_k by one SDE step and finish by ODE. The
   children's rewards differ only through the noise at k, so normalizing them within the group of (seed, k)
   (population std, eps 1e-4: the paper's "seed group") credits step k alone, and only log pi(x_{k+1} | x_k) is
   trained. The official code branches at every step k = 0..T-2 of every iteration.
2. Noise-aware weighting (paper Eq. 7): each step's clipped surrogate is multiplied by
   `w_t = s_t / mean_j s_j`, `s_t = sigma_t sqrt(|dt_t|)` the SDE transition std, the mean taken over the
   trainable steps 0..T-2 (the official code's constants 2.25 for SD3.5-M and 1.73 for FLUX.1-dev are exactly this
   normalizer); the KL term is not weighted. `FlowGRPOTrainer.step_weights` implements it (`noise_aware_weighting`).

Everything else (rewards, advantages, clipped loss, KL, the engine) is `FlowGRPOTrainer`'s: this file only swaps the
sampling for branching and sets the paper's defaults.

Deviations: `num_branch_steps > 0` branches at a random subset of steps per sampling batch (all processes
alike) to fit CPU budgets (TeleBoost's "sampled_k"), and `sde_window_range` limits branching to the steps [lo, hi)
(default all); the official run skips sampling in its first two epochs (we
do not); the KL convention is `exact` (the reference divides by the transition std, `sqrt(|dt|)` included). As in
Flow-GRPO, the update detaches the unconditional CFG branch unless `cfg_backprop_uncond=True` (the official code
is unreleased; its Flow-GRPO base detaches it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from visalign.generators import Rollout, seeded_generators
from visalign.pipelines.grpo import FlowGRPOConfig, FlowGRPOTrainer


@dataclass
class TempFlowGRPOConfig(FlowGRPOConfig):
    """TempFlow-GRPO; defaults are the official SD3.5-M GenEval recipe (`config/dgx.py: geneval_sd3_pr`).

    `sample_batch_size` counts seeds (each its own prompt draw); an iteration yields, per process,
    `num_batches_per_iteration * sample_batch_size * group_size * (branch steps)` children.
    """

    group_size: int = field(default=6, metadata={"help": "SDE children per seed and branch step (K)."})
    sample_batch_size: int = field(default=1, metadata={"help": "Seeds per sampling batch and process."})
    per_device_train_batch_size: int = field(
        default=6, metadata={"help": "Transitions per training micro-batch and process, at one branch step."}
    )
    eval_batch_size: int = field(default=1, metadata={"help": "Images per evaluation batch and process."})
    num_branch_steps: int = field(
        default=0,
        metadata={"help": "Branch at this many random steps of 0..T-2 in each sampling batch (0 = all of them)."},
    )
    advantage_scope: Literal["group", "global"] = field(default="group", metadata={"help": "Per seed group."})
    advantage_unbiased: bool = field(default=False, metadata={"help": "Population std (np.std)."})
    noise_aware_weighting: bool = field(default=True, metadata={"help": "Paper Eq. 7 weights."})
    beta: float = field(default=0.004, metadata={"help": "KL coefficient (GenEval: 0.004, PickScore: 0.001)."})
    kl_kind: Literal["exact", "flow_grpo"] = field(default="exact", metadata={"help": "`kl_penalty` kind."})

    @property
    def batch_rows(self) -> int:
        """Children of one sampling batch (per process) at one branch step."""
        return self.sample_batch_size * self.group_size

    def __post_init__(self) -> None:
        if self.sde_window_size:
            raise ValueError("TempFlow-GRPO branches instead of using an SDE window: set `sde_window_size` to 0")
        lo, hi = self.window_range
        if not 0 <= lo < hi <= self.num_inference_steps - 1:
            raise ValueError(
                f"`sde_window_range` [{lo}, {hi}) must be a non-empty part of the trainable steps "
                f"[0, {self.num_inference_steps - 1})"
            )
        if not 0 <= self.num_branch_steps <= hi - lo:
            raise ValueError(
                f"`num_branch_steps` must be in [0, {hi - lo}] (0 = every step of [{lo}, {hi})), "
                f"got {self.num_branch_steps}"
            )
        super().__post_init__()

    @property
    def window_range(self) -> tuple[int, int]:
        """The steps branching may use: `sde_window_range`, or every trainable step."""
        return self.sde_window_range or (0, self.num_inference_steps - 1)


class TempFlowGRPOTrainer(FlowGRPOTrainer):
    """`FlowGRPOTrainer` whose samples are TempFlow-GRPO branches: one trained transition each, grouped by
    (seed, branch step). Takes the same arguments, with a `TempFlowGRPOConfig`."""

    config: TempFlowGRPOConfig

    def samples_per_prompt(self) -> int:
        """Each seed draws its own prompt; groups come from branching."""
        return 1

    def sample_batch(self, prompts: list[str], index: Tensor, iteration: int, batch: int) -> Rollout:
        """Branch the seeds `index` (positions in the iteration) at this batch's branch steps."""
        c = self.config
        latents = self.adapter.initial_latents(seeded_generators([(c.seed, iteration, 0, i) for i in index]))
        with self.engine.autocast():
            return self.adapter.branch(
                prompts,
                self.adapter.encode_prompts(prompts, c.guidance_scale),
                latents,
                num_inference_steps=c.num_inference_steps,
                guidance_scale=c.guidance_scale,
                noise_level=c.noise_level,
                branch_steps=self.branch_steps(iteration, batch),
                num_branches=c.group_size,
                kind=c.sde_kind,
                generator=seeded_generators([(c.seed, iteration, 1, i) for i in index]),
                group_ids=index.to(self.engine.device),
                model=self.engine.unwrapped,
            )

    def branch_steps(self, iteration: int, batch: int) -> list[int]:
        """Every step of `window_range` (default 0..T-2), or `num_branch_steps` of them at random (the same on every
        process)."""
        c = self.config
        steps = list(range(*c.window_range))
        if not c.num_branch_steps:
            return steps
        generator = seeded_generators([(c.seed, iteration, 4, batch)])[0]
        chosen = torch.randperm(len(steps), generator=generator)[: c.num_branch_steps]
        return sorted(steps[i] for i in chosen.tolist())
