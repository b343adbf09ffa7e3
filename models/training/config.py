"""Typed training configuration (pydantic, so Prefect renders it as a form). Defaults are the paper's."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from models.diffusion.gaussian_diffusion import TimestepSampling


class OptimizerConfig(BaseModel):
    name: Literal["adamw", "came"] = Field("adamw", description="AdamW (PixArt-alpha) or CAME (PixArt-Sigma).")
    lr: float = Field(2e-5, gt=0, description="Learning rate at a global batch of 256 (before scaling).")
    weight_decay: float = Field(3e-2, ge=0, description="Decoupled weight decay.")
    eps: float = Field(1e-10, gt=0, description="Adam epsilon (the reference uses 1e-10).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    warmup_steps: int = Field(1000, ge=0, description="Linear warm-up steps, then constant.")
    grad_clip: float = Field(0.01, gt=0, description="Max gradient norm (the reference clips at 0.01).")
    schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After the warm-up: constant (the paper) or a cosine decay to 0 at the stage's last step (short "
        "runs end on a small learning rate, so the final weights are not the noisy ones of a large step).",
    )
    lr_scaling: Literal["sqrt", "none"] = Field(
        "sqrt", description="sqrt: lr * sqrt(global_batch / 256), the reference's auto_lr rule."
    )

    def effective_lr(self, global_batch: int) -> float:
        return self.lr * (global_batch / 256) ** 0.5 if self.lr_scaling == "sqrt" else self.lr


class TrainConfig(BaseModel):
    steps: int = Field(..., gt=0, description="Optimiser steps of this stage.")
    global_batch_size: int = Field(..., gt=0, description="Samples per step summed over all workers.")
    seed: int = Field(0, description="Seeds weights, noise, timesteps, dropout and data order.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    timestep_sampling: TimestepSampling = Field(
        "uniform",
        description="How training draws t: 'uniform' (the paper) or 'logit_normal' (SD3: t/T = sigmoid(N(0, 1)), "
        "mostly middle noise levels; a small model learns layout and colour in far fewer steps).",
    )
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA of the weights used for sampling and export.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on CUDA, fp32 on the CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward.")
    max_consecutive_nonfinite: int = Field(
        5, ge=1, description="Stop the stage when this many steps in a row have a non-finite loss or gradient."
    )
    log_every: int = Field(10, ge=1, description="Steps between logged metrics.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")
