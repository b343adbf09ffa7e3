"""The pixel codec and feature extraction: exact round trips, T5 features restored, reuse and crash safety."""

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.pixart import build_pixart
from models.pixel_codec import PixelCodec, build_latent_codec
from models.text_encoder import MAX_LENGTH
from models.vae import VAE
from storage.artifacts import ArtifactStore
from storage.buckets import bucket_size, nearest_bucket
from storage.features import extract_features, extract_shard, load_image
from storage.loader import LoaderConfig, build_loader
from storage.shards import iter_shard, load_npy

BASE = 64  # px: the CPU demo's resolution
SIZES = [(40, 80), (64, 64), (90, 45), (50, 100), (70, 72)]  # (h, w): buckets 0.5, 1.0, 2.0
CAPTIONS = ["a red circle above a blue square", "", "a photo of a small green dog in a park at sunset, 3 of them."]


def image_samples(n: int, start: int = 0):
    """Image-shard samples as ingest writes them: jpg, json (with the bucket), txt, and cls for every other one."""
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        h, w = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        key = f"img_{i:04d}"
        sample = {
            "__key__": key,
            "jpg": data,
            "json": {
                "key": key,
                "source": f"test:{i}",
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": w,
                "height": h,
                "aspect_ratio": h / w,
                "bucket": nearest_bucket(h, w),
                "meta": {},
            },
            "txt": CAPTIONS[i % len(CAPTIONS)],
        }
        if i % 2 == 0:
            sample["cls"] = i % 7
        yield sample


def write_image_artifact(root, shards: int, per_shard: int):
    """A complete ingest-like artifact of `shards` image shards."""
    art = ArtifactStore(str(root)).artifact("ingest", {"shards": shards, "per_shard": per_shard})
    for s in range(shards):
        art.write_shard(f"{s:06d}.tar", image_samples(per_shard, start=s * per_shard))
    art.finish({"written": shards * per_shard})
    return art


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_artifact(tmp_path_factory.mktemp("images"), shards=2, per_shard=5)


# ---------------------------------------------------------------------------------------------------
#                                     Pixel codec
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
def test_pixel_codec_is_exact(factor):
    levels = torch.randint(0, 256, (2, 3, 16, 24), generator=torch.Generator().manual_seed(0))
    images = levels / 127.5 - 1  # 8-bit images in [-1, 1], as extraction makes them
    codec = PixelCodec(factor=factor)
    mean, std = codec.encode(images)
    assert codec.latent_channels == 3 * factor**2 and codec.downsample_factor == factor
    assert mean.shape == (2, 3 * factor**2, 16 // factor, 24 // factor) and not std.any()
    assert torch.equal(codec.decode(codec.sample(mean, std)), images)
    # stored as float16, every 8-bit level survives
    stored = mean.half().float()
    assert torch.equal(((codec.decode(stored) + 1) * 127.5).round().long(), levels)
    # a power-of-two scaling factor keeps the round trip exact
    scaled = PixelCodec(factor=factor, scaling_factor=2.0)
    assert torch.equal(scaled.decode(scaled.sample(*scaled.encode(images))), images)
    with pytest.raises(ValueError, match="multiples of the pixel codec's factor"):
        codec.encode(torch.zeros(1, 3, 16 + 1, 24))


def test_build_latent_codec(tiny):
    assert isinstance(build_latent_codec("pixel", factor=2), PixelCodec)
    vae = build_latent_codec("vae", vae=tiny.vae_dir)
    assert isinstance(vae, VAE) and vae.downsample_factor == 8
    with pytest.raises(ValueError, match="expected 'vae' or 'pixel'"):
        build_latent_codec("jpeg")


# ---------------------------------------------------------------------------------------------------
#                                     Extraction
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vae", "pixel"])
def test_extracted_features_match_direct_encoding(tmp_path, images, t5, vae, kind):
    codec = vae if kind == "vae" else PixelCodec(factor=4)
    multiple = codec.downsample_factor * 2
    captions = {"img_0003": "a blue square to the left of a yellow star"}  # the captioning stage's, for one key
    out = ArtifactStore(str(tmp_path)).artifact("features", {"codec": kind})
    manifest = extract_features(images, out, t5, codec, captions=captions, base_resolution=BASE, batch_size=2)
    assert manifest["summary"]["samples"] == 10 and manifest["summary"]["codec"] == kind
    raw = {s["__key__"]: s for info in out.shards() for s in iter_shard(out.shard_url(info.name), info)}
    originals = {s["__key__"]: s for info in images.shards() for s in iter_shard(images.shard_url(info.name), info)}
    assert raw.keys() == originals.keys()

    batches = list(build_loader(out, LoaderConfig(batch_size=3, num_workers=0, epochs=1)))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(originals)
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            meta, original = json.loads(raw[key]["json"]), json.loads(originals[key]["json"])
            caption = captions.get(key, originals[key]["txt"].decode())
            assert meta["caption"] == caption

            # T5: the padded features and mask the encoder gives, from the valid tokens alone
            direct, direct_mask = t5.encode([caption])  # (1, 120, C), (1, 120)
            k = int(direct_mask.sum())
            assert meta["t5_tokens"] == k and load_npy(raw[key]["t5.npy"]).shape == (k, t5.d_model)
            assert batch["y"].shape[1:] == (MAX_LENGTH, t5.d_model)
            assert torch.equal(batch["mask"][i], direct_mask[0])
            torch.testing.assert_close(batch["y"][i, :k], direct[0, :k], rtol=1e-3, atol=1e-3)  # float16 storage
            assert not batch["y"][i, k:].any()  # padding: masked out by cross-attention, stored as nothing

            # latents: the bucket's shape; the stored mean is the codec's own encoding of the crop
            height, width = bucket_size(original["bucket"], BASE, multiple)
            f = codec.downsample_factor
            assert (meta["height"], meta["width"]) == (height, width) and batch["bucket"] == original["bucket"]
            assert batch["x"].shape[1:] == (codec.latent_channels, height // f, width // f)
            crop = load_image(originals[key]["jpg"], height, width)[None]  # (1, 3, H, W)
            mean, _ = codec.encode(crop)
            stored = torch.from_numpy(load_npy(raw[key]["latent.npy"]).astype(np.float32))
            assert stored.shape[0] == (1 if kind == "pixel" else 2) * codec.latent_channels
            torch.testing.assert_close(stored[: codec.latent_channels], mean[0], rtol=1e-3, atol=1e-3)
            if kind == "pixel":  # exact: the crop's 8-bit pixels come back
                decoded = codec.decode(batch["x"][i : i + 1])
                assert torch.equal(((decoded + 1) * 127.5).round(), ((crop + 1) * 127.5).round())

            # labels and PixArtMS micro-conditions
            assert batch["cls"][i] == (int(originals[key]["cls"]) if "cls" in originals[key] else -1)
            assert batch["img_hw"][i].tolist() == [original["height"], original["width"]]
            assert batch["aspect_ratio"][i].item() == float(original["bucket"])


def test_extraction_is_reused_not_redone(tmp_path, images, t5):
    codec = PixelCodec(factor=4)
    out = ArtifactStore(str(tmp_path)).artifact("features", {"codec": "pixel"})
    info = images.shards()[0]
    args = (images.shard_url(info.name), info, out, info.name, t5, codec)
    first = extract_shard(*args, base_resolution=BASE)
    path = tmp_path / out.id / "shards" / info.name
    mtime = path.stat().st_mtime_ns
    assert extract_shard(*args, base_resolution=BASE) == first
    assert path.stat().st_mtime_ns == mtime  # not rewritten


def test_interrupted_extraction_leaves_no_shard(tmp_path, images, t5):
    class DiesOnSecondBatch:
        def __init__(self, encoder):
            self.encoder, self.calls = encoder, 0

        def encode(self, prompts):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("worker died")
            return self.encoder.encode(prompts)

    codec = PixelCodec(factor=4)
    out = ArtifactStore(str(tmp_path)).artifact("features", {"codec": "pixel"})
    info = images.shards()[0]
    with pytest.raises(RuntimeError, match="worker died"):
        extract_shard(
            images.shard_url(info.name),
            info,
            out,
            info.name,
            DiesOnSecondBatch(t5),
            codec,
            base_resolution=BASE,
            batch_size=2,
        )
    assert not out.shard_done(info.name)
    assert list((tmp_path / out.id / "shards").iterdir()) == []  # no shard, no temporary file, no record
    done = extract_shard(images.shard_url(info.name), info, out, info.name, t5, codec, base_resolution=BASE)
    assert out.shard_done(info.name) and done.count == info.count


def test_restored_captions_condition_pixart_like_the_encoder_output(tmp_path, images, t5):
    """T5 writes outputs at padded positions too; storing valid tokens only changes nothing the model sees."""
    out = ArtifactStore(str(tmp_path)).artifact("features", {"codec": "pixel"})
    extract_features(images, out, t5, PixelCodec(factor=4), base_resolution=BASE, progress=False)
    batch = next(iter(build_loader(out, LoaderConfig(batch_size=2, num_workers=0, epochs=1))))
    raw = {s["__key__"]: s for info in out.shards() for s in iter_shard(out.shard_url(info.name), info)}
    captions = [json.loads(raw[key]["json"])["caption"] for key in batch["keys"]]
    direct, mask = t5.encode(captions)  # (2, 120, C), (2, 120)
    assert (direct * (1 - mask[..., None])).abs().max() > 0  # padding is not zero in the encoder's output

    torch.manual_seed(0)
    model = build_pixart("PixArt-T/2", input_size=8, caption_channels=t5.d_model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)  # the zero-initialised cross-attention would hide any difference
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
        torch.testing.assert_close(
            model(x, t, batch["y"], batch["mask"]), model(x, t, direct, mask), rtol=1e-3, atol=1e-3
        )
