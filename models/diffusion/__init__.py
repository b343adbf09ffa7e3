"""The diffusion process apart from the network: IDDPM schedule and hybrid loss, respacing, samplers.

Pure PyTorch. The network is always an argument, `model(x, t, **model_kwargs)`; nothing here knows about
the transformer. Layout after IDDPM / DiT's `diffusion/` package.
"""

from models.diffusion.ddim import ddim, ddim_timesteps
from models.diffusion.dpm_solver import dpm_solver, dpm_solver_timesteps
from models.diffusion.gaussian_diffusion import (
    DenoiserFn,
    GaussianDiffusion,
    linear_beta_schedule,
    split_output,
)
from models.diffusion.guidance import classifier_free_guidance, guide
from models.diffusion.parameterization import PREDICTION_TYPES, PredictionType
from models.diffusion.respace import respace, space_timesteps
from models.diffusion.samplers import create_diffusion, sample

__all__ = [
    "PREDICTION_TYPES",
    "DenoiserFn",
    "PredictionType",
    "GaussianDiffusion",
    "classifier_free_guidance",
    "create_diffusion",
    "ddim",
    "ddim_timesteps",
    "dpm_solver",
    "dpm_solver_timesteps",
    "guide",
    "linear_beta_schedule",
    "respace",
    "sample",
    "space_timesteps",
    "split_output",
]
