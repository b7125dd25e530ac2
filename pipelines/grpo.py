"""GRPO for flow generators: Flow-GRPO, Pref-GRPO and TempFlow-GRPO (the latter's sampler in `tempflow.py`).

Papers: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), DanceGRPO (Xue et al. 2025, arXiv 2505.07818), Pref-GRPO
(Wang et al. 2025, arXiv 2508.20751), TempFlow-GRPO (He et al. 2025, arXiv 2508.04324), GRPO-Guard (Wang et al.
2025, arXiv 2510.22319), on PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, Eq. 7).

The pure math is in `grpo_loss.py` (`group_advantages`, `policy_loss`, `ratio_norm_log_prob`), a rollout's rewards
(pointwise, or Pref-GRPO's validated win rates) in `grpo_rewards.py`; the sampler step and its log-prob are
`visalign.sampling.sde_step`, the KL to the reference `visalign.sampling.kl_penalty`, Pref-GRPO's win rates
`visalign.reward_models.pairwise.win_rates`.

This file's configs and trainer (`FlowGRPOConfig`, `PrefGRPOConfig`, `FlowGRPOTrainer`) compose them with the
generator layer (`visalign.generators.adapter_for`: any family) and `visalign.engine.Engine`, following Flow-GRPO's
`scripts/train_sd3.py`: an
iteration samples groups (SDE everywhere, or in an SDE window: Flow-GRPO-Fast/MixGRPO), gathers rewards from every
process, normalizes them per group, and takes `updates_per_iteration` optimizer steps per inner epoch, each
accumulating the clipped surrogate (and the KL) of every (micro-batch, trained step), `gradient_accumulation_steps`
micro-batches of `per_device_train_batch_size` samples; the run's last iteration stops at `max_steps`, whatever its
value. Pref-GRPO is the
same loop with `reward_mode="win_rate"`: the rewards are a pairwise judge's win rates in each group
(`reward.group`), which average 0.5 by construction, so an external pointwise reward is always logged too.

Classifier-free guidance in the update: the log-probs are recomputed with the guided velocity
`v_uncond + w (v_text - v_uncond)` and, by default, the unconditional prediction detached, as Flow-GRPO does
(`noise_pred_uncond.detach()` in `scripts/train_sd3.py: compute_log_prob`): the gradient is `w * d v_text` only.
`cfg_backprop_uncond=True` backpropagates through both branches (the gradient gains `(1 - w) * d v_uncond`; the
forward values are the same, the learning rates and clip ranges of the reference then do not transfer). Pref-GRPO
and TempFlow-GRPO inherit the option. FLUX.1-dev has no negative pass, so the option changes nothing there.

Deviations from the reference code: Pref-GRPO rounds win rates to 3 decimals (we do not); Flow-GRPO's tracker
gives singleton groups 0 only through `r - mean = 0` (we force 0 in every scope, where the unbiased std would be NaN).
The trainer keeps samples whose advantage is 0 (Flow-GRPO drops them and re-adds random ones to keep batches
divisible; they carry no policy gradient, so only the loss normalization differs). Trained steps are the noisy steps
but the schedule's last (Flow-GRPO's `timestep_fraction=0.99` of 10 steps), and `timestep_fraction < 1` picks a
random subset shared by the batch (DanceGRPO and Pref-GRPO draw one per sample). Noise is drawn from generators
keyed by (seed, iteration, sample), so a run is the same on any number of processes and after a resume. Pref-GRPO's
reward mix (win rate plus CLIP advantages) and GDPO re-standardization are not reproduced; GRPO-Guard's per-step
`1 / |dt|` gradient reweighting is not implemented (RatioNorm is, `ratio_norm=True`). The unconditional CFG branch
is detached in the update as in the reference; `cfg_backprop_uncond=True` is a deliberate departure (see above).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from visalign.config import GeneratorConfig
from visalign.engine import Engine, ScoreTotals, peak_memory_gb
from visalign.generators import Rollout, adapter_for, seeded_generators
from visalign.lifecycle import TrainingLoop
from visalign.loading import load_generator
from visalign.monitor import RewardMonitor
from visalign.pipelines.grpo_loss import group_advantages, policy_loss, ratio_norm_log_prob
from visalign.pipelines.grpo_rewards import score_rollout
from visalign.prompts import PromptSampler, load_prompts
from visalign.rewards import RewardModel, load_reward
from visalign.sampling import check_sde_window, kl_penalty, noise_aware_weights, sde_window, step_std
from visalign.world.evaluate import add_levels, category_sums

# ---------------------------------------------------------------------------------------------------------------
# The trainer: sample groups -> rewards -> group advantages -> clipped policy loss per trained timestep.


@dataclass
class FlowGRPOConfig(GeneratorConfig):
    """Flow-GRPO (and its SDE-window variants); defaults are the paper's SD3.5-M recipe (`config/grpo.py`).

    Sizes are per process: an iteration samples `num_batches_per_iteration` batches of `sample_batch_size`
    samples on every process, `group_size` per prompt (groups may span processes, as in Flow-GRPO). An optimizer step
    accumulates `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` samples, each at every
    trained timestep (Flow-GRPO's `train.gradient_accumulation_steps`, times its timesteps), so an inner epoch takes
    `updates_per_iteration` steps; `max_steps`, `eval_steps` and `save_steps` count these steps. Any
    `max_steps >= 1` works: the last iteration stops partway when `max_steps` falls inside it.
    """

    pretrained_model_name_or_path: str = field(
        default="tiny:sd3",
        metadata={"help": "The pipeline: a diffusers folder or hub id, `world:sd3` (the shapes world), `tiny:sd3`."},
    )
    prompts: str = field(
        default="world:train", metadata={"help": "Training prompts: a text file (one a line) or `world:train`."}
    )
    reward: str = field(default="world-verifier", metadata={"help": "The trained reward (`list_rewards()`)."})
    reward_pretrained: str | None = field(default=None, metadata={"help": "Weights of the reward, if any."})
    reward_mode: Literal["score", "win_rate"] = field(
        default="score",
        metadata={"help": "score: pointwise `reward.score`; win_rate: Pref-GRPO, a pairwise judge's `reward.group`."},
    )
    bradley_terry_temperature: float | None = field(
        default=None,
        metadata={
            "help": "win_rate with a pointwise `reward`: judge pairs by sigmoid((s_i - s_j) / this) on its scores "
            "(`BradleyTerryWinRate`). Leave None for a pairwise judge."
        },
    )
    external_reward: str | None = field(
        default=None, metadata={"help": "A pointwise reward logged on the same samples (and at eval), never trained."}
    )
    external_reward_pretrained: str | None = field(default=None, metadata={"help": "Weights of the external reward."})
    height: int | None = field(default=512, metadata={"help": "Image height (required)."})
    width: int | None = field(default=512, metadata={"help": "Image width (required)."})
    num_inference_steps: int = field(default=10, metadata={"help": "Sampling steps while training (T)."})
    guidance_scale: float = field(default=4.5, metadata={"help": "CFG scale (FLUX.1-dev: the guidance embedding)."})
    cfg_backprop_uncond: bool = field(
        default=False,
        metadata={
            "help": "Backpropagate the update through the unconditional CFG branch too; default False detaches "
            "it, as Flow-GRPO's compute_log_prob (the gradient is then guidance_scale * d v_text)."
        },
    )
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (Flow-GRPO SD3: 0.7, FLUX: 0.9)."})
    sde_kind: Literal["sde", "cps", "dance"] = field(default="sde", metadata={"help": "`sde_step` kind."})
    sde_window_size: int = field(
        default=0, metadata={"help": "SDE on this many consecutive steps, ODE elsewhere (0 = SDE everywhere)."}
    )
    sde_window_range: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "[lo, hi): where a window may lie (default [0, T // 2), Flow-GRPO-Fast); TempFlow-GRPO: the steps "
            "it may branch at (default all, [0, T - 1))."
        },
    )
    same_noise: bool = field(default=False, metadata={"help": "The samples of a group share their initial noise."})
    group_size: int = field(default=24, metadata={"help": "Samples per prompt (G)."})
    sample_batch_size: int = field(default=9, metadata={"help": "Samples per sampling batch and process."})
    num_batches_per_iteration: int = field(default=4, metadata={"help": "Sampling batches per iteration."})
    advantage_scope: Literal["group", "global"] = field(
        default="global", metadata={"help": "Where the advantage std is taken (Flow-GRPO: the whole batch)."}
    )
    advantage_unbiased: bool = field(default=False, metadata={"help": "Bessel-corrected std (Pref-GRPO)."})
    advantage_eps: float = field(default=1e-4, metadata={"help": "Added to the advantage std."})
    per_device_train_batch_size: int = field(
        default=9, metadata={"help": "Samples per training micro-batch and process, at one trained timestep."}
    )
    gradient_accumulation_steps: int = field(
        default=2,
        metadata={
            "help": "Micro-batches per optimizer step, each also accumulated over every trained timestep; a step "
            "covers whole sampling batches (equal to the sampling batches per step when "
            "per_device_train_batch_size = sample_batch_size)."
        },
    )
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "Train this fraction of the noisy steps, a random subset per iteration."}
    )
    num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each iteration's samples."})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip range (log-probs are element means)."})
    adv_clip: float = field(default=5.0, metadata={"help": "Advantage clip."})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (Flow-GRPO GenEval: 0.04)."})
    kl_kind: Literal["exact", "flow_grpo"] = field(default="flow_grpo", metadata={"help": "`kl_penalty` kind."})
    ratio_norm: bool = field(default=False, metadata={"help": "GRPO-Guard's RatioNorm of the ratio."})
    noise_aware_weighting: bool = field(
        default=False, metadata={"help": "Weight each step's policy loss by its noise std, mean 1 (TempFlow-GRPO)."}
    )
    eval_num_inference_steps: int = field(default=40, metadata={"help": "ODE steps at evaluation."})
    eval_guidance_scale: float = field(default=4.5, metadata={"help": "Guidance at evaluation."})
    eval_batch_size: int = field(default=9, metadata={"help": "Images per evaluation batch and process."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in {
            "group_size": self.group_size,
            "sample_batch_size": self.sample_batch_size,
            "num_batches_per_iteration": self.num_batches_per_iteration,
            "num_inner_epochs": self.num_inner_epochs,
            "noise_level": self.noise_level,
        }.items():
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}")
        if self.group_size < 2:
            raise ValueError(
                f"`group_size` must be >= 2: a group of one has no relative advantage, got {self.group_size}"
            )
        if self.height is None or self.width is None:
            raise ValueError("GRPO needs `height` and `width`")
        per_step, per_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps, self.batch_rows
        if per_step % per_batch or self.num_batches_per_iteration % (per_step // per_batch):
            raise ValueError(
                f"an optimizer step must cover whole sampling batches of an iteration: per_device_train_batch_size x "
                f"gradient_accumulation_steps ({self.per_device_train_batch_size} x {self.gradient_accumulation_steps}"
                f") must be a multiple of the {per_batch} samples per batch and timestep, that multiple dividing "
                f"`num_batches_per_iteration` ({self.num_batches_per_iteration})"
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"`timestep_fraction` must be in (0, 1], got {self.timestep_fraction}")
        if self.num_inference_steps < 2:
            raise ValueError("`num_inference_steps` must be >= 2: the last step is never trained")
        check_sde_window(self.sde_window_size, self.window_range, self.num_inference_steps)
        if self.bradley_terry_temperature is not None and not (
            self.reward_mode == "win_rate" and self.bradley_terry_temperature > 0
        ):
            raise ValueError("`bradley_terry_temperature` must be > 0 and is used by reward_mode='win_rate' only")
        if self.reward_mode == "win_rate" and self.external_reward is None:
            raise ValueError(
                "reward_mode='win_rate' needs `external_reward`: win rates average 0.5 whatever the samples, so only "
                "an external metric shows progress"
            )

    @property
    def batch_rows(self) -> int:
        """Samples of one sampling batch (per process) that share a trained timestep."""
        return self.sample_batch_size

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer steps per inner epoch: the iteration's samples over those of one step."""
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        return self.num_batches_per_iteration * self.batch_rows // per_step

    @property
    def window_range(self) -> tuple[int, int]:
        return self.sde_window_range or (0, self.num_inference_steps // 2)


@dataclass
class PrefGRPOConfig(FlowGRPOConfig):
    """Pref-GRPO: rewards are a pairwise judge's win rates within each group (`scripts/_common_finetune.sh`)."""

    reward_mode: Literal["score", "win_rate"] = field(default="win_rate", metadata={"help": "Pref-GRPO: win_rate."})
    external_reward: str | None = field(default="world-verifier", metadata={"help": "Logged, never trained on."})
    group_size: int = field(default=8, metadata={"help": "Samples per prompt (G)."})
    sample_batch_size: int = field(default=8, metadata={"help": "Samples per sampling batch and process."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Samples per training micro-batch and process, at one trained timestep."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Images per evaluation batch and process."})
    advantage_scope: Literal["group", "global"] = field(default="group", metadata={"help": "Per-group std."})
    advantage_unbiased: bool = field(default=True, metadata={"help": "torch's unbiased std, as the reference."})
    advantage_eps: float = field(default=1e-8, metadata={"help": "Added to the advantage std."})
    same_noise: bool = field(default=True, metadata={"help": "`--init_same_noise`."})
    timestep_fraction: float = field(default=0.6, metadata={"help": "A random 60% of the noisy steps."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (Pref-GRPO: 0)."})
    kl_kind: Literal["exact", "flow_grpo"] = field(default="exact", metadata={"help": "Pref-GRPO's `grpo/kl.py`."})


class FlowGRPOTrainer(TrainingLoop):
    """Flow-GRPO, Pref-GRPO (`reward_mode="win_rate"`) and, through `TempFlowGRPOTrainer`, TempFlow-GRPO.

    Each iteration: draw prompts; sample groups with the family's adapter (flow families: `sde_kind` in the
    configured SDE window; SD/SDXL: DDPO's DDIM step with eta = `noise_level`); score them
    (pointwise `reward.score`, or a pairwise judge's win rates `reward.group` per group); gather the rewards of
    every process and normalize them per group (`group_advantages`); then, for every trained timestep of every
    micro-batch, recompute the log-prob of the stored transition and minimize the clipped surrogate
    (`policy_loss`), times the step's noise-aware weight when asked, plus `beta` times the KL to the reference
    (adapters disabled). The external reward is logged on the same samples.

    Args:
        pipe: the policy, a pipeline of any family in `visalign.generators.ADAPTERS`; its denoiser is trained.
        reward (`RewardModel`): the trained reward.
        config (`FlowGRPOConfig`): the recipe.
        prompts (`list[str]`): training prompts.
        external_reward (`RewardModel`, *optional*): logged on the samples, and the evaluation reward when given.
        eval_prompts (`list[str]`, *optional*): prompts of the ODE evaluation (`config.eval_steps`).
        eval_reward (`RewardModel`, *optional*): the evaluation judge (default: the external reward, else the reward).

    The loop (resume, evaluation schedule, checkpoints, export) is `visalign.lifecycle.TrainingLoop.train`; one
    `train_step` is one iteration, several optimizer steps.
    """

    def __init__(
        self,
        pipe: Any,
        reward: RewardModel,
        config: FlowGRPOConfig,
        prompts: list[str],
        *,
        external_reward: RewardModel | None = None,
        eval_prompts: list[str] | None = None,
        eval_reward: RewardModel | None = None,
    ):
        if config.reward_mode == "win_rate" and external_reward is None:
            raise ValueError("reward_mode='win_rate' needs an `external_reward` to log (win rates average 0.5)")
        self.config = config
        self.adapter = adapter_for(pipe, **config.adapter_options())
        self.engine = Engine.for_generator(config, self.adapter, keep_reference=config.beta > 0)
        per_prompt, batch, processes = self.samples_per_prompt(), config.sample_batch_size, self.engine.num_processes
        if (processes * batch) % per_prompt:
            raise ValueError(
                f"misconfigured group sizes: {processes} process(es) x sample_batch_size {batch} = "
                f"{processes * batch} samples per batch, not a multiple of group_size ({per_prompt})"
            )
        if config.reward_mode == "win_rate" and batch % per_prompt:
            raise ValueError(
                f"misconfigured group sizes: win rates compare a whole group on one process, so sample_batch_size "
                f"({batch}) must be a multiple of group_size ({per_prompt})"
            )
        flow = self.adapter.target == "flow"
        self.kind = config.sde_kind if flow else "ddim"  # DDPO's policy step on epsilon/v families
        if not flow and (config.noise_aware_weighting or (config.beta > 0 and config.kl_kind == "flow_grpo")):
            raise ValueError(
                f"{self.adapter.family} samples with DDIM: `noise_aware_weighting` and kl_kind='flow_grpo' are "
                "flow-SDE conventions; set noise_aware_weighting=false and kl_kind='exact'"
            )
        self.reward = reward.to(self.engine.device).eval()
        self.external_reward = None if external_reward is None else external_reward.to(self.engine.device).eval()
        # The reward-hacking monitor: the external reward is the gold one, tracked beside a pointwise training reward
        # (win rates average 0.5 by construction, so there is nothing to compare them with).
        self.monitor = (
            RewardMonitor(self.external_reward)
            if self.external_reward is not None and config.reward_mode == "score"
            else None
        )
        self.prompt_sampler = PromptSampler(prompts, config.seed)
        self.eval_prompts = eval_prompts
        self.eval_reward = None if eval_reward is None else eval_reward.to(self.engine.device).eval()

    @classmethod
    def from_config(cls, config: FlowGRPOConfig) -> FlowGRPOTrainer:
        """Build the pipeline, rewards and prompts the config names (what `visalign train` runs)."""
        reward = load_reward(config.reward, config.reward_pretrained)
        if config.bradley_terry_temperature is not None:
            from visalign.reward_models.pairwise import BradleyTerryWinRate

            reward = BradleyTerryWinRate(reward, config.bradley_terry_temperature)
        external = None
        if config.external_reward is not None:
            external = load_reward(config.external_reward, config.external_reward_pretrained)
        return cls(
            load_generator(config.pretrained_model_name_or_path)[0],
            reward,
            config,
            load_prompts(config.prompts),
            external_reward=external,
            eval_prompts=None if config.eval_prompts is None else load_prompts(config.eval_prompts),
            eval_reward=None if config.eval_reward is None else load_reward(config.eval_reward),
        )

    def samples_per_prompt(self) -> int:
        """Consecutive samples of an iteration that share a prompt: Flow-GRPO's group."""
        return self.config.group_size

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_prompts)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the engine's state: the prompt sampler's position and the monitor."""
        state: dict[str, Any] = {"prompt_sampler": self.prompt_sampler.state_dict()}
        if self.monitor is not None:
            state["monitor"] = self.monitor.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        if self.monitor is not None and "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])

    def export(self) -> None:
        """The reward-hacking monitor's records, beside the run."""
        if self.monitor is not None and self.engine.is_main_process:
            self.monitor.save(self.engine.output_dir / "monitor")

    def train_step(self) -> dict[str, float]:
        """Sample, score and normalize one iteration's groups, then take its optimizer steps (`update`)."""
        start = time.perf_counter()
        iteration = self.prompt_sampler.iteration
        rollout, rewards, metrics = self.rollout()
        advantages, advantage_metrics = self.advantages(rollout, rewards)
        tick = time.perf_counter()
        update_metrics = self.update(rollout, advantages, iteration)
        metrics["iteration"] = iteration
        self._synchronize()
        metrics["time/update"] = time.perf_counter() - tick
        metrics["time/iteration"] = time.perf_counter() - start
        metrics["samples_per_second"] = len(rollout) * self.engine.num_processes / metrics["time/iteration"]
        metrics["memory/peak_gb"] = peak_memory_gb(self.engine.device)
        return {**metrics, **advantage_metrics, **update_metrics}

    def rollout(self) -> tuple[Rollout, Tensor, dict[str, float]]:
        """This process's samples of one iteration, their rewards `[N]`, and reward and timing metrics."""
        c, engine = self.config, self.engine
        iteration = self.prompt_sampler.iteration
        global_batch = engine.num_processes * c.sample_batch_size
        per_prompt = self.samples_per_prompt()
        drawn = self.prompt_sampler.draw(c.num_batches_per_iteration * global_batch // per_prompt)
        texts = [p for p in drawn for _ in range(per_prompt)]
        parts, rewards, timing = [], [], {"time/sampling": 0.0, "time/reward": 0.0}
        aspects: dict[str, list[Tensor]] = defaultdict(list)
        for b in range(c.num_batches_per_iteration):
            first = b * global_batch + engine.process_index * c.sample_batch_size
            index = torch.arange(first, first + c.sample_batch_size)
            tick = time.perf_counter()
            part = self.sample_batch([texts[i] for i in index.tolist()], index, iteration, b)
            self._synchronize()
            timing["time/sampling"] += time.perf_counter() - tick
            tick = time.perf_counter()
            rewards.append(score_rollout(part, self.reward, c.reward_mode, self.external_reward, aspects))
            timing["time/reward"] += time.perf_counter() - tick
            parts.append(part)
        rollout, rewards = Rollout.cat(parts), torch.cat(rewards)
        metrics = {name: float(torch.cat(values).mean()) for name, values in aspects.items()}
        metrics = engine.mean_across_processes(metrics) | timing
        if self.monitor is not None:
            gold = torch.cat(aspects[f"external/{self.external_reward.name}"])
            groups = engine.gather(rollout.group_ids).tolist()  # pairs within a prompt's group are compared
            metrics |= self.monitor.record(
                engine.step, engine.gather(rewards), engine.gather(gold), prompts=[str(g) for g in groups]
            )
        return rollout, rewards, metrics

    def sample_batch(self, prompts: list[str], index: Tensor, iteration: int, batch: int) -> Rollout:
        """Sample one batch; `index` holds the samples' positions in the iteration (the same on any process count).

        Initial noise is keyed by group when `same_noise`, else by sample; SDE noise always by sample.
        """
        c = self.config
        group_ids = index // self.samples_per_prompt()
        noise_keys = group_ids if c.same_noise else index
        latents = self.adapter.initial_latents(seeded_generators([(c.seed, iteration, 0, k) for k in noise_keys]))
        with self.engine.autocast():
            return self.adapter.sample(
                prompts,
                self.adapter.encode_prompts(prompts, c.guidance_scale),
                latents,
                num_inference_steps=c.num_inference_steps,
                guidance_scale=c.guidance_scale,
                noise_level=c.noise_level,
                noise_steps=self.noise_window(iteration, batch),
                kind=self.kind,
                generator=seeded_generators([(c.seed, iteration, 1, i) for i in index]),
                group_ids=group_ids,
                model=self.engine.unwrapped,
            )

    def noise_window(self, iteration: int, batch: int) -> list[int] | None:
        """The SDE steps of a batch: all (None), or `sde_window_size` consecutive ones placed at random."""
        c = self.config
        return sde_window(c.sde_window_size, c.window_range, seeded_generators([(c.seed, iteration, 2, batch)])[0])

    def advantages(self, rollout: Rollout, rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Group advantages over every process's rewards; returns this process's `[N]` and metrics."""
        c, engine = self.config, self.engine
        all_rewards, all_groups = engine.gather(rewards), engine.gather(rollout.group_ids)
        advantages = group_advantages(
            all_rewards, all_groups, scope=c.advantage_scope, unbiased=c.advantage_unbiased, eps=c.advantage_eps
        )
        metrics = {"reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std(correction=0))}
        _, inverse = all_groups.unique(return_inverse=True)
        spread = torch.zeros(int(inverse.max()) + 1, device=advantages.device).index_add_(0, inverse, advantages.abs())
        metrics |= {
            "advantage/abs_mean": float(advantages.abs().mean()),
            "advantage/zero_groups": float((spread == 0).float().mean()),
        }
        return advantages.reshape(engine.num_processes, -1)[engine.process_index], metrics

    def trained_steps(self, rollout: Rollout, iteration: int) -> Tensor:
        """`[T]` bool: the noisy steps except the last one (Flow-GRPO's `timestep_fraction=0.99`), optionally a
        random `timestep_fraction` of them, the same on every process."""
        trained = (rollout.stds > 0).any(dim=0)
        trained[-1] = False
        if self.config.timestep_fraction < 1:
            steps = trained.nonzero().flatten()
            keep = max(1, int(len(steps) * self.config.timestep_fraction))
            generator = seeded_generators([(self.config.seed, iteration, 3)])[0]
            trained[:] = False
            trained[steps[torch.randperm(len(steps), generator=generator)[:keep].to(steps.device)]] = True
        if not trained.any():
            raise ValueError("no trainable step: every step was deterministic (noise_level 0 or ODE)")
        return trained

    def update(self, rollout: Rollout, advantages: Tensor, iteration: int) -> dict[str, float]:
        """`num_inner_epochs * updates_per_iteration` optimizer steps over the rollout, each accumulating all its
        (samples, step) units; the run's last iteration stops at `max_steps` (its remaining updates are skipped)."""
        c, engine = self.config, self.engine
        trained = self.trained_steps(rollout, iteration)
        weights = self.step_weights(rollout)
        stats: dict[str, list[float]] = defaultdict(list)
        parts = torch.arange(len(rollout), device=rollout.latents.device).chunk(c.updates_per_iteration)
        for part in [part for _ in range(c.num_inner_epochs) for part in parts][: c.max_steps - engine.step]:
            units = [
                (rows, int(t))
                for t in trained.nonzero().flatten()
                for rows in part[rollout.stds[part, t] > 0].split(c.per_device_train_batch_size)
                if len(rows)
            ]
            self._check_same_unit_count(len(units))
            for i, (rows, t) in enumerate(units):
                with engine.accumulate(sync=i == len(units) - 1):
                    loss, unit_stats = self.loss(rollout, rows, t, advantages[rows], float(weights[t]))
                    engine.backward(loss / len(units))
                for k, v in unit_stats.items():
                    stats[k].append(float(v))
            for k, v in engine.optimizer_step().items():
                stats[k].append(v)
        means = {f"train/{k}": sum(v) / len(v) for k, v in stats.items()}
        return engine.mean_across_processes(means)

    def step_weights(self, rollout: Rollout) -> Tensor:
        """`[T]` policy-loss weights: 1, or TempFlow-GRPO's noise-aware `s_t / mean(s)` with the mean over the
        schedule's trainable steps `0..T-2` (whatever subset this iteration trains: the official SD3.5-M constant
        2.25 is this mean over all 9), `s_t` the SDE transition std of step t."""
        t_count = rollout.num_steps
        if not self.config.noise_aware_weighting:
            return torch.ones(t_count)
        stds = torch.stack(
            [step_std(rollout.sigmas, t, rollout.noise_level, kind=rollout.kind) for t in range(t_count)]
        )
        trainable = torch.arange(t_count) < t_count - 1
        return noise_aware_weights(stds.cpu(), trainable)

    def loss(
        self, rollout: Rollout, rows: Tensor, step: int, advantages: Tensor, weight: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`weight * policy_loss + beta * KL` for the transitions of `rows` at `step` under the current model."""
        c, engine = self.config, self.engine
        with engine.autocast():
            policy = self.adapter.log_prob(rollout, rows, step, engine.model, detach_uncond=not c.cfg_backprop_uncond)
        old_log_prob = rollout.log_probs[rows, step]
        log_prob = policy.log_prob
        if c.ratio_norm:
            log_prob = ratio_norm_log_prob(log_prob, old_log_prob, policy.mean, rollout.means[rows, step], policy.std)
        loss, stats = policy_loss(log_prob, old_log_prob, advantages, c.clip_range, c.adv_clip)
        stats["policy_loss"] = loss.detach()
        loss = weight * loss
        if c.beta > 0:
            with torch.no_grad(), engine.reference() as reference, engine.autocast():
                ref_mean = self.adapter.log_prob(rollout, rows, step, reference).mean
            dt = rollout.sigmas[step + 1] - rollout.sigmas[step] if c.kl_kind == "flow_grpo" else None
            kl = kl_penalty(policy.mean, ref_mean, policy.std, kind=c.kl_kind, dt=dt).mean()
            loss = loss + c.beta * kl
            stats["kl"] = kl.detach()
        stats["loss"] = loss.detach()
        return loss, stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """ODE samples of the evaluation prompts (EMA weights when on), scored by the evaluation judge (default: the
        external reward, else the reward); returns `eval/<name>` and `eval/<name>/<aspect>` means over images.
        Seeds are fixed."""
        c, engine = self.config, self.engine
        judge = self.eval_reward or self.external_reward or self.reward
        texts = [p for p in self.eval_prompts for _ in range(c.eval_images_per_prompt)]
        totals = ScoreTotals("eval")
        with engine.ema_weights():
            for index in torch.arange(engine.process_index, len(texts), engine.num_processes).split(c.eval_batch_size):
                prompts = [texts[i] for i in index.tolist()]
                latents = self.adapter.initial_latents(seeded_generators([(c.seed, 0xE7A1, i) for i in index]))
                with engine.autocast():
                    images = self.adapter.sample(
                        prompts,
                        self.adapter.encode_prompts(prompts, c.eval_guidance_scale),
                        latents,
                        num_inference_steps=c.eval_num_inference_steps,
                        guidance_scale=c.eval_guidance_scale,
                        model=engine.unwrapped,
                    ).images
                out = judge.score(images, prompts)
                totals.add(judge.name, out)
                by_category = category_sums(prompts, out.aspects["correct"]) if "correct" in out.aspects else None
                for category, value in (by_category or {}).items():
                    totals.sums[f"eval/{judge.name}/correct@{category}"] += value
        return add_levels(totals.means(engine, len(texts)), f"eval/{judge.name}", texts)

    def _check_same_unit_count(self, count: int) -> None:
        """DDP needs every process to take the same number of micro-steps per update."""
        if self.engine.num_processes == 1:
            return
        counts = self.engine.gather(torch.tensor([count], device=self.engine.device))
        if not (counts == count).all():
            raise RuntimeError(f"processes disagree on micro-steps per update: {counts.tolist()}")

    def _synchronize(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)
