"""Saving and loading PixArt checkpoints in every form a user brings.

Ours: a torch file `{"state_dict": <official layout>, "model_config": <constructor kwargs>}`, so the
official code's `PixArt(...).load_state_dict(torch.load(path)["state_dict"])` works on it and we can
rebuild the architecture without guessing. Also accepted: official checkpoints (architecture inferred
from shapes), `.safetensors` files, and diffusers directories (a transformer or a whole pipeline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from models.checkpoint import load_state_dict_strict, read_checkpoint, unwrap_state_dict
from models.convert_pixart import diffusers_to_pixart, pixart_from_state_dict
from models.pixart import PixArt, PixArtMS


def model_config(model: PixArt) -> dict:
    """Constructor kwargs that rebuild `model` (plus `multi_scale`); `adaln` and `prediction_type` only when not
    the defaults ("single", "epsilon"), so configs of such models read as before those options existed."""
    block = model.blocks[0]
    config = dict(
        input_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        hidden_size=model.hidden_size,
        depth=len(model.blocks),
        num_heads=model.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.hidden_size,
        class_dropout_prob=model.y_embedder.uncond_prob,
        pred_sigma=model.pred_sigma,
        caption_channels=model.caption_channels,
        model_max_length=model.model_max_length,
        lewei_scale=model.lewei_scale,
        multi_scale=isinstance(model, PixArtMS),
    )
    if model.adaln != "single":
        config["adaln"] = model.adaln
    if model.prediction_type != "epsilon":
        config["prediction_type"] = model.prediction_type
    return config


def scheduler_prediction_type(pipeline_dir: Path) -> str:
    """What a diffusers directory's transformer predicts: its scheduler's prediction_type, "epsilon" without one."""
    config = pipeline_dir / "scheduler" / "scheduler_config.json"
    return json.loads(config.read_text()).get("prediction_type", "epsilon") if config.is_file() else "epsilon"


def build_from_config(config: dict) -> PixArt:
    config = dict(config)
    cls = PixArtMS if config.pop("multi_scale", False) else PixArt
    return cls(**config)


def save_pixart(model: PixArt, path: str | os.PathLike, **extra) -> Path:
    """Write atomically (temporary name, then rename) so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": model_config(model), **extra}, tmp)
    os.replace(tmp, path)
    return path


def load_pixart(src: str | os.PathLike, null_caption: torch.Tensor | None = None, **overrides) -> PixArt:
    """A PixArt from our checkpoint, an official one, a .safetensors file or a diffusers directory.

    `overrides` (e.g. num_heads, lewei_scale, input_size) fill in what a bare state dict cannot tell.
    """
    src = Path(src)
    if src.is_dir():
        from diffusers import PixArtTransformer2DModel

        sub = "transformer" if (src / "transformer").is_dir() else None
        transformer = PixArtTransformer2DModel.from_pretrained(src, subfolder=sub)
        model, _ = diffusers_to_pixart(transformer, null_caption=null_caption)
        model.prediction_type = scheduler_prediction_type(src if sub else src.parent)
        return model
    raw = read_checkpoint(src)
    if isinstance(raw, dict) and "model_config" in raw:  # ours: the architecture is stored
        model = build_from_config({**raw["model_config"], **overrides})
        load_state_dict_strict(model, unwrap_state_dict(raw, src, "state_dict"), what=f"PixArt checkpoint {src}")
        return model
    return pixart_from_state_dict(unwrap_state_dict(raw, src), **overrides)
