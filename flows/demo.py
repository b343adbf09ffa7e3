"""The embedded demo: what exists of the pipeline, end to end, on tiny local components and the CPU.

1. build a tiny T5 (with a locally trained tokenizer) and a tiny VAE, saved and loaded by from_pretrained;
2. a tiny class-conditional DiT stands in for stage 1 and is re-parameterised into PixArt at t = 500;
3. the PixArt is checked against diffusers' PixArtTransformer2DModel after conversion;
4. it is exported as a diffusers PixArtAlphaPipeline directory;
5. the same prompts and seed are sampled with our DPM-Solver++ and with the exported diffusers pipeline,
   and the two results are compared and written as one PNG grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

PROMPTS = [
    "a red circle above a blue square",
    "a small green triangle on a white background",
    "a large yellow star to the left of a purple circle",
    "a blue square",
]


def to_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """(N, 3, H, W) images in [-1, 1] -> one PIL grid with `rows` rows."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    grid = torch.full((3, rows * h, cols * w), -1.0)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def run_demo(workdir: Path, seed: int = 0, console: Console | None = None) -> dict:
    from diffusers import PixArtAlphaPipeline

    from models.convert_pixart import pixart_to_diffusers
    from models.dit import DiT_models
    from models.export import export_pipeline
    from models.generate import generate_latents
    from models.pixart_checkpoint import load_pixart, save_pixart
    from models.reparam import dit_to_pixart
    from models.text_encoder import T5TextEncoder
    from models.tiny import build_tiny_components
    from models.vae import VAE

    console = console or Console(stderr=True)
    workdir = Path(workdir)
    torch.manual_seed(seed)

    # 1. Tiny components, through the production loaders
    console.rule("1. tiny components")
    parts = build_tiny_components(workdir / "components", seed=seed)
    encoder = T5TextEncoder.from_pretrained(parts.t5_dir)
    vae = VAE.from_pretrained(parts.vae_dir)
    console.print(f"T5 d_model={encoder.d_model}, VAE x{vae.downsample_factor} with {vae.latent_channels} channels")

    # 2. Stage-1 stand-in: a class-conditional DiT with random weights, re-parameterised into PixArt
    console.rule("2. DiT -> PixArt re-parameterisation")
    dit = DiT_models["DiT-T/2"](input_size=8, num_classes=10, in_channels=vae.latent_channels)
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    pixart, report = dit_to_pixart(dit.eval(), t=500, caption_channels=encoder.d_model)
    console.print(report.summary())
    ckpt = save_pixart(pixart, workdir / "checkpoints" / "pixart_from_dit.pth")
    pixart = load_pixart(ckpt).eval()
    x = torch.randn(2, vae.latent_channels, 8, 8)
    y, mask = encoder.encode(PROMPTS[:2])
    with torch.no_grad():
        gap_dit = pixart(x, torch.tensor([500, 500]), y, mask) - dit(
            x, torch.tensor([500, 500]), torch.tensor([10, 10])
        )

    # 3. Conversion to diffusers
    console.rule("3. diffusers conversion")
    with torch.no_grad():
        t = torch.tensor([10, 900])
        ours = pixart(x, t, y, mask)
        theirs = pixart_to_diffusers(pixart)(
            x,
            encoder_hidden_states=y,
            timestep=t,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    gap_diffusers = (ours - theirs).abs().max().item()

    # 4. Export and 5. sample both ways
    console.rule("4. export + 5. sampling: ours vs diffusers")
    out = export_pipeline(pixart, workdir / "export" / "pixart-demo", text_encoder=parts.t5_dir, vae=parts.vae_dir)
    gen = torch.Generator().manual_seed(seed)
    latents = generate_latents(pixart, encoder, PROMPTS, negative="empty", generator=gen, progress=True)
    pipe = PixArtAlphaPipeline.from_pretrained(out)
    px = 8 * vae.downsample_factor
    ref = pipe(PROMPTS, negative_prompt="", num_inference_steps=20, guidance_scale=4.5, height=px, width=px,
               generator=torch.Generator().manual_seed(seed), output_type="latent", use_resolution_binning=False,
               clean_caption=False).images  # fmt: skip
    gap_sampling = ((latents - ref).abs().max() / ref.abs().max()).item()  # relative: random weights blow up
    images = vae.decode(latents)
    grid_path = workdir / "samples" / "demo_grid.png"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    to_grid(torch.cat([images, vae.decode(ref)]), rows=2).save(grid_path)

    results = {
        "pixart_vs_dit_at_t500": gap_dit.abs().max().item(),
        "pixart_vs_diffusers_forward": gap_diffusers,
        "our_sampler_vs_diffusers_pipeline (relative)": gap_sampling,
        "checkpoint": str(ckpt),
        "export": str(out),
        "grid": str(grid_path),
    }
    table = Table(title="demo summary")
    table.add_column("check")
    table.add_column("max |difference| or path")
    for k, v in results.items():
        table.add_row(k, f"{v:.2e}" if isinstance(v, float) else v)
    console.print(table)
    return results
