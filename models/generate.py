"""Text to latents with our PixArt and samplers: encode prompts, guide, solve.

Two choices of unconditional caption:
- "null": the learned null embedding the model was trained with under caption dropout (the reference
  sampling scripts do this, masked with the caption's own mask);
- "empty": T5 features of "" with their own mask, which is what diffusers' PixArtAlphaPipeline uses. With
  it our samples equal the exported pipeline's for the same seed (see the demo and tests).
"""

from __future__ import annotations

from typing import Literal

import torch

from models.diffusion import sample
from models.pixart import PixArt, PixArtMS
from models.text_encoder import T5TextEncoder


def micro_conditions(n: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """PixArtMS data_info for images of height x width pixels: img_hw (N, 2), aspect_ratio (N, 1)."""
    return {
        "img_hw": torch.tensor([[float(height), float(width)]]).repeat(n, 1),
        "aspect_ratio": torch.tensor([[height / width]]).repeat(n, 1),
    }


@torch.no_grad()
def generate_latents(
    model: PixArt,
    encoder: T5TextEncoder,
    prompts: list[str],
    latent_hw: tuple[int, int] | None = None,
    image_hw: tuple[int, int] | None = None,
    sampler: str = "dpm-solver",
    steps: int = 20,
    cfg_scale: float = 4.5,
    negative: Literal["null", "empty"] = "null",
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """Latents (N, C, h, w) for `prompts`; noise drawn from `generator` on the CPU (as diffusers on CPU).

    latent_hw defaults to the model's trained size; image_hw (pixels) feeds PixArtMS's micro-conditions.
    clip_x0: bound of the data (the codec's `clip_range`: the pixel codec's, None for a VAE), see `sample`.
    """
    # 1. Check inputs
    if encoder.d_model != model.caption_channels:
        raise ValueError(
            f"caption_channels={model.caption_channels} does not match the text encoder's d_model={encoder.d_model}"
        )
    n = len(prompts)
    h, w = latent_hw or (model.input_size, model.input_size)
    device = next(model.parameters()).device

    # 2. Encode the prompts and the unconditional caption
    y, mask = encoder.encode(list(prompts))  # (N, L, C_text), (N, L)
    if negative == "null":
        y_null = model.y_embedder.y_embedding[None].expand(n, -1, -1).to(y)  # (N, L, C_text)
        uncond = {"y": y_null}  # shares the caption's mask, as the reference sampler does
    elif negative == "empty":
        y_null, mask_null = encoder.encode([""] * n)
        uncond = {"y": y_null, "mask": mask_null}
    else:
        raise ValueError(f"negative={negative!r}; expected 'null' or 'empty'")
    kwargs = {"y": y.to(device), "mask": mask.to(device)}
    if isinstance(model, PixArtMS):
        ih, iw = image_hw or (h * 8, w * 8)
        kwargs["data_info"] = micro_conditions(n, ih, iw)
        uncond["data_info"] = kwargs["data_info"]
    uncond = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in uncond.items()}

    # 3. Sample
    noise = torch.randn((n, model.in_channels, h, w), generator=generator).to(device)
    return sample(
        model,
        noise,
        model_kwargs=kwargs,
        uncond_kwargs=uncond if cfg_scale != 1.0 else None,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        learn_sigma=model.pred_sigma,
        prediction_type=model.prediction_type,
        progress=progress,
        clip_x0=clip_x0,
    )
