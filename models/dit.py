"""DiT, the class-conditional diffusion transformer, exactly as facebookresearch/DiT `models.py`.

Same module names, same initialisation and same numerics (timestep frequencies without shift, LayerNorm
eps 1e-6), so the released checkpoints (DiT-XL-2-256x256.pt, ...) load with `load_state_dict`. Paper:
Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023). PixArt-alpha starts from DiT-XL/2.
"""

from __future__ import annotations

import os
import re
from functools import partial

import torch
from torch import nn

from models.checkpoint import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, load_state_dict_strict, read_state_dict
from models.diffusion.parameterization import PredictionType, check_prediction_type
from models.layers import Attention, Mlp, PatchEmbed, TimestepEmbedder, modulate, sincos_2d, unpatchify

# ---------------------------------------------------------------------------------------------------
#                                 Embedding layer for class labels
# ---------------------------------------------------------------------------------------------------


class LabelEmbedder(nn.Module):
    """Class labels to vectors. Also drops labels to the null class for classifier-free guidance.

    With dropout the table has one extra row, index `num_classes`: the learned "no class" embedding.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


# ---------------------------------------------------------------------------------------------------
#                                           Core DiT model
# ---------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """A transformer block with adaptive layer norm zero (adaLN-Zero) conditioning on c = t + y."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, T, D) tokens, c (N, D) condition -> (N, T, D)."""
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # 6 x (N, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from tokens to patches of out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, T, D), c (N, D) -> (N, T, p * p * out_channels)."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)  # 2 x (N, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone: noise (and variance) of class-conditional latents."""

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
        num_classes: int = 1000,
        learn_sigma: bool = True,
        prediction_type: PredictionType = "epsilon",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 for the 2D sin-cos embedding")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.prediction_type = check_prediction_type(prediction_type)  # epsilon or v: for the loss and samplers
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos table; a frozen Parameter (not a buffer) as in the official code, so that the key
        # `pos_embed` is in the state dict and the parameter count matches the paper's.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Transformer layers: xavier-uniform linears, zero biases.
        def _basic_init(module: nn.Module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Positional embedding: the fixed 2D sin-cos table (MAE's).
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], (grid, grid))[None])  # (1, T, D)

        # Patch embedding: like an nn.Linear over flattened patches (instead of nn.Conv2d's default).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # (D, C * p * p)
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label embedding table.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Timestep embedding MLP.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation, so every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Output layers: zero, so the untrained model predicts 0.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) latents, t (N,) diffusion timesteps, y (N,) labels (num_classes: the null class)."""
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"latent size {tuple(x.shape[-2:])} does not match the fixed positional table of "
                f"input_size={self.input_size}"
            )
        h = w = self.input_size // self.patch_size
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        return unpatchify(x, h, w, self.patch_size, self.out_channels)  # (N, out_channels, H, W)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guided_channels: int = 3
    ) -> torch.Tensor:
        """Classifier-free guidance in one batch: x, t, y are [conditional half; unconditional half].

        Only the first half of x is used (both halves denoise the same latents). As in the official code,
        guidance applies to the first 3 channels by default "for exact reproducibility" of the paper's
        samples; pass guided_channels=self.in_channels for the standard guidance of all epsilon channels.
        """
        half = x[: len(x) // 2]  # (N/2, C, H, W)
        combined = torch.cat([half, half], dim=0)  # (N, C, H, W)
        model_out = self.forward(combined, t, y)  # (N, out_channels, H, W)
        eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # each (N/2, guided_channels, H, W)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (N, guided_channels, H, W)
        return torch.cat([eps, rest], dim=1)  # (N, out_channels, H, W)


# ---------------------------------------------------------------------------------------------------
#                                              Presets
# ---------------------------------------------------------------------------------------------------

# (depth, hidden_size, num_heads) of the paper's model sizes (Table 1).
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

# Called with the remaining arguments, as in the official code: DiT_models["DiT-XL/2"](input_size=32).
# "DiT-T/2" and "DiT-M/2" are ours: a tiny model for CI and debugging (hidden 48 = 3 heads x 16, divisible by 3
# and 4), and a mini one (0.7M parameters) that learns the shapes source within the CPU demo's minutes.
DiT_models: dict[str, partial[DiT]] = {
    f"DiT-{size}/{p}": partial(DiT, depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads)
    for size, (depth, hidden, heads) in SIZES.items()
    for p in (2, 4, 8)
}
DiT_models["DiT-T/2"] = partial(DiT, depth=2, hidden_size=48, patch_size=2, num_heads=3)
DiT_models["DiT-M/2"] = partial(DiT, depth=4, hidden_size=96, patch_size=2, num_heads=3)


# ---------------------------------------------------------------------------------------------------
#                               Loading: infer the architecture from shapes
# ---------------------------------------------------------------------------------------------------


def dit_kwargs_from_state_dict(
    state_dict: dict[str, torch.Tensor], num_heads: int | None = None, class_dropout_prob: float = 0.1
) -> dict:
    """Constructor arguments of the DiT that wrote `state_dict`, read from its tensor shapes.

    Two things are not in the shapes: the head count (taken from the preset with the same depth and width
    unless given) and whether the label table has a null row (yes unless class_dropout_prob == 0, as in
    every released DiT).
    """
    required = [
        "x_embedder.proj.weight",
        "pos_embed",
        "blocks.0.mlp.fc1.weight",
        "final_layer.linear.weight",
        "y_embedder.embedding_table.weight",
    ]
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise ValueError(
            f"not an official DiT state dict: no {absent} (first keys: {sorted(state_dict)[:5]}); "
            "a diffusers DiTTransformer2DModel is loaded from its directory or hub id instead"
        )
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape  # (D, C, p, p)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_patches = state_dict["pos_embed"].shape[1]  # pos_embed: (1, T, D)
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} tokens, not a square grid")
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // patch**2  # (p * p * out, D)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final_layer predicts {out_channels} channels; DiT: {in_channels} or twice that")
    if num_heads is None:
        heads = {(p.keywords["depth"], p.keywords["hidden_size"]): p.keywords["num_heads"] for p in DiT_models.values()}
        num_heads = heads.get((depth, hidden))
        if num_heads is None:
            raise ValueError(f"no DiT preset has depth={depth}, hidden_size={hidden}: pass num_heads")
    table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        class_dropout_prob=class_dropout_prob,
        num_classes=table_rows - (class_dropout_prob > 0),
        learn_sigma=out_channels == 2 * in_channels,
    )


def dit_from_state_dict(
    state_dict: dict[str, torch.Tensor], num_heads: int | None = None, class_dropout_prob: float = 0.1
) -> DiT:
    """Build the DiT whose architecture `state_dict` describes and load it strictly."""
    model = DiT(**dit_kwargs_from_state_dict(state_dict, num_heads, class_dropout_prob))
    load_state_dict_strict(model, state_dict, what="DiT checkpoint")
    return model


def dit_from_checkpoint(src: str | os.PathLike, num_heads: int | None = None, class_dropout_prob: float = 0.1) -> DiT:
    """Load a DiT from an official checkpoint file, a diffusers directory or a hub id (fp32, CPU, eval mode).

    - `.pt` / `.pth` / `.bin`: torch.load(weights_only=True); raw state dicts and {"ema"/"model": ...}
      training checkpoints both work. `.safetensors`: read with safetensors.
    - a directory or hub id: diffusers' DiTTransformer2DModel (from `transformer/` if present), converted.
    The architecture is read from the weights; num_heads / class_dropout_prob only resolve what shapes
    cannot tell (see `dit_kwargs_from_state_dict`) and are ignored for diffusers sources.
    """
    if os.path.isfile(src) or str(src).lower().endswith(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES):
        model = dit_from_state_dict(read_state_dict(src), num_heads, class_dropout_prob)
    else:
        # Imported here so that DiT itself does not need diffusers.
        from models.convert_dit import diffusers_to_dit, load_diffusers_dit

        model = diffusers_to_dit(load_diffusers_dit(src))
    return model.float().eval()
