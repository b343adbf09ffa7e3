"""Feature extraction: one image shard in, one feature shard out (T5 caption features + image latents).

Training never runs T5 or the VAE: both are run once here, and every epoch reads their outputs. Per sample,
a feature shard holds

    KEY.t5.npy      float16 (k, C_text): T5 features of the k valid tokens only (EOS included), k <= 120;
                    the loader restores the padded (120, C_text) tensor and the (120,) mask from k alone
                    (zeros where T5 wrote outputs for padding: cross-attention masks them out)
    KEY.latent.npy  float16, unscaled, by the codec's layout (also written in KEY.json as latent_layout):
                    "mean_std" (the VAE): mean and std concatenated on channels, (2C, h, w), as the reference
                    stores them, so training draws a fresh sample every epoch;
                    "mean" (the pixel codec): the mean alone, (C, h, w): its std is identically zero and its
                    mean is exact (float16 keeps all 256 levels of an 8-bit pixel apart)
    KEY.cls         the class label, where the image shard has one
    KEY.json        key, bucket, height, width (training crop, px), orig_height, orig_width (the image's size,
                    PixArtMS's img_hw condition as the reference uses it), latent_shape [C, h, w] (what the
                    model sees), latent_layout, codec ("vae" | "pixel"), scaling_factor, t5_tokens (k),
                    t5_length (120), caption (the text encoded), caption_source ("captions" | "txt")

Each image is resized (bicubic) to cover its aspect-ratio bucket at `base_resolution` and centre-cropped,
as the reference's multi-scale dataset does; bucket sides are multiples of the codec's downsample factor
times PixArt's patch size, so latents tile into patches. Images are encoded in batches of one bucket.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from models.pixel_codec import codec_kind
from storage.artifacts import Artifact
from storage.buckets import bucket_size
from storage.loader import batch_by_bucket
from storage.shards import ShardInfo, iter_shard

if TYPE_CHECKING:
    from models.pixel_codec import LatentCodec
    from models.text_encoder import T5TextEncoder

PATCH_SIZE = 2  # PixArt-XL/2: latents are cut into 2 x 2 patches, so their sides must be even


def default_multiple(codec: LatentCodec) -> int:
    """Bucket sides in pixels are multiples of this: one patch of latents (8 x 2 = 16 for the SD VAE)."""
    return codec.downsample_factor * PATCH_SIZE


def latent_layout(codec: LatentCodec) -> str:
    """The stored latent: "mean" for the exact pixel codec (its std is zero), else "mean_std" (module docstring)."""
    return "mean" if codec_kind(codec) == "pixel" else "mean_std"


def load_image(data: bytes, height: int, width: int) -> torch.Tensor:
    """Encoded image bytes -> (3, height, width) float32 in [-1, 1], resized to cover and centre-cropped.

    The reference's transform (InternalDataMS): bicubic resize so that the image covers the bucket with one
    side exact, then a centre crop of the other.
    """
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
    w0, h0 = img.size
    if height / h0 > width / w0:
        size = (max(width, int(w0 * height / h0)), height)  # PIL sizes are (w, h)
    else:
        size = (width, max(height, int(h0 * width / w0)))
    img = img.resize(size, Image.BICUBIC)
    left, top = round((size[0] - width) / 2), round((size[1] - height) / 2)
    img = img.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W) uint8
    return pixels.float() / 127.5 - 1


def to_float16(values: torch.Tensor, what: str, key: str) -> np.ndarray:
    """float16 numpy copy; a value beyond float16's range raises instead of being stored as inf."""
    out = values.detach().cpu().to(torch.float16).numpy()
    if not np.isfinite(out).all():
        raise ValueError(
            f"{what} of sample {key} do not fit float16 (max |value| {values.abs().max().item():.4g} > 65504)"
        )
    return out


def encode_batch(
    samples: list[dict],
    bucket: str,
    text_encoder: T5TextEncoder,
    codec: LatentCodec,
    captions: dict[str, str] | None,
    base_resolution: int,
    multiple: int,
) -> Iterator[dict]:
    """Image-shard samples of one bucket -> feature-shard samples (see the module docstring)."""
    # 1. Images -> latents
    height, width = bucket_size(bucket, base_resolution, multiple)
    keys = [s["__key__"] for s in samples]
    missing = [k for k, s in zip(keys, samples, strict=True) if "jpg" not in s]
    if missing:
        raise ValueError(f"image-shard samples {missing} have no jpg member")
    images = torch.stack([load_image(s["jpg"], height, width) for s in samples])  # (B, 3, H, W)
    mean, std = codec.encode(images)  # (B, C, h, w) each
    layout = latent_layout(codec)
    latents = mean if layout == "mean" else torch.cat([mean, std], dim=1)  # (B, C or 2C, h, w)

    # 2. Captions -> T5 features of the valid tokens
    texts, sources = [], []
    for key, sample in zip(keys, samples, strict=True):
        if captions is not None and key in captions:
            texts.append(captions[key])
            sources.append("captions")
        else:
            texts.append(sample.get("txt", b"").decode())
            sources.append("txt")
    features, mask = text_encoder.encode(texts)  # (B, L, C_text), (B, L)
    lengths = mask.sum(dim=1)  # (B,)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask.bool(), positions[None] < lengths[:, None]):
        raise ValueError("the text encoder's mask is not a prefix of ones: valid tokens cannot be stored alone")

    # 3. One feature sample per image
    for i, (key, sample) in enumerate(zip(keys, samples, strict=True)):
        meta = json.loads(sample["json"])
        k = int(lengths[i])
        out = {
            "__key__": key,
            "t5.npy": to_float16(features[i, :k], "T5 features", key),  # (k, C_text)
            "latent.npy": to_float16(latents[i], "latents", key),  # (C or 2C, h, w)
            "json": {
                "key": key,
                "bucket": bucket,
                "height": height,
                "width": width,
                "orig_height": meta["height"],
                "orig_width": meta["width"],
                "latent_shape": list(mean.shape[1:]),
                "latent_layout": layout,
                "codec": codec_kind(codec),
                "scaling_factor": codec.scaling_factor,
                "t5_tokens": k,
                "t5_length": mask.shape[1],
                "caption": texts[i],
                "caption_source": sources[i],
            },
        }
        if "cls" in sample:
            out["cls"] = int(sample["cls"])
        yield out


def extract_shard(
    image_shard_url: str,
    image_shard_info: ShardInfo,
    out_artifact: Artifact,
    name: str,
    text_encoder: T5TextEncoder,
    codec: LatentCodec,
    *,
    captions: dict[str, str] | None = None,
    base_resolution: int = 256,
    batch_size: int = 32,
    multiple: int | None = None,
) -> ShardInfo:
    """Write feature shard `name` of `out_artifact` from one image shard; reuse it if already finished.

    captions: {key: caption} from the captioning stage; a key absent from it keeps the image shard's txt.
    multiple: bucket sides in pixels are multiples of it; default the codec's downsample factor x 2.
    The image shard is checked against `image_shard_info` before it is read; the feature shard is written
    under a temporary name, so an interruption leaves nothing that looks finished.
    """
    # 1. Reuse a finished shard
    if out_artifact.shard_done(name):
        return out_artifact.shard_record(name)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected at least 1")
    multiple = multiple or default_multiple(codec)

    # 2. Stream: encode a bucket's samples as soon as they fill a batch, the partial batches at the end
    def feature_samples() -> Iterator[dict]:
        for bucket, group in batch_by_bucket(iter_shard(image_shard_url, image_shard_info), batch_size):
            yield from encode_batch(group, bucket, text_encoder, codec, captions, base_resolution, multiple)

    return out_artifact.write_shard(name, feature_samples())


def extract_features(
    image_artifact: Artifact,
    out_artifact: Artifact,
    text_encoder: T5TextEncoder,
    codec: LatentCodec,
    *,
    captions: dict[str, str] | None = None,
    base_resolution: int = 256,
    batch_size: int = 32,
    multiple: int | None = None,
    progress: bool = True,
) -> dict:
    """Extract every shard of a complete image artifact (finished ones are reused), then finish the output.

    Feature shards keep the image shards' names. Returns the manifest, whose summary records what the
    loader and the trainer must agree with (codec, channels, scaling factor, T5 width and length).
    """
    multiple = multiple or default_multiple(codec)
    records, reused = [], 0
    for info in tqdm(image_artifact.shards(), desc="extract features", unit="shard", disable=not progress):
        if out_artifact.shard_done(info.name):
            records.append(out_artifact.shard_record(info.name))
            reused += 1
            continue
        records.append(
            extract_shard(
                image_artifact.shard_url(info.name),
                info,
                out_artifact,
                info.name,
                text_encoder,
                codec,
                captions=captions,
                base_resolution=base_resolution,
                batch_size=batch_size,
                multiple=multiple,
            )
        )
    summary = {
        "samples": sum(r.count for r in records),
        "shards": len(records),
        "reused_shards": reused,
        "codec": codec_kind(codec),
        "latent_layout": latent_layout(codec),
        "latent_channels": codec.latent_channels,
        "downsample_factor": codec.downsample_factor,
        "scaling_factor": codec.scaling_factor,
        "base_resolution": base_resolution,
        "multiple": multiple,
        "t5_channels": text_encoder.d_model,
        "t5_length": text_encoder.max_length,
    }
    return out_artifact.finish(summary, shards=records)
