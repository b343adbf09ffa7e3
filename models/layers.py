"""Building blocks shared by DiT and PixArt, in the official repositories' key layout.

Names match the checkpoints they load (`x_embedder.proj`, `t_embedder.mlp.0`, `attn.qkv`, `mlp.fc1`):
DiT (facebookresearch/DiT, models.py) and PixArt-alpha (PixArt-alpha/PixArt-alpha, diffusion/model/nets)
both build on timm's PatchEmbed / Attention / Mlp, re-implemented here so no timm is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; x (N, T, D), shift and scale (N, 1, D). One fused kernel."""
    return torch.addcmul(shift, x, 1 + scale)


# ---------------------------------------------------------------------------------------------------
#                                     Positional embeddings
# ---------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) as [sin, cos], frequencies 1 / 10000^(2i/dim); float64 like numpy."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_hw: tuple[int, int], lewei_scale: float = 1.0, base_size: int | None = None):
    """Fixed 2D sin-cos table (H*W, dim), row-major over (h, w), as in DiT / PixArt.

    PixArt rescales the grid so that a grid of `base_size` cells spans base_size / lewei_scale units
    whatever its actual size (`grid / (size / base_size) / lewei_scale`). With base_size equal to the
    grid size and lewei_scale 1 this is DiT's table. The first half of the channels encodes the w
    coordinate (the reference calls it emb_h; kept for bit-compatibility).
    """
    h, w = grid_hw
    base_h = h if base_size is None else base_size
    base_w = w if base_size is None else base_size
    grid_h = torch.arange(h, dtype=torch.float32) / (h / base_h) / lewei_scale
    grid_w = torch.arange(w, dtype=torch.float32) / (w / base_w) / lewei_scale
    gw, gh = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each (H, W)
    emb = torch.cat([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], dim=1)  # (H*W, dim)
    return emb.float()


# ---------------------------------------------------------------------------------------------------
#                                 Embedding layers for x, t, sizes
# ---------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image latents to patch tokens: (N, C, H, W) -> (N, H*W / p^2, D). Key layout of timm's PatchEmbed."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by patch_size={p}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors: sinusoidal features [cos, sin] (shift 0), then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(N,) float timesteps -> (N, dim). Follows GLIDE / DiT exactly (freq shift 0, cos first)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, dim/2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class SizeEmbedder(TimestepEmbedder):
    """PixArtMS micro-conditions: each scalar of s (N, k) embedded like a timestep -> (N, k * D_out)."""

    def forward(self, s: torch.Tensor, batch_size: int) -> torch.Tensor:
        if s.ndim == 1:
            s = s[:, None]  # (N, k)
        if s.shape[0] != batch_size:
            if batch_size % s.shape[0]:
                raise ValueError(f"size condition batch {s.shape[0]} does not divide the batch {batch_size}")
            s = s.repeat(batch_size // s.shape[0], 1)
        n, k = s.shape
        emb = super().forward(s.reshape(-1))  # (N * k, D_out)
        return emb.reshape(n, -1)  # (N, k * D_out)


# ---------------------------------------------------------------------------------------------------
#                                    Attention and feed-forward
# ---------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """timm's Mlp (fc1 -> act -> fc2), tanh-approximated GELU as DiT and PixArt use."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm / DiT key layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to text tokens (PixArt key layout: q_linear, kv_linear, proj).

    The reference packs the valid text tokens of the batch into one sequence with xformers' block-diagonal
    mask; a key-padding mask over the padded batch is the same computation for SDPA.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (N, T, D) image tokens; y (N, L, D) text tokens, or (S, D) only the valid ones of the batch in
        the order of attn_mask (N, 1, 1, L) bool, True = attend."""
        n, t, d = x.shape
        hd = d // self.num_heads
        q = self.q_linear(x).reshape(n, t, self.num_heads, hd).transpose(1, 2)  # (N, heads, T, hd)
        kv = self.kv_linear(y)  # (N, L, 2D) or (S, 2D)
        if y.ndim == 2:  # packed: project valid tokens only, then lay them out padded for SDPA
            valid = attn_mask[:, 0, 0]  # (N, L)
            kv = kv.new_zeros(n, valid.shape[1], 2 * d).index_put((valid,), kv)  # (N, L, 2D)
        kv = kv.reshape(n, kv.shape[1], 2, self.num_heads, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, hd)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, heads, T, hd)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


# ---------------------------------------------------------------------------------------------------
#                                           Patch helpers
# ---------------------------------------------------------------------------------------------------


def unpatchify(x: torch.Tensor, h: int, w: int, patch_size: int, channels: int) -> torch.Tensor:
    """(N, h*w, p*p*C) tokens -> (N, C, h*p, w*p) images, the inverse of PatchEmbed's layout."""
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)
