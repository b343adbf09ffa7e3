"""DDIM sampling (Song et al. 2021, eq. 12 and 16), discretised as diffusers' `DDIMScheduler`.

Matches `DDIMScheduler(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=False)`:
timesteps 0, T // steps, ... counted down, the step after t is t - T // steps, and the step after the
smallest one lands on alpha-bar = 1 (clean data). With steps dividing T this is also IDDPM's "ddimN"
respacing. x_0 is not clipped: latents are not confined to [-1, 1] (diffusers' default clip_sample=True
is for pixel-space models).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from models.diffusion.gaussian_diffusion import DenoiserFn, split_output
from models.diffusion.parameterization import PredictionType, x0_and_eps


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(steps,) int64 descending: diffusers' "leading" spacing with steps_offset 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_train_timesteps}]")
    return torch.arange(steps - 1, -1, -1, dtype=torch.long) * (num_train_timesteps // steps)


@torch.no_grad()
def ddim(
    model: DenoiserFn,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int = 50,
    eta: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    prediction_type: PredictionType = "epsilon",
) -> Iterator[torch.Tensor]:
    """DDIM from x_T = noise (N, C, H, W); yields x after each step (last: x_0). eta 0 is deterministic.

    `alphas_cumprod` (T,) is the training schedule; only the prediction half of a (N, 2C, H, W) output is used.
    """
    num_train_timesteps = len(alphas_cumprod)
    stride = num_train_timesteps // steps
    a_all = alphas_cumprod.to(torch.float64)

    dtype = torch.promote_types(noise.dtype, torch.float32)  # update in float32 at least
    x = noise
    for t in ddim_timesteps(steps, num_train_timesteps).tolist():
        a_t = a_all[t].item()
        a_prev = a_all[t - stride].item() if t - stride >= 0 else 1.0
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        pred, _ = split_output(model(x, t_batch, **(model_kwargs or {})), x.shape[1])
        x0, eps = x0_and_eps(prediction_type, pred.to(dtype), x.to(dtype), a_t**0.5, (1.0 - a_t) ** 0.5)  # (N, C, H, W)
        if clip_x0 is not None:  # as diffusers' clip_sample: clamp x_0, then re-derive eps from it
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x.to(dtype) - a_t**0.5 * x0) / (1.0 - a_t) ** 0.5

        # sigma_t(eta) of eq. 16: eta = 1 is the DDPM posterior's standard deviation.
        std = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        x_next = a_prev**0.5 * x0 + (1.0 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x_next = x_next + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        x = x_next.to(noise.dtype)
        yield x
