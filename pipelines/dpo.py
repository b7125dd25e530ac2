"""Diffusion-DPO: direct preference optimization of text-to-image denoisers (Wallace et al. 2023, arXiv 2311.12908).

For a prompt `c` with a preferred image `x^w` and a dispreferred `x^l`, both are noised with the same noise and
timestep, and the trained model is pushed to lower its denoising error on `x^w` more than the reference model does,
relative to `x^l` (the paper's Eq. 14; `dpo_loss`). The errors are per-sample MSEs of the prediction target
(`visalign.generators.objective`, through the family's adapter): epsilon (SD1.5, SDXL), v (v-prediction SD 2.x), or
the flow velocity `eps - x0` with logit-normal timesteps (SD3.x, FLUX, Qwen-Image, Wan: Flow-GRPO's
`scripts/train_sd3_dpo.py`). The reference is the model with its LoRA adapters disabled, or a frozen copy under
full fine-tuning (`visalign.engine.Engine.reference`).

Pairs come from a Pick-a-Pic-schema dataset (`visalign.pipelines.pickapic.load_pairs`) or are built online
from the current model and a reward (`build_pairs`: best vs worst per prompt, Flow-GRPO's online DPO), rebuilt every
`rebuild_every` steps and written under `output_dir/pairs/`.

Logged: `implicit_accuracy` (the fraction of pairs the model ranks better than the reference; 0.5 at the start),
the model's and the reference's errors on winners and losers, and their gaps `mse_gap_w = model - ref` (on the
winner it should fall below the loser's): the useful progress signals, since the loss itself is flat and noisy.

Deliberate deviations from the reference code: ties in the implicit accuracy count 1/2 (diffusers) instead of 0
(the official script); flow timesteps are continuous; each pair's noise, timestep, caption dropout and VAE sample
come from a generator keyed by `(seed, step, pair)`, so an update is the same on any number of processes and a
resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.generators import seeded_generators
from visalign.loading import load_generator
from visalign.pipelines.denoiser_trainer import (
    DenoiserConfig,
    DenoiserTrainer,
    evaluation_from_config,
)
from visalign.pipelines.pickapic import load_pairs, save_pairs
from visalign.pipelines.preference_data import IndexSampler, PreferencePairs, build_pairs
from visalign.prompts import PromptSampler, load_prompts
from visalign.rewards import RewardModel, load_reward

logger = logging.getLogger(__name__)

LOSS_KINDS = ("sigmoid", "hinge", "ipo")


def dpo_logits(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor) -> Tensor:
    """`h = (L_ref(w) - L_ref(l)) - (L_theta(w) - L_theta(l))`: how much more the model improved on the winner than on
    the loser, relative to the reference (diffusers' `logits`). `[B]`, float32 (float64 when an input is); the
    reference errors are treated as constants."""
    errors = dict(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    for name, t in errors.items():
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] == 0 or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a non-empty 1-D float tensor [B] of per-sample errors")
        if t.shape != model_err_w.shape:
            raise ValueError(f"`{name}` must have the shape of `model_err_w` {tuple(model_err_w.shape)}")
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in errors.values()) else torch.float32
    model_diff = model_err_w.to(dtype) - model_err_l.to(dtype)
    ref_diff = ref_err_w.detach().to(dtype) - ref_err_l.detach().to(dtype)
    return ref_diff - model_diff


def dpo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float = 5000.0,
    *,
    kind: str = "sigmoid",
    rpo_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The Diffusion-DPO loss (Wallace et al. 2023, arXiv 2311.12908, Eq. 14) and its implicit accuracy.

    With per-sample denoising errors `L(x) = ||target - prediction(x_t, t)||^2` (element mean) of the winner `w` and
    the loser `l` under the trained model (`theta`) and the reference, each pair sharing its noise and timestep,
    `h = (L_ref(w) - L_ref(l)) - (L_theta(w) - L_theta(l))` and `u = (beta / 2) h`:
    - `"sigmoid"`: `-log sigmoid(u)` (Eq. 14, the paper's `T omega(lambda_t)` folded into `beta`; the official
      `train.py`'s `-logsigmoid(-0.5 beta_dpo (model_diff - ref_diff))`).
    - `"hinge"`: `max(0, 1 - u)` (SLiC's hinge, diffusers' `--loss_type hinge`).
    - `"ipo"`: `(h - 1 / beta)^2` (IPO, Azar et al. 2023, arXiv 2310.12036, Eq. 17 with `tau = beta / 2`; diffusers'
      `(logits - 1 / (2 beta'))^2`).
    The batch mean is returned. `beta` is in the original paper's units, with the 1/2 factor: 5000 for SD1.5 and
    SDXL (`launchers/sd15.sh`). diffusers' `train_diffusion_dpo.py` has no 1/2 (`beta' h`): its `--beta_dpo 2500`
    is this `beta=5000`, so pass twice the diffusers value. Flow-GRPO's flow-matching DPO keeps the paper's 1/2 (its
    beta 100 for SD3.5-M is this `beta=100`).

    The implicit accuracy is the fraction of pairs with `h > 0` (the model ranks the winner better than the
    reference does), ties counted 1/2 as diffusers does, so it is 0.5 when the model equals the reference. The
    official script counts ties as 0.

    Identity: when the model equals the reference, `h = 0` and the sigmoid loss is `ln 2` for every `beta`.

    `rpo_alpha` adds RPO's negative log-likelihood of the winner (Pang et al. 2024, arXiv 2404.19733, Eq. 2:
    `L_DPO + alpha L_NLL`; trl's `rpo_alpha`), here the winner's denoising error `alpha L_theta(w)`, the diffusion
    model's bound on it up to constants. DPO alone lets the winner's error rise too, only less than the loser's; the
    term holds it down. The error itself moves far more easily than the pair's difference: on the shapes world
    (beta 500) alpha 10, a fiftieth of the DPO gradient's `beta / 4` at the start, already keeps both errors within
    0.003 of the reference's 0.043, where plain DPO (LoRA on every layer) lets them rise by about 0.03
    (`benchmarks/results/README.md`, Diffusion-DPO).

    Args:
        model_err_w, model_err_l (`Tensor` `[B]`): the trained model's errors on winners and losers (with gradient).
        ref_err_w, ref_err_l (`Tensor` `[B]`): the reference's errors (treated as constants).
        beta (`float`): `> 0`, paper units.
        kind (`str`): `"sigmoid"`, `"hinge"` or `"ipo"`.
        rpo_alpha (`float`, *optional*): `>= 0`, the weight of the winner's error; None (or 0) is plain DPO.

    Returns:
        `(loss, implicit_accuracy)`: scalars, float32 (float64 when an input is); the accuracy is detached.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"`kind` must be one of {LOSS_KINDS}, got {kind!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ValueError(f"`beta` must be a finite number > 0 (paper units, e.g. 5000 for SD1.5), got {beta!r}")
    if rpo_alpha is not None and (isinstance(rpo_alpha, bool) or not 0 <= rpo_alpha < math.inf):
        raise ValueError(f"`rpo_alpha` must be a finite number >= 0 or None, got {rpo_alpha!r}")
    h = dpo_logits(model_err_w, model_err_l, ref_err_w, ref_err_l)
    u = 0.5 * beta * h
    if kind == "sigmoid":
        losses = -F.logsigmoid(u)
    elif kind == "hinge":
        losses = torch.relu(1 - u)
    else:
        losses = (h - 1 / beta) ** 2
    if rpo_alpha:
        losses = losses + rpo_alpha * model_err_w.to(losses.dtype)
    with torch.no_grad():
        accuracy = ((h > 0).to(h.dtype) + 0.5 * (h == 0).to(h.dtype)).mean()
    return losses.mean(), accuracy


@dataclass
class DPOConfig(DenoiserConfig):
    """Diffusion-DPO settings on top of the generator's and the engine's. Defaults are the paper's SD1.5 recipe where
    it has one (beta 5000, caption dropout 0.2); online pairs follow Flow-GRPO's online DPO (best vs worst)."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Pick-a-Pic-schema pairs (.parquet, a folder of parquet shards or a hub snapshot, a hub dataset "
            "id, .jsonl, or a folder with manifest.jsonl); None builds pairs online from the current model and "
            "`reward`."
        },
    )
    split: str = field(
        default="train",
        metadata={
            "help": "The split of a sharded or hub `dataset` (Pick-a-Pic: train, validation, test, validation_unique, "
            "test_unique); splits are never merged."
        },
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "Bad dataset rows: raise naming the row, or skip and count them."}
    )
    beta: float = field(default=5000.0, metadata={"help": "DPO beta in paper units (diffusers' beta_dpo x 2)."})
    loss_type: Literal["sigmoid", "hinge", "ipo"] = field(default="sigmoid", metadata={"help": "The DPO loss."})
    rpo_alpha: float | None = field(
        default=None,
        metadata={
            "help": "RPO: add this weight times the winner's denoising error (trl's `rpo_alpha`); None: plain DPO."
        },
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Pairs per micro-batch and process (official launchers: 1 per GPU)."}
    )
    caption_dropout: float = field(
        default=0.2, metadata={"help": "Probability of an empty caption for a pair (official train.py: 0.2)."}
    )
    reward: str = field(default="world-verifier", metadata={"help": "Online pairs: the reward that ranks a group."})
    reward_pretrained: str | None = field(default=None, metadata={"help": "Online pairs: the reward's weights."})
    prompts: str = field(
        default="world:train", metadata={"help": "Online pairs: `world:train` or a text file (one prompt a line)."}
    )
    prompts_per_round: int = field(default=32, metadata={"help": "Online pairs: prompts sampled per round."})
    num_images_per_prompt: int = field(default=8, metadata={"help": "Online pairs: images per prompt."})
    pair_mode: Literal["best_worst", "all"] = field(
        default="best_worst", metadata={"help": "Online pairs: best vs worst, or all pairs with a margin."}
    )
    pair_margin: float = field(default=0.0, metadata={"help": "Online pairs: the minimal reward gap of a pair."})
    rebuild_every: int = field(
        default=0, metadata={"help": "Online pairs: rebuild from the current model every this many steps (0: once)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}")
        if self.rpo_alpha is not None and not 0 <= self.rpo_alpha < math.inf:
            raise ValueError(f"`rpo_alpha` must be >= 0 or None, got {self.rpo_alpha}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout}")
        for name in ("prompts_per_round", "num_images_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.rebuild_every < 0 or self.pair_margin < 0:
            raise ValueError(
                f"`rebuild_every` and `pair_margin` must be >= 0, got {self.rebuild_every}, {self.pair_margin}"
            )
        if self.dataset is None and self.num_images_per_prompt < 2:
            raise ValueError("online pairs need `num_images_per_prompt` >= 2")


class DPOTrainer(DenoiserTrainer):
    """Diffusion-DPO on the training engine, from a pair dataset or from pairs built online.

    Args:
        pipe: a pipeline of any generator family (`visalign.generators.ADAPTERS`).
        config (`DPOConfig`): the run.
        pairs (`PreferencePairs`, *optional*): offline pairs (`load_pairs`, ties dropped).
        reward (`RewardModel`, *optional*), prompts (`list[str]`, *optional*): online pairs, instead of `pairs`.
        eval_prompts, eval_reward: the evaluation (`DenoiserTrainer`).
    """

    def __init__(
        self,
        pipe,
        config: DPOConfig,
        *,
        pairs: PreferencePairs | None = None,
        reward: RewardModel | None = None,
        prompts: list[str] | None = None,
        eval_prompts: list[str] | None = None,
        eval_reward: RewardModel | None = None,
    ):
        if (pairs is None) == (reward is None or prompts is None):
            raise ValueError("pass `pairs` (offline DPO) or both `reward` and `prompts` (online pairs), not both")
        if pairs is not None and pairs.has_ties:
            raise ValueError("DPO needs strict preferences: load the pairs with ties='drop'")
        super().__init__(pipe, config, eval_prompts=eval_prompts, eval_reward=eval_reward)
        if self.adapter.height != self.adapter.width:
            raise ValueError(
                f"DPO trains on square images: `height` and `width` differ ({config.height}, {config.width})"
            )
        self.reward = None if reward is None else reward.to(self.engine.device).eval()
        self.prompt_sampler = None if prompts is None else PromptSampler(prompts, config.seed)
        self.pairs = None if pairs is None else pairs.at_resolution(self.adapter.height)
        self.pairs_path = None
        self.sampler = None if pairs is None else IndexSampler(len(pairs), config.seed)
        self._built_at: int | None = None

    @classmethod
    def from_config(cls, config: DPOConfig) -> DPOTrainer:
        """Build the pipeline, the pairs (or the online reward and prompts) and the evaluation the config names."""
        if config.dataset is None:
            data = dict(
                reward=load_reward(config.reward, config.reward_pretrained), prompts=load_prompts(config.prompts)
            )
        else:
            data = dict(pairs=load_pairs(config.dataset, split=config.split, on_error=config.on_error))
        pipe = load_generator(config.pretrained_model_name_or_path)[0]
        return cls(pipe, config, **data, **evaluation_from_config(config))

    # -- pairs ----------------------------------------------------------------------------------------------------

    def rebuild_pairs(self) -> None:
        """Online pairs from the current model (EMA weights when on): sample, rank by the reward, save, use."""
        cfg, engine = self.config, self.engine
        prompts = self.prompt_sampler.draw(cfg.prompts_per_round)
        self.adapter.model.eval()
        with engine.ema_weights(), engine.autocast():
            pairs = build_pairs(
                self.adapter.pipe,
                prompts,
                self.reward,
                num_images_per_prompt=cfg.num_images_per_prompt,
                mode=cfg.pair_mode,
                margin=cfg.pair_margin,
                seed=cfg.seed * 1_000_003 + engine.step,
                progress=engine.is_main_process,
                **self.generation_kwargs(cfg.num_inference_steps, cfg.guidance_scale),
            )
        folder = f"pairs/step-{engine.step}"  # relative to `output_dir`: a copied run folder resumes from its own
        if engine.is_main_process:
            save_pairs(pairs, Path(cfg.output_dir) / folder)
        engine.accelerator.wait_for_everyone()
        gaps = torch.tensor([won - lost for won, lost in pairs.scores])
        logger.info(
            "built %d pairs at step %d: mean reward gap %.3f, %d prompts without a pair",
            len(pairs),
            engine.step,
            float(gaps.mean()),
            pairs.skipped.get("no_margin", 0),
        )
        # Train on the saved 8-bit images, as a resumed run will.
        self._use_pairs(folder, engine.step)

    def _use_pairs(self, folder: str, built_at: int) -> None:
        """Read the pairs built at step `built_at` from `output_dir/folder` (an absolute `folder` as is), with a
        fresh sampler over them: the one state both a fresh build and a resumed run start from."""
        self.pairs = load_pairs(Path(self.config.output_dir) / folder, resolution=self.adapter.height)
        self.sampler = IndexSampler(len(self.pairs), self.config.seed + built_at)
        self.pairs_path, self._built_at = folder, built_at

    def _rebuild_due(self) -> bool:
        if self.reward is None:
            return False
        if self.pairs is None:
            return True
        every, step = self.config.rebuild_every, self.engine.step
        return every > 0 and step % every == 0 and step != self._built_at

    # -- one step -------------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step on `per_device_train_batch_size x gradient_accumulation_steps x processes` pairs
        (rebuilding online pairs first when due)."""
        cfg, engine = self.config, self.engine
        if self._rebuild_due():
            with engine.pause_progress():  # sampling, saving and reading pairs: not training time (the bar's ETA)
                self.rebuild_pairs()
        micro = cfg.per_device_train_batch_size * engine.num_processes  # one micro-batch, all processes
        indices = self.sampler.draw(micro * cfg.gradient_accumulation_steps)
        sums: dict[str, float] = {}
        self.adapter.model.train()
        for m in range(cfg.gradient_accumulation_steps):
            positions = list(range(m * micro, (m + 1) * micro))[engine.process_index :: engine.num_processes]
            with engine.accumulate(sync=m == cfg.gradient_accumulation_steps - 1), engine.autocast():
                loss, stats = self.pair_loss([indices[i] for i in positions], [(engine.step, i) for i in positions])
                engine.backward(loss / cfg.gradient_accumulation_steps)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.gradient_accumulation_steps
        return engine.mean_across_processes(sums) | engine.optimizer_step()

    def pair_loss(self, indices: list[int], keys: list[tuple[int, int]]) -> tuple[Tensor, dict[str, float]]:
        """The DPO loss of pairs `indices`; `keys` (`(step, position in the global batch)`) seed each pair's caption
        dropout, timestep, VAE samples and noise (shared by its two images)."""
        cfg, a = self.config, self.adapter
        items = [self.pairs[i] for i in indices]
        generators = seeded_generators([(cfg.seed, 0xD90, *k) for k in keys])
        drop = [float(torch.rand(1, generator=g)) < cfg.caption_dropout for g in generators]
        t = torch.cat([a.sample_timesteps(1, g) for g in generators])
        winners, losers = zip(*(p.winner_loser() for p in items))
        x0 = a.encode_images(torch.stack(winners + losers), generators + generators)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(x0.device)
        cond = a.encode_prompts(["" if dropped else p.caption for p, dropped in zip(items, drop)]).repeat(2)
        noise, t = torch.cat([noise, noise]), torch.cat([t, t])
        with torch.no_grad(), self.engine.reference() as reference:
            ref_w, ref_l = a.errors(x0, noise, t, cond, reference).chunk(2)
        model_w, model_l = a.errors(x0, noise, t, cond, self.engine.model).chunk(2)
        loss, accuracy = dpo_loss(
            model_w, model_l, ref_w, ref_l, cfg.beta, kind=cfg.loss_type, rpo_alpha=cfg.rpo_alpha
        )
        stats = {
            "train/loss": float(loss.detach()),
            "train/implicit_accuracy": float(accuracy),
            "train/model_mse_w": float(model_w.detach().mean()),
            "train/model_mse_l": float(model_l.detach().mean()),
            "train/ref_mse_w": float(ref_w.mean()),
            "train/ref_mse_l": float(ref_l.mean()),
            "train/mse_gap_w": float((model_w.detach() - ref_w).mean()),
            "train/mse_gap_l": float((model_l.detach() - ref_l).mean()),
        }
        return loss, stats

    # -- resuming -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            "pair_sampler": self.sampler.state_dict() if self.sampler else None,
            "pairs_path": self.pairs_path,
            "pairs_built_at": self._built_at,
        }
        if self.prompt_sampler is not None:
            state["prompt_sampler"] = self.prompt_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.prompt_sampler is not None:
            self.prompt_sampler.load_state_dict(state["prompt_sampler"])
        if state["pairs_path"] is not None:  # online pairs: the sampler must span them before its state loads
            self._use_pairs(state["pairs_path"], state["pairs_built_at"])
        if state["pair_sampler"] is not None:
            self.sampler.load_state_dict(state["pair_sampler"])
