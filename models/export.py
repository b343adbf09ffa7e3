"""Export a trained PixArt as a diffusers pipeline directory (`PixArtAlphaPipeline.from_pretrained(dir)`).

The transformer is converted exactly (models.convert_pixart); the T5 encoder, its tokenizer and the VAE
are loaded from the ids or directories the user names; the scheduler is DPM-Solver++ configured as in
the PixArt-alpha release, which is also what our own sampler reproduces step for step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

from models.convert_pixart import pixart_to_diffusers
from models.pixart import PixArt, PixArtMS
from models.text_encoder import T5TextEncoder
from models.vae import VAE

# The scheduler of the released PixArt-alpha pipelines (scheduler/scheduler_config.json on the hub).
PIXART_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    thresholding=False,
    use_karras_sigmas=False,
    # Written out so that a later diffusers release with other defaults samples the same way; variance_type
    # stays None: diffusers' DPM-Solver would cut a learned-sigma output to 3 channels (the pipeline cuts it).
    timestep_spacing="linspace",
    final_sigmas_type="zero",
    variance_type=None,
)


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The released PixArt-alpha scheduler, for a model predicting `prediction_type` (epsilon or v_prediction)."""
    return {**PIXART_SCHEDULER_CONFIG, "prediction_type": prediction_type}


def export_pipeline(
    model: PixArt,
    out_dir: str | os.PathLike,
    text_encoder: str | os.PathLike,
    vae: str | os.PathLike,
    safe_serialization: bool = True,
) -> Path:
    """Write transformer + T5 (+ tokenizer) + VAE + scheduler to `out_dir`; returns it.

    The directory is assembled under a temporary name and renamed when complete, so a crash never leaves
    a directory that looks like a finished export.
    """
    # 1. Load and check the components
    if isinstance(model, PixArtMS) and model.input_size != 128:
        raise ValueError(
            f"a PixArtMS with input_size={model.input_size} cannot be exported as a pipeline: diffusers' "
            "PixArtAlphaPipeline passes the resolution / aspect-ratio conditions only when sample_size == 128 "
            "(the 1024 model); export the transformer alone with `pixart convert official-to-diffusers`"
        )
    encoder = T5TextEncoder.from_pretrained(text_encoder)
    if encoder.d_model != model.caption_channels:
        raise ValueError(
            f"caption_channels={model.caption_channels} does not match the text encoder's d_model={encoder.d_model}"
        )
    autoencoder = VAE.from_pretrained(vae).model
    if autoencoder.config.latent_channels != model.in_channels:
        raise ValueError(
            f"the model has in_channels={model.in_channels} but the VAE has "
            f"latent_channels={autoencoder.config.latent_channels}"
        )

    # 2. Assemble the pipeline
    pipe = PixArtAlphaPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        vae=autoencoder,
        transformer=pixart_to_diffusers(model.float()),
        scheduler=DPMSolverMultistepScheduler(**scheduler_config(model.prediction_type)),
    )

    # 3. Save atomically
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=safe_serialization)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
