"""Compositional evaluation on held-out shapes prompts: images in, T2I-CompBench-style scores and a report out.

The image source is pluggable; one scorer judges them all:
- `generate_images`: the model under test (our PixArt, a T5 text encoder, a latent codec), sampled as PixArt-alpha
  samples (DPM-Solver++ 20 steps, cfg 4.5 by default);
- `render_images`: the shapes renderer drawing each prompt's scene, a perfect model (the judge's ceiling).

`evaluate_images` judges images against the scenes of their prompts (`models.judge`), scores each category with
a 95% Wilson interval, optionally adds FID / CLIP score (`models.metrics`), and writes the report (markdown, JSON,
one sample grid per category). `evaluate` is generate + evaluate_images.

Images are ordered prompt-major: image j of prompt i is at i * images_per_prompt + j. Generation draws the noise
of batch b from a generator seeded by (seed, b), so the same (seed, batch_size) gives the same images, and two
models evaluated with them start from the same noise.
"""

from __future__ import annotations

import json
import math
import random
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.generate import generate_latents
from models.judge import ATTRIBUTES, CATEGORY_ATTRIBUTES, Analysis, analyse, category_holds, judge, to_rgb_array
from models.metrics import MetricsConfig, compute_metrics
from models.pixart import PixArt
from models.pixel_codec import LatentCodec
from models.text_encoder import T5TextEncoder
from storage.sources.shapes import Scene, place, render

Prompt = tuple[str, str, Scene]  # (category, prompt, scene), as storage.sources.shapes.heldout_prompts returns them

# PixArt-alpha's published T2I-CompBench results: real prompts judged by BLIP-VQA / UniDet, so a reference for the
# shape of the results (spatial hardest, texture and colour easiest), not numbers the shapes benchmark reproduces.
PAPER_T2I_COMPBENCH: dict[str, float] = {
    "color": 0.6886,
    "shape": 0.5582,
    "texture": 0.7044,
    "spatial": 0.2082,
    "complex": 0.4117,
}

GRID_ROWS = 8  # prompts per category grid
GRID_COLUMNS = 8  # images per prompt shown
GRID_CELL = 96  # pixels per image in a grid (upscaled with nearest neighbours)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n (95% for the default z); (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"k={k}, n={n}: expected 0 <= k <= n")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends, where rounding could cross p
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass
class CategoryScore:
    """One category's result: the fraction of images right for it, with a 95% Wilson interval.

    Images of one prompt are not independent, so the interval is a little narrow when images_per_prompt > 1.
    attributes: the pass rate of each attribute on this category's images (the diagnosis of a failure).
    """

    category: str
    num_prompts: int
    num_images: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    attributes: dict[str, float]
    paper: float | None  # PixArt-alpha's T2I-CompBench figure for this category, for context


@dataclass
class ImageResult:
    """The judge's verdict on one image; detected: what it saw (size colour texture shape @ centre in pixels)."""

    index: int
    category: str
    prompt: str
    sample: int
    correct: bool
    verdict: dict[str, bool | None]
    detected: list[str]


@dataclass
class EvalReport:
    """Everything an evaluation found; plain data, so `to_dict()` is JSON (a Prefect artifact publishes it)."""

    categories: dict[str, CategoryScore]
    overall: float  # mean accuracy over categories
    num_images: int
    images_per_prompt: int
    settings: dict
    metrics: dict[str, dict] = field(default_factory=dict)  # MetricResult / MetricUnavailable as dicts
    results: list[ImageResult] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # what was written: "markdown", "json", "grid_<category>"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def markdown(self) -> str:
        """The report as markdown: categories, attributes, metrics, settings, grids."""
        lines = [
            "# Compositional evaluation (held-out shapes prompts)",
            "",
            f"{self.num_images} images, {self.images_per_prompt} per prompt; mean over categories: "
            f"**{self.overall:.3f}**.",
            "",
            "| category | prompts | images | correct | accuracy | 95% CI | PixArt-α, T2I-CompBench (paper) |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.categories.values():
            paper = "" if c.paper is None else f"{c.paper:.4f}"
            lines.append(
                f"| {c.category} | {c.num_prompts} | {c.num_images} | {c.correct} | {c.accuracy:.3f} | "
                f"[{c.ci_low:.3f}, {c.ci_high:.3f}] | {paper} |"
            )
        lines += ["", "Pass rate per attribute (diagnosis):", "", "| category | " + " | ".join(ATTRIBUTES) + " |"]
        lines.append("|---" * (len(ATTRIBUTES) + 1) + "|")
        for c in self.categories.values():
            cells = [f"{c.attributes[a]:.3f}" if a in c.attributes else "" for a in ATTRIBUTES]
            lines.append(f"| {c.category} | " + " | ".join(cells) + " |")
        if self.metrics:
            lines += ["", "## Distribution metrics", ""]
            for name, m in self.metrics.items():
                shown = (
                    f"{m['value']:.4f} ({_details(m['details'])})" if m["available"] else f"unavailable: {m['reason']}"
                )
                lines.append(f"- **{name}**: {shown}")
        lines += ["", "## Settings", "", *(f"- {k}: {v}" for k, v in self.settings.items())]
        grids = {k: v for k, v in self.files.items() if k.startswith("grid_")}
        if grids:
            lines += ["", "## Samples (green: right for its category, red: wrong)", ""]
            lines += [f"### {k.removeprefix('grid_')}\n\n![{k}]({Path(v).name})\n" for k, v in grids.items()]
        return "\n".join(lines) + "\n"


def _details(details: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in details.items())


def _describe(analysis: Analysis) -> list[str]:
    return [f"{o.size} {o.color} {o.texture} {o.shape} @ ({o.cx:.1f}, {o.cy:.1f})" for o in analysis.objects]


# --------------------------------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------------------------------


def _batch_generator(seed: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(random.Random(f"{seed}:{batch}").getrandbits(63))


@torch.no_grad()
def generate_images(
    model: PixArt,
    text_encoder: T5TextEncoder,
    codec: LatentCodec,
    prompts: list[str],
    images_per_prompt: int = 1,
    seed: int = 0,
    sampler: str = "dpm-solver",
    steps: int = 20,
    cfg_scale: float = 4.5,
    batch_size: int = 16,
    negative: Literal["null", "empty"] = "null",
    latent_hw: tuple[int, int] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images (len(prompts) * images_per_prompt, 3, H, W) in [-1, 1], prompt-major, decoded by `codec`.

    Sampled in eval mode (the model's mode is restored after); the noise of batch b comes from (seed, b).
    """
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt}, batch_size={batch_size}: expected both >= 1")
    texts = [p for p in prompts for _ in range(images_per_prompt)]
    h, w = latent_hw or (model.input_size, model.input_size)
    image_hw = (h * codec.downsample_factor, w * codec.downsample_factor)  # PixArtMS's micro-conditions
    images = []
    was_training = model.training
    model.eval()  # no caption dropout, no stochastic depth
    try:
        for b, start in enumerate(range(0, len(texts), batch_size)):
            latents = generate_latents(
                model,
                text_encoder,
                texts[start : start + batch_size],
                latent_hw=(h, w),
                image_hw=image_hw,
                sampler=sampler,
                steps=steps,
                cfg_scale=cfg_scale,
                negative=negative,
                generator=_batch_generator(seed, b),
                progress=progress,
                clip_x0=getattr(codec, "clip_range", None),
            )  # (B, C, h, w)
            images.append(codec.decode(latents).float().cpu())  # (B, 3, h * f, w * f)
    finally:
        model.train(was_training)
    return torch.cat(images)


def render_images(
    scenes: list[Scene], images_per_prompt: int = 1, height: int = 64, width: int = 64, seed: int = 0
) -> torch.Tensor:
    """The scenes drawn by the shapes renderer, each in `images_per_prompt` random layouts (a perfect model).

    Returns (len(scenes) * images_per_prompt, 3, height, width) in [-1, 1], prompt-major.
    """
    images = []
    for i, scene in enumerate(scenes):
        for j in range(images_per_prompt):
            images.append(_from_pixels(render(place(scene, random.Random(f"{seed}:{i}:{j}")), height, width)))
    return torch.stack(images)


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def evaluate_images(
    images: torch.Tensor | list,
    prompts: list[Prompt],
    images_per_prompt: int = 1,
    settings: dict | None = None,
    metrics: MetricsConfig | None = None,
    out_dir: str | Path | None = None,
) -> EvalReport:
    """Judge images against their prompts' scenes and score every category (see the module docstring).

    images: (N, 3, H, W) in [-1, 1] (or a list of what `models.judge.analyse` takes), N = len(prompts) *
    images_per_prompt, prompt-major. metrics: FID against renders of the same scenes, and CLIP score.
    out_dir: where report.md, report.json and grid_<category>.png are written (nothing is written without it).
    """
    # 1. Check inputs
    if len(images) != len(prompts) * images_per_prompt:
        raise ValueError(
            f"{len(images)} images for {len(prompts)} prompts x {images_per_prompt} images per prompt; "
            f"expected {len(prompts) * images_per_prompt}, prompt-major"
        )
    # 2. Judge every image
    results = []
    for index, image in enumerate(images):
        category, prompt, scene = prompts[index // images_per_prompt]
        analysis = analyse(image)
        verdict = judge(analysis, scene)
        results.append(
            ImageResult(
                index=index,
                category=category,
                prompt=prompt,
                sample=index % images_per_prompt,
                correct=category_holds(verdict, category),
                verdict=verdict.to_dict(),
                detected=_describe(analysis),
            )
        )
    # 3. Score each category, in the order of CATEGORY_ATTRIBUTES
    categories = {}
    for category in [c for c in CATEGORY_ATTRIBUTES if any(r.category == c for r in results)]:
        mine = [r for r in results if r.category == category]
        correct = sum(r.correct for r in mine)
        low, high = wilson_interval(correct, len(mine))
        attributes = {}
        for a in ATTRIBUTES:
            asked = [r.verdict[a] for r in mine if r.verdict[a] is not None]
            if asked:
                attributes[a] = sum(asked) / len(asked)
        categories[category] = CategoryScore(
            category=category,
            num_prompts=len({r.prompt for r in mine}),
            num_images=len(mine),
            correct=correct,
            accuracy=correct / len(mine),
            ci_low=low,
            ci_high=high,
            attributes=attributes,
            paper=PAPER_T2I_COMPBENCH.get(category),
        )
    report = EvalReport(
        categories=categories,
        overall=sum(c.accuracy for c in categories.values()) / max(len(categories), 1),
        num_images=len(results),
        images_per_prompt=images_per_prompt,
        settings=dict(settings or {}),
        results=results,
    )
    # 4. Distribution metrics: the same scenes rendered are the real distribution
    if metrics is not None:
        fake = _as_tensor(images)
        real = render_images([s for _, _, s in prompts], images_per_prompt, *fake.shape[-2:], seed=1)
        texts = [p for _, p, _ in prompts for _ in range(images_per_prompt)]
        report.metrics = {k: v.to_dict() for k, v in compute_metrics(real, fake, texts, metrics).items()}
    # 5. Write
    if out_dir is not None:
        write_report(report, images, out_dir)
    return report


def _as_tensor(images: torch.Tensor | list) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] of a tensor or a list of what `models.judge.analyse` takes."""
    return images if isinstance(images, torch.Tensor) else torch.stack([_from_pixels(im) for im in images])


def _from_pixels(image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] of anything `models.judge.analyse` takes."""
    return torch.from_numpy(to_rgb_array(image)).permute(2, 0, 1).float() / 127.5 - 1


def _pixels(image) -> np.ndarray:
    """(H, W, 3) uint8 of anything `models.judge.analyse` takes."""
    return to_rgb_array(image).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def sample_grid(images: torch.Tensor | list, report: EvalReport, category: str) -> Image.Image:
    """A grid of the category's first GRID_ROWS prompts (rows, labelled) x their images, framed green if right."""
    rows = [r for r in report.results if r.category == category and r.sample < GRID_COLUMNS]
    prompts = list(dict.fromkeys(r.prompt for r in rows))[:GRID_ROWS]
    columns = min(report.images_per_prompt, GRID_COLUMNS)
    label_width, pad = 260, 4
    cell = GRID_CELL + 2 * pad
    grid = Image.new("RGB", (label_width + columns * cell, len(prompts) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        draw.multiline_text((pad, row * cell + pad), textwrap.fill(prompt, 40), fill=(0, 0, 0))
        for r in (r for r in rows if r.prompt == prompt):
            x0, y0 = label_width + r.sample * cell, row * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(40, 170, 60) if r.correct else (210, 40, 40))
            tile = Image.fromarray(_pixels(images[r.index])).resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST)
            grid.paste(tile, (x0 + pad, y0 + pad))
    return grid


def write_report(report: EvalReport, images: torch.Tensor | list, out_dir: str | Path) -> EvalReport:
    """Write grid_<category>.png, report.json and report.md under out_dir; record their paths in report.files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for category in report.categories:
        path = out / f"grid_{category}.png"
        sample_grid(images, report, category).save(path)
        report.files[f"grid_{category}"] = str(path)
    report.files["json"], report.files["markdown"] = str(out / "report.json"), str(out / "report.md")
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.markdown())
    return report


# --------------------------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------------------------


def evaluate(
    model: PixArt,
    text_encoder: T5TextEncoder,
    codec: LatentCodec,
    prompts: list[Prompt],
    images_per_prompt: int = 4,
    seed: int = 0,
    sampler: str = "dpm-solver",
    steps: int = 20,
    cfg_scale: float = 4.5,
    batch_size: int = 16,
    negative: Literal["null", "empty"] = "null",
    latent_hw: tuple[int, int] | None = None,
    metrics: MetricsConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> EvalReport:
    """Generate images for the prompts (e.g. `heldout_prompts(config)`) with the model, judge and report them."""
    # 1. Generate
    images = generate_images(
        model,
        text_encoder,
        codec,
        [p for _, p, _ in prompts],
        images_per_prompt=images_per_prompt,
        seed=seed,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        batch_size=batch_size,
        negative=negative,
        latent_hw=latent_hw,
        progress=progress,
    )
    # 2. Judge, score, write
    settings = {
        "source": f"model ({type(model).__name__})",
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "negative": negative,
        "seed": seed,
        "batch_size": batch_size,
        "image_size": list(images.shape[-2:]),
    }
    return evaluate_images(images, prompts, images_per_prompt, settings=settings, metrics=metrics, out_dir=out_dir)
