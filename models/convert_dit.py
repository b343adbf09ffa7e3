"""Exact conversion between the official DiT (models/dit.py) and diffusers' DiTTransformer2DModel.

Key mapping (DiT -> diffusers), D = hidden size:
    x_embedder.proj                      -> pos_embed.proj
    t_embedder.mlp.0 / .2                -> transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / _2
    y_embedder.embedding_table           -> transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
    blocks.{i}.attn.qkv (3D, D)          -> transformer_blocks.{i}.attn1.to_q / to_k / to_v (D, D) each
    blocks.{i}.attn.proj                 -> transformer_blocks.{i}.attn1.to_out.0
    blocks.{i}.mlp.fc1 / fc2             -> transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    blocks.{i}.adaLN_modulation.1        -> transformer_blocks.{i}.norm1.linear
    final_layer.adaLN_modulation.1       -> proj_out_1
    final_layer.linear                   -> proj_out_2
    pos_embed                            -> (not stored: diffusers recomputes the same sin-cos table)
diffusers keeps a copy of the shared timestep and class embedders in every block (its final layer reads
block 0's); going back, the copies must agree.

Numerics: diffusers' DiT differs from the official one in two places that no weight can fix, its timestep
frequencies (`downscale_freq_shift=1`, official 0) and the eps of the LayerNorm before each MLP (1e-5,
official 1e-6). `match_official_numerics` patches both, see its docstring for what survives saving.
"""

from __future__ import annotations

import os

import torch
from diffusers import DiTTransformer2DModel

from models.checkpoint import load_state_dict_strict
from models.dit import DiT, dit_from_state_dict

OFFICIAL_NORM_EPS = 1e-6  # DiT's LayerNorm eps
OFFICIAL_FREQ_SHIFT = 0  # GLIDE / DiT timestep frequencies exp(-log(10000) * i / half), no shift


def _key_map(depth: int) -> dict[str, list[str]]:
    """DiT key -> the diffusers keys holding the same tensor (several for the embedders each block copies).

    The fused qkv projection is the one entry that is not a copy: `dit_to_diffusers` splits it.
    """
    pairs = [
        ("x_embedder.proj", "pos_embed.proj"),
        ("final_layer.adaLN_modulation.1", "proj_out_1"),
        ("final_layer.linear", "proj_out_2"),
    ]
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        pairs += [
            (f"{b}.attn.proj", f"{d}.attn1.to_out.0"),
            (f"{b}.mlp.fc1", f"{d}.ff.net.0.proj"),
            (f"{b}.mlp.fc2", f"{d}.ff.net.2"),
            (f"{b}.adaLN_modulation.1", f"{d}.norm1.linear"),
        ]
    key_map = {f"{a}.{p}": [f"{b}.{p}"] for a, b in pairs for p in ("weight", "bias")}
    emb = [f"transformer_blocks.{i}.norm1.emb" for i in range(depth)]
    for p in ("weight", "bias"):
        key_map[f"t_embedder.mlp.0.{p}"] = [f"{e}.timestep_embedder.linear_1.{p}" for e in emb]
        key_map[f"t_embedder.mlp.2.{p}"] = [f"{e}.timestep_embedder.linear_2.{p}" for e in emb]
    key_map["y_embedder.embedding_table.weight"] = [f"{e}.class_embedder.embedding_table.weight" for e in emb]
    return key_map


def dit_to_diffusers(
    state_dict_or_model: DiT | dict[str, torch.Tensor], official_numerics: bool = False
) -> DiTTransformer2DModel:
    """An official DiT (model or state dict) as diffusers' DiTTransformer2DModel, weights copied exactly.

    A state dict must be of a preset's depth and width (for the head count); otherwise build the model
    with `dit_from_state_dict(sd, num_heads=...)` and pass that.

    With official_numerics=True the result also computes what DiT computes (`match_official_numerics`);
    by default it is a stock diffusers model, which is what `from_pretrained` rebuilds from a saved copy.
    """
    # 1. Check the source fits diffusers' fixed choices
    dit = state_dict_or_model
    if not isinstance(dit, DiT):
        dit = dit_from_state_dict(state_dict_or_model)
    hidden, depth = dit.pos_embed.shape[-1], len(dit.blocks)
    if dit.y_embedder.dropout_prob <= 0:
        raise ValueError("class_dropout_prob=0: diffusers' DiT always has a null-class row; DiT has none")
    mlp_hidden = dit.blocks[0].mlp.fc1.out_features
    if mlp_hidden != 4 * hidden:
        raise ValueError(f"mlp hidden size {mlp_hidden} != 4 * hidden_size={hidden}; diffusers' DiT fixes 4")

    # 2. Build the diffusers model
    transformer = DiTTransformer2DModel(
        num_attention_heads=dit.num_heads,
        attention_head_dim=hidden // dit.num_heads,
        in_channels=dit.in_channels,
        out_channels=dit.out_channels,
        num_layers=depth,
        sample_size=dit.input_size,
        patch_size=dit.patch_size,
        num_embeds_ada_norm=dit.y_embedder.num_classes,
    )
    if not torch.allclose(transformer.pos_embed.pos_embed, dit.pos_embed.float(), atol=1e-6):
        raise ValueError("the DiT's pos_embed is not the fixed sin-cos table diffusers recomputes")

    # 3. Copy the weights
    sd = dit.state_dict()
    out = {target: sd[key] for key, targets in _key_map(depth).items() for target in targets}
    for i in range(depth):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].chunk(3, dim=0)  # each (D, D)
        qb, kb, vb = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3, dim=0)  # each (D,)
        for name, w, b in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):
            out[f"transformer_blocks.{i}.attn1.{name}.weight"] = w
            out[f"transformer_blocks.{i}.attn1.{name}.bias"] = b
    if dit.pos_embed.dtype != torch.float32:  # (diffusers warns on any .to(dtype), so only when needed)
        transformer.to(dit.pos_embed.dtype)
    load_state_dict_strict(transformer, out, what="DiT weights converted to diffusers")
    if official_numerics:
        match_official_numerics(transformer)
    return transformer.eval()


def diffusers_to_dit(transformer: DiTTransformer2DModel) -> DiT:
    """diffusers' DiTTransformer2DModel as an official DiT, weights copied exactly.

    The DiT computes with the official numerics, i.e. what the original DiT checkpoint computed (the hub's
    facebook/DiT-* weights were converted from it), not bit-for-bit what the stock diffusers model does.
    """
    # 1. Check the config has a DiT counterpart
    cfg = transformer.config
    fixed = dict(
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
    )
    for name, value in fixed.items():
        if cfg[name] != value:
            raise ValueError(f"{name}={cfg[name]!r} has no counterpart in DiT, which uses {value!r}")
    in_channels, out_channels = cfg.in_channels, transformer.out_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels={out_channels}; DiT predicts in_channels={in_channels} or twice that")
    block0 = transformer.transformer_blocks[0]
    hidden = transformer.inner_dim

    # 2. Build the DiT
    dit = DiT(
        input_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=block0.ff.net[0].proj.out_features / hidden,
        class_dropout_prob=block0.norm1.emb.class_embedder.dropout_prob,
        num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * in_channels,
    ).to(transformer.dtype)

    # 3. Copy the weights; the per-block copies of the embedders must be one tensor
    sd = transformer.state_dict()
    out = {"pos_embed": dit.pos_embed.data}
    for key, sources in _key_map(cfg.num_layers).items():
        differing = [s for s in sources[1:] if not torch.equal(sd[s], sd[sources[0]])]
        if differing:
            raise ValueError(f"{differing[0]} differs from {sources[0]}; DiT has one shared {key}")
        out[key] = sd[sources[0]]
    for i in range(cfg.num_layers):
        attn = f"transformer_blocks.{i}.attn1"
        for p in ("weight", "bias"):
            qkv = [sd[f"{attn}.to_{n}.{p}"] for n in "qkv"]  # 3 x (D, D) or 3 x (D,)
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(qkv)  # (3D, D) or (3D,)
    load_state_dict_strict(dit, out, what="diffusers DiT weights converted to DiT")
    return dit.eval()


def match_official_numerics(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Make a diffusers DiT compute exactly what the official DiT computes (in place).

    - LayerNorm eps before each MLP (`norm3`) to 1e-6: also written to the config (`norm_eps`, a documented
      constructor argument), so it survives save_pretrained / from_pretrained.
    - timestep frequencies to shift 0: `CombinedTimestepLabelEmbeddings` hard-codes
      `downscale_freq_shift=1` and has no config field, so this patch lives on the instance only and a
      reloaded model needs it again.
    """
    transformer.register_to_config(norm_eps=OFFICIAL_NORM_EPS)
    for block in transformer.transformer_blocks:
        block.norm3.eps = OFFICIAL_NORM_EPS
        block.norm1.emb.time_proj.downscale_freq_shift = OFFICIAL_FREQ_SHIFT
    return transformer


def load_diffusers_dit(src: str | os.PathLike) -> DiTTransformer2DModel:
    """diffusers' DiTTransformer2DModel from a local directory or a hub id; `transformer/` if present."""
    src = str(src)
    if os.path.isdir(src):
        found = [s for s in ("transformer", "") if os.path.isfile(os.path.join(src, s, "config.json"))]
        if not found:
            raise FileNotFoundError(f"no diffusers config.json in {src}/transformer or {src}")
        return DiTTransformer2DModel.from_pretrained(src, subfolder=found[0] or None)
    try:  # hub pipelines such as facebook/DiT-XL-2-256 keep the transformer in a subfolder
        return DiTTransformer2DModel.from_pretrained(src, subfolder="transformer")
    except OSError as in_subfolder:
        try:
            return DiTTransformer2DModel.from_pretrained(src)
        except OSError as at_root:
            raise OSError(f"cannot load a DiTTransformer2DModel from {src!r}: {in_subfolder} / {at_root}") from at_root
