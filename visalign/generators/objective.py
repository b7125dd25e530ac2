"""The denoising objective every image-trained method shares (Diffusion-DPO, Diffusion-DRO, and their flow ports).

Pure functions (float32 inside, float64 when an input is):
- `forward_noise`: DDPM's `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` (Ho et al. 2020, Eq. 4;
  `DDPMScheduler.add_noise`) for epsilon and v models; rectified flow's `x_sigma = (1 - sigma) x0 + sigma eps`
  (Esser et al. 2024, arXiv 2403.03206, Eq. 2 with `a = 1 - t`, `b = t`) for flow models.
- `prediction_target`: `eps`; v-prediction's `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0` (Salimans & Ho 2022,
  arXiv 2202.00512, Sec. 4; `DDPMScheduler.get_velocity`); the flow velocity `eps - x0`.
- `per_sample_mse`: `||prediction - target||^2` averaged over every non-batch element (`[B]`), the error the methods
  compare between the trained and the reference model.
- `logit_normal_sigmas`: SD3's `logit-normal(m, s)` training density (Esser et al. 2024, Sec. 3.1, Eq. 19), then the
  scheduler's static shift `shift sigma / (1 + (shift - 1) sigma)` (SD3's Eq. 23 resolution shift).

Deliberate deviation: flow timesteps are continuous (`sigma * num_train_timesteps`), where diffusers' SD3 scripts
and Flow-GRPO's DPO snap the logit-normal draw onto the scheduler's 1,000-step grid first.
"""

from __future__ import annotations

import torch
from torch import Tensor

TARGETS = ("epsilon", "v_prediction", "flow")


def forward_noise(
    x0: Tensor, noise: Tensor, t: Tensor, *, target: str, alphas_cumprod: Tensor | None = None
) -> Tensor:
    """The noised latent `x_t` for `target` ("epsilon", "v_prediction" or "flow").

    Args:
        x0 (`Tensor` `[B, ...]`): clean latents.
        noise (`Tensor` `[B, ...]`): standard Gaussian noise.
        t (`Tensor` `[B]`): integer training timesteps (epsilon, v) or sigmas in [0, 1] (flow).
        alphas_cumprod (`Tensor` `[num_train_timesteps]`): the DDPM schedule; epsilon and v only.

    Returns:
        `Tensor` like `x0`, float32 (float64 when an input is).
    """
    x0, noise, a, b = _coefficients(x0, noise, t, target, alphas_cumprod)
    return a * x0 + b * noise


def prediction_target(
    x0: Tensor, noise: Tensor, t: Tensor, *, target: str, alphas_cumprod: Tensor | None = None
) -> Tensor:
    """What the denoiser regresses at `x_t = forward_noise(x0, noise, t)`: `eps`, `v` or `eps - x0` (see module)."""
    x0, noise, a, b = _coefficients(x0, noise, t, target, alphas_cumprod)
    if target == "epsilon":
        return noise
    if target == "v_prediction":
        return a * noise - b * x0
    return noise - x0


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """`mean((prediction - target)^2)` over every non-batch element: `[B]`, float32 (float64 when an input is)."""
    if not isinstance(prediction, Tensor) or prediction.ndim < 2 or prediction.shape[0] == 0:
        raise ValueError("`prediction` must be a tensor [B, ...] with a non-batch dim")
    if not isinstance(target, Tensor) or target.shape != prediction.shape:
        raise ValueError(f"`target` must have the shape of `prediction` {tuple(prediction.shape)}")
    dtype = _dtype(prediction, target)
    return ((prediction.to(dtype) - target.to(dtype)) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def logit_normal_sigmas(
    n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """`n` flow-matching training sigmas: `sigmoid(N(mean, std^2))`, then `shift s / (1 + (shift - 1) s)`.

    `mean=0, std=1` is SD3's `lognorm(0.00, 1.00)` default (and Flow-GRPO's DPO); `shift` is the scheduler's
    (`FlowMatchEulerDiscreteScheduler.config.shift`: 3.0 for SD3.5, 1.0 for the shapes world). Returns `[n]` float32.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}")
    if not std > 0 or not shift > 0:
        raise ValueError(f"`std` and `shift` must be > 0, got std={std}, shift={shift}")
    sigma = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return shift * sigma / (1 + (shift - 1) * sigma)


def _coefficients(
    x0: Tensor, noise: Tensor, t: Tensor, target: str, alphas_cumprod: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(x0, noise, a, b)` in the compute dtype with `x_t = a x0 + b noise`, `a` and `b` shaped `[B, 1, ...]`."""
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {TARGETS}, got {target!r}")
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError("`x0` must be a float tensor [B, ...] with a non-batch dim")
    if not isinstance(noise, Tensor) or noise.shape != x0.shape:
        raise ValueError(f"`noise` must have the shape of `x0` {tuple(x0.shape)}")
    if not isinstance(t, Tensor) or t.shape != (x0.shape[0],):
        raise ValueError(f"`t` must be a tensor of shape [{x0.shape[0]}] (one timestep per sample)")
    dtype = _dtype(x0, noise, *([alphas_cumprod] if alphas_cumprod is not None else []))
    view = (-1,) + (1,) * (x0.ndim - 1)
    if target == "flow":
        if not t.is_floating_point() or (t < 0).any() or (t > 1).any():
            raise ValueError("`t` must hold flow sigmas in [0, 1] for target='flow'")
        sigma = t.to(dtype).view(view)
        return x0.to(dtype), noise.to(dtype), 1 - sigma, sigma
    if alphas_cumprod is None:
        raise ValueError(f"`alphas_cumprod` is required for target={target!r}")
    if t.is_floating_point() or (t < 0).any() or (t >= len(alphas_cumprod)).any():
        raise ValueError(f"`t` must hold integer timesteps in [0, {len(alphas_cumprod) - 1}] for target={target!r}")
    abar = alphas_cumprod.to(device=x0.device, dtype=dtype)[t.to(x0.device)].view(view)
    return x0.to(dtype), noise.to(dtype), abar.sqrt(), (1 - abar).sqrt()


def _dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
