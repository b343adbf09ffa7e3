"""The data plane end to end: shapes -> ingest -> LLaVA captions -> T5 + latent features, killed and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from models.captioner import LlavaCaptioner
from models.pixel_codec import PixelCodec
from models.text_encoder import T5TextEncoder
from models.vae import VAE
from storage.artifacts import ArtifactStore
from storage.captions import CaptionChoice, CaptionStore, CaptionVersion, caption_shard, caption_stats, select_captions
from storage.features import extract_features
from storage.ingest import ingest
from storage.loader import LoaderConfig, build_loader
from storage.sources.shapes import ShapesConfig, ShapesSource

ROOT = Path(__file__).resolve().parents[1]

EXTRACT = """
import sys
from models.pixel_codec import PixelCodec
from models.text_encoder import T5TextEncoder
from storage.artifacts import ArtifactStore
from storage.features import extract_features
root, images_id, features_id, t5_dir = sys.argv[1:]
store = ArtifactStore(root)
extract_features(store.get(images_id), store.get(features_id), T5TextEncoder.from_pretrained(t5_dir),
                 PixelCodec(factor=4), base_resolution=32, batch_size=4, progress=False)
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    store = ArtifactStore(str(tmp_path_factory.mktemp("store")))
    shapes = ShapesConfig(count=48, image_size=64, aspect_ratios=["1.0", "0.5", "2.0"])  # short side >= 32
    art = store.artifact("ingest", {"shapes": shapes.model_dump()})
    summary = ingest(ShapesSource(shapes), art, samples_per_shard=4, progress=False)
    assert summary.written == 48 and art.complete
    return store, art


def test_ingest_caption_extract_and_load(images, tiny):
    store, art = images
    first = art.shards()[0]
    samples = list(wds.WebDataset(art.shard_url(first.name), shardshuffle=False))  # the real library reads it
    assert {"jpg", "json", "txt", "cls"} <= set(samples[0]) and "." not in samples[0]["__key__"]

    # captions: a LLaVA version beside the exact sidecar captions
    captioner = LlavaCaptioner.from_pretrained(tiny.llava_dir)
    captions = CaptionStore(str(Path(store.root) / "captions"))
    version = CaptionVersion(**captioner.version_spec(generation={"max_new_tokens": 8}))
    captions.register(version)
    for info in art.shards()[:3]:
        caption_shard(art.shard_url(info.name), info, captioner, captions, version)
    stats = caption_stats(captions, version.id, art.shards()[:3])
    assert stats.count == 12 and stats.mean_tokens > 0
    chosen = select_captions(art.shard_url(first.name), first, CaptionChoice(source="sidecar"), captions)
    assert all(text.startswith("a ") for text in chosen.values())  # the exact shapes captions

    # features with the tiny VAE and the pixel codec; then the loader
    t5 = T5TextEncoder.from_pretrained(tiny.t5_dir)
    for name, codec in (("vae", VAE.from_pretrained(tiny.vae_dir)), ("pixel", PixelCodec(factor=4))):
        features = store.artifact("features", {"codec": name}, upstream=[art.id])
        manifest = extract_features(art, features, t5, codec, base_resolution=32, batch_size=8, progress=False)
        assert manifest["summary"]["samples"] == 48 and features.complete
        batch = next(iter(build_loader(features, LoaderConfig(batch_size=4, num_workers=0))))
        assert batch["x"].shape[0] <= 4 and batch["y"].shape[1:] == (120, 32)


@pytest.mark.slow
def test_killed_extraction_redoes_only_unfinished_shards(images, tiny):
    store, art = images
    features = store.artifact("features", {"codec": "pixel", "run": "killed"}, upstream=[art.id])
    shards = Path(features.url) / "shards"
    command = [sys.executable, "-c", EXTRACT, store.root, art.id, features.id, str(tiny.t5_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while len(list(shards.glob("*.json"))) < 2:
        assert proc.poll() is None and time.time() < deadline, "extraction ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("*.tar")}
    records = {p.stem for p in shards.glob("*.json")}
    assert 2 <= len(records) < len(art.shards()) and not features.complete
    finished = {name: ident for name, ident in done.items() if Path(name).stem in records}

    subprocess.run(command, cwd=ROOT, env=env, check=True)
    assert features.complete and features.verify() == {}
    manifest = json.loads((Path(features.url) / "manifest.json").read_text())
    assert manifest["summary"]["reused_shards"] == len(finished)
    for name, ident in finished.items():  # finished shards were not rewritten
        path = shards / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == ident, name
