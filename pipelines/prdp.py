"""PRDP: Proximal Reward Difference Prediction (Deng, Wang, Wei, Hou, Grundmann; CVPR 2024, arXiv 2402.08714).

The paper publishes no code; this is its first public implementation, written from the paper and its supplement
(App. G's reference loss), with the choices below stated.

The KL-regularized objective `max E[r(x0, c)] - beta KL(pi_theta || pi_ref)` over denoising trajectories (Eq. 6) has
the optimum `pi* ∝ pi_ref exp(r / beta)` (Eq. 7), so for two trajectories `a`, `b` of the same prompt the log-ratio
`r̂_theta(x̄) = log pi_theta(x̄ | c) / pi_ref(x̄ | c)` must satisfy `r̂(a) - r̂(b) = (r(a) - r(b)) / beta` (Eqs. 8-13).
PRDP regresses the model's predicted reward difference onto the observed one (Eq. 14) instead of maximizing the
reward, with a proximal (clipped, pessimistic) update for stability (Eqs. 16-21) on samples of the current policy
(Algorithm 1: each epoch samples `images_per_prompt` trajectories for each of `prompts_per_epoch` prompts from the
frozen `pi_old`, scores them, and takes `inner_updates` gradient steps on all pairs of each prompt). `prdp_loss`
states the exact form. Our one addition: `prompts_per_update` makes each of those steps take a mini-batch of whole
prompts (all their pairs), in passes over a reshuffled order of the epoch's prompts, PPO-style: more, cheaper steps
per sampled epoch where the paper's full-batch steps are too slow. A `max_steps` inside an epoch ends the run there
(the epoch's remaining steps are skipped).

Sampling: DDIM with `eta = 1` (the paper's DDPM sampler), classifier-free guidance in the policy (log-probs of the
guided mean), per-step log-probs as element means (`visalign.sampling.ddim_step`, DDPO's convention); flow models (SD3,
FLUX, Qwen-Image, Wan) use Flow-GRPO's SDE (`sde_kind`), a port the paper does not make; both are the family adapter's
one sampler (`visalign.generators`). `sde_window_size` / `sde_window_range` / `same_noise` take Flow-GRPO-Fast's window
(the GRPO trainer's names and meaning): each epoch only that window's steps are noisy, and only they are trained; with
`same_noise` a prompt's trajectories share their initial noise. `pi_ref` is the model with adapters disabled (or the
frozen initial copy). The paper's `beta` (3e-5 / 3e-6) and `clip_range` (1e-6 / 1e-4) belong to its own, unstated,
log-prob reduction: tune both for ours.

The gradient is exact and memory-light: the loss depends on the parameters only through the `[N, T]` log-probs, so
one pass without gradient gives the log-probs and `g = dL / d log_prob` (autograd on a leaf), and a second pass
backpropagates `sum(g[:, t] * log_prob_t)` one step (and micro-batch) at a time. The first inner update of an epoch
reuses the log-probs recorded while sampling (the model is `pi_old` then).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from visalign.engine import peak_memory_gb
from visalign.generators import Rollout, seeded_generators
from visalign.loading import load_generator
from visalign.pipelines.denoiser_trainer import DenoiserConfig, DenoiserTrainer, evaluation_from_config
from visalign.prompts import PromptSampler, load_prompts
from visalign.rewards import RewardModel, load_reward
from visalign.sampling import StepOutput, check_sde_window, kl_penalty, sde_window
from visalign.types import check_scores

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum")


def prdp_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    ref_log_probs: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    beta: float,
    clip_range: float,
    reduction: str = "mean",
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PRDP's proximal reward-difference-prediction loss (Deng et al. 2024, Eqs. 14, 16-21; App. G).

    For trajectory `i` (of prompt `group_ids[i]`, reward `r_i`) and step `t`, with per-step log-probs under the
    current model, the sampling model `pi_old` and the frozen pretrained model `pi_ref`:
    - `r̂_it = log pi_theta(x_{t-1} | x_t) - log pi_ref(x_{t-1} | x_t)` (Eq. 19's terms: against `pi_ref`);
    - `r̂c_it = clip(r̂_it, r̂old_it - clip_range, r̂old_it + clip_range)` with `r̂old = log pi_old - log pi_ref`
      (Eq. 20: a trust region around `pi_old` in log space, per step);
    - `R̂_i = agg_t r̂_it`, `R̂c_i = agg_t r̂c_it`, `agg` the mean over steps (`reduction="mean"`, App. G's code, where
      the paper's beta values live) or the sum (`"sum"`, Eqs. 19 and 21; the same as the mean with beta / T and the
      loss times T^2);
    - for every ordered pair `(i, j)` of the same prompt with `r_i > r_j` (each unordered pair once; equal rewards
      give no pair): `l_ij = max((R̂_i - R̂_j - (r_i - r_j) / beta)^2, (R̂c_i - R̂c_j - (r_i - r_j) / beta)^2)`
      (Eq. 14's regression, Eq. 17 clipped, Eq. 18's pessimistic maximum);
    - `loss = mean_ij l_ij + kl_coef * mean(kl)`: Algorithm 1's `1 / (N C(B, 2)) sum_n sum_{i<j}` when no rewards
      tie. The paper has no separate KL term (its KL is `beta`); `kl` (e.g. `visalign.sampling.kl_penalty` of the
      step means against `pi_ref`, DPOK-style) is an optional extra, off by default.
    Identity: the loss is 0 when `R̂_i - R̂_j = (r_i - r_j) / beta` for every pair and the log-probs equal `pi_old`'s.
    A batch without a pair gives a zero loss (with a graph).

    Args:
        log_probs (`Tensor` `[N, T]`): current per-step log-probs of the stored transitions (with gradient).
        old_log_probs (`Tensor` `[N, T]`): those recorded at sampling (`pi_old`).
        ref_log_probs (`Tensor` `[N, T]`): those under `pi_ref` (constants).
        rewards (`Tensor` `[N]`): finite rewards.
        group_ids (`Tensor` `[N]`, integer): the prompt of each trajectory; pairs never cross prompts.
        beta (`float`): `> 0`, the KL weight: the target is `(r_i - r_j) / beta`.
        clip_range (`float`): `> 0`, the stepwise clip `epsilon` (in the units of the log-probs).
        reduction (`str`): `"mean"` or `"sum"` over steps.
        kl (`Tensor` `[N]` or `[N, T]`, *optional*), kl_coef (`float`): the optional KL term.

    Returns:
        `(loss, stats)`: the scalar loss and detached `pairs` (count), `clipfrac` (steps where the clip binds),
        `pessimistic_frac` (pairs where the clipped loss is the larger) and `rdp_error` (mean `|R̂_i - R̂_j -
        (r_i - r_j) / beta|`), float32 (float64 when an input is).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in {"beta": beta, "clip_range": clip_range}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not 0 <= kl_coef < math.inf:
        raise ValueError(f"`kl_coef` must be a finite number >= 0, got {kl_coef!r}")
    if not isinstance(log_probs, Tensor) or log_probs.ndim != 2 or 0 in log_probs.shape:
        raise ValueError("`log_probs` must be a non-empty tensor [N, T] of per-step log-probs")
    for name, t in {"old_log_probs": old_log_probs, "ref_log_probs": ref_log_probs}.items():
        if not isinstance(t, Tensor) or t.shape != log_probs.shape:
            raise ValueError(f"`{name}` must have the shape of `log_probs` {tuple(log_probs.shape)}")
    n = log_probs.shape[0]
    if not isinstance(rewards, Tensor) or rewards.shape != (n,) or not torch.isfinite(rewards).all():
        raise ValueError(f"`rewards` must be a finite tensor of shape [{n}]")
    if not isinstance(group_ids, Tensor) or group_ids.shape != (n,) or group_ids.is_floating_point():
        raise ValueError(f"`group_ids` must be an integer tensor of shape [{n}]")
    if (kl is None) != (kl_coef == 0):
        raise ValueError("`kl` and `kl_coef` > 0 go together")
    dtype = (
        torch.float64 if any(t.dtype == torch.float64 for t in (log_probs, old_log_probs, rewards)) else torch.float32
    )
    lp, old, ref = log_probs.to(dtype), old_log_probs.detach().to(dtype), ref_log_probs.detach().to(dtype)
    ratio, old_ratio = lp - ref, old - ref
    clipped = torch.minimum(torch.maximum(ratio, old_ratio - clip_range), old_ratio + clip_range)
    agg = (lambda x: x.mean(dim=1)) if reduction == "mean" else (lambda x: x.sum(dim=1))
    predicted, predicted_clipped = agg(ratio), agg(clipped)
    r = rewards.detach().to(dtype)
    target = (r[:, None] - r[None, :]) / beta
    pairs = _pair_mask(r, group_ids)
    unclipped_sq = (predicted[:, None] - predicted[None, :] - target) ** 2
    clipped_sq = (predicted_clipped[:, None] - predicted_clipped[None, :] - target) ** 2
    losses = torch.maximum(unclipped_sq, clipped_sq)[pairs]
    count = int(pairs.sum())
    loss = losses.mean() if count else (predicted * 0).sum()
    if kl is not None:
        loss = loss + kl_coef * kl.to(dtype).mean()
    with torch.no_grad():
        error = (predicted[:, None] - predicted[None, :] - target).abs()[pairs]
        stats = {
            "pairs": torch.tensor(float(count), dtype=dtype),
            "clipfrac": (clipped != ratio).to(dtype).mean(),
            "pessimistic_frac": (clipped_sq[pairs] > unclipped_sq[pairs]).to(dtype).mean()
            if count
            else lp.new_zeros(()),
            "rdp_error": error.mean() if count else lp.new_zeros(()),
        }
    return loss, stats


@dataclass
class PRDPConfig(DenoiserConfig):
    """PRDP settings on top of the generator's and the engine's; defaults are the paper's small-scale recipe (App. E,
    Tab. 4) except `beta` and `clip_range`, whose units depend on the log-prob reduction (tune them)."""

    reward: str = field(default="world-verifier", metadata={"help": "The reward (`list_rewards()`)."})
    reward_pretrained: str | None = field(default=None, metadata={"help": "Weights of the reward, if any."})
    prompts: str = field(default="world:train", metadata={"help": "Training prompts: `world:train` or a text file."})
    prompts_per_epoch: int = field(default=32, metadata={"help": "Prompts sampled per epoch (N; paper: 32)."})
    images_per_prompt: int = field(default=16, metadata={"help": "Trajectories per prompt (B; paper: 16)."})
    inner_updates: int = field(default=10, metadata={"help": "Gradient steps per epoch (K; paper: 10, large: 1)."})
    prompts_per_update: int | None = field(
        default=None,
        metadata={"help": "Prompts (with all their trajectories) per gradient step; None: the whole epoch (paper)."},
    )
    beta: float = field(default=1e-3, metadata={"help": "KL weight: the target is reward difference / beta."})
    clip_range: float = field(default=1e-4, metadata={"help": "Stepwise clip of the log-ratio around pi_old."})
    reduction: Literal["mean", "sum"] = field(
        default="mean", metadata={"help": "Log-ratio over steps (App. G: mean)."}
    )
    kl_coef: float = field(default=0.0, metadata={"help": "Optional DPOK-style step KL to pi_ref (paper: none)."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta of the sampler (1: DDPM, the paper's)."})
    noise_level: float = field(default=0.7, metadata={"help": "Flow models: the SDE noise level a."})
    sde_kind: Literal["sde", "cps", "dance"] = field(default="sde", metadata={"help": "Flow models: `sde_step` kind."})
    sde_window_size: int = field(
        default=0,
        metadata={
            "help": "Noisy (SDE or DDIM eta) on this many consecutive steps of each epoch, deterministic elsewhere, "
            "and only those trained (0 = every step, the paper's)."
        },
    )
    sde_window_range: tuple[int, int] | None = field(
        default=None, metadata={"help": "[lo, hi): where the window may lie (default [0, T // 2), Flow-GRPO-Fast)."}
    )
    same_noise: bool = field(default=False, metadata={"help": "A prompt's trajectories share their initial noise."})
    num_inference_steps: int = field(default=50, metadata={"help": "Sampling steps T (paper: 50)."})
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG while sampling (paper: 5.0)."})
    sample_batch_size: int = field(default=16, metadata={"help": "Trajectories per sampling batch and process."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Trajectories per backward micro-batch and process."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "prompts_per_epoch",
            "images_per_prompt",
            "inner_updates",
            "sample_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_update is not None and not (
            1 <= self.prompts_per_update <= self.prompts_per_epoch
            and self.prompts_per_epoch % self.prompts_per_update == 0
        ):
            raise ValueError(
                f"`prompts_per_update` ({self.prompts_per_update}) must divide `prompts_per_epoch` "
                f"({self.prompts_per_epoch}), or be None for whole-epoch updates"
            )
        if self.images_per_prompt < 2:
            raise ValueError("`images_per_prompt` must be >= 2: pairs are formed within a prompt")
        if not self.beta > 0 or not self.clip_range > 0 or not self.kl_coef >= 0:
            raise ValueError("`beta` and `clip_range` must be > 0 and `kl_coef` >= 0")
        check_sde_window(self.sde_window_size, self.window_range, self.num_inference_steps)
        if not 0 < self.eta <= 1:
            raise ValueError(f"`eta` must be in (0, 1]: a deterministic sampler has no log-prob, got {self.eta}")
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                "`gradient_accumulation_steps` must be 1 in PRDP: a step's rows are set by `prompts_per_update` (its "
                "micro-batches of per_device_train_batch_size are accumulated within the step)"
            )
        if self.save_steps % self.inner_updates:
            raise ValueError(
                f"`save_steps` ({self.save_steps}) must be a multiple of `inner_updates` "
                f"({self.inner_updates}): checkpoints fall between epochs (an epoch's samples are not stored)"
            )

    @property
    def window_range(self) -> tuple[int, int]:
        return self.sde_window_range or (0, self.num_inference_steps // 2)


@dataclass
class Epoch:
    """One epoch's samples on this process: the rollout, rewards `[N]`, prompt ids `[N]`, per-step `pi_ref`
    log-probs `[N, S]` and step means `[N, S, ...]` (KL term only) of the trained steps `[S]`, and the pair count
    of all processes."""

    rollout: Rollout
    rewards: Tensor
    group_ids: Tensor
    ref_log_probs: Tensor
    ref_means: Tensor | None
    steps: Tensor
    total_pairs: int


class PRDPTrainer(DenoiserTrainer):
    """PRDP on the training engine (Algorithm 1: online sampling, `inner_updates` proximal steps per epoch).

    Args:
        pipe: a pipeline of any generator family: DDIM on SD and SDXL, the flow SDE on the others.
        reward (`RewardModel`): the reward (black box: no gradient needed).
        config (`PRDPConfig`): the run.
        prompts (`list[str]`): training prompts.
        eval_prompts, eval_reward: the evaluation (`DenoiserTrainer`).
    """

    def __init__(
        self,
        pipe,
        reward: RewardModel,
        config: PRDPConfig,
        prompts: list[str],
        *,
        eval_prompts: list[str] | None = None,
        eval_reward: RewardModel | None = None,
    ):
        super().__init__(pipe, config, eval_prompts=eval_prompts, eval_reward=eval_reward)
        for name in ("prompts_per_epoch", "prompts_per_update"):
            value = getattr(config, name)
            if value is not None and value % self.engine.num_processes:
                raise ValueError(
                    f"`{name}` ({value}) must be divisible by the process count ({self.engine.num_processes}): a "
                    "prompt's trajectories live on one process"
                )
        self.reward = reward.to(self.engine.device).eval()
        self.prompt_sampler = PromptSampler(prompts, config.seed)
        self.epoch: Epoch | None = None

    @classmethod
    def from_config(cls, config: PRDPConfig) -> PRDPTrainer:
        """Build the pipeline, reward, prompts and evaluation the config names (what `visalign train` runs)."""
        reward = load_reward(config.reward, config.reward_pretrained)
        return cls(
            load_generator(config.pretrained_model_name_or_path)[0],
            reward,
            config,
            load_prompts(config.prompts),
            **evaluation_from_config(config),
        )

    # -- sampling -----------------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One gradient step; the first of each epoch samples and scores the epoch's trajectories."""
        metrics: dict[str, float] = {}
        inner = self.engine.step % self.config.inner_updates
        if inner and self.epoch is None:
            raise ValueError(
                f"resumed at step {self.engine.step}, inside an epoch of `inner_updates` "
                f"({self.config.inner_updates}) steps whose samples no checkpoint stores (the final checkpoint of a "
                "run whose `max_steps` ended inside an epoch): resume from a checkpoint at a multiple of "
                "`inner_updates`"
            )
        if inner == 0:
            tick = time.perf_counter()
            metrics = self.sample_epoch()
            metrics["time/sampling"] = time.perf_counter() - tick
        tick = time.perf_counter()
        metrics |= self.update(reuse_old=inner == 0, rows=self.update_rows(inner))
        metrics["time/update"] = time.perf_counter() - tick
        metrics["memory/peak_gb"] = peak_memory_gb(self.engine.device)
        return metrics

    @torch.no_grad()
    def sample_epoch(self) -> dict[str, float]:
        """Sample `images_per_prompt` trajectories for this process's share of `prompts_per_epoch` prompts from the
        current model (`pi_old`), score them, and record `pi_ref`'s log-probs of every trained step."""
        c, engine, a = self.config, self.engine, self.adapter
        epoch = self.prompt_sampler.iteration
        per_process = c.prompts_per_epoch // engine.num_processes
        drawn = self.prompt_sampler.draw(c.prompts_per_epoch)
        first = engine.process_index * per_process
        group_ids = torch.arange(first, first + per_process).repeat_interleave(c.images_per_prompt)
        texts = [drawn[g] for g in group_ids.tolist()]
        a.model.eval()
        parts = []
        window = sde_window(c.sde_window_size, c.window_range, seeded_generators([(c.seed, 0xB0D, epoch)])[0])
        for index in torch.arange(len(texts)).split(c.sample_batch_size):
            keys = [(c.seed, 0xB0D, epoch, int(group_ids[i]), int(i) % c.images_per_prompt) for i in index]
            shared = [(c.seed, 0xB0D, epoch, int(group_ids[i])) for i in index] if c.same_noise else None
            with engine.autocast():
                parts.append(self._sample([texts[i] for i in index.tolist()], keys, window, shared))
        rollout = Rollout.cat(parts)
        scored = self.reward.score(rollout.images, rollout.prompts)
        rewards = check_scores(scored.score, len(texts), f"{self.reward.name} reward").float()
        steps = self._trained_steps(rollout)
        n_steps, latent_shape = len(steps), rollout.latents.shape[2:]
        ref_log_probs = torch.zeros(len(texts), n_steps, device=rollout.latents.device)
        ref_means = torch.zeros(len(texts), n_steps, *latent_shape, device=ref_log_probs.device) if c.kl_coef else None
        with engine.reference() as reference, engine.autocast():
            for s, t in enumerate(steps.tolist()):
                for rows in torch.arange(len(texts), device=ref_log_probs.device).split(c.per_device_train_batch_size):
                    out = self._log_prob(rollout, rows, t, reference)
                    ref_log_probs[rows, s] = out.log_prob.float()
                    if ref_means is not None:
                        ref_means[rows, s] = out.mean.float()
        group_ids = group_ids.to(engine.device)
        all_rewards, all_groups = engine.gather(rewards), engine.gather(group_ids)
        self.epoch = Epoch(
            rollout,
            rewards,
            group_ids,
            ref_log_probs,
            ref_means,
            steps,
            total_pairs=_pair_count(all_rewards, all_groups),
        )
        aspects = {f"reward/{k}": float(v.float().mean()) for k, v in scored.aspects.items()}
        return {
            "reward/mean": float(all_rewards.mean()),
            "reward/std": float(all_rewards.std(correction=0)),
            "train/pairs": float(self.epoch.total_pairs),
            **engine.mean_across_processes(aspects),
        }

    def _sample(
        self,
        prompts: list[str],
        keys: list[tuple[int, ...]],
        noise_steps: list[int] | None = None,
        initial_keys: list[tuple[int, ...]] | None = None,
    ) -> Rollout:
        """Trajectories of `prompts` from the current model: DDIM with `eta` (epsilon/v families) or the flow SDE
        (`sde_kind`, `noise_level`), noisy on `noise_steps` (all when None); each sample's generator draws its
        initial noise, then its step noise, unless `initial_keys` key the initial noise (a prompt's shared one)."""
        c, a = self.config, self.adapter
        generators = seeded_generators(keys)
        initial = generators if initial_keys is None else seeded_generators(initial_keys)
        flow = a.target == "flow"
        return a.sample(
            prompts,
            a.encode_prompts(prompts, c.guidance_scale),
            a.initial_latents(initial),
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            noise_level=c.noise_level if flow else c.eta,
            noise_steps=noise_steps,
            kind=c.sde_kind if flow else a.default_kind,
            generator=generators,
            model=self.engine.unwrapped,
        )

    def _log_prob(self, rollout: Rollout, rows: Tensor, step: int, model) -> StepOutput:
        """The policy `model` at `step` for `rows`, scoring their stored transitions (DDIM or flow SDE)."""
        return self.adapter.log_prob(rollout, rows, step, model)

    def _trained_steps(self, rollout: Rollout) -> Tensor:
        """Steps with noise (a deterministic step has no log-prob and carries no gradient)."""
        steps = (rollout.stds.amax(dim=0) > 0).nonzero().flatten().cpu()
        if len(steps) == 0:
            raise ValueError("no stochastic step: PRDP needs eta > 0 (DDIM) or noise_level > 0 (flow)")
        return steps

    # -- the update -----------------------------------------------------------------------------------------------

    def update_rows(self, inner: int) -> Tensor | None:
        """The trajectories of this process that gradient step `inner` of the epoch trains on: all (None) without
        `prompts_per_update`; else whole prompts, in passes over a shuffled order of the epoch's prompts."""
        c, engine, e = self.config, self.engine, self.epoch
        if c.prompts_per_update is None:
            return None
        local = c.prompts_per_epoch // engine.num_processes
        per_update = c.prompts_per_update // engine.num_processes
        updates_per_pass = local // per_update
        pass_index, slot = divmod(inner, updates_per_pass)
        key = (c.seed, 0xB0E, self.prompt_sampler.iteration, pass_index, engine.process_index)
        order = torch.randperm(local, generator=seeded_generators([key])[0])
        first = int(e.group_ids.min())
        chosen = order[slot * per_update : (slot + 1) * per_update].to(e.group_ids.device) + first
        return torch.isin(e.group_ids, chosen).nonzero().flatten()

    def update(self, reuse_old: bool, rows: Tensor | None = None) -> dict[str, float]:
        """One optimizer step on the epoch's `prdp_loss` (`backward`, then the engine's step)."""
        metrics = self.backward(reuse_old, rows)
        return self.engine.mean_across_processes(metrics) | self.engine.optimizer_step()

    def backward(self, reuse_old: bool, rows: Tensor | None = None) -> dict[str, float]:
        """Accumulate the exact gradient of `prdp_loss` over the epoch's trajectories `rows` (default: all) in two
        passes (see the module docstring); with `reuse_old` the sampling log-probs stand for the current ones (the
        model is still `pi_old`)."""
        c, engine, e = self.config, self.engine, self.epoch
        rollout, steps = e.rollout, e.steps.tolist()
        if rows is None:
            rows = torch.arange(len(rollout), device=e.rewards.device)
        old = rollout.log_probs[rows][:, steps].float()
        positions = list(torch.arange(len(rows), device=rows.device).split(c.per_device_train_batch_size))
        self.adapter.model.train()
        if reuse_old:
            current = old.clone()
        else:
            current = torch.zeros_like(old)
            with torch.no_grad(), engine.autocast():
                for s, t in enumerate(steps):
                    for at in positions:
                        current[at, s] = self._log_prob(rollout, rows[at], t, engine.model).log_prob.float()
        leaf = current.clone().requires_grad_(True)
        rewards, group_ids = e.rewards[rows], e.group_ids[rows]
        loss, stats = prdp_loss(
            leaf,
            old,
            e.ref_log_probs[rows],
            rewards,
            group_ids,
            beta=c.beta,
            clip_range=c.clip_range,
            reduction=c.reduction,
        )
        # Each process holds whole prompts: weighting its pair mean by processes x its share of all pairs makes
        # DDP's gradient average the mean over every pair.
        local_pairs = _pair_count(rewards, group_ids)
        total_pairs = int(engine.gather(torch.tensor([local_pairs], device=engine.device)).sum())
        scale = engine.num_processes * local_pairs / max(total_pairs, 1)
        (grad,) = torch.autograd.grad(loss * scale, leaf)
        units = [(s, t, at) for s, t in enumerate(steps) for at in positions]
        kl_sum = 0.0
        for i, (s, t, at) in enumerate(units):
            with engine.accumulate(sync=i == len(units) - 1), engine.autocast():
                out = self._log_prob(rollout, rows[at], t, engine.model)
                surrogate = (grad[at, s] * out.log_prob.float()).sum()
                if c.kl_coef > 0:
                    kl = kl_penalty(out.mean.float(), e.ref_means[rows[at], s], out.std.float(), kind="exact")
                    kl_sum += float(kl.detach().sum())
                    surrogate = surrogate + c.kl_coef * kl.sum() / (len(rows) * len(steps))
                engine.backward(surrogate)
        metrics = {f"train/{k}": float(v) for k, v in stats.items() if k != "pairs"}
        metrics["train/loss"] = float(loss.detach())
        if c.kl_coef > 0:
            metrics["train/kl"] = kl_sum / (len(rows) * len(steps))
        return metrics

    # -- resuming -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"prompt_sampler": self.prompt_sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])


def _pair_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """`[N, N]` bool: `(i, j)` is a pair of `prdp_loss` (same prompt, `r_i > r_j`; each unordered pair once)."""
    return (group_ids[:, None] == group_ids[None, :]) & (rewards[:, None] > rewards[None, :])


def _pair_count(rewards: Tensor, group_ids: Tensor) -> int:
    return int(_pair_mask(rewards, group_ids).sum())
