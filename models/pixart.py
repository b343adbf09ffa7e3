"""PixArt-alpha: DiT + cross-attention to T5 tokens + adaLN-single (Chen et al., 2023).

Module names and the state-dict layout follow the official PixArt-alpha code
(diffusion/model/nets/PixArt.py, PixArtMS.py) so released checkpoints load with `load_state_dict`.
Notation follows the paper and DiT: x latents, t timesteps, y text features, N batch, T image tokens,
L text tokens, D hidden size, C latent channels.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.diffusion.parameterization import PredictionType, check_prediction_type
from models.dit import FinalLayer
from models.layers import (
    Attention,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    modulate,
    sincos_2d,
    unpatchify,
)

# How the timestep modulates the blocks. "single": PixArt's adaLN-single, one MLP t -> t0 shared by all blocks
# plus a learned (6, D) table per block. "block": DiT's adaLN, an MLP t -> 6D in every block (for the ablation of
# the paper's adaLN-single section; no diffusers counterpart).
AdaLN = Literal["single", "block"]

# ---------------------------------------------------------------------------------------------------
#                                       Conditioning embedders
# ---------------------------------------------------------------------------------------------------


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the hidden size; drops captions to a learned null embedding for CFG."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_features=hidden_size, out_features=hidden_size)
        # The null caption (L, C_text). A parameter (the paper: learned); same key as the reference buffer.
        self.y_embedding = nn.Parameter(torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace whole captions by the null embedding: with p = uncond_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.uncond_prob
        else:
            drop = force_drop_ids.to(y.device) == 1
        return torch.where(drop[:, None, None], self.y_embedding.to(y.dtype), y)  # (N, L, C_text)

    def forward(
        self,
        y: torch.Tensor,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, L, C_text) -> (N, L, D); or, given the (N, L') valid-token mask, only the valid tokens (S, D).

        Projecting only valid tokens is what the reference's packed (xformers) path does: T5 pads every
        caption to 120 tokens, and the projection from 4096 channels is a large share of a step.
        """
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if y.shape[1:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption dropout needs y of shape (N, {tuple(self.y_embedding.shape)}), got {tuple(y.shape)}"
                )
            y = self.token_drop(y, force_drop_ids)
        if valid is not None:
            y = y[:, : valid.shape[1]][valid]  # (S, C_text), S = number of valid tokens in the batch
        return self.y_proj(y)  # (N, L, D) or (S, D)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath), active only in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


# ---------------------------------------------------------------------------------------------------
#                                        Core PixArt model
# ---------------------------------------------------------------------------------------------------


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention to text, MLP; modulated by adaLN-single (the shared t0 plus this block's
    table) or, with adaln="block", by DiT's adaLN (this block's own MLP of t)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        adaln: AdaLN = "single",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.adaln = adaln
        if adaln == "single":
            # adaLN-single: this block's own embedding E_i (6, D), added to the shared t0.
            self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        else:
            # DiT's adaLN: this block's own MLP from t to its six modulation vectors (6D^2 + 6D parameters).
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None):
        """x (N, T, D), y (N, L, D) or packed valid tokens (S, D), attn_mask (N, 1, 1, L) bool; c the timestep
        condition: t0 (N, 6D) with adaLN-single, t (N, D) with per-block adaLN."""
        n = x.shape[0]
        if self.adaln == "single":
            mod = self.scale_shift_table[None] + c.reshape(n, 6, -1)  # (N, 6, D)
        else:
            mod = self.adaLN_modulation(c).reshape(n, 6, -1)  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # each (N, 1, D)
        x = self.gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = x + self.cross_attn(x, y, attn_mask)
        x = self.gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x

    def gated_residual(self, x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + drop_path(gate * branch), fused into one kernel when stochastic depth is off."""
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            return torch.addcmul(x, gate, branch)
        return x + self.drop_path(gate * branch)


class T2IFinalLayer(nn.Module):
    """LayerNorm, modulation by t (not t0) plus its own (2, D) table, linear to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # each (N, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class PixArt(nn.Module):
    """PixArt-alpha at a fixed square resolution (the 256 and 512 models)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        lewei_scale: float = 1.0,
        adaln: AdaLN = "single",
        prediction_type: PredictionType = "epsilon",
        **unused,
    ):
        super().__init__()
        if unused:
            raise TypeError(f"unexpected PixArt arguments: {sorted(unused)}")
        if adaln not in ("single", "block"):
            raise ValueError(f"adaln={adaln!r}; expected 'single' (PixArt's adaLN-single) or 'block' (DiT's per-block)")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pred_sigma = pred_sigma
        # What the first out channels mean (epsilon or v): no weight depends on it, samplers and the loss do.
        self.prediction_type = check_prediction_type(prediction_type)
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.lewei_scale = lewei_scale
        self.base_size = input_size // patch_size
        self.adaln = adaln
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if adaln == "single":
            # adaLN-single: one MLP from t to all six modulation vectors, shared by every block.
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        num_patches = self.base_size**2
        self.register_buffer("pos_embed", torch.zeros(1, num_patches, hidden_size))  # persistent: official key
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            [PixArtBlock(hidden_size, num_heads, mlp_ratio, drop_path=rates[i], adaln=adaln) for i in range(depth)]
        )
        if adaln == "single":
            self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)
        else:
            self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)  # DiT's, modulated by t
        self.initialize_weights()

    # -- initialisation ---------------------------------------------------------------------------

    def initialize_weights(self):
        # Transformer linears: xavier uniform, zero bias (DiT).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        self.pos_embed.copy_(self.position_table(self.base_size, self.base_size)[None])

        # Patch embedding like a linear layer (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Timestep, adaLN-single and caption MLPs: N(0, 0.02) as the reference.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.adaln == "single":
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)

        # Cross-attention output and final projection start at zero: text and output enter gradually.
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

        # Per-block adaLN: adaLN-Zero as DiT, zero modulation, so every block starts as the identity.
        if self.adaln == "block":
            for module in [*(block.adaLN_modulation for block in self.blocks), self.final_layer.adaLN_modulation]:
                nn.init.constant_(module[-1].weight, 0)
                nn.init.constant_(module[-1].bias, 0)

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """(h*w, D) sin-cos positions for an h x w token grid, scaled by lewei_scale around base_size."""
        return sincos_2d(self.hidden_size, (h, w), lewei_scale=self.lewei_scale, base_size=self.base_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    # -- forward ----------------------------------------------------------------------------------

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) -> tokens with positions (N, T, D)."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"PixArt was built for {self.input_size}x{self.input_size} latents, got {tuple(x.shape[-2:])}; "
                "use PixArtMS for other sizes"
            )
        return self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, D), T = H * W / p^2

    def embed_time(self, timestep: torch.Tensor, n: int, data_info: dict | None) -> torch.Tensor:
        return self.t_embedder(timestep.to(self.dtype))  # (N, D)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        data_info: dict | None = None,
        force_drop_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """x (N, C, H, W), timestep (N,), y (N, L, C_text) or (N, 1, L, C_text), mask (N, L) 1 = valid token.

        Returns (N, 2C, H, W) when pred_sigma (epsilon, then variance interpolation), else (N, C, H, W).
        """
        n = x.shape[0]
        x = x.to(self.dtype)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if timestep.ndim == 0:
            timestep = timestep.expand(n)
        y = self._check_captions(y, n)  # (N, L, C_text)
        attn_mask = self._key_padding_mask(mask, n, y.shape[1])  # (N, 1, 1, L') or None
        valid = None if attn_mask is None else attn_mask[:, 0, 0]  # (N, L')

        x = self.embed_positions(x)  # (N, T, D)
        t = self.embed_time(timestep, n, data_info)  # (N, D)
        c = self.t_block(t) if self.adaln == "single" else t  # (N, 6D) the shared t0, or (N, D) for per-block MLPs
        y = self.y_embedder(y.to(self.dtype), self.training, force_drop_ids, valid)  # (N, L, D) or packed (S, D)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, c, attn_mask, use_reentrant=False)
            else:
                x = block(x, y, c, attn_mask)  # (N, T, D)
        x = self.final_layer(x, t)  # (N, T, p*p*C_out)
        return unpatchify(x, h, w, self.patch_size, self.out_channels)  # (N, C_out, H, W)

    def _check_captions(self, y: torch.Tensor, n: int) -> torch.Tensor:
        if y.ndim == 4:  # the official (N, 1, L, C) layout
            y = y.squeeze(1)
        if y.ndim != 3 or y.shape[-1] != self.caption_channels:
            raise ValueError(
                f"y must be (N, L, {self.caption_channels}) text features, got {tuple(y.shape)}; "
                f"caption_channels={self.caption_channels} must match the text encoder's d_model"
            )
        if y.shape[0] != n:
            raise ValueError(f"y has batch {y.shape[0]} but x has batch {n}")
        return y

    @staticmethod
    def _key_padding_mask(mask: torch.Tensor | None, n: int, length: int) -> torch.Tensor | None:
        """(N, L) 0/1 mask -> (N, 1, 1, L') bool for SDPA; every caption needs at least one valid token.

        L' <= L drops the trailing columns that no caption uses: padding costs the caption projection and
        the cross-attention real work (T5 pads every caption to 120 tokens) and changes no output.
        """
        if mask is None:
            return None
        mask = mask.reshape(mask.shape[0], -1)  # accepts (N, 1, 1, L) from the official code too
        if mask.shape[0] != n:
            mask = mask.repeat(n // mask.shape[0], 1)  # one mask shared by the batch, as the reference
        if mask.shape != (n, length):
            raise ValueError(f"mask must be (N, L) = ({n}, {length}), got {tuple(mask.shape)}")
        mask = mask != 0
        if not bool(mask.any(dim=1).all()):
            raise ValueError("a caption mask has no valid token; T5 always emits at least the EOS token")
        used = int(mask.any(dim=0).nonzero().max()) + 1  # last column any caption attends to
        return mask[:, None, None, :used]

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        mask: torch.Tensor | None = None,
        data_info: dict | None = None,
        guidance_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance on a doubled batch [cond; uncond] (the reference's interface).

        Guides all epsilon channels by default; guidance_channels=3 reproduces the reference, which
        guides only the first three (a DiT leftover).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), timestep, y, mask, data_info)  # (2N, C_out, H, W)
        k = self.in_channels if guidance_channels is None else guidance_channels
        eps, rest = out[:, :k], out[:, k:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def forward_with_dpmsolver(self, x, timestep, y, mask=None, data_info=None):
        """Epsilon only, for ODE samplers."""
        out = self.forward(x, timestep, y, mask, data_info)
        return out[:, : self.in_channels] if self.pred_sigma else out

    def enable_gradient_checkpointing(self, on: bool = True):
        self.gradient_checkpointing = on
        return self


class PixArtMS(PixArt):
    """Multi-scale PixArt (1024): any latent size, plus image-size and aspect-ratio micro-conditions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.hidden_size % 3:
            raise ValueError(
                f"PixArtMS needs hidden_size divisible by 3 (size and ratio embed to D/3 each), got {self.hidden_size}"
            )
        self.csize_embedder = SizeEmbedder(self.hidden_size // 3)  # (h, w) -> 2 * D/3
        self.ar_embedder = SizeEmbedder(self.hidden_size // 3)  # h / w   -> D/3
        nn.init.normal_(self.csize_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.csize_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.ar_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.ar_embedder.mlp[2].weight, std=0.02)
        for module in (self.csize_embedder, self.ar_embedder):
            nn.init.constant_(module.mlp[0].bias, 0)
            nn.init.constant_(module.mlp[2].bias, 0)

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        pos = self.position_table(h, w).to(device=x.device, dtype=x.dtype)  # (T, D) for this h x w grid
        return self.x_embedder(x) + pos[None]  # (N, T, D)

    def embed_time(self, timestep: torch.Tensor, n: int, data_info: dict | None) -> torch.Tensor:
        if not data_info or "img_hw" not in data_info or "aspect_ratio" not in data_info:
            raise ValueError("PixArtMS needs data_info={'img_hw': (N, 2), 'aspect_ratio': (N, 1)}")
        t = self.t_embedder(timestep.to(self.dtype))  # (N, D)
        csize = self.csize_embedder(data_info["img_hw"].to(t), n)  # (N, 2D/3)
        ar = self.ar_embedder(data_info["aspect_ratio"].to(t), n)  # (N, D/3)
        return t + torch.cat([csize, ar], dim=1)  # (N, D): into t_block, or every block's own adaLN MLP


# ---------------------------------------------------------------------------------------------------
#                                              Presets
# ---------------------------------------------------------------------------------------------------

# Sizes of the DiT family at patch 2 (DiT paper, Table 1), plus a tiny debug size for tests (T) and a mini one
# for the CPU demo (M).
PIXART_PRESETS: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "PixArt-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "PixArt-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "PixArt-S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "PixArt-T/2": dict(depth=2, hidden_size=48, patch_size=2, num_heads=3, caption_channels=32),
    "PixArt-M/2": dict(depth=4, hidden_size=96, patch_size=2, num_heads=3, caption_channels=32),
}


def build_pixart(name: str, multi_scale: bool = False, **overrides) -> PixArt:
    """A preset by name with any constructor argument overridden, e.g. build_pixart("PixArt-XL/2", input_size=64)."""
    if name not in PIXART_PRESETS:
        raise KeyError(f"unknown PixArt preset {name!r}; choose one of {sorted(PIXART_PRESETS)}")
    cls = PixArtMS if multi_scale else PixArt
    return cls(**{**PIXART_PRESETS[name], **overrides})


def cross_attention_is_silent(model: PixArt) -> bool:
    """True while every cross-attention output projection is zero (as initialised)."""
    return all(not b.cross_attn.proj.weight.any() and not b.cross_attn.proj.bias.any() for b in model.blocks)


__all__ = ["PixArt", "PixArtMS", "PIXART_PRESETS", "build_pixart"]
