"""Diffusion-DRO: denoising ranking optimization from expert images and the model's own samples.

Paper: Wu, Ruan, Tseng, Shuai, "Ranking-based Preference Optimization for Diffusion Models from Implicit User
Feedback" (NeurIPS 2025, arXiv 2510.18353); reference code basiclab/DiffusionDRO (`train.py`, `misc/buffer.py`).

Inverse-RL framing without a reward model in the loop: the model should denoise expert images (offline
demonstrations, e.g. the 500 best Pick-a-Pic images by PickScore) better than the reference does, and reproduce its
own recent samples less well than the reference does. With per-sample errors (element means)
`L_exp = ||target - model(x_t^exp, t, c)||^2` for an expert latent noised with fresh noise, and
`L_pol = ||pred_policy - model(x_t^pol, t, c)||^2` for a latent `x_t^pol` on a trajectory of a lagged copy of the
model whose own prediction there was `pred_policy`, each against the same error of the reference,
`diff = (L_exp - L_exp^ref) - (L_pol - L_pol^ref)` and the loss is the hinge `mean(max(0, diff + margin))`
(`dro_loss`). An expert row and a policy row share their caption `c` and timestep `t`.

The online negatives: a lagged copy of the trained weights (synced every `policy_update_steps` optimizer steps; the
reference syncs every 16 micro-steps at accumulation 16, i.e. every update) samples DDIM trajectories (guidance
1.0, the expert's caption, each rollout's timesteps shifted by a random offset so that every training timestep is
seen); a `ReplayBuffer` keeps the newest `buffer_size` trajectories with every step's `x_t` and prediction, and the
expert latent and caption they were sampled for; training rows are drawn uniformly over its trajectories and steps.
With classifier-free guidance (`guidance_scale > 1`, a departure: the states then lie on the guided distribution the
user samples), the stored prediction is still the copy's unguided one at each state, the function the loss trains.
While the copy equals the trained weights (synced every update, and the buffer holding only its trajectories), the
policy error is zero at its minimum and has no gradient: the loss then trains on the experts alone. A lag of several
updates (`policy_update_steps > 1`) gives the policy term its push away from the model's own recent samples.

Deliberate deviations from the reference code: DDIM (`eta = 0`) instead of DPMSolver++ for the rollouts, with one
timestep offset per rollout batch instead of per sample; the lagged copy is the trained parameters swapped in (no
third UNet in memory); gradient clipping works (the reference passes an exhausted iterator to `clip_grad_norm_`, so
it never clips); no EMA by default.

Flow models (SD3, FLUX, Qwen-Image; a port the paper does not make) use the flow objective of
`visalign.generators.objective`: the expert target is the velocity `eps - x0` at a row's sigma, and the policy rows are
ODE trajectories (Flow-GRPO's SDE at noise level `eta` when `eta > 0`) on the pipeline's own sigmas, which
`perturb_timesteps` leaves unshifted (a flow schedule has no offset). FLUX's training predictions use its training
guidance (3.5): set `guidance_scale` to it so that the lagged copy's predictions are the same function. Video families
are not supported (expert sets are images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from visalign.engine import EMA
from visalign.generators import Conditioning, Rollout, seeded_generators
from visalign.generators.objective import per_sample_mse
from visalign.loading import load_generator
from visalign.pipelines.denoiser_trainer import (
    DenoiserConfig,
    DenoiserTrainer,
    evaluation_from_config,
)
from visalign.pipelines.expert_sets import ExpertSet, load_experts
from visalign.pipelines.preference_data import IndexSampler
from visalign.rewards import RewardModel

logger = logging.getLogger(__name__)

CONDITIONING_FIELDS = tuple(f.name for f in fields(Conditioning))


def dro_loss(
    expert_err: Tensor, expert_err_ref: Tensor, policy_err: Tensor, policy_err_ref: Tensor, margin: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Diffusion-DRO's ranking hinge (Wu et al. 2025, arXiv 2510.18353; `train.py` of basiclab/DiffusionDRO).

    `diff = (expert_err - expert_err_ref) - (policy_err - policy_err_ref)` and `loss = mean(max(0, diff + margin))`:
    the expert's error, relative to the reference, should sit at least `margin` below the policy sample's. The
    reference errors are treated as constants. At initialization (model = reference) `diff = 0` and the loss is
    exactly `margin`.

    Args:
        expert_err, expert_err_ref (`Tensor` `[B]`): the model's and the reference's errors on noised expert latents.
        policy_err, policy_err_ref (`Tensor` `[B]`): their errors against the lagged policy's own predictions.
        margin (`float`): `>= 0` (reference: 1e-3).

    Returns:
        `(loss, diff)`: the scalar loss and the detached `[B]` gaps (`diff < -margin`: a row ranked with room to
        spare), float32 (float64 when an input is).
    """
    errors = dict(
        expert_err=expert_err, expert_err_ref=expert_err_ref, policy_err=policy_err, policy_err_ref=policy_err_ref
    )
    for name, t in errors.items():
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] == 0 or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a non-empty 1-D float tensor [B] of per-sample errors")
        if t.shape != expert_err.shape:
            raise ValueError(f"`{name}` must have the shape of `expert_err` {tuple(expert_err.shape)}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < float("inf"):
        raise ValueError(f"`margin` must be a finite number >= 0, got {margin!r}")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in errors.values()) else torch.float32
    expert_gap = expert_err.to(dtype) - expert_err_ref.detach().to(dtype)
    policy_gap = policy_err.to(dtype) - policy_err_ref.detach().to(dtype)
    diff = expert_gap - policy_gap
    return torch.relu(diff + margin).mean(), diff.detach()


def training_timesteps(rollout: Rollout) -> Tensor:
    """The training timesteps of a rollout's states `x_t`, `[T]`: DDPM's integers, or a flow model's sigmas in
    [0, 1] (what `training_prediction` takes)."""
    return rollout.timesteps if rollout.sigmas is None else rollout.sigmas[: rollout.num_steps]


@dataclass
class BufferRows:
    """Training rows drawn from a `ReplayBuffer`: expert latents `x0`, conditioning, timesteps `t` (`[B]`), the
    policy's latents `x_t` and its predictions there."""

    x0: Tensor
    conditioning: Conditioning
    t: Tensor
    x_t: Tensor
    prediction: Tensor


class ReplayBuffer:
    """The newest `size` policy trajectories, each with the expert latent and the conditioning it was sampled for
    (basiclab/DiffusionDRO `misc/buffer.py`: rows are trajectories, trimmed to the newest `size`)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"`size` must be >= 1, got {size}")
        self.size = size
        self.x0: Tensor | None = None
        self.conditioning: Conditioning | None = None
        self.t = self.x_t = self.predictions = None

    def __len__(self) -> int:
        return 0 if self.x0 is None else len(self.x0)

    def push(self, x0: Tensor, rollout: Rollout) -> None:
        """Add trajectories (`rollout`, N of them) sampled for the expert latents `x0` (`[N, ...]`)."""
        if len(x0) != len(rollout):
            raise ValueError(f"`x0` has {len(x0)} rows for {len(rollout)} trajectories")
        n_steps, t = rollout.num_steps, training_timesteps(rollout)
        new = dict(
            x0=x0,
            t=t.expand(len(rollout), n_steps),
            x_t=rollout.latents[:, :n_steps],
            predictions=rollout.predictions,
        )
        if self.x0 is not None and self.x_t.shape[1:] != new["x_t"].shape[1:]:
            raise ValueError("trajectories in a buffer must share their number of steps and latent shape")
        for name, value in new.items():
            old = getattr(self, name)
            setattr(self, name, (value if old is None else torch.cat([old, value]))[-self.size :])
        cond = rollout.conditioning
        cond = cond if self.conditioning is None else Conditioning.cat([self.conditioning, cond])
        self.conditioning = cond.select(torch.arange(len(cond))[-self.size :].to(cond.prompt_embeds.device))

    def state_dict(self) -> dict[str, Tensor]:
        """The trajectories as flat tensors (none when empty): a checkpoint keeps them, so that a resumed run trains
        on the rows the uninterrupted one would."""
        if self.x0 is None:
            return {}
        cond = {f"conditioning.{k}": getattr(self.conditioning, k) for k in CONDITIONING_FIELDS}
        tensors = dict(x0=self.x0, t=self.t, x_t=self.x_t, predictions=self.predictions, **cond)
        return {k: v for k, v in tensors.items() if v is not None}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`'s output (tensors already on their device)."""
        if not state:
            self.x0 = self.conditioning = self.t = self.x_t = self.predictions = None
            return
        if len(state["x0"]) > self.size:
            raise ValueError(
                f"the saved replay buffer holds {len(state['x0'])} trajectories, `buffer_size` is {self.size}"
            )
        self.x0, self.t, self.x_t, self.predictions = state["x0"], state["t"], state["x_t"], state["predictions"]
        self.conditioning = Conditioning(**{k: state.get(f"conditioning.{k}") for k in CONDITIONING_FIELDS})

    def sample(self, n: int, generator: torch.Generator) -> BufferRows:
        """`n` rows: trajectories without replacement while `n` <= their count (else with), steps uniform."""
        if len(self) == 0:
            raise ValueError("the replay buffer is empty: push trajectories first")
        count, n_steps = len(self), self.x_t.shape[1]
        rows = (
            torch.randperm(count, generator=generator)[:n]
            if n <= count
            else torch.randint(count, (n,), generator=generator)
        )
        steps = torch.randint(n_steps, (n,), generator=generator)
        rows_d, steps_d = rows.to(self.x0.device), steps.to(self.x0.device)
        return BufferRows(
            self.x0[rows_d],
            self.conditioning.select(rows_d),
            self.t[rows_d, steps_d],
            self.x_t[rows_d, steps_d],
            self.predictions[rows_d, steps_d],
        )


@dataclass
class DROConfig(DenoiserConfig):
    """Diffusion-DRO settings on top of the generator's and the engine's; defaults are the reference's
    (`train.py` click options) where they carry over."""

    experts: str = field(
        default="", metadata={"help": "Expert images: a folder with manifest.jsonl ({caption, image} rows)."}
    )
    on_error: Literal["raise", "skip"] = field(default="raise", metadata={"help": "Bad expert rows: raise or skip."})
    margin: float = field(default=1e-3, metadata={"help": "Ranking margin m of the hinge (reference: 1e-3)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Expert/policy row pairs per micro-batch and process (reference: 4)."}
    )
    caption_dropout: float = field(default=0.2, metadata={"help": "Empty-caption probability (reference: 0.2)."})
    policy_update_steps: int = field(
        default=1, metadata={"help": "Sync the lagged sampling copy every this many optimizer steps."}
    )
    buffer_size: int = field(default=4, metadata={"help": "Trajectories the replay buffer keeps, per process."})
    rollouts_per_micro_step: int = field(
        default=4, metadata={"help": "Fresh trajectories per micro-step and process (reference: 4)."}
    )
    perturb_timesteps: bool = field(
        default=True, metadata={"help": "Shift each rollout's timesteps randomly (DDIM; flow schedules stay)."}
    )
    eta: float = field(
        default=0.0, metadata={"help": "DDIM eta of the rollouts, flow models' SDE noise level (0: deterministic)."}
    )
    guidance_scale: float = field(
        default=1.0,
        metadata={"help": "CFG of the rollouts (reference: 1.0); the buffer keeps the unguided predictions."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.experts:
            raise ValueError("`experts` must name a folder (or .jsonl) of expert images")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout}")
        for name in ("policy_update_steps", "buffer_size", "rollouts_per_micro_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not self.margin >= 0:
            raise ValueError(f"`margin` must be >= 0, got {self.margin}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"`eta` must be in [0, 1], got {self.eta}")
        if self.save_steps % self.policy_update_steps:
            raise ValueError(
                f"`save_steps` ({self.save_steps}) must be a multiple of `policy_update_steps` "
                f"({self.policy_update_steps}): a checkpoint then holds the lagged copy (= the trained weights)"
            )


class DROTrainer(DenoiserTrainer):
    """Diffusion-DRO on the training engine.

    Args:
        pipe: an image pipeline of any generator family (DDIM rollouts on SD and SDXL, ODE on flow models).
        config (`DROConfig`): the run.
        experts (`ExpertSet`): the expert images and their captions (`top_k_experts`, `load_experts`).
        eval_prompts, eval_reward: the evaluation (`DenoiserTrainer`).
    """

    def __init__(
        self,
        pipe,
        config: DROConfig,
        experts: ExpertSet,
        *,
        eval_prompts: list[str] | None = None,
        eval_reward: RewardModel | None = None,
    ):
        super().__init__(pipe, config, eval_prompts=eval_prompts, eval_reward=eval_reward)
        a, engine = self.adapter, self.engine
        if a.video:
            raise ValueError(f"Diffusion-DRO trains on expert images; the video family {a.family} is not supported")
        if a.height != a.width:
            raise ValueError(f"DRO trains on square images: `height` and `width` differ ({a.height}, {a.width})")
        self.experts = ExpertSet(experts.captions, experts.sources, a.height, experts.scores, experts.source)
        self.expert_sampler = IndexSampler(len(self.experts), config.seed)
        self.buffer = ReplayBuffer(config.buffer_size)
        self.policy = EMA(engine.parameters, decay=0.0, every=config.policy_update_steps)  # the lagged copy

    @classmethod
    def from_config(cls, config: DROConfig) -> DROTrainer:
        """Build the pipeline, the expert set and the evaluation the config names (what `visalign train` runs)."""
        experts = load_experts(config.experts, on_error=config.on_error)
        pipe = load_generator(config.pretrained_model_name_or_path)[0]
        return cls(pipe, config, experts, **evaluation_from_config(config))

    def train_step(self) -> dict[str, float]:
        """One optimizer step: per micro-step, refill the buffer from the lagged copy, then rank expert vs policy."""
        cfg, engine = self.config, self.engine
        micro = cfg.per_device_train_batch_size
        sums: dict[str, float] = {}
        for m in range(cfg.gradient_accumulation_steps):
            self.refill(m)
            generator = seeded_generators([(cfg.seed, 0xD22, engine.step, m, engine.process_index)])[0]
            rows = self.buffer.sample(micro, generator)
            self.adapter.model.train()
            with engine.accumulate(sync=m == cfg.gradient_accumulation_steps - 1), engine.autocast():
                loss, stats = self.ranking_loss(rows, generator)
                engine.backward(loss / cfg.gradient_accumulation_steps)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.gradient_accumulation_steps
        metrics = engine.mean_across_processes(sums) | engine.optimizer_step()
        self.policy.update(engine.step)
        return metrics

    @torch.no_grad()
    def refill(self, micro_step: int) -> None:
        """Roll out `rollouts_per_micro_step` trajectories per process from the lagged copy for freshly drawn expert
        images (their captions, dropped with `caption_dropout`) and push them with the experts' latents."""
        cfg, engine, a = self.config, self.engine, self.adapter
        n, rank = cfg.rollouts_per_micro_step, engine.process_index
        drawn = self.expert_sampler.draw(n * engine.num_processes)[rank * n : (rank + 1) * n]
        keys = [(cfg.seed, 0xD20, engine.step, micro_step, rank * n + j) for j in range(n)]
        generators = seeded_generators(keys)
        captions, images = zip(*(self.experts[i] for i in drawn))
        captions = [
            "" if float(torch.rand(1, generator=g)) < cfg.caption_dropout else c for c, g in zip(captions, generators)
        ]
        x0 = a.encode_images(torch.stack(images), generators)
        flow = a.target == "flow"
        offset = 0
        if cfg.perturb_timesteps and not flow:
            offset_generator = seeded_generators([(cfg.seed, 0xD21, engine.step, micro_step, rank)])[0]
            offset = int(torch.randint(a.max_offset(cfg.num_inference_steps), (1,), generator=offset_generator))
        a.model.eval()
        with self.policy.swapped_in(), engine.autocast():
            # each sample's generator draws its initial noise, then its step noise
            rollout = a.sample(
                captions,
                a.encode_prompts(captions, cfg.guidance_scale),
                a.initial_latents(generators),
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                noise_level=cfg.eta,
                kind=("sde" if cfg.eta > 0 else "ode") if flow else "ddim",
                generator=generators,
                offset=offset,
                model=engine.unwrapped,
            )
            if cfg.guidance_scale > 1 and a.uses_negative:
                rollout = replace(rollout, predictions=self.unguided_predictions(rollout))
        self.buffer.push(x0, rollout)

    def unguided_predictions(self, rollout: Rollout) -> Tensor:
        """The lagged copy's `training_prediction` at every state of a guided rollout, `[N, T, ...]`.

        Classifier-free guidance steers the trajectory, but the loss compares the model's unguided prediction with
        the stored one: stored guided, the policy error would not vanish at equality and its push away from the
        copy's samples would push the conditioning itself. Call with the copy swapped in."""
        a, n_steps, t = self.adapter, rollout.num_steps, training_timesteps(rollout)
        predictions = [
            a.training_prediction(
                rollout.latents[:, i], t[i].expand(len(rollout)), rollout.conditioning, self.engine.unwrapped
            )
            for i in range(n_steps)
        ]
        return torch.stack(predictions, dim=1).to(rollout.predictions.dtype)

    def ranking_loss(self, rows: BufferRows, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """`dro_loss` of buffer rows: each expert latent noised with fresh noise at its row's timestep."""
        a = self.adapter
        noise = torch.randn(rows.x0.shape, generator=generator).to(rows.x0.device)
        x_t_expert, target_expert = a.noise(rows.x0, noise, rows.t)
        x_t = torch.cat([x_t_expert, rows.x_t])
        targets = torch.cat([target_expert, rows.prediction]).float()
        t, cond = torch.cat([rows.t, rows.t]), rows.conditioning.repeat(2)
        with torch.no_grad(), self.engine.reference() as reference:
            ref_prediction = a.training_prediction(x_t, t, cond, reference)
            ref_expert, ref_policy = per_sample_mse(ref_prediction.float(), targets).chunk(2)
        prediction = a.training_prediction(x_t, t, cond, self.engine.model)
        model_expert, model_policy = per_sample_mse(prediction.float(), targets).chunk(2)
        loss, diff = dro_loss(model_expert, ref_expert, model_policy, ref_policy, self.config.margin)
        stats = {
            "train/loss": float(loss.detach()),
            "train/diff": float(diff.mean()),
            "train/ranked": float((diff < 0).float().mean()),
            "train/expert_mse": float(model_expert.detach().mean()),
            "train/policy_mse": float(model_policy.detach().mean()),
            "train/expert_gap": float((model_expert.detach() - ref_expert).mean()),
            "train/policy_gap": float((model_policy.detach() - ref_policy).mean()),
        }
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        """The expert sampler and this process's replay buffer (its trajectories outlive a step when `buffer_size`
        exceeds `rollouts_per_micro_step`; the engine writes tensors per process)."""
        buffer = {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}
        return {"expert_sampler": self.expert_sampler.state_dict(), **buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.expert_sampler.load_state_dict(state["expert_sampler"])
        device = self.engine.device
        self.buffer.load_state_dict(
            {k.removeprefix("buffer."): v.to(device) for k, v in state.items() if k.startswith("buffer.")}
        )
        self.policy.update(0)  # checkpoints fall on sync steps: the lagged copy equals the restored weights
