"""Entry points: `create_diffusion` (the IDDPM process, for training) and `sample` (guided sampling -> x_0).

PixArt-alpha's defaults (paper): DPM-Solver++ 20 steps, cfg 4.5; IDDPM 100 steps with the learned variance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from models.diffusion.ddim import ddim
from models.diffusion.dpm_solver import dpm_solver
from models.diffusion.gaussian_diffusion import DenoiserFn, GaussianDiffusion, linear_beta_schedule
from models.diffusion.guidance import classifier_free_guidance
from models.diffusion.parameterization import PredictionType
from models.diffusion.respace import respace, space_timesteps

Sampler = Literal["dpm-solver", "ddim", "iddpm"]


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None = None,
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    prediction_type: PredictionType = "epsilon",
) -> GaussianDiffusion:
    """PixArt's IDDPM: linear betas over `diffusion_steps`, optionally respaced ("100", "ddim25", [...])."""
    betas = linear_beta_schedule(diffusion_steps)
    diffusion = GaussianDiffusion(betas, learn_sigma=learn_sigma, prediction_type=prediction_type)
    if timestep_respacing is None or timestep_respacing == "":
        return diffusion
    return respace(diffusion, space_timesteps(diffusion_steps, timestep_respacing))


def sample(
    model: DenoiserFn,
    noise: torch.Tensor | Sequence[int],
    model_kwargs: dict[str, Any] | None = None,
    uncond_kwargs: dict[str, Any] | None = None,
    sampler: Sampler = "dpm-solver",
    steps: int = 20,
    cfg_scale: float = 4.5,
    guidance_channels: int | None = None,
    eta: float = 0.0,
    learn_sigma: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    clip_x0: float | None = None,
    prediction_type: PredictionType = "epsilon",
) -> torch.Tensor:
    """Sample x_0 (N, C, H, W) from x_T = `noise`, or from fresh noise of shape `noise` drawn by `generator`.

    Args:
        model: `model(x, t, **model_kwargs)` -> (N, 2C, H, W) with a learned sigma, else (N, C, H, W).
        model_kwargs: conditional inputs (e.g. caption embedding `y`, `mask`).
        uncond_kwargs: the kwargs that differ for the unconditional pass (e.g. the null caption `y`); needed
            unless cfg_scale is 1 (no guidance).
        sampler: "dpm-solver" (DPM-Solver++ 2M), "ddim" or "iddpm" (ancestral, respaced to `steps`).
        guidance_channels: guide only the first k epsilon channels (the reference code guides 3); all if None.
        eta: DDIM's noise scale (0: deterministic).
        learn_sigma: whether the model predicts the variance; IDDPM samples with it, the ODE samplers drop it.
        generator: draws the initial noise (if only a shape is given) and IDDPM's / DDIM(eta > 0)'s noise.
        device: where fresh noise is drawn; the generator's device by default.
        progress: show a tqdm progress bar.
        clip_x0: clamp each predicted x_0 to [-clip_x0, clip_x0]: needed for pixel-space data (the pixel codec),
            whose early x_0 predictions are divided by a tiny sqrt(alpha-bar) and otherwise run away; None (no
            clamp) for VAE latents, as diffusers' PixArt pipeline samples them.
        prediction_type: what the model predicts, "epsilon" (PixArt-alpha) or "v_prediction". Guidance is the
            same for both: it is linear in the output, and the conversion to x_0 is affine in it.
    """
    # 1. Check inputs
    if uncond_kwargs is None and cfg_scale != 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} needs uncond_kwargs for the unconditional pass; use 1.0 for none")
    if sampler != "ddim" and eta != 0.0:
        raise ValueError(f"eta={eta} applies to the DDIM sampler only, not {sampler!r}")
    if not isinstance(noise, torch.Tensor):
        device = generator.device if device is None and generator is not None else device
        noise = torch.randn(tuple(noise), generator=generator, device=device)

    # 2. Guide
    if cfg_scale != 1.0:
        model = classifier_free_guidance(model, uncond_kwargs, cfg_scale, guidance_channels)

    # 3. Solve
    alphas_cumprod = create_diffusion().alphas_cumprod  # (1000,) float64, the training schedule
    trajectory: Iterator[torch.Tensor]
    if sampler == "dpm-solver":
        trajectory = dpm_solver(model, noise, alphas_cumprod, steps, model_kwargs, clip_x0, prediction_type)
    elif sampler == "ddim":
        trajectory = ddim(model, noise, alphas_cumprod, steps, eta, model_kwargs, generator, clip_x0, prediction_type)
    elif sampler == "iddpm":
        spaced = create_diffusion(str(steps), learn_sigma=learn_sigma, prediction_type=prediction_type)
        trajectory = spaced.p_sample_loop_progressive(model, noise, model_kwargs, generator, clip_x0)
    else:
        raise ValueError(f"sampler={sampler!r}; expected 'dpm-solver', 'ddim' or 'iddpm'")

    x = noise
    for x_next in tqdm(trajectory, total=steps, desc=sampler, disable=not progress):
        x = x_next
    return x
