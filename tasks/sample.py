"""Sampling: prompts -> images with our DPM-Solver++ and the codec, and the held-out sample grid of a run.

<samples>/grid.png          the samples in prompt order, as many rows as prompt categories
<samples>/images/NNN.png    each sample alone
<samples>/prompts.json      [{index, category, prompt, image, scene}] (scene: what the prompt asks for,
                            where the shapes source produced it, for evaluation)
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.generate import generate_latents
from models.grid import to_grid
from storage.artifacts import ArtifactStore
from storage.fs import atomic_write, write_json
from tasks.components import device
from tasks.config import SampleConfig
from tasks.export import load_exported


@torch.no_grad()
def generate_images(
    model,
    encoder,
    codec,
    prompts: list[str],
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = 20,
    cfg_scale: float = 4.5,
    seed: int = 0,
    negative: str = "null",
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for `prompts`; H, W default to the model's trained size in pixels."""
    f = codec.downsample_factor
    height, width = height or model.input_size * f, width or model.input_size * f
    if height % f or width % f:
        raise ValueError(f"height={height}, width={width}: both must be multiples of the codec's factor {f}")
    latents = generate_latents(
        model,
        encoder,
        prompts,
        latent_hw=(height // f, width // f),
        image_hw=(height, width),
        steps=steps,
        cfg_scale=cfg_scale,
        negative=negative,
        generator=torch.Generator().manual_seed(seed),
        clip_x0=getattr(codec, "clip_range", None),
    )  # (N, C, h, w)
    return codec.decode(latents.to(codec.device))  # (N, 3, H, W)


def to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_png(url: str, image: Image.Image) -> None:
    with atomic_write(url) as out:
        out.write(to_png(image))


@task(name="sample-grid", cache_policy=NO_CACHE)
def sample_grid(model_dir: str, prompts: list[dict], config: SampleConfig, root: str, samples_id: str) -> dict:
    """Sample every prompt ({category, prompt, scene}) from an exported model, write the grid and finish."""
    artifact = ArtifactStore(root).get(samples_id)
    model, encoder, codec, negative = load_exported(model_dir, device=device())
    images = generate_images(
        model,
        encoder,
        codec,
        [p["prompt"] for p in prompts],
        steps=config.steps,
        cfg_scale=config.cfg_scale,
        seed=config.seed,
        negative=negative,
    ).cpu()
    rows = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        name = f"images/{i:03d}.png"
        write_png(artifact.path(name), to_grid(image[None], rows=1, pad=0))
        rows.append({"index": i, **prompt, "image": name})
    categories = list(dict.fromkeys(p.get("category", "") for p in prompts))
    write_png(artifact.path("grid.png"), to_grid(images, rows=len(categories)))
    write_json(artifact.path("prompts.json"), rows)
    summary = {"grid": artifact.path("grid.png"), "images": len(rows), "categories": categories, "model": model_dir}
    artifact.finish(summary)
    return summary
