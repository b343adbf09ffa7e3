"""DPM-Solver++(2M): the multistep second-order data-prediction solver (Lu et al. 2022, arXiv 2211.01095).

Discretised exactly as diffusers' `DPMSolverMultistepScheduler` configured like the PixArt-alpha release
(algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final, timestep_spacing
"linspace", final_sigmas_type "zero"), so a model samples the same here and in `PixArtAlphaPipeline`:
  - timesteps round(linspace(0, T - 1, steps + 1)) from the top, dropping the last (0);
  - the first step is first order (no history yet); so is the last, which lands on sigma = 0 and
    therefore returns the data prediction x_0 itself;
  - every other step is the 2M "midpoint" update.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from models.diffusion.gaussian_diffusion import DenoiserFn, split_output
from models.diffusion.parameterization import PredictionType, x0_and_eps


def dpm_solver_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(steps,) int64 descending: diffusers' "linspace" spacing (numpy, to round the same .5 cases)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_train_timesteps}]")
    t = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return torch.from_numpy(t.copy())


@torch.no_grad()
def dpm_solver(
    model: DenoiserFn,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int = 20,
    model_kwargs: dict[str, Any] | None = None,
    clip_x0: float | None = None,
    prediction_type: PredictionType = "epsilon",
) -> Iterator[torch.Tensor]:
    """Solve the probability-flow ODE from x_T = noise (N, C, H, W); yields x after each step (last: x_0).

    `alphas_cumprod` (T,) is the training schedule; only the prediction half of a (N, 2C, H, W) output is used.
    clip_x0: clamp the data prediction to [-clip_x0, clip_x0] (pixel-space data; diffusers' thresholding
    with a fixed bound). None, the default, is diffusers' behaviour for latents.
    """
    timesteps = dpm_solver_timesteps(steps, len(alphas_cumprod))
    a = alphas_cumprod.to(torch.float64)[timesteps]
    alpha, sigma = a.sqrt(), (1.0 - a).sqrt()  # x_t = alpha_t x_0 + sigma_t eps, each (steps,)
    lam = torch.log(alpha / sigma)  # half log-SNR lambda_t, increasing along the trajectory

    dtype = torch.promote_types(noise.dtype, torch.float32)  # update in float32 at least, as diffusers does
    x, x0_prev = noise, None
    for i, t in enumerate(timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        pred, _ = split_output(model(x, t_batch, **(model_kwargs or {})), x.shape[1])
        x_t = x.to(dtype)
        x0, _ = x0_and_eps(prediction_type, pred.to(dtype), x_t, alpha[i].item(), sigma[i].item())  # (N, C, H, W)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)

        if i == len(timesteps) - 1:
            x_next = x0  # the final step goes to sigma = 0, where the first-order update is x_0 exactly
        else:
            h = (lam[i + 1] - lam[i]).item()
            phi = alpha[i + 1].item() * -np.expm1(-h)  # alpha_t (1 - e^{-h})
            d = x0
            if x0_prev is not None:
                # 2M midpoint: D = D0 + (D0 - D_prev) / (2 r), r = h_prev / h
                r = (lam[i] - lam[i - 1]).item() / h
                d = x0 + (x0 - x0_prev) / (2.0 * r)
            x_next = (sigma[i + 1] / sigma[i]).item() * x_t + phi * d
        x0_prev = x0
        x = x_next.to(noise.dtype)
        yield x
