"""The image autoencoder: images in [-1, 1] <-> latents scaled by the VAE's `scaling_factor`.

PixArt-alpha trains in the latent space of Stable Diffusion's VAE (`stabilityai/sd-vae-ft-ema`, 4 channels,
8x downsampling, scaling factor 0.18215). Feature extraction stores the unscaled latent distribution
(mean, std), as the reference code stores mean and std per image; training draws `sample` from it each
step, so one extraction serves every epoch with fresh noise.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from models.text_encoder import default_dtype, resolve_pretrained

if TYPE_CHECKING:  # diffusers' model code takes a second to import: loaded on use (every config imports this)
    from diffusers import AutoencoderKL

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


class VAE:
    """A frozen `AutoencoderKL` with PixArt's conventions for scaling and value range."""

    def __init__(self, model: AutoencoderKL):
        self.model = model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike = DEFAULT_VAE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        subfolder: str | None = None,
    ) -> VAE:
        """Load from a hub id, a VAE directory, or a diffusers pipeline directory (its vae/ subfolder).

        `subfolder` names the VAE's folder in a hub pipeline; local pipeline directories are recognised
        by their model_index.json.
        """
        from diffusers import AutoencoderKL

        name, folder = resolve_pretrained(id_or_dir, "vae", "VAE", subfolder)
        class_name = AutoencoderKL.load_config(name, subfolder=folder).get("_class_name")
        if class_name != "AutoencoderKL":
            raise ValueError(f"{name} is not an AutoencoderKL directory: its config has _class_name={class_name!r}")
        dtype = dtype or default_dtype(device)
        model = AutoencoderKL.from_pretrained(name, subfolder=folder, torch_dtype=dtype).to(device)
        return cls(model)

    @property
    def clip_range(self) -> None:
        """VAE latents are unbounded: samplers do not clamp them (as diffusers' PixArt pipeline)."""
        return None

    @property
    def scaling_factor(self) -> float:
        """Multiplies sampled latents so they have roughly unit variance (0.18215 for the SD VAE)."""
        return self.model.config.scaling_factor

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent cell along each side: one 2x downsampling between encoder blocks."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, H, W) in [-1, 1] -> unscaled (mean, std), each (N, C, H/f, W/f) float32."""
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"images of shape {tuple(images.shape)}: expected (N, 3, H, W) with H and W multiples of "
                f"the VAE's downsample factor {f}"
            )
        dist = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents from N(mean, std^2) and scale them: what the diffusion model is trained on."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images (N, 3, h*f, w*f) float32, clamped to [-1, 1]."""
        latents = latents.to(self.device, self.dtype) / self.scaling_factor
        return self.model.decode(latents).sample.float().clamp(-1, 1)
