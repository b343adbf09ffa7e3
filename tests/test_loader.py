"""The training loader: one bucket per batch, seeded order, exact resume, DDP x worker split, damaged shards."""

import json
import shutil
from itertools import islice

import pytest
import torch
from test_features import write_image_artifact

from models.text_encoder import T5TextEncoder
from models.vae import VAE
from storage.artifacts import Artifact, ArtifactStore
from storage.features import extract_features
from storage.loader import LoaderConfig, build_loader, feature_shards
from storage.shards import ShardError, iter_shard

BATCH = 4


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny):
    """A complete feature artifact (tiny T5, tiny VAE: mean and std stored) of 8 shards x 6 samples."""
    root = tmp_path_factory.mktemp("store")
    images = write_image_artifact(root, shards=8, per_shard=6)
    t5, vae = T5TextEncoder.from_pretrained(tiny.t5_dir), VAE.from_pretrained(tiny.vae_dir)
    out = ArtifactStore(str(root)).artifact("features", {"codec": "vae"}, upstream=[images.id])
    extract_features(images, out, t5, vae, base_resolution=64, batch_size=BATCH, progress=False)
    return out


@pytest.fixture(scope="module")
def buckets(features):
    """{key: bucket} of every sample."""
    return {
        s["__key__"]: json.loads(s["json"])["bucket"]
        for info in features.shards()
        for s in iter_shard(features.shard_url(info.name), info)
    }


def config(**overrides):
    return LoaderConfig(**{"batch_size": BATCH, "shuffle_buffer": 8, "num_workers": 2, "epochs": 1, **overrides})


def keys(batches):
    return [b["keys"] for b in batches]


def test_batches_hold_one_bucket_with_documented_shapes(features, buckets):
    batches = list(build_loader(features, config(num_workers=0)))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(buckets)  # every sample once
    for b in batches:
        n = len(b["keys"])
        assert 1 <= n <= BATCH and {buckets[k] for k in b["keys"]} == {b["bucket"]}
        assert b["x"].shape[:2] == (n, 4) and b["x"].dtype == torch.float32
        assert b["y"].shape == (n, 120, 32) and b["y"].dtype == torch.float32
        assert b["mask"].shape == (n, 120) and b["mask"].dtype == torch.int64
        assert b["cls"].shape == (n,) and b["cls"].dtype == torch.int64
        assert b["img_hw"].shape == (n, 2) and b["aspect_ratio"].shape == (n, 1)
        assert (b["aspect_ratio"] == float(b["bucket"])).all()
    assert sum(len(b["keys"]) == BATCH for b in batches) >= len(batches) // 2  # mostly full batches


def test_order_is_set_by_the_seed(features):
    first, again = list(build_loader(features, config())), list(build_loader(features, config()))
    assert keys(first) == keys(again)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, again, strict=True))  # same latent noise
    assert keys(build_loader(features, config(seed=1))) != keys(first)


def test_latents_are_sampled_afresh_each_epoch(features):
    two = list(build_loader(features, config(epochs=2, num_workers=0)))
    latents = {}
    for b in two:
        for k, x in zip(b["keys"], b["x"], strict=True):
            latents.setdefault(k, []).append(x)
    assert all(len(xs) == 2 and not torch.equal(*xs) for xs in latents.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(features, workers):
    cfg = config(epochs=2, num_workers=workers)
    full = list(build_loader(features, cfg))
    per_epoch = len(full) // 2
    for taken in (3, per_epoch, per_epoch + 2):
        loader = build_loader(features, cfg)
        assert keys(islice(loader, taken)) == keys(full[:taken])
        state = loader.state_dict()
        rest = list(build_loader(features, cfg, state=json.loads(json.dumps(state))))  # as saved in a checkpoint
        assert keys(rest) == keys(full[taken:])
        same = (
            torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) for a, b in zip(rest, full[taken:], strict=True)
        )
        assert all(same)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_resume_after_a_worker_ran_out(features):
    shards, cfg = feature_shards(features)[:5], config(batch_size=1, num_workers=3)  # 2, 2 and 1 shards per worker
    loader = build_loader(shards, cfg)
    full, states = zip(*((batch, loader.state) for batch in loader), strict=True)
    assert states[-1].lane_batches == (12, 12, 6)  # batches each worker gave
    for taken in range(3 * 6, 3 * 6 + 5):  # the third worker has run out; the other two take turns
        loader = build_loader(shards, cfg)
        assert keys(islice(loader, taken)) == keys(full[:taken])
        assert keys(build_loader(shards, cfg, state=loader.state_dict())) == keys(full[taken:])


def test_ranks_and_workers_split_every_sample_exactly_once(features, buckets):
    seen = [[k for b in build_loader(features, config(), rank=r, world_size=2) for k in b["keys"]] for r in (0, 1)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(buckets)


def test_state_from_another_worker_count_is_refused(features):
    loader = build_loader(features, config())
    next(iter(loader))
    with pytest.raises(ValueError, match="resume with the num_workers"):
        build_loader(features, config(num_workers=3), state=loader.state_dict())


def test_damaged_shard_is_never_trained_on(features, tmp_path):
    shutil.copytree(features.url, tmp_path / features.id)
    copy = Artifact(str(tmp_path), features.id)
    victim = copy.shards()[5].name
    path = tmp_path / features.id / "shards" / victim
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{victim}.*will not be trained on"):
        list(build_loader(copy, config()))


def test_batch_split_gives_each_rank_its_slice_of_the_single_process_batches(features):
    """split="batches": 2 ranks together see exactly the global batches of one process (exact DDP runs)."""
    single = list(build_loader(features, config(batch_size=2 * BATCH, split="batches", num_workers=0)))
    ranks = [list(build_loader(features, config(split="batches", num_workers=0), rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) > 0  # ranks step in lockstep
    for whole, a, b in zip(single, *ranks, strict=True):
        assert whole["keys"] == a["keys"] + b["keys"] and a["bucket"] == b["bucket"] == whole["bucket"]
        torch.testing.assert_close(whole["x"], torch.cat([a["x"], b["x"]]))


def test_keep_keys_restricts_the_samples(features, buckets):
    chosen = sorted(buckets)[::3]
    seen = [k for b in build_loader(features, config(num_workers=0), keep_keys=chosen) for k in b["keys"]]
    assert sorted(seen) == chosen
