"""One stochastic sampler step with its log-probability: the policy that online RL (DDPO, Flow-GRPO, DanceGRPO,
Pref-GRPO, TempFlow-GRPO) optimizes.

A step `x -> x'` is a Gaussian policy `pi(x' | x) = N(mean, std^2 I)` whose mean is a function of the model output;
rollouts sample it, training re-evaluates the log-density of the stored `x'` under the current model.
`kl_penalty` is the KL between the policy's step and a reference model's (Gaussians of the same std).

Conventions (kept from the reference implementations, for parity of clip ranges and KL coefficients):
- Flow matching: `x_sigma = (1 - sigma) * x0 + sigma * eps`, the model predicts the velocity `v ~ eps - x0`,
  sampling runs sigma from 1 to 0 over `sigmas` (the schedule `FlowMatchEulerDiscreteScheduler.sigmas` holds,
  `num_steps + 1` entries ending in 0) and `dt = sigmas[index + 1] - sigmas[index] < 0`.
- `log_prob` is the Gaussian log-density of `x'` averaged (not summed) over every non-batch element, as in DDPO,
  Flow-GRPO, DanceGRPO and Pref-GRPO. Log-ratios are therefore about 1/D of the true ones (D = latent size),
  which is why their PPO clip ranges are 1e-4.
- Math runs in float32 even for bf16/fp16 inputs (float64 when an input is float64); outputs are in that dtype.
- A deterministic transition (`std == 0`: noise level 0, kind `"ode"`, the last CPS step, DDIM with eta 0) has
  no density: its `log_prob` is zeros. Such steps carry no policy gradient and must not be trained.
- Noise level 0 is the plain Euler step `x + dt * v` for every flow kind, bit-equal to
  `FlowMatchEulerDiscreteScheduler.step` for float32 inputs (diffusers multiplies `dt * v` in the model dtype
  first; we upcast first, so for bf16/fp16 inputs we are the more precise of the two).

Deliberate deviation: for `kind="cps"` we return the true Gaussian log-density. Flow-GRPO's CPS code drops every
constant and the `1 / (2 std^2)` factor (`log_prob = -mean((x' - mean)^2)`), a per-step rescaling of ours:
theirs `= 2 std^2 * (ours + log(std) + log(2 pi) / 2)`. Clip ranges tuned on their CPS recipes transfer only
approximately.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

FLOW_KINDS = ("sde", "cps", "dance", "ode")
PREDICTION_TYPES = ("epsilon", "v_prediction")
KL_KINDS = ("exact", "flow_grpo")


@dataclass
class StepOutput:
    """One sampler step and its Gaussian policy.

    Args:
        prev_sample (`Tensor` `[B, ...]`): `x'`, the sample one step closer to the data (given or drawn).
        log_prob (`Tensor` `[B]`): `log N(x'; mean, std^2)` averaged over the non-batch elements; zeros when the
            step is deterministic (`std == 0`).
        mean (`Tensor` `[B, ...]`): the mean of `x'` given `x`; differentiable in the model output.
        std (`Tensor` `[]`): the standard deviation of `x'` given `x` (the transition std, `sqrt(|dt|)` included).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def step_std(sigmas: Tensor, index: int, noise_level: float, *, kind: str = "sde") -> Tensor:
    """The transition std of flow step `index` (what `sde_step(...).std` returns), without a model call.

    Per kind, with `sigma = sigmas[index]`, `sigma' = sigmas[index + 1]`, `a = noise_level`:
    - `"sde"` (Flow-GRPO): `a * sqrt(sigma / (1 - sigma)) * sqrt(sigma - sigma')`; at `sigma == 1` the
      denominator uses `sigmas[1]` instead (Flow-GRPO's guard), which makes the first step's std exactly `a`.
    - `"dance"` (DanceGRPO): `a * sqrt(sigma - sigma')`.
    - `"cps"` (coefficients-preserving): `sigma' * sin(a * pi / 2)`; 0 at the last step.
    - `"ode"`: 0.

    Returns a 0-d tensor, float64 when `sigmas` is float64, else float32. Use it to precompute TempFlow-GRPO's
    `noise_aware_weights` from the schedule.
    """
    dtype = torch.float64 if isinstance(sigmas, Tensor) and sigmas.dtype == torch.float64 else torch.float32
    sig, index = _check_flow_schedule(sigmas, index, noise_level, kind, dtype)
    return _flow_noise(sig, index, noise_level, kind)[1]


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigmas: Tensor,
    index: int,
    noise_level: float,
    *,
    kind: str = "sde",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """One flow-matching step `x_sigma -> x_sigma'` as a Gaussian policy, sampling `x'` or scoring a given one.

    Kinds (`sigma = sigmas[index]`, `sigma' = sigmas[index + 1]`, `dt = sigma' - sigma`, `a = noise_level`,
    `x1 = x + (1 - sigma) v` the predicted noise, `x0 = x - sigma v` the predicted data):
    - `"sde"`: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, the ODE-to-SDE conversion): Euler-Maruyama of
      `dx = [v + g^2 / (2 sigma) * x1] dt + g dW` with `g = a * sqrt(sigma / (1 - sigma))`, so
      `mean = x + dt * (v + g^2 / (2 sigma) * x1)`, `std = g * sqrt(|dt|)`. The reverse SDE shares the ODE's
      marginals because the score is `-x1 / sigma`. At `sigma == 1`, `g` uses `sigmas[1]` in the denominator
      (Flow-GRPO's guard against dividing by 0), so the first step's std is exactly `a`.
    - `"dance"`: DanceGRPO (Xue et al. 2025, arXiv 2505.07818, `flux_step`): the same drift with a constant
      diffusion `g = a`, `std = a * sqrt(|dt|)`.
    - `"cps"`: coefficients-preserving sampling (Wang & Yu 2025, arXiv 2509.05952, as in Flow-GRPO's code):
      `std = sigma' * sin(a pi / 2)`, `mean = (1 - sigma') x0 + sigma' * cos(a pi / 2) * x1` (that is,
      `sqrt(sigma'^2 - std^2) * x1`), so `x'` keeps the marginal's coefficients. Needs `a <= 1`. Deterministic at
      the last step (`sigma' = 0`).
    - `"ode"`: the Euler step `x + dt * v`; `noise_level` is ignored.

    `noise_level == 0` gives the Euler step for every kind. See the module docstring for the log-prob convention.

    Args:
        velocity (`Tensor` `[B, ...]`): the model's velocity at `sample` (CFG applied), any float dtype.
        sample (`Tensor` `[B, ...]`): `x` at `sigmas[index]`; any layout (`[B, C, H, W]`, packed `[B, L, D]`, ...).
        sigmas (`Tensor` `[num_steps + 1]`): the full schedule, decreasing within [0, 1].
        index (`int`): the step, in `[0, num_steps - 1]`.
        noise_level (`float`): `a >= 0` (Flow-GRPO's `noise_level`, DanceGRPO's `eta`).
        kind (`str`): `"sde"`, `"cps"`, `"dance"` or `"ode"`.
        prev_sample (`Tensor` `[B, ...]`, *optional*): a stored `x'` whose log-prob to evaluate instead of sampling;
            returned (in the compute dtype) as `prev_sample`.
        generator (`torch.Generator` or a list of B, *optional*): for the noise, as in diffusers pipelines.
    """
    _check_latents(velocity, sample, prev_sample, "velocity")
    dtype = _compute_dtype(velocity, sample, prev_sample)
    sig, index = _check_flow_schedule(sigmas, index, noise_level, kind, dtype)
    g, std = _flow_noise(sig, index, noise_level, kind)
    sigma, sigma_next = sig[index], sig[index + 1]
    v, x = velocity.to(dtype), sample.to(dtype)
    if kind == "ode" or noise_level == 0:
        mean = x + (sigma_next - sigma) * v
    elif kind == "cps":
        x0 = x - sigma * v
        x1 = x + (1 - sigma) * v
        mean = (1 - sigma_next) * x0 + (sigma_next * math.cos(noise_level * math.pi / 2)) * x1
    else:  # "sde" and "dance" share the drift and differ in the diffusion g
        x1 = x + (1 - sigma) * v
        mean = x + (sigma_next - sigma) * (v + (g**2 / (2 * sigma)) * x1)
    return _gaussian_step(mean, std, None if prev_sample is None else prev_sample.to(dtype), generator)


def ddim_step(
    noise_pred: Tensor,
    sample: Tensor,
    timestep: int,
    prev_timestep: int,
    alphas_cumprod: Tensor,
    eta: float,
    *,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | Tensor | None = None,
) -> StepOutput:
    """One DDIM step `x_t -> x_{t_prev}` as a Gaussian policy (DDPO, Black et al. 2023, arXiv 2305.13301).

    DDIM (Song et al., arXiv 2010.02502) Eq. 12 with Eq. 16's `sigma_t(eta)`, in the scheduler's notation
    (`alpha = alphas_cumprod[timestep]`, `alpha' = alphas_cumprod[prev_timestep]`):
    `x0 = (x - sqrt(1 - alpha) eps) / sqrt(alpha)`, `std = eta * sqrt((1 - alpha') / (1 - alpha) * (1 - alpha /
    alpha'))`, `mean = sqrt(alpha') x0 + sqrt(1 - alpha' - std^2) eps`, `x' = mean + std z`. With `eta = 0` this
    is `DDIMScheduler.step` (no sample clipping or thresholding, as in SD/SDXL configs). `log_prob` is DDPO's:
    the Gaussian log-density averaged over non-batch elements (zeros when `std == 0`).

    Args:
        noise_pred (`Tensor` `[B, ...]`): the UNet output (CFG applied): epsilon or v, per `prediction_type`.
        sample (`Tensor` `[B, ...]`): `x_t`.
        timestep (`int`): the training timestep `t` of `sample`.
        prev_timestep (`int`): the next timestep, `< timestep`; negative past the last step, where
            `final_alpha_cumprod` is used (default `alphas_cumprod[0]`, i.e. `set_alpha_to_one=False`).
        alphas_cumprod (`Tensor` `[num_train_timesteps]`): the scheduler's `alphas_cumprod`.
        eta (`float`): in [0, 1]; DDPO samples with 1.
        prev_sample (`Tensor` `[B, ...]`, *optional*): a stored `x'` whose log-prob to evaluate instead of sampling.
        generator (`torch.Generator` or a list of B, *optional*): for the noise.
        prediction_type (`str`): `"epsilon"` or `"v_prediction"`.
        final_alpha_cumprod (`float` or `Tensor` `[]`, *optional*): `alpha'` past the last step (negative
            `prev_timestep`); the scheduler's `final_alpha_cumprod`.
    """
    _check_latents(noise_pred, sample, prev_sample, "noise_pred")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if not _is_real(eta) or not 0 <= eta <= 1:
        raise ValueError(f"`eta` must be a number in [0, 1], got {eta!r}")
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.ndim != 1 or not alphas_cumprod.is_floating_point():
        raise ValueError("`alphas_cumprod` must be a 1-D float tensor (the scheduler's `alphas_cumprod`)")
    timestep, prev_timestep = _as_int(timestep, "timestep"), _as_int(prev_timestep, "prev_timestep")
    if not 0 <= timestep < len(alphas_cumprod):
        raise ValueError(f"`timestep` must be in [0, {len(alphas_cumprod) - 1}], got {timestep}")
    if prev_timestep >= timestep:
        raise ValueError(f"`prev_timestep` must be smaller than `timestep` ({timestep}), got {prev_timestep}")

    dtype = _compute_dtype(noise_pred, sample, prev_sample)
    acp = alphas_cumprod.detach().to(dtype)
    alpha = acp[timestep]
    if prev_timestep >= 0:
        alpha_prev = acp[prev_timestep]
    elif final_alpha_cumprod is None:
        alpha_prev = acp[0]
    else:
        alpha_prev = torch.as_tensor(final_alpha_cumprod, dtype=dtype, device=acp.device)
    if not 0 < float(alpha) < 1 or not float(alpha) <= float(alpha_prev) <= 1:
        raise ValueError(
            "`alphas_cumprod` must rise within (0, 1] from `timestep` to `prev_timestep` (and be < 1 at `timestep`), "
            f"got {float(alpha):.6g} -> {float(alpha_prev):.6g}"
        )
    beta, beta_prev = 1 - alpha, 1 - alpha_prev

    eps, x = noise_pred.to(dtype), sample.to(dtype)
    if prediction_type == "epsilon":
        x0 = (x - beta ** (0.5) * eps) / alpha ** (0.5)
    else:
        x0 = alpha**0.5 * x - beta**0.5 * eps
        eps = alpha**0.5 * eps + beta**0.5 * x
    std = eta * ((beta_prev / beta) * (1 - alpha / alpha_prev)) ** (0.5)
    mean = alpha_prev ** (0.5) * x0 + (1 - alpha_prev - std**2) ** (0.5) * eps
    return _gaussian_step(mean, std, None if prev_sample is None else prev_sample.to(dtype), generator)


def check_sde_window(size: int, window_range: tuple[int, int], num_inference_steps: int) -> None:
    """Raise unless an SDE window of `size` consecutive steps (0: none, the SDE everywhere) fits in `window_range`
    `[lo, hi)` within the trainable steps `[0, num_inference_steps - 1)` (the last step is never trained)."""
    lo, hi = window_range
    if size < 0:
        raise ValueError(f"`sde_window_size` must be >= 0, got {size}")
    if size and not (0 <= lo and lo + size <= hi <= num_inference_steps - 1):
        raise ValueError(
            f"an SDE window of {size} steps must fit in `sde_window_range` [{lo}, {hi}) within the trainable steps "
            f"[0, {num_inference_steps - 1})"
        )


def sde_window(size: int, window_range: tuple[int, int], generator: torch.Generator) -> list[int] | None:
    """The noisy steps of Flow-GRPO-Fast's window: `size` consecutive steps placed uniformly at random in
    `window_range` `[lo, hi)` (drawn from `generator`); None (every step noisy) when `size` is 0."""
    if not size:
        return None
    lo, hi = window_range
    start = lo + int(torch.randint(hi - lo - size + 1, (1,), generator=generator))
    return list(range(start, start + size))


def noise_aware_weights(stds: Tensor, trained_mask: Tensor) -> Tensor:
    """TempFlow-GRPO's per-step policy-loss weights (He et al. 2025, arXiv 2508.04324, ICLR 2026 Eq. 7).

    `w_t = s_t / mean_{j trained} s_j` on trained steps and 0 elsewhere, where `s_t` is step t's transition std
    (`sigma_t * sqrt(dt_t)`, from `step_std`): proportional to the injected noise, mean 1 over the trained steps
    (the authors' normalization; their SD3.5-M code hard-codes `1 / mean = 2.25`). The weight multiplies each
    step's clipped surrogate only, not the KL term and not the advantage normalization.

    Args:
        stds (`Tensor` `[T]`): per-step transition stds, `>= 0`.
        trained_mask (`Tensor` `[T]`, bool): which steps are trained.

    Returns:
        `Tensor` `[T]`, float32 (float64 when `stds` is).
    """
    if not isinstance(stds, Tensor) or stds.ndim != 1 or not stds.is_floating_point():
        raise ValueError("`stds` must be a 1-D float tensor of per-step transition stds")
    if not isinstance(trained_mask, Tensor) or trained_mask.dtype != torch.bool or trained_mask.shape != stds.shape:
        raise ValueError(f"`trained_mask` must be a bool tensor of shape {tuple(stds.shape)} (the shape of `stds`)")
    dtype = torch.float64 if stds.dtype == torch.float64 else torch.float32
    s = stds.detach().to(dtype)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("`stds` must be finite and non-negative")
    if not trained_mask.any():
        raise ValueError("`trained_mask` selects no step")
    norm = s[trained_mask].mean()
    if norm == 0:
        raise ValueError("`stds` are all zero on the trained steps: no noise to weight by")
    return torch.where(trained_mask, s / norm, torch.zeros_like(s))


def kl_penalty(
    mean: Tensor,
    ref_mean: Tensor,
    std: float | Tensor,
    *,
    kind: str = "exact",
    dt: float | Tensor | None = None,
) -> Tensor:
    """The per-sample KL from the policy's step to the reference model's, in a named convention.

    Both steps are Gaussians with the same std (the noise does not depend on the model), so per element
    `KL(N(mean, std^2) || N(ref_mean, std^2)) = (mean - ref_mean)^2 / (2 std^2)`.
    - `"exact"`: that KL averaged over non-batch elements (Pref-GRPO's `grpo/kl.py`, DanceGRPO-style steps).
    - `"flow_grpo"`: Flow-GRPO's `train_sd3.py` value `mean((mean - ref_mean)^2) / (2 g^2)`, where `g` is the SDE
      diffusion `a sqrt(sigma / (1 - sigma))` without the `sqrt(|dt|)`; since `std = g sqrt(|dt|)`, it is
      `|dt| * exact`. Flow-GRPO's `beta` values (0.04, 0.01, 0.004) are in these units. TempFlow-GRPO's code divides
      by the transition std with its `sqrt(|dt|)` (the exact form), which is why its recipe uses `"exact"`.

    Args:
        mean (`Tensor` `[B, ...]`): the current policy's step mean (with gradient).
        ref_mean (`Tensor` `[B, ...]`): the reference policy's step mean (computed without gradient).
        std (`float` or `Tensor` broadcastable to `mean`): the transition std, `sde_step(...).std`; `> 0`.
        kind (`str`): `"exact"` or `"flow_grpo"`.
        dt (`float` or `Tensor` broadcastable to `mean`): `sigmas[index + 1] - sigmas[index]`; for `"flow_grpo"`
            only.

    Returns:
        `Tensor` `[B]`, float32 (float64 when an input is); multiply its batch mean by `beta`.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"`kind` must be one of {KL_KINDS}, got {kind!r}")
    if (dt is None) == (kind == "flow_grpo"):
        raise ValueError("`dt` is required by kind='flow_grpo' and used by no other kind")
    if not isinstance(mean, Tensor) or mean.ndim < 2 or not mean.is_floating_point():
        raise ValueError("`mean` must be a float tensor of shape [B, ...] with a non-batch dim")
    if not isinstance(ref_mean, Tensor) or ref_mean.shape != mean.shape:
        raise ValueError(f"`ref_mean` must be a tensor of the shape of `mean` {tuple(mean.shape)}")
    dtype = _compute_dtype(mean, ref_mean, *(t for t in (std, dt) if isinstance(t, Tensor)))
    std = torch.as_tensor(std, dtype=dtype, device=mean.device)
    if not torch.isfinite(std).all() or (std <= 0).any():
        raise ValueError("`std` must be finite and > 0 (a deterministic step has no KL)")
    kl = (mean.to(dtype) - ref_mean.to(dtype)) ** 2 / (2 * std**2)
    if kind == "flow_grpo":
        kl = kl * torch.as_tensor(dt, dtype=dtype, device=mean.device).abs()
    return kl.mean(dim=tuple(range(1, mean.ndim)))


# ---------------------------------------------------------------------------------------------------------------


def _gaussian_step(
    mean: Tensor, std: Tensor, prev_sample: Tensor | None, generator: torch.Generator | list[torch.Generator] | None
) -> StepOutput:
    """Draw `x' = mean + std * z` unless given, and its log-density averaged over non-batch elements."""
    if float(std) == 0:
        return StepOutput(mean if prev_sample is None else prev_sample, mean.new_zeros(mean.shape[0]), mean, std)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    log_density = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return StepOutput(prev_sample, log_density.mean(dim=tuple(range(1, mean.ndim))), mean, std)


def _flow_noise(sig: Tensor, index: int, noise_level: float, kind: str) -> tuple[Tensor, Tensor]:
    """The diffusion coefficient `g` (0 for cps/ode) and the transition std of flow step `index`."""
    sigma, sigma_next = sig[index], sig[index + 1]
    zero = torch.zeros((), dtype=sig.dtype, device=sig.device)
    if kind == "ode" or noise_level == 0:
        return zero, zero
    if kind == "cps":
        return zero, sigma_next * math.sin(noise_level * math.pi / 2)
    if kind == "sde":
        denominator = 1 - (sig[1] if float(sigma) == 1 else sigma)
        g = noise_level * torch.sqrt(sigma / denominator)
    else:  # dance
        g = torch.full((), float(noise_level), dtype=sig.dtype, device=sig.device)
    return g, g * torch.sqrt(sigma - sigma_next)


def _check_flow_schedule(
    sigmas: Tensor, index: int, noise_level: float, kind: str, dtype: torch.dtype
) -> tuple[Tensor, int]:
    if kind not in FLOW_KINDS:
        raise ValueError(f"`kind` must be one of {FLOW_KINDS}, got {kind!r}")
    if not _is_real(noise_level) or not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"`noise_level` must be a finite number >= 0, got {noise_level!r}")
    if kind == "cps" and noise_level > 1:
        raise ValueError(
            f"`noise_level` must be in [0, 1] for kind='cps' (std = sigma' sin(a pi/2)), got {noise_level}"
        )
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2 or not sigmas.is_floating_point():
        raise ValueError("`sigmas` must be a 1-D float tensor of num_steps + 1 values (the scheduler's `sigmas`)")
    index = _as_int(index, "index")
    if not 0 <= index < len(sigmas) - 1:
        raise ValueError(f"`index` must be in [0, {len(sigmas) - 2}] for {len(sigmas)} sigmas, got {index}")
    sig = sigmas.detach().to(dtype)
    sigma, sigma_next = float(sig[index]), float(sig[index + 1])
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(
            f"`sigmas` must decrease within [0, 1] at step {index}, got sigmas[{index}]={sigma:.6g}, "
            f"sigmas[{index + 1}]={sigma_next:.6g}"
        )
    return sig, index


def _check_latents(output: Tensor, sample: Tensor, prev_sample: Tensor | None, output_name: str) -> None:
    for name, t in ((output_name, output), ("sample", sample), ("prev_sample", prev_sample)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"`{name}` must be a float torch.Tensor, got {type(t).__name__}")
        if t.ndim < 2 or t.shape[0] == 0:
            raise ValueError(
                f"`{name}` must have shape [B, ...] with B >= 1 and a non-batch dim, got {tuple(t.shape)}"
            )
        if t.shape != sample.shape:
            raise ValueError(f"`{name}` must have the shape of `sample` {tuple(sample.shape)}, got {tuple(t.shape)}")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.is_floating_point()):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"`{name}` must be an integer, got {value!r}") from None
