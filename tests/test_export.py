"""Export to a diffusers PixArtAlphaPipeline directory; our sampler reproduces the exported pipeline."""

import pytest
import torch
from diffusers import PixArtAlphaPipeline

from models.export import export_pipeline
from models.generate import generate_latents
from models.pixart import PixArt, PixArtMS
from models.pixart_checkpoint import load_pixart
from models.text_encoder import T5TextEncoder

PROMPTS = ["a red circle above a blue square", "a green triangle"]
TINY = dict(depth=2, hidden_size=48, num_heads=3, patch_size=2, caption_channels=32)


def gentle_random(model, seed=0):
    """Random weights of unit gain so that 20 guided steps stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 * p[0].numel() ** -0.5 if p.ndim > 1 else 0.02))
    return model.eval()


def pipeline_latents(pipe, height, width, seed=0, steps=20):
    return pipe(
        PROMPTS,
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=4.5,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
    ).images


@pytest.mark.parametrize(
    ("multi_scale", "prediction_type"), [(False, "epsilon"), (True, "epsilon"), (False, "v_prediction")]
)
def test_exported_pipeline_loads_and_matches_our_sampler(tiny, tmp_path, multi_scale, prediction_type):
    # diffusers' pipeline feeds micro-conditions only to sample_size 128 (1024 px) models
    cls, size = (PixArtMS, 128) if multi_scale else (PixArt, 8)
    model = gentle_random(cls(input_size=size, prediction_type=prediction_type, **TINY))
    out = export_pipeline(model, tmp_path / "pipe", text_encoder=tiny.t5_dir, vae=tiny.vae_dir)
    assert (out / "model_index.json").is_file() and not (tmp_path / "pipe.partial").exists()
    assert load_pixart(out).prediction_type == prediction_type  # read back from the scheduler

    pipe = PixArtAlphaPipeline.from_pretrained(out)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
    assert pipe.scheduler.config.prediction_type == prediction_type
    hw = (8, 12) if multi_scale else (8, 8)  # latents; the tiny VAE downsamples by 8
    theirs = pipeline_latents(pipe, hw[0] * 8, hw[1] * 8)
    encoder = T5TextEncoder.from_pretrained(tiny.t5_dir)
    ours = generate_latents(
        model, encoder, PROMPTS, latent_hw=hw, negative="empty", generator=torch.Generator().manual_seed(0)
    )
    assert ours.shape == theirs.shape == (2, 4, *hw)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    images = pipe(PROMPTS[:1], num_inference_steps=2, height=64, width=64, use_resolution_binning=False,
                  clean_caption=False, generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images[0].size == (64, 64)


def test_export_refuses_what_the_pipeline_cannot_run(tiny, tmp_path):
    model = PixArt(input_size=8, **{**TINY, "caption_channels": 64})
    with pytest.raises(ValueError, match="caption_channels=64 does not match the text encoder's d_model=32"):
        export_pipeline(model, tmp_path / "pipe", text_encoder=tiny.t5_dir, vae=tiny.vae_dir)
    with pytest.raises(ValueError, match="only when sample_size == 128"):
        export_pipeline(PixArtMS(input_size=8, **TINY), tmp_path / "pipe", text_encoder=tiny.t5_dir, vae=tiny.vae_dir)
    assert not (tmp_path / "pipe").exists()


def test_generation_with_the_learned_null_caption_is_deterministic(tiny):
    model = gentle_random(PixArt(input_size=8, **TINY))
    encoder = T5TextEncoder.from_pretrained(tiny.t5_dir)
    a = generate_latents(model, encoder, PROMPTS, steps=5, generator=torch.Generator().manual_seed(3))
    b = generate_latents(model, encoder, PROMPTS, steps=5, generator=torch.Generator().manual_seed(3))
    c = generate_latents(model, encoder, PROMPTS, steps=5, negative="empty", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)  # the null caption is not T5("")
    for sampler in ("ddim", "iddpm"):
        x = generate_latents(model, encoder, PROMPTS, sampler=sampler, steps=5, generator=torch.Generator())
        assert torch.isfinite(x).all()
