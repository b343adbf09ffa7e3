"""An exact, weightless stand-in for the VAE (pixel-unshuffle), and the factory that picks a latent codec.

The CPU demo trains on a tiny random VAE, whose decoded samples are noise whatever the model learns. The
pixel codec instead folds each f x f block of pixels into channels: images (N, 3, H, W) in [-1, 1] become
latents (N, 3 f^2, H/f, W/f) and back, exactly (`decode(sample(*encode(x))) == x` bit for bit), so a model
trained on it produces images one can look at. It has the `VAE`'s interface (`encode -> (mean, std)`,
`sample`, `decode`, `scaling_factor`, `latent_channels`, `downsample_factor`, `device`, `dtype`) so feature
extraction, training and sampling use either without knowing which.

    f = 2 -> 12 channels, f = 4 -> 48 channels, f = 8 -> 192 channels (the SD VAE: 4 channels at f = 8).

`scaling_factor` defaults to 1.0: pixel-space diffusion (DDPM, ADM) trains on [-1, 1] directly. Any other
value multiplies the latents as the VAE's factor does; a power of two keeps the round trip exact.
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from models.vae import DEFAULT_VAE, VAE


class LatentCodec(Protocol):
    """What extraction, training and sampling need of an image <-> latent codec (`VAE` or `PixelCodec`)."""

    @property
    def scaling_factor(self) -> float: ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def downsample_factor(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def sample(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelCodec:
    """Pixel-unshuffle by `factor`: a lossless, deterministic "autoencoder" with no weights."""

    def __init__(self, factor: int = 4, scaling_factor: float = 1.0, device: str | torch.device = "cpu"):
        if factor < 1:
            raise ValueError(f"factor={factor}: expected a positive integer (2 -> 12 channels, 4 -> 48)")
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor={scaling_factor}: expected a positive number (1.0 for [-1, 1])")
        self.factor = factor
        self._scaling_factor = float(scaling_factor)
        self._device = torch.device(device)

    @property
    def scaling_factor(self) -> float:
        return self._scaling_factor

    @property
    def clip_range(self) -> float:
        """Scaled latents lie in [-clip_range, clip_range]: samplers clamp their x_0 predictions to it."""
        return self._scaling_factor

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor**2

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) in [-1, 1] -> unscaled (mean, std), each (N, 3 f^2, H/f, W/f); std is zero."""
        f = self.factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images of shape {tuple(images.shape)}: expected (N, 3, H, W) with H and W multiples of "
                f"the pixel codec's factor {f}"
            )
        mean = F.pixel_unshuffle(images.to(self.device, self.dtype), f)  # (N, 3 f^2, H/f, W/f)
        return mean, torch.zeros_like(mean)

    def sample(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: the distribution is a point (std is zero), so no noise is drawn."""
        return mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, 3 f^2, h, w) -> images (N, 3, h*f, w*f) float32, clamped to [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: expected (N, {self.latent_channels}, h, w) for the "
                f"pixel codec with factor {self.factor}"
            )
        latents = latents.to(self.device, self.dtype) / self.scaling_factor
        return F.pixel_shuffle(latents, self.factor).clamp(-1, 1)  # (N, 3, h*f, w*f)


def codec_kind(codec: LatentCodec) -> Literal["vae", "pixel"]:
    """The name feature shards record for a codec: "pixel" for `PixelCodec`, else "vae"."""
    return "pixel" if isinstance(codec, PixelCodec) else "vae"


def build_latent_codec(
    kind: Literal["vae", "pixel"],
    vae: str | os.PathLike = DEFAULT_VAE,
    factor: int = 4,
    scaling_factor: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LatentCodec:
    """The VAE loaded from `vae` (hub id or directory; `dtype` defaults per device), or a `PixelCodec`.

    `factor` and `scaling_factor` apply to the pixel codec only: the VAE's come from its config.
    """
    if kind == "vae":
        return VAE.from_pretrained(vae, device=device, dtype=dtype)
    if kind == "pixel":
        return PixelCodec(factor=factor, scaling_factor=scaling_factor, device=device)
    raise ValueError(f"latent codec kind={kind!r}; expected 'vae' or 'pixel'")
