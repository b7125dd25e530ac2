"""ReNO: reward-based noise optimization at inference (Eyring et al., NeurIPS 2024, arXiv 2406.04312).

The weights of a one- or few-step generator G stay fixed; the initial noise z of each prompt p is optimized against
a weighted set of differentiable rewards r_k:

    min_z  L(z) = sum_k w_k * loss_k(G(z, p), p) + lambda * R(z),      loss_k = -r_k,
    R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||                           (d = numel(z) of one sample)

R is the negative log-density of ||z|| under the chi distribution with d degrees of freedom (the norm of a standard
Gaussian), which keeps z on the Gaussian shell; its minimum is at ||z|| = sqrt(d - 1). Each iteration renders the
image from z, scores it, records it, and (except at the last iteration) takes one optimizer step on z after clipping
the gradient norm of z. The returned image is the iterate with the highest weighted reward (the regularizer excluded).

Defaults are the reference code's (ExplainableML/ReNO `training/trainer.py` `LatentNoiseTrainer.train`,
`training/optim.py`, `arguments.py`): 50 iterations, SGD lr 5 with Nesterov momentum 0.9, gradient-norm clip 0.1,
lambda 0.01; Adam (eps 1e-2) and L-BFGS (10 inner iterations, history 3, strong Wolfe) share the `learning_rate`. The
reward weights are HPSv2.1 5, ImageReward 1, PickScore 0.05, CLIP (ViT-H-14, 100 * cos) 0.01 (`REFERENCE_REWARDS`).
`ReNO.best_of_n` is the reference's `--imageselect` baseline: N random noises with the same number of generator calls,
the best by the same weighted reward.

The generator is a pipeline of any family of the generator layer (`visalign.generators.adapter_for`) whose `__call__`
takes `latents`: SD/SD-Turbo and SDXL-Turbo (UNet), SD3, FLUX-schnell and Qwen-Image (flow transformers; FLUX and
Qwen-Image take packed latents `[B, L, 4C]`), the shapes-world models. The family's adapter gives the image size and
draws the initial noise as the pipeline itself would from the same generator. Diffusers decorates `__call__` with
`torch.no_grad()`; ReNO calls the undecorated function (`inspect.unwrap`), so each pipeline's own prompt encoding,
scheduler, guidance, latent packing and VAE decode run unchanged, with gradients.

Deliberate deviations from the reference:
- Losses are the negated rewards: the reference's offsets (`1 - cos`, `30 - score`, `2 - score`, ...) are constants
  and change no gradient. The best iterate is the first one with the highest weighted reward, as theirs.
- z is a float32 tensor, cast to the pipeline's dtype for each call (the reference keeps an fp16 Parameter); the
  regularizer is float32 in both.
- Prompts are batched: each sample has its own noise, seed, gradient clip and best iterate, so with SGD or Adam a
  batch equals its items run one by one. L-BFGS couples the batch through its line search on the summed objective.
- L-BFGS evaluates the objective several times per step: every evaluation is a generator call, recorded in the
  history and eligible as the best iterate (the reference's trainer steps L-BFGS without a closure, which fails).
- Rewards keep their own preprocessing; rewards with equal transforms share one pass (`CompositeReward`). The
  reference resizes and center-crops once for all rewards, so its HPSv2 sees a crop instead of its padded input.
- Gradient checkpointing covers the denoiser and the VAE decoder (diffusers' own), not the reward models.

The `visalign reno` command and the figures it writes are in `reno_cli.py`.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from visalign.generators import adapter_for
from visalign.reward_models.compose import CompositeReward, RewardPart
from visalign.rewards import RewardModel
from visalign.types import check_prompts

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "lbfgs")
ADAM_EPS = 1e-2  # the reference's Adam eps
LBFGS_OPTIONS = {"max_iter": 10, "history_size": 3, "line_search_fn": "strong_wolfe"}
# The reference's reward weights (arguments.py); CLIP is open_clip ViT-H-14 laion2B scored as 100 * cos.
REFERENCE_REWARDS = {"hpsv2.1": 5.0, "imagereward": 1.0, "pickscore": 0.05, "clipscore": 0.01}
REFERENCE_REWARD_OPTIONS = {"clipscore": {"pretrained": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "w": 100.0}}
# Arguments ReNO passes to the pipeline itself.
RESERVED_PIPELINE_KWARGS = (
    "prompt",
    "latents",
    "generator",
    "output_type",
    "return_dict",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "num_images_per_prompt",
)


def noise_norm_regularizer(z: Tensor) -> Tensor:
    """ReNO's noise prior `R(z) = 0.5 * ||z||^2 - (d - 1) * log ||z||` per sample, in float32 (float64 for float64).

    `R` is `-log chi_d(||z||)` up to a constant: the chi density with d degrees of freedom is
    `chi_d(r) ~ r^(d-1) exp(-r^2 / 2)`. Its gradient is `z * (1 - (d - 1) / ||z||^2)`, zero on the sphere
    `||z|| = sqrt(d - 1)`, the minimum.

    Args:
        z (`Tensor` `[B, ...]`): the noise; d is the number of elements of one sample.

    Returns:
        `Tensor` `[B]`.
    """
    if not isinstance(z, Tensor) or z.ndim < 2 or not z.is_floating_point():
        raise ValueError(f"`z` must be a float tensor of shape [B, ...], got {_describe(z)}")
    d = math.prod(z.shape[1:])
    if d < 2:
        raise ValueError(f"`z` needs at least 2 elements per sample (d - 1 > 0), got shape {tuple(z.shape)}")
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(z.to(dtype).flatten(1), dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


def clip_grad_norm_per_sample_(grad: Tensor, max_norm: float) -> Tensor:
    """Clip each sample's gradient in place: `g_i <- g_i * min(1, max_norm / (||g_i|| + 1e-6))`.

    This is `torch.nn.utils.clip_grad_norm_` applied to each sample on its own (the reference clips its single
    sample's noise), so samples of a batch do not shrink each other's steps.

    Args:
        grad (`Tensor` `[B, ...]`): the gradient, modified in place.
        max_norm (`float`): the largest norm a sample's gradient keeps.

    Returns:
        `Tensor` `[B]`: the norms before clipping.
    """
    norms = torch.linalg.vector_norm(grad.flatten(1).float(), dim=1)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    grad.mul_(scale.to(grad.dtype).view(-1, *([1] * (grad.ndim - 1))))
    return norms


@dataclass
class ReNOConfig:
    """ReNO's optimization and sampling settings (defaults: the reference's)."""

    num_iterations: int = field(
        default=50, metadata={"help": "iterations: renders of the noise; all but the last take an optimizer step"}
    )
    optimizer: str = field(default="sgd", metadata={"help": f"one of {OPTIMIZERS}"})
    learning_rate: float = field(
        default=5.0, metadata={"help": "learning rate of every optimizer (the reference's 5 is SGD's)"}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum for SGD"})
    max_grad_norm: float = field(default=0.1, metadata={"help": "max gradient norm of each sample's noise"})
    reg_weight: float = field(default=0.01, metadata={"help": "lambda, the weight of the noise-norm regularizer"})
    num_inference_steps: int = field(default=1, metadata={"help": "generator steps per render"})
    guidance_scale: float = field(default=0.0, metadata={"help": "classifier-free guidance (0 for turbo models)"})
    height: int | None = field(default=None, metadata={"help": "image height (default: the denoiser's sample size)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: the denoiser's sample size)"})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "recompute denoiser and VAE-decoder activations in the backward pass"}
    )

    def __post_init__(self) -> None:
        positive_ints = {"num_iterations": self.num_iterations, "num_inference_steps": self.num_inference_steps}
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        numbers = {"learning_rate": self.learning_rate, "max_grad_norm": self.max_grad_norm}
        for name, value in numbers.items():
            if not _is_real(value) or not value > 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}")
        if not _is_real(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("`nesterov` needs `momentum` > 0 (or set nesterov=False)")
        if not _is_real(self.reg_weight) or not self.reg_weight >= 0:
            raise ValueError(f"`reg_weight` must be a number >= 0, got {self.reg_weight!r}")
        if not _is_real(self.guidance_scale) or not self.guidance_scale >= 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {self.guidance_scale!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")


@dataclass
class ReNOOutput:
    """What `ReNO.__call__` returns; one entry per prompt in every batched field.

    Args:
        images (`Tensor` `[B, 3, H, W]`, float in [0, 1]): the best iterate by weighted reward.
        noise (`Tensor` `[B, ...]`, float32): the initial noise that renders `images` (the optimized noise).
        reward (`Tensor` `[B]`): the weighted reward of `images`.
        best_iteration (`list[int]`): for each sample, the index into `history` of its best iterate.
        initial_images (`Tensor` `[B, 3, H, W]`): the first render, the base model's sample from `initial_noise`.
        initial_noise (`Tensor` `[B, ...]`, float32).
        initial_reward (`Tensor` `[B]`).
        history (`list[dict]`): one entry per generator call: `iteration`, `reward` (weighted) and `rewards`
            (`{part name: raw score}`), `regularizer` (`R(z)`, unweighted), `total` (the minimized objective
            `-reward + lambda * R`) and `noise_norm`, each a list of B floats.
        generator_calls (`int`): renders made (`num_iterations` for SGD and Adam, more for L-BFGS).
    """

    images: Tensor
    noise: Tensor
    reward: Tensor
    best_iteration: list[int]
    initial_images: Tensor
    initial_noise: Tensor
    initial_reward: Tensor
    history: list[dict[str, Any]]
    generator_calls: int


@dataclass
class BestOfNOutput:
    """What `ReNO.best_of_n` returns.

    Args:
        images (`Tensor` `[B, 3, H, W]`): the best of the N candidates of each prompt by weighted reward.
        noise (`Tensor` `[B, ...]`): the noise of each chosen candidate.
        reward (`Tensor` `[B]`): its weighted reward.
        best_index (`list[int]`): which candidate was chosen (0 is ReNO's initial noise for the same seed).
        rewards (`Tensor` `[N, B]`): the weighted reward of every candidate.
        generator_calls (`int`): N.
    """

    images: Tensor
    noise: Tensor
    reward: Tensor
    best_index: list[int]
    rewards: Tensor
    generator_calls: int


class ReNO:
    """Reward-based noise optimization on a differentiable diffusers pipeline.

        pipe = StableDiffusionPipeline.from_pretrained("stabilityai/sd-turbo", safety_checker=None)
        rewards = [RewardPart(load_reward("hpsv2.1"), 5.0), RewardPart(load_reward("imagereward"), 1.0)]
        out = ReNO(pipe, rewards)(["a red fox in the snow"], seed=0)
        out.images, out.noise, out.history

    Args:
        pipe: a text-to-image pipeline of a supported family (`visalign.generators.ADAPTERS`) whose `__call__`
            takes `latents` (and returns tensors with `output_type="pt"`); no safety checker or watermark, which
            leave torch. Its weights are frozen only while ReNO runs; disable its own progress bar
            (`pipe.set_progress_bar_config(disable=True)`).
        rewards: differentiable rewards: `RewardPart`s (reward, weight, calibration), a mapping `name -> reward`
            (weight 1), a single `RewardModel`, or a `CompositeReward` in `"weighted_raw"` mode.
        config: optimization and sampling settings.
        pipeline_kwargs: further arguments of every pipeline call (e.g. `max_sequence_length=16` for the SD3-class
            shapes-world model, `sigmas`, `timesteps`).
    """

    def __init__(
        self,
        pipe: Any,
        rewards: RewardModel | Sequence[RewardPart] | Mapping[str, RewardModel],
        config: ReNOConfig | None = None,
        pipeline_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config if config is not None else ReNOConfig()
        if not isinstance(self.config, ReNOConfig):
            raise ValueError(f"`config` must be a ReNOConfig, got {type(self.config).__name__}")
        self._call = _differentiable_call(pipe)
        self.pipe = pipe
        self.rewards = _composite(rewards)
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        reserved = sorted(set(self.pipeline_kwargs) & set(RESERVED_PIPELINE_KWARGS))
        if reserved:
            raise ValueError(f"`pipeline_kwargs` must not set {reserved}: ReNO passes them (use `config` for steps)")
        self.adapter = adapter_for(pipe, height=self.config.height, width=self.config.width)
        if self.adapter.video:
            raise ValueError(f"ReNO optimizes the noise of image generators; {type(pipe).__name__} makes videos")
        self.height, self.width = self.adapter.height, self.adapter.width

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """Standard Gaussian noise `[B, ...]` float32 on the pipeline's device, in the layout its `latents` take
        (`GeneratorAdapter.initial_latents`); sample i from a CPU generator seeded with `seeds[i]` (so a sample's
        noise does not depend on the batch or the device, and equals the pipeline's own for that generator)."""
        return self.adapter.initial_latents([torch.Generator().manual_seed(s) for s in seeds])

    def render(self, noise: Tensor, prompts: list[str], seeds: Sequence[int]) -> Tensor:
        """Images `[B, 3, H, W]` in [0, 1] from initial noise `noise`, differentiable in it when grad is enabled.

        Stochastic schedulers draw from generators reseeded with `seeds` at every call (as the reference does), so
        the image is a deterministic function of the noise.
        """
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        try:
            images = self._call(
                self.pipe,
                prompt=prompts,
                latents=noise.to(self.pipe.dtype),
                generator=generators,
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                height=self.height,
                width=self.width,
                output_type="pt",
                **self.pipeline_kwargs,
            ).images
        except RuntimeError as e:
            if "requires grad" not in str(e):
                raise
            raise ValueError(
                f"`pipe` ({type(self.pipe).__name__}) cannot be differentiated: its __call__ leaves torch ({e}); "
                "load it without a safety checker or watermark (safety_checker=None, add_watermarker=False)"
            ) from e
        if torch.is_grad_enabled() and noise.requires_grad and not images.requires_grad:
            raise ValueError(
                f"`pipe` ({type(self.pipe).__name__}) cannot be differentiated: its images carry no gradient to "
                "`latents` (a step outside autograd, e.g. a detaching scheduler)"
            )
        return images

    def __call__(self, prompts: list[str], *, seed: int | Sequence[int] = 0, progress: bool = False) -> ReNOOutput:
        """Optimize the noise of each prompt; sample i starts from the noise of seed `seed + i` (or `seed[i]`)."""
        prompts = check_prompts(prompts)
        seeds = _seeds(seed, len(prompts))
        cfg = self.config
        z = self.initial_noise(seeds).requires_grad_(True)
        initial_noise = z.detach().clone()
        optimizer = _optimizer(cfg, z)
        history: list[dict[str, Any]] = []
        best: dict[str, Tensor] = {}
        initial: dict[str, Tensor] = {}

        def evaluate(iteration: int, step: bool) -> Tensor:
            """Render, score and record; with `step`, also backpropagate and clip. Returns the summed objective."""
            with torch.set_grad_enabled(step):
                images = self.render(z, prompts, seeds)
                out = self.rewards.score(images, prompts)
                regularizer = noise_norm_regularizer(z)
                total = -out.score + cfg.reg_weight * regularizer
            if step:
                missing = [name for name, s in out.aspects.items() if not s.requires_grad]
                if missing or not out.score.requires_grad:
                    raise ValueError(
                        f"`rewards` {missing or [self.rewards.name]} returned scores without a gradient to the "
                        "pixels although marked differentiable"
                    )
            _record(history, iteration, z, out.score, out.aspects, regularizer, total)
            if len(history) == 1:
                initial.update(images=images.detach().float(), reward=out.score.detach())
            _keep_best(best, len(history) - 1, out.score, images, z)
            if step:
                optimizer.zero_grad(set_to_none=True)
                total.sum().backward()
                clip_grad_norm_per_sample_(z.grad, cfg.max_grad_norm)
            return total.sum().detach()

        bar = _progress(cfg.num_iterations, progress)
        with _noise_only_gradients(self.pipe, self.adapter.model, self.rewards, cfg.gradient_checkpointing):
            for iteration in range(cfg.num_iterations):
                if iteration == cfg.num_iterations - 1:
                    evaluate(iteration, step=False)  # the last iterate is evaluated, not stepped
                elif cfg.optimizer == "lbfgs":
                    optimizer.step(lambda iteration=iteration: evaluate(iteration, step=True))
                else:
                    evaluate(iteration, step=True)
                    optimizer.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{sum(history[-1]['reward']) / len(prompts):.4g}")
        if bar is not None:
            bar.close()
        logger.info(
            "ReNO: %d generator calls, mean reward %.4g -> %.4g",
            len(history),
            float(initial["reward"].mean()),
            float(best["reward"].mean()),
        )
        return ReNOOutput(
            images=best["images"],
            noise=best["noise"],
            reward=best["reward"],
            best_iteration=best["index"].tolist(),
            initial_images=initial["images"],
            initial_noise=initial_noise,
            initial_reward=initial["reward"],
            history=history,
            generator_calls=len(history),
        )

    @torch.no_grad()
    def best_of_n(
        self, prompts: list[str], num_candidates: int | None = None, *, seed: int | Sequence[int] = 0
    ) -> BestOfNOutput:
        """The best of `num_candidates` random noises per prompt by weighted reward (default: `num_iterations`, the
        generator calls of ReNO with SGD or Adam). Candidate 0 is ReNO's initial noise for the same seed; candidate
        j is the (j+1)-th draw of the sample's seeded generator."""
        prompts = check_prompts(prompts)
        n = self.config.num_iterations if num_candidates is None else num_candidates
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"`num_candidates` must be a positive int, got {n!r}")
        seeds = _seeds(seed, len(prompts))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        best: dict[str, Tensor] = {}
        rewards = []
        for j in range(n):
            noise = self.adapter.initial_latents(generators)
            images = self.render(noise, prompts, seeds).float()
            rewards.append(self.rewards.score(images, prompts).score)
            _keep_best(best, j, rewards[-1], images, noise)
        return BestOfNOutput(
            best["images"], best["noise"], best["reward"], best["index"].tolist(), torch.stack(rewards), n
        )


# ---------------------------------------------------------------------------------------------------------------


def _differentiable_call(pipe: Any):
    """The pipeline class's `__call__` without diffusers' `torch.no_grad()` decorator, after checking that ReNO can
    drive it (a `DiffusionPipeline` with a denoiser and a VAE whose `__call__` takes `latents` and `prompt`)."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError(f"`pipe` must be a diffusers DiffusionPipeline, got {type(pipe).__name__}")
    call = inspect.unwrap(type(pipe).__call__)
    params = inspect.signature(call).parameters
    missing = [name for name in ("prompt", "latents", "output_type") if name not in params]
    if missing:
        raise ValueError(
            f"`pipe` ({type(pipe).__name__}) cannot be differentiated by ReNO: its __call__ takes no {missing} "
            "(ReNO needs a text-to-image pipeline that accepts the initial noise as `latents`)"
        )
    if not isinstance(pipe.components.get("vae"), nn.Module):
        raise ValueError(f"`pipe` ({type(pipe).__name__}) has no `vae` component to decode latents")
    return call


def _composite(rewards: Any) -> CompositeReward:
    """The objective's rewards as one `CompositeReward` (weighted sum), checked to be differentiable."""
    if isinstance(rewards, CompositeReward):
        composite = rewards
        if composite.mode != "weighted_raw":
            raise ValueError(
                f"`rewards` must combine in 'weighted_raw' mode, got {composite.mode!r} (per-prompt z-scores "
                "couple the samples of a batch and vanish for a single sample)"
            )
    elif isinstance(rewards, RewardModel):
        composite = CompositeReward([RewardPart(rewards)])
    elif isinstance(rewards, (Mapping, Sequence)) and not isinstance(rewards, str):
        composite = CompositeReward(rewards)
    else:
        raise ValueError(
            "`rewards` must be a RewardModel, a sequence of RewardPart or a mapping name -> RewardModel, "
            f"got {type(rewards).__name__}"
        )
    parts = zip(composite.part_names, composite.rewards)
    frozen = [f"{name} ({type(r).__name__})" for name, r in parts if not r.differentiable]
    if frozen:
        raise ValueError(
            f"`rewards` must all be differentiable; not differentiable: {', '.join(frozen)}. ReNO backpropagates "
            "the reward into the noise; judges and verifiers without gradients can rank candidates (best_of_n) or "
            "evaluate the result instead"
        )
    return composite


def _optimizer(cfg: ReNOConfig, z: Tensor) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([z], lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam([z], lr=cfg.learning_rate, eps=ADAM_EPS)
    return torch.optim.LBFGS([z], lr=cfg.learning_rate, **LBFGS_OPTIONS)


@contextmanager
def _noise_only_gradients(pipe: Any, denoiser: nn.Module, rewards: nn.Module, checkpointing: bool):
    """While ReNO runs: no parameter of the pipeline or the rewards requires grad (autograd then keeps only what the
    gradient of the noise needs), and, with `checkpointing`, the denoiser and the VAE (when its class supports it;
    Qwen-Image's and Wan's do not) recompute activations in the backward pass. Everything is restored on exit."""
    modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)] + [rewards]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    vae = pipe.components["vae"]
    candidates = [denoiser] + ([vae] if getattr(vae, "_supports_gradient_checkpointing", False) else [])
    checkpointed = [m for m in candidates if not m.is_gradient_checkpointing]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if checkpointing:
            for m in checkpointed:
                try:
                    m.enable_gradient_checkpointing()
                except ValueError as e:
                    raise ValueError(f"`gradient_checkpointing`: {e}; set it to False") from e
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if checkpointing:
            for m in checkpointed:
                m.disable_gradient_checkpointing()


def _record(
    history: list[dict[str, Any]],
    iteration: int,
    z: Tensor,
    reward: Tensor,
    parts: Mapping[str, Tensor],
    regularizer: Tensor,
    total: Tensor,
) -> None:
    """Append one generator call to `history` (lists of B floats)."""
    history.append(
        {
            "iteration": iteration,
            "reward": reward.detach().tolist(),
            "rewards": {name: s.detach().tolist() for name, s in parts.items()},
            "regularizer": regularizer.detach().tolist(),
            "total": total.detach().tolist(),
            "noise_norm": torch.linalg.vector_norm(z.detach().flatten(1).float(), dim=1).tolist(),
        }
    )


def _keep_best(best: dict[str, Tensor], index: int, reward: Tensor, images: Tensor, noise: Tensor) -> None:
    """Keep, per sample, the first candidate with the highest reward (`best` starts empty)."""
    reward, images, noise = reward.detach(), images.detach().float(), noise.detach()
    if not best:
        best.update(reward=reward.clone(), images=images.clone(), noise=noise.clone())
        best["index"] = torch.full((len(reward),), index, dtype=torch.long)
        return
    better = reward > best["reward"]
    best["reward"] = torch.where(better, reward, best["reward"])
    best["images"] = torch.where(better.view(-1, 1, 1, 1), images, best["images"])
    best["noise"] = torch.where(better.view(-1, *([1] * (noise.ndim - 1))), noise, best["noise"])
    best["index"] = torch.where(better.cpu(), index, best["index"])


def _seeds(seed: int | Sequence[int], batch_size: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + i for i in range(batch_size)]
    if isinstance(seed, Sequence) and len(seed) == batch_size and all(isinstance(s, int) for s in seed):
        return list(seed)
    raise ValueError(f"`seed` must be an int or a list of {batch_size} ints (one per prompt), got {seed!r}")


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="ReNO", unit="it")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__


def pipeline_kwargs(defaults: dict[str, Any]) -> dict[str, Any]:
    """The extra call arguments ReNO needs from a model's generation defaults (`visalign.loading.load_generator`'s
    second value): its `max_sequence_length` when it has one (the shapes-world SD3 model was trained with 16 zero T5
    tokens). ReNO sets steps and guidance itself."""
    return {"max_sequence_length": defaults["max_sequence_length"]} if "max_sequence_length" in defaults else {}
