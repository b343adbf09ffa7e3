"""The paper's three stages as model transitions: what each stage trains and how it starts.

1. pixel dependency: a class-conditional DiT (from scratch, or an official DiT checkpoint);
2. text-image alignment: PixArt, re-parameterised from stage 1 (models.reparam) or any PixArt checkpoint;
3. aesthetics: PixArtMS at a higher resolution, from stage 2. The size / aspect-ratio embedders are new:
   their output layers start at zero so that the stage-2 model's function is unchanged at step 0, and the
   positional grid is rescaled (lewei_scale) so that the new, larger grid spans what the old one spanned.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from models.diffusion.parameterization import PredictionType
from models.dit import DiT, DiT_models, dit_from_checkpoint
from models.pixart import PIXART_PRESETS, PixArt, PixArtMS
from models.pixart_checkpoint import load_pixart, model_config
from models.reparam import ReparamReport, dit_to_pixart


class StageModelConfig(BaseModel):
    """Architecture and initialisation of one stage's model."""

    stage: Literal[1, 2, 3] = Field(
        ..., description="1 pixel dependency (DiT), 2 alignment (PixArt), 3 aesthetics (MS)."
    )
    model: str = Field(
        "PixArt-XL/2", description="Size preset: 'PixArt-XL/2' ... or 'PixArt-T/2'; DiT uses the same size."
    )
    input_size: int = Field(32, description="Latent size (image size / VAE factor); 32 = 256 px with the SD VAE.")
    in_channels: int = Field(4, description="Latent channels of the codec (4 for the SD VAE).")
    caption_channels: int = Field(4096, description="Text encoder width (4096 for T5 v1.1 XXL).")
    num_classes: int = Field(1000, description="Stage 1 only: class count of the labelled data.")
    lewei_scale: float | None = Field(
        None, description="Positional scale; default input_size / 64 (0.5 at 256 px, 1 at 512, 2 at 1024)."
    )
    init: str | None = Field(None, description="Checkpoint to start from (DiT for stage 1, PixArt for 2 and 3).")
    reparam_t: int = Field(500, description="Stage 2 from a DiT: timestep of the re-parameterisation.")
    prediction_type: PredictionType = Field(
        "epsilon",
        description="What the network learns to predict: 'epsilon' (the paper) or 'v_prediction' (small pixel-space "
        "models: an epsilon error is amplified up to ~160x in x_0 at high noise). Applies to the model the stage "
        "trains, whatever it starts from.",
    )

    def scale(self) -> float:
        return self.lewei_scale if self.lewei_scale is not None else self.input_size / 64


def _size(name: str) -> dict:
    if name not in PIXART_PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PIXART_PRESETS)}")
    preset = dict(PIXART_PRESETS[name])
    preset.pop("caption_channels", None)
    return preset


def _trained_as(model: DiT | PixArt, cfg: StageModelConfig) -> DiT | PixArt:
    """The stage trains (and samples) `model` with the configured prediction type, whatever it started with."""
    model.prediction_type = cfg.prediction_type
    return model


def build_stage1(cfg: StageModelConfig) -> DiT:
    """Class-conditional DiT of the preset's size, or the given official DiT checkpoint."""
    if cfg.init:
        return _trained_as(dit_from_checkpoint(cfg.init).train(), cfg)
    size = _size(cfg.model)
    preset = next(
        (
            k
            for k, p in DiT_models.items()
            if all(p.keywords[f] == size[f] for f in ("depth", "hidden_size", "patch_size"))
        ),
        None,
    )
    if preset is None:
        raise ValueError(f"no DiT preset matches {cfg.model}")
    model = DiT_models[preset](input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes)
    return _trained_as(model, cfg)


def build_stage2(cfg: StageModelConfig, stage1: DiT | None = None) -> tuple[PixArt, ReparamReport | None]:
    """PixArt re-parameterised from stage 1's DiT, or loaded from `cfg.init`, or fresh."""
    if stage1 is not None:
        pixart, report = dit_to_pixart(stage1, t=cfg.reparam_t, caption_channels=cfg.caption_channels)
        return _trained_as(pixart, cfg), report
    if cfg.init:
        return _trained_as(load_pixart(cfg.init), cfg), None
    size = _size(cfg.model)
    model = PixArt(
        input_size=cfg.input_size,
        in_channels=cfg.in_channels,
        caption_channels=cfg.caption_channels,
        lewei_scale=cfg.scale(),
        prediction_type=cfg.prediction_type,
        **size,
    )
    return model, None


@torch.no_grad()
def to_multi_scale(model: PixArt, input_size: int, lewei_scale: float | None = None) -> PixArtMS:
    """Stage 2 -> 3: the same weights in a PixArtMS at `input_size`, micro-conditions silent at first.

    lewei_scale defaults to keeping the span of the grid: old_scale * input_size / old_input_size.
    """
    if isinstance(model, PixArtMS):
        return model
    config = model_config(model)
    config.pop("multi_scale")
    config["input_size"] = input_size
    config["lewei_scale"] = lewei_scale or model.lewei_scale * input_size / model.input_size
    ms = PixArtMS(**config)
    state = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    missing, unexpected = ms.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("csize_embedder", "ar_embedder", "pos_embed")) for k in missing)
    for embedder in (ms.csize_embedder, ms.ar_embedder):
        embedder.mlp[2].weight.zero_()
        embedder.mlp[2].bias.zero_()
    return ms


def build_stage3(cfg: StageModelConfig, stage2: PixArt | None = None) -> PixArtMS:
    """PixArtMS from stage 2's model (or `cfg.init`), at cfg.input_size."""
    source = stage2 if stage2 is not None else (load_pixart(cfg.init) if cfg.init else None)
    if source is None:
        size = _size(cfg.model)
        return PixArtMS(
            input_size=cfg.input_size,
            in_channels=cfg.in_channels,
            caption_channels=cfg.caption_channels,
            lewei_scale=cfg.scale(),
            prediction_type=cfg.prediction_type,
            **size,
        )
    return _trained_as(to_multi_scale(source, cfg.input_size, cfg.lewei_scale), cfg)
