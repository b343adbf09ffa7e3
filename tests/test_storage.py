"""Shards, tables and the artifact store: atomic writes, checksums, reuse, gc; local and fsspec URLs."""

import json

import numpy as np
import pytest
import webdataset as wds

from storage.artifacts import ArtifactStore, artifact_id
from storage.shards import ShardError, iter_shard, load_npy, npy_bytes, verify_shard, write_shard
from storage.tables import read_rows, write_table


def samples(n=3, start=0):
    for i in range(start, start + n):
        yield {
            "__key__": f"sample_{i:04d}",
            "jpg": b"\xff\xd8fake-jpeg" + bytes([i]),
            "json": {"i": i, "source": "test"},
            "txt": f"a red circle number {i}",
            "cls": i % 3,
            "latent.npy": np.full((2, 2), i, dtype=np.float16),
        }


def test_shard_round_trip_through_webdataset(tmp_path):
    url = str(tmp_path / "000000.tar")
    info = write_shard(url, samples())
    assert info.count == 3 and info.bytes == (tmp_path / "000000.tar").stat().st_size
    ours = list(iter_shard(url, info))
    assert [s["__key__"] for s in ours] == ["sample_0000", "sample_0001", "sample_0002"]
    assert json.loads(ours[1]["json"]) == {"i": 1, "source": "test"}
    assert ours[2]["txt"].decode() == "a red circle number 2" and ours[2]["cls"] == b"2"
    assert load_npy(ours[1]["latent.npy"]).dtype == np.float16
    # the webdataset library itself reads the same tar
    theirs = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s["__key__"] for s in ours]
    assert theirs[0]["latent.npy"] == ours[0]["latent.npy"]


def test_same_content_same_bytes(tmp_path):
    a = write_shard(str(tmp_path / "a.tar"), samples())
    b = write_shard(str(tmp_path / "b.tar"), samples())
    assert a.sha256 == b.sha256 and a.bytes == b.bytes


def test_bad_keys_and_crashes_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="no dots"):
        write_shard(str(tmp_path / "x.tar"), [{"__key__": "a.b", "txt": "x"}])

    def crashing():
        yield from samples(2)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        write_shard(str(tmp_path / "y.tar"), crashing())
    assert list(tmp_path.iterdir()) == []  # no shard, no temporary file


def test_truncated_or_altered_shard_is_detected(tmp_path):
    url = str(tmp_path / "s.tar")
    info = write_shard(url, samples())
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[:-700])
    assert "truncated" in verify_shard(url, info)
    with pytest.raises(ShardError):
        list(iter_shard(url, info))
    (tmp_path / "s.tar").write_bytes(data[:100] + b"X" + data[101:])
    assert "altered" in verify_shard(url, info)


def test_npy_helpers_are_exact():
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float16)
    np.testing.assert_array_equal(load_npy(npy_bytes(a)), a)


@pytest.mark.parametrize("root", ["local", "memory://store"])
def test_artifact_store(tmp_path, root):
    root = str(tmp_path / "store") if root == "local" else root
    store = ArtifactStore(root)
    ingest = store.artifact("ingest", {"source": "shapes", "count": 10})
    assert store.artifact("ingest", {"count": 10, "source": "shapes"}).id == ingest.id  # key order irrelevant
    assert artifact_id("ingest", {"source": "shapes", "count": 11}) != ingest.id
    assert not ingest.complete

    ingest.write_shard("000000.tar", samples(2))
    ingest.write_shard("000001.tar", samples(2, start=2))
    assert ingest.shard_done("000000.tar") and not ingest.shard_done("000002.tar")
    manifest = ingest.finish({"written": 4})
    assert ingest.complete and len(manifest["shards"]) == 2 and ingest.verify() == {}

    features = store.artifact("features", {"codec": "pixel"}, upstream=[ingest.id])
    assert artifact_id("features", {"codec": "pixel"}, [ingest.id + "x"]) != features.id  # upstream matters
    orphan = store.artifact("features", {"codec": "vae"}, upstream=[ingest.id])
    listing = {a.id: a for a in store.ls()}
    assert listing[ingest.id].complete and listing[ingest.id].shards == 2 and not listing[orphan.id].complete

    assert store.gc(keep=[features.id], dry_run=True) == [orphan.id]
    assert store.gc(keep=[features.id]) == [orphan.id]
    assert set(store.ids()) == {ingest.id, features.id}  # the upstream of a kept artifact stays


def test_artifact_shard_damaged_after_completion_is_redone(tmp_path):
    store = ArtifactStore(str(tmp_path))
    art = store.artifact("ingest", {"n": 1})
    art.write_shard("000000.tar", samples(3))
    path = tmp_path / art.id / "shards" / "000000.tar"
    path.write_bytes(path.read_bytes()[:512])
    assert not art.shard_done("000000.tar")
    art.write_shard("000000.tar", samples(3))
    assert art.shard_done("000000.tar")


def test_tables_round_trip(tmp_path):
    url = str(tmp_path / "quarantine.parquet")
    assert read_rows(url) == []
    write_table(url, [{"source": "a.jpg", "reason": "truncated"}, {"source": "b.png", "reason": "too small"}])
    assert [r["reason"] for r in read_rows(url)] == ["truncated", "too small"]
