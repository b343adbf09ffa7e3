"""Timestep respacing: run a trained T-step diffusion with fewer steps, after IDDPM's `respace.py`.

Keeping a subset S of the original steps and setting beta'_i = 1 - alpha-bar_{s_i} / alpha-bar_{s_(i-1)}
gives a shorter process with exactly the original alpha-bar at the kept steps (IDDPM, section 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from models.diffusion.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Sorted original timesteps to keep.

    `section_counts` is "ddimN" (the stride that gives exactly N steps, as DDIM does: "ddim25" of 1000 keeps
    0, 40, ..., 960), or counts per equal section of the original steps, as a list or a comma-separated
    string: "100" keeps 100 evenly spaced steps from 0 to T-1, "10,15,20" keeps 10 of the first third etc.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)  # the first `extra` sections take one more step
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(steps))


def respace(diffusion: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """The process keeping only `use_timesteps` of `diffusion`; its model calls see the original timesteps."""
    kept = torch.tensor(sorted(set(use_timesteps)), dtype=torch.long)
    if len(kept) == 0 or kept[0] < 0 or kept[-1] >= diffusion.num_timesteps:
        raise ValueError(f"use_timesteps must be in [0, {diffusion.num_timesteps}), got {kept.tolist()}")
    alphas_cumprod = diffusion.alphas_cumprod[kept]  # (S,)
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return GaussianDiffusion(
        1.0 - alphas_cumprod / prev,
        learn_sigma=diffusion.learn_sigma,
        timestep_map=diffusion.timestep_map[kept],
        prediction_type=diffusion.prediction_type,
    )
