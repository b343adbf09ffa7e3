"""Optimisers, the learning-rate schedule and the EMA of the weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from models.training.config import OptimizerConfig


def build_optimizer(model: nn.Module, config: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW as PixArt-alpha trains, or CAME (the published `came-pytorch`) as PixArt-Sigma does."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if config.name == "came":
        try:
            from came_pytorch import CAME
        except ImportError as err:
            raise ImportError("optimizer 'came' needs the package came-pytorch (pip install came-pytorch)") from err
        # CAME's two eps and its third beta are its own (PixArt-Sigma's values); lr and decay are shared.
        return CAME(params, lr=lr, weight_decay=config.weight_decay, betas=(*config.betas, 0.9999), eps=(1e-30, 1e-16))
    raise ValueError(f"optimizer {config.name!r}; expected 'adamw' or 'came'")


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over the warm-up, then constant (the reference schedule)."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


def lr_factor(config: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """The LR multiplier of `config.schedule`: the warm-up, then constant or a cosine decay to 0 at total_steps."""
    warmup = warmup_constant(config.warmup_steps)
    if config.schedule == "constant":
        return warmup

    def cosine(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return warmup(step) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return cosine


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers (positions) copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)
