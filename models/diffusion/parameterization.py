"""What the network predicts: epsilon (DiT, PixArt-alpha) or v (Salimans & Ho 2022, "Progressive Distillation").

With x_t = alpha_t x_0 + sigma_t eps (alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t)):

    v   = alpha_t eps - sigma_t x_0
    x_0 = alpha_t x_t - sigma_t v        eps = sigma_t x_t + alpha_t v

Both are exact reparameterisations of the same process; they differ in what an imperfect network gets wrong.
An epsilon error becomes an x_0 error multiplied by sigma_t / alpha_t (about 160 at t = 999 of the linear
schedule), which a large model on VAE latents absorbs and a small model on pixels does not; a v error is never
amplified by more than 1. The names are diffusers' (`prediction_type` of its schedulers), so an exported
scheduler samples our v models the same way.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)

Coefficient = float | torch.Tensor  # a scalar, or (N, 1, 1, 1) to broadcast over (N, C, H, W)


def check_prediction_type(prediction_type: str) -> PredictionType:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {list(PREDICTION_TYPES)}")
    return prediction_type  # type: ignore[return-value]


def training_target(
    prediction_type: PredictionType, x_start: torch.Tensor, noise: torch.Tensor, alpha: Coefficient, sigma: Coefficient
) -> torch.Tensor:
    """What the network should output for x_t = alpha x_start + sigma noise; (N, C, H, W)."""
    if check_prediction_type(prediction_type) == "epsilon":
        return noise
    return alpha * noise - sigma * x_start


def x0_and_eps(
    prediction_type: PredictionType, out: torch.Tensor, x_t: torch.Tensor, alpha: Coefficient, sigma: Coefficient
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) predicted by a network output `out` (N, C, H, W) at x_t, with diffusers' formulas."""
    if check_prediction_type(prediction_type) == "epsilon":
        return (x_t - sigma * out) / alpha, out
    return alpha * x_t - sigma * out, alpha * out + sigma * x_t
