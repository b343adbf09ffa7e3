"""FID and CLIP score through torchmetrics, with feature extractors named by a local path or a hub id.

- FID: torchmetrics' `FrechetInceptionDistance` on the 2048-d pool features of torch-fidelity's InceptionV3
  (the TF-ported network every published FID uses, PixArt-alpha's COCO FID-30K included). Its weights file
  (`pt_inception-2015-12-05-6726825d.pth`) comes from `fid_weights` or torch hub's cache. Any other
  `nn.Module` mapping uint8 images (N, 3, H, W) to features (N, D) can stand in (`feature=`).
- CLIP score: torchmetrics' `CLIPScore` (100 * cosine of CLIP image and caption embeddings, floored at 0) with a
  `CLIPModel` + `CLIPProcessor` loaded by transformers' `from_pretrained` from `clip_model`, a hub id or a
  directory written by `save_pretrained`.

Nothing is downloaded unless `allow_download` is set: a metric whose weights are neither local nor cached
comes back as `MetricUnavailable` with the reason, and is skipped, never estimated some other way.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.text_encoder import resolve_pretrained

# torchmetrics and transformers' model code take seconds to import: they are loaded on use (every config imports
# this module, for MetricsConfig).
if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3 (TF FID weights)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default


class MetricsConfig(BaseModel):
    """Which distribution metrics to compute, and where their feature extractors' weights are."""

    model_config = ConfigDict(extra="forbid")

    fid: bool = Field(True, description="Compute FID between generated images and renders of the same prompts.")
    fid_weights: str | None = Field(
        None,
        description=f"Local file with torch-fidelity's InceptionV3 weights ({FID_WEIGHTS_FILE}); None: torch hub's "
        "cache (downloaded there only if allow_download).",
    )
    clip_score: bool = Field(True, description="Compute the CLIP score of generated images against their prompts.")
    clip_model: str = Field(
        DEFAULT_CLIP, description="CLIPModel + CLIPProcessor: a hub id or a directory written by save_pretrained."
    )
    allow_download: bool = Field(
        False, description="Fetch missing weights from the network; off: a missing weight is a MetricUnavailable."
    )


@dataclass(frozen=True)
class MetricResult:
    """A computed metric. details: what it was computed with (feature extractor, weights, image counts)."""

    name: str
    value: float
    details: dict = field(default_factory=dict)
    available: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MetricUnavailable:
    """A metric that was skipped, and why (missing weights, missing package): never a made-up value."""

    name: str
    reason: str
    available: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8 in [0, 255], what both metrics' extractors take."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------------------------


def _fid_weights(config: MetricsConfig) -> Path | None:
    """The InceptionV3 weights file to load, or None to let torch-fidelity download it (only if allowed).

    Raises FileNotFoundError with what to configure when there is none.
    """
    if config.fid_weights is not None:
        path = Path(config.fid_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"fid_weights={config.fid_weights!r} is not a file; expected torch-fidelity's {FID_WEIGHTS_FILE}"
            )
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if config.allow_download:
        return None
    raise FileNotFoundError(
        f"no FID InceptionV3 weights: fid_weights is not set and {cached} does not exist (downloads are off); "
        f"set fid_weights to a local copy of {FID_WEIGHTS_FILE} or allow_download=True"
    )


def fid(
    real: torch.Tensor,
    fake: torch.Tensor,
    config: MetricsConfig | None = None,
    feature: nn.Module | None = None,
    batch_size: int = 64,
) -> MetricResult | MetricUnavailable:
    """FID between two image sets (N, 3, H, W) in [-1, 1]; lower is better.

    feature: an extractor of uint8 images (N, 3, H, W) -> (N, D) used instead of the InceptionV3 of `config`.
    """
    config = config or MetricsConfig()
    if len(real) < 2 or len(fake) < 2:
        return MetricUnavailable("fid", f"FID needs at least 2 images per set, got {len(real)} real, {len(fake)} fake")
    # 1. The feature extractor
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is not None:
        metric, extractor = FrechetInceptionDistance(feature=feature), type(feature).__name__
    else:
        try:
            weights = _fid_weights(config)
        except FileNotFoundError as e:
            return MetricUnavailable("fid", str(e))
        if importlib.util.find_spec("torch_fidelity") is None:
            return MetricUnavailable(
                "fid", "torch-fidelity is not installed (pip install torch-fidelity): it provides FID's InceptionV3"
            )
        try:
            path = None if weights is None else str(weights)  # None: torch-fidelity downloads them
            metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path)
        except Exception as e:  # a failed download or a corrupt file: say which, skip the metric
            return MetricUnavailable("fid", f"could not load FID InceptionV3 ({weights or 'download'}): {e}")
        extractor = f"InceptionV3 pool3 2048-d ({weights or 'downloaded'})"
    # 2. Features of both sets, in batches
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch_size):
                metric.update(to_uint8(images[start : start + batch_size]), real=is_real)
        value = float(metric.compute())
    return MetricResult("fid", value, {"feature_extractor": extractor, "num_real": len(real), "num_fake": len(fake)})


# --------------------------------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------------------------------


class _TensorFeatures(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as tensors.

    transformers 5 returns an output object there, which torchmetrics 1.9's CLIPScore takes for a tensor
    (Lightning-AI/torchmetrics#3407, fixed after 1.9.0); with either version this passes tensors through.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(id_or_dir: str | os.PathLike, allow_download: bool = False) -> tuple[CLIPModel, CLIPProcessor]:
    """(CLIPModel, CLIPProcessor) from a directory written by save_pretrained or a hub id.

    A hub id must be in the local Hugging Face cache unless allow_download; else FileNotFoundError says so.
    """
    from huggingface_hub import try_to_load_from_cache
    from transformers import CLIPModel, CLIPProcessor

    name, _ = resolve_pretrained(id_or_dir, "clip", "CLIP model")
    if (
        not Path(name).is_dir()
        and not allow_download
        and not isinstance(try_to_load_from_cache(name, "config.json"), str)
    ):
        raise FileNotFoundError(
            f"CLIP model {name!r} is not in the local Hugging Face cache and downloads are off; pass a directory "
            "written by save_pretrained, or allow_download=True"
        )
    model = CLIPModel.from_pretrained(name).eval().requires_grad_(False)
    return model, CLIPProcessor.from_pretrained(name)


def clip_score(
    images: torch.Tensor,
    prompts: list[str],
    config: MetricsConfig | None = None,
    batch_size: int = 64,
) -> MetricResult | MetricUnavailable:
    """Mean CLIP score (0-100, higher is better) of images (N, 3, H, W) in [-1, 1] against their prompts."""
    config = config or MetricsConfig()
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts; expected one prompt per image")
    try:
        model, processor = load_clip(config.clip_model, config.allow_download)
    except Exception as e:  # missing directory, not cached, failed download: skip with the reason
        return MetricUnavailable("clip_score", f"could not load CLIP model {config.clip_model!r}: {e}")
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = to_uint8(images[start : start + batch_size])
            metric.update(list(batch), prompts[start : start + batch_size])
        value = float(metric.compute())
    return MetricResult("clip_score", value, {"model": config.clip_model, "num_images": len(images)})


def compute_metrics(
    real: torch.Tensor, fake: torch.Tensor, prompts: list[str], config: MetricsConfig
) -> dict[str, MetricResult | MetricUnavailable]:
    """The metrics `config` turns on: FID(real, fake) and the CLIP score of `fake` against `prompts`."""
    out: dict[str, MetricResult | MetricUnavailable] = {}
    if config.fid:
        out["fid"] = fid(real, fake, config)
    if config.clip_score:
        out["clip_score"] = clip_score(fake, prompts, config)
    return out
