"""Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + s * (eps_cond - eps_uncond).

The model runs once on a doubled batch [cond; uncond]. By default every epsilon channel is guided, as
diffusers' `PixArtAlphaPipeline` does. `guidance_channels=3` reproduces the reference `forward_with_cfg`,
which guides only the first 3 channels (a leftover from DiT) and leaves the 4th latent channel unguided.
The learned-variance half, if any, is taken from the conditional pass, as the reference keeps it.
"""

from __future__ import annotations

from typing import Any

import torch

from models.diffusion.gaussian_diffusion import DenoiserFn


def guide(out: torch.Tensor, channels: int, cfg_scale: float, guidance_channels: int | None = None) -> torch.Tensor:
    """(2N, C', H, W) output on [cond; uncond] -> (N, C', H, W), guiding the first k of the C eps channels."""
    k = channels if guidance_channels is None else guidance_channels
    if not 1 <= k <= channels:
        raise ValueError(f"guidance_channels={guidance_channels} must be in [1, {channels}] (the epsilon channels)")
    cond, uncond = out.chunk(2, dim=0)  # each (N, C', H, W)
    guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


def _concat_halves(name: str, cond: Any, uncond: Any) -> Any:
    """Batch one model kwarg for [cond; uncond]: tensors concatenate, dicts recurse, the rest must agree."""
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, dict) and isinstance(uncond, dict) and cond.keys() == uncond.keys():
        return {k: _concat_halves(f"{name}.{k}", cond[k], uncond[k]) for k in cond}
    if cond is uncond or (not isinstance(cond, torch.Tensor | dict) and cond == uncond):
        return cond
    raise ValueError(
        f"model kwarg {name!r} differs between the conditional ({type(cond).__name__}) and unconditional "
        f"({type(uncond).__name__}) passes; only tensors (batched on dim 0) and dicts of them may differ"
    )


def classifier_free_guidance(
    model: DenoiserFn,
    uncond_kwargs: dict[str, Any],
    cfg_scale: float,
    guidance_channels: int | None = None,
) -> DenoiserFn:
    """Wrap `model` into a guided model with the same call and output shape.

    The wrapper's own kwargs are the conditional ones; `uncond_kwargs` replaces some of them for the
    unconditional pass (e.g. `{"y": null_caption_embedding}`), the others are shared by both halves.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, **cond_kwargs: Any) -> torch.Tensor:
        unknown = set(uncond_kwargs) - set(cond_kwargs)
        if unknown:
            raise ValueError(
                f"uncond_kwargs {sorted(unknown)} have no conditional counterpart in {sorted(cond_kwargs)}"
            )
        kwargs = {k: _concat_halves(k, v, uncond_kwargs.get(k, v)) for k, v in cond_kwargs.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs)  # (2N, C', H, W)
        return guide(out, x.shape[1], cfg_scale, guidance_channels)

    return guided
