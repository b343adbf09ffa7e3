"""Export: the last stage's EMA model as a self-contained directory, and loading one back to generate from.

    <export>/model/pixart.pth        our checkpoint (official key layout, learned null caption included)
    <export>/model/transformer/      diffusers PixArtTransformer2DModel (exact conversion)
    <export>/model/scheduler/        diffusers DPM-Solver++ config; its prediction_type says what the model predicts
    <export>/model/text_encoder/     T5 encoder and tokenizer
    with the VAE (and a model diffusers' pipeline can condition: not a PixArtMS below 1024 px):
    <export>/model/model_index.json, vae/, tokenizer/   a whole diffusers PixArtAlphaPipeline
    with the pixel codec:
    <export>/model/codec.json        how latents decode (models.pixel_codec.build_latent_codec arguments)

`pixart generate --model <export>/model` and `load_exported` read either form; the pipeline form also loads with
`diffusers.PixArtAlphaPipeline.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.pixart import PixArt, PixArtMS
from storage.artifacts import ArtifactStore
from storage.fs import filesystem
from tasks.components import Components, latent_codec, text_encoder
from tasks.locks import is_local

CHECKPOINT = "pixart.pth"


def exportable_as_pipeline(model: PixArt, codec: dict) -> bool:
    """diffusers' PixArtAlphaPipeline decodes with a VAE and micro-conditions PixArtMS only at sample size 128."""
    return codec["kind"] == "vae" and not (isinstance(model, PixArtMS) and model.input_size != 128)


@torch.no_grad()
def conversion_gap(model: PixArt, exported: PixArt, seed: int = 0) -> float:
    """max |ours - exported| of one forward pass on random inputs (0 up to float error for an exact export)."""
    g = torch.Generator().manual_seed(seed)
    n, size = 2, model.input_size
    x = torch.randn(n, model.in_channels, size, size, generator=g)  # (N, C, H, W)
    y = torch.randn(n, model.model_max_length, model.caption_channels, generator=g)  # (N, L, C_text)
    mask = torch.zeros(n, model.model_max_length, dtype=torch.int64)
    mask[:, :7] = 1
    t = torch.tensor([10, 900])
    data_info = None
    if isinstance(model, PixArtMS):
        data_info = {"img_hw": torch.tensor([[256.0, 256.0]] * n), "aspect_ratio": torch.ones(n, 1)}
    ours = model.eval()(x, t, y, mask, data_info=data_info)
    theirs = exported.eval()(x, t, y, mask, data_info=data_info)
    return (ours - theirs).abs().max().item()


@task(name="export-model", cache_policy=NO_CACHE)
def export_model(ema_checkpoint: str, components: Components, root: str, export_id: str) -> dict:
    """Write <export>/model from a stage's EMA checkpoint and finish the export artifact; returns its summary."""
    from diffusers import DPMSolverMultistepScheduler

    from models.convert_pixart import pixart_to_diffusers
    from models.export import export_pipeline, scheduler_config
    from models.pixart_checkpoint import load_pixart, save_pixart

    # 1. Load the model
    artifact = ArtifactStore(root).get(export_id)
    if not is_local(artifact.url):
        raise ValueError(f"export writes a local directory; workdir {root!r} is remote")
    model = load_pixart(ema_checkpoint).eval()
    out = Path(filesystem(artifact.url)[1]) / "model"
    tmp = out.with_name("model.partial")
    shutil.rmtree(tmp, ignore_errors=True)

    # 2. The diffusers pipeline where it can be one, else the transformer, T5 and the codec's description
    if exportable_as_pipeline(model, components.codec):
        export_pipeline(model, tmp, text_encoder=components.t5, vae=components.vae)
        kind = "pipeline"
    else:
        pixart_to_diffusers(model).save_pretrained(tmp / "transformer")
        # The transformer's config cannot say what it predicts; its scheduler (as in a pipeline) does.
        DPMSolverMultistepScheduler(**scheduler_config(model.prediction_type)).save_pretrained(tmp / "scheduler")
        encoder = text_encoder(components.t5, "cpu")
        encoder.model.save_pretrained(tmp / "text_encoder")
        encoder.tokenizer.save_pretrained(tmp / "text_encoder")
        (tmp / "codec.json").write_text(json.dumps(components.codec, indent=1) + "\n")
        kind = "transformer"
    save_pixart(model, tmp / CHECKPOINT)

    # 3. Check the exported transformer reproduces the model, then move the directory into place
    exported = load_pixart(tmp / "transformer" if kind == "transformer" else tmp)
    gap = conversion_gap(model, exported)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    summary = {"kind": kind, "dir": str(out), "max_abs_diff_vs_model": gap, "source": ema_checkpoint}
    artifact.finish(summary)
    return summary


def load_exported(
    path: str | os.PathLike,
    text_encoder_name: str | None = None,
    codec: dict | None = None,
    device: str = "cpu",
):
    """(model, T5 encoder, codec, negative) to generate with, from an export directory, a stage's directory
    (ema.pth), a diffusers transformer or pipeline directory, or a checkpoint file.

    text_encoder_name / codec override what the directory holds, and are required where it holds none.
    `negative` is the unconditional caption: "null" (the learned one) for our checkpoints, "empty" (T5 of "")
    for diffusers directories, which keep no null caption.
    """
    from models.pixart_checkpoint import load_pixart

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist: pass an export directory or a checkpoint")
    checkpoint = path
    if path.is_dir():
        checkpoint = next((path / n for n in (CHECKPOINT, "ema.pth") if (path / n).is_file()), None)
        pipeline = (path / "model_index.json").is_file()
        if text_encoder_name is None:
            text_encoder_name = str(path) if pipeline else _dir_or_none(path / "text_encoder")
        if codec is None and (path / "codec.json").is_file():
            codec = json.loads((path / "codec.json").read_text())
        elif codec is None and pipeline:
            codec = {"kind": "vae", "vae": str(path)}
    model = load_pixart(checkpoint or path).eval().to(device)
    if text_encoder_name is None:
        raise ValueError(f"{path} holds no text encoder: pass --text-encoder (a T5 directory or hub id)")
    if codec is None:
        raise ValueError(f"{path} holds no VAE or codec.json: pass --vae (a VAE directory or hub id) or --pixel-factor")
    negative = "null" if checkpoint is not None else "empty"
    return model, text_encoder(text_encoder_name, device), latent_codec(codec, device), negative


def _dir_or_none(path: Path) -> str | None:
    return str(path) if path.is_dir() else None
