"""Exact conversion between the official PixArt-alpha layout and diffusers' PixArtTransformer2DModel.

The mapping mirrors diffusers' scripts/convert_pixart_alpha_to_diffusers.py: fused qkv / kv projections
split into to_q/to_k/to_v, adaLN-single under `adaln_single`, the caption MLP under `caption_projection`.
diffusers keeps no null caption embedding (its pipeline encodes "" instead), so `y_embedder.y_embedding`
is dropped one way and must be supplied (or freshly initialised, and reported) the other way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.checkpoint import load_state_dict_strict
from models.layers import sincos_2d
from models.pixart import PixArt, PixArtMS

if TYPE_CHECKING:  # diffusers' model code takes a second to import: loaded on use (every config imports this)
    from diffusers import PixArtTransformer2DModel

# official prefix -> diffusers prefix, for modules that map one to one (weight and bias)
_DIRECT = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_DIRECT_MS = {
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_BLOCK_DIRECT = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# Keys with no diffusers counterpart: positions are recomputed, the null caption lives in the pipeline.
_OFFICIAL_ONLY = ("pos_embed", "y_embedder.y_embedding")


def _direct_map(model_is_ms: bool) -> dict[str, str]:
    return {**_DIRECT, **(_DIRECT_MS if model_is_ms else {})}


def official_to_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int, multi_scale: bool) -> dict:
    """Official PixArt state dict -> diffusers PixArtTransformer2DModel state dict."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _direct_map(multi_scale).items():
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    out["scale_shift_table"] = sd["final_layer.scale_shift_table"]
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        out[f"{d}.scale_shift_table"] = sd[f"{b}.scale_shift_table"]
        for src, dst in _BLOCK_DIRECT.items():
            for p in ("weight", "bias"):
                out[f"{d}.{dst}.{p}"] = sd[f"{b}.{src}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{b}.attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{d}.attn1.to_q.{p}"], out[f"{d}.attn1.to_k.{p}"], out[f"{d}.attn1.to_v.{p}"] = q, k, v
            k, v = sd[f"{b}.cross_attn.kv_linear.{p}"].chunk(2, dim=0)
            out[f"{d}.attn2.to_k.{p}"], out[f"{d}.attn2.to_v.{p}"] = k, v
    return out


def diffusers_to_official_state_dict(sd: dict[str, torch.Tensor], depth: int, multi_scale: bool) -> dict:
    """diffusers PixArtTransformer2DModel state dict -> official layout (without pos_embed / y_embedding)."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _direct_map(multi_scale).items():
        for p in ("weight", "bias"):
            out[f"{src}.{p}"] = sd[f"{dst}.{p}"]
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        out[f"{b}.scale_shift_table"] = sd[f"{d}.scale_shift_table"]
        for src, dst in _BLOCK_DIRECT.items():
            for p in ("weight", "bias"):
                out[f"{b}.{src}.{p}"] = sd[f"{d}.{dst}.{p}"]
        for p in ("weight", "bias"):
            qkv = [sd[f"{d}.attn1.to_{n}.{p}"] for n in "qkv"]
            out[f"{b}.attn.qkv.{p}"] = torch.cat(qkv, dim=0)
            kv = [sd[f"{d}.attn2.to_{n}.{p}"] for n in "kv"]
            out[f"{b}.cross_attn.kv_linear.{p}"] = torch.cat(kv, dim=0)
    return out


def diffusers_config(model: PixArt) -> dict:
    """The PixArtTransformer2DModel config that reproduces `model` exactly."""
    if model.adaln != "single":
        raise ValueError(
            f"adaln={model.adaln!r}: diffusers' PixArtTransformer2DModel has adaLN-single only; a model with "
            "per-block adaLN (the ablation) cannot be converted or exported, keep its checkpoint (save_pixart)"
        )
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.hidden_size
    if mlp_ratio != 4.0:
        raise ValueError(f"diffusers' PixArt has a fixed MLP ratio of 4, this model has mlp_ratio={mlp_ratio}")
    return dict(
        num_attention_heads=model.num_heads,
        attention_head_dim=model.hidden_size // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        cross_attention_dim=model.hidden_size,
        attention_bias=True,
        sample_size=model.input_size,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=model.lewei_scale,
        use_additional_conditions=isinstance(model, PixArtMS),
        caption_channels=model.caption_channels,
    )


def pixart_to_diffusers(model: PixArt) -> PixArtTransformer2DModel:
    """Our (official-layout) model as a diffusers PixArtTransformer2DModel with identical outputs."""
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(**diffusers_config(model))
    sd = official_to_diffusers_state_dict(model.state_dict(), len(model.blocks), isinstance(model, PixArtMS))
    load_state_dict_strict(transformer, sd, what="converted PixArt weights (diffusers layout)")
    return transformer.to(model.dtype)


def diffusers_to_pixart(
    transformer: PixArtTransformer2DModel,
    null_caption: torch.Tensor | None = None,
    model_max_length: int = 120,
) -> tuple[PixArt, list[str]]:
    """A diffusers PixArtTransformer2DModel as our PixArt / PixArtMS; returns (model, freshly_initialised_keys).

    `null_caption` (L, C_text) fills `y_embedder.y_embedding` (e.g. the T5 features of "" padded to L);
    without it the null caption keeps its random initialisation and is listed as fresh.
    """
    cfg = transformer.config
    if cfg.norm_type != "ada_norm_single":
        raise ValueError(f"not a PixArt-alpha transformer: norm_type={cfg.norm_type!r}")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    multi_scale = bool(transformer.use_additional_conditions)
    cls = PixArtMS if multi_scale else PixArt
    scale = cfg.interpolation_scale if cfg.interpolation_scale is not None else max(cfg.sample_size // 64, 1)
    model = cls(
        input_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        hidden_size=hidden,
        depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads,
        pred_sigma=cfg.out_channels == 2 * cfg.in_channels,
        caption_channels=cfg.caption_channels,
        model_max_length=model_max_length,
        lewei_scale=float(scale),
    )
    sd = diffusers_to_official_state_dict(transformer.state_dict(), cfg.num_layers, multi_scale)
    sd["pos_embed"] = model.pos_embed
    fresh = []
    if null_caption is not None:
        sd["y_embedder.y_embedding"] = null_caption.reshape(model.y_embedder.y_embedding.shape)
    else:
        sd["y_embedder.y_embedding"] = model.y_embedder.y_embedding.data
        fresh.append("y_embedder.y_embedding")
    load_state_dict_strict(model, sd, what="PixArt weights converted from diffusers")
    return model.to(transformer.dtype), fresh


# ---------------------------------------------------------------------------------------------------
#                             Official checkpoints: infer the architecture
# ---------------------------------------------------------------------------------------------------


def infer_pixart_kwargs(
    sd: dict[str, torch.Tensor], num_heads: int | None = None, lewei_scale: float | None = None
) -> dict:
    """Constructor arguments of the model that wrote an official state dict.

    Widths come from weight shapes. The head count is not stored: by default PixArt's head dim of 72 is
    assumed. lewei_scale is recovered by matching the stored positional table.
    """
    required = [
        "x_embedder.proj.weight",
        "t_block.1.weight",
        "y_embedder.y_proj.fc1.weight",
        "final_layer.linear.weight",
    ]
    missing = [k for k in required if k not in sd]
    if missing:
        raise KeyError(f"not an official PixArt state dict: missing {missing}")
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    if num_heads is None:
        if hidden % 72:
            raise ValueError(f"hidden_size={hidden} is not a multiple of PixArt's head dim 72; pass num_heads")
        num_heads = hidden // 72
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_channels = sd["final_layer.linear.weight"].shape[0] // patch**2
    caption_channels = sd["y_embedder.y_proj.fc1.weight"].shape[1]
    kwargs = dict(
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=caption_channels,
        model_max_length=sd["y_embedder.y_embedding"].shape[0] if "y_embedder.y_embedding" in sd else 120,
    )
    if "pos_embed" in sd:
        grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
        kwargs["input_size"] = grid * patch
        kwargs["lewei_scale"] = lewei_scale or _match_lewei_scale(sd["pos_embed"][0], grid, hidden)
    elif lewei_scale is not None:
        kwargs["lewei_scale"] = lewei_scale
    kwargs["multi_scale"] = "csize_embedder.mlp.0.weight" in sd
    return kwargs


def _match_lewei_scale(table: torch.Tensor, grid: int, hidden: int) -> float:
    """Which positional scale wrote this (T, D) table: the released models use 0.5, 1 or 2."""
    for scale in (1.0, 0.5, 2.0, grid / 32, grid / 64):
        if torch.allclose(table.float(), sincos_2d(hidden, (grid, grid), scale, grid), atol=1e-4):
            return scale
    raise ValueError("the checkpoint's pos_embed matches no known lewei_scale; pass --lewei-scale")


def pixart_from_state_dict(sd: dict[str, torch.Tensor], **overrides) -> PixArt:
    """Build the matching PixArt / PixArtMS and load an official state dict into it (strictly)."""
    inferred = infer_pixart_kwargs(
        sd, num_heads=overrides.pop("num_heads", None), lewei_scale=overrides.pop("lewei_scale", None)
    )
    kwargs = {**inferred, **overrides}
    multi_scale = kwargs.pop("multi_scale")
    model = (PixArtMS if multi_scale else PixArt)(**kwargs)
    if "pos_embed" not in sd:
        sd = {**sd, "pos_embed": model.pos_embed}
    load_state_dict_strict(model, sd, what="official PixArt checkpoint")
    return model
