"""Ingest: bad inputs quarantined with their reason, good ones normalised to RGB JPEG shards, resumable per shard."""

import io
import json
import os

import pytest
import webdataset as wds
from bad_inputs import build_bad_folder, encode, gradient_rgb, png_with_declared_size, sa1b_members, write_tar
from PIL import Image

from storage.artifacts import ArtifactStore
from storage.images import ImageRules, check_image
from storage.ingest import (
    IngestPlan,
    ingest,
    ingest_shard,
    plan_ingest,
    safe_key,
    shard_complete,
    unique_key,
)
from storage.shards import iter_shard
from storage.sources.base import RawSample
from storage.sources.folder import FolderConfig, FolderSource
from storage.sources.sa1b import SA1BConfig, SA1BSource
from storage.tables import read_rows


def close(a, b, tol=16):
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad-input folder ingested once (4 samples per shard); shared by the assertions below."""
    root = tmp_path_factory.mktemp("bad")
    expect = build_bad_folder(root / "images")
    store = ArtifactStore(str(root / "store"))
    art = store.artifact("ingest", {"source": "bad"})
    summary = ingest(FolderSource(FolderConfig(path=str(root / "images"))), art, samples_per_shard=4, progress=False)
    return root, expect, art, summary


def test_every_bad_input_has_its_outcome(bad):
    root, expect, art, summary = bad
    samples = {r["source"]: r for r in read_rows(art.path("samples.parquet"))}
    quarantine = {r["source"]: r for r in read_rows(art.path("quarantine.parquet"))}
    duplicates = {r["source"]: r for r in read_rows(art.path("duplicates.parquet"))}
    shard_samples = {
        s["__key__"]: s
        for url in sorted((root / "store" / art.id / "shards").glob("*.tar"))
        for s in iter_shard(str(url))
    }
    for name, want in expect.items():
        if want.reason:
            assert name in quarantine and quarantine[name]["reason"] == want.reason, (name, quarantine.get(name))
            assert quarantine[name]["detail"], name
            continue
        if want.duplicate_of:
            assert duplicates[name]["duplicate_of"] == samples[want.duplicate_of]["key"]
            continue
        row = samples[name]
        assert (row["width"], row["height"]) == want.size, name
        assert row["aspect_ratio"] == pytest.approx(want.size[1] / want.size[0])
        if want.key:
            assert row["key"] == want.key
        sample = shard_samples[row["key"]]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == want.size, name
        for xy, rgb in (want.pixels or {}).items():
            assert close(image.getpixel(xy), rgb), (name, xy, image.getpixel(xy), rgb)
        if want.passthrough:
            assert sample["jpg"] == (root / "images" / name).read_bytes()
        assert sample["txt"].decode() == want.caption and row["has_caption"] == bool(want.caption)
        if want.caption_error:
            assert row["caption_error"].startswith(want.caption_error), (name, row["caption_error"])
        else:
            assert row["caption_error"] is None
        record = json.loads(sample["json"])
        assert record["key"] == row["key"] and record["sha256"] == row["sha256"] and record["bucket"] == row["bucket"]
    # the two files whose names sanitise alike both keep a (different) key
    assert samples["x_y.png"]["key"].startswith("x_y_") and samples["x_y.png"]["key"] != samples["x.y.png"]["key"]
    assert "notes.md" not in samples and "notes.md" not in quarantine  # not an image candidate at all


def test_summary_counts(bad):
    _, expect, art, summary = bad
    reasons = {}
    for want in expect.values():
        if want.reason:
            reasons[want.reason] = reasons.get(want.reason, 0) + 1
    written = sum(1 for w in expect.values() if not w.reason and not w.duplicate_of)
    assert summary.samples_in == len(expect)
    assert (summary.written, summary.duplicates, summary.quarantined) == (written, 1, reasons)
    assert summary.samples_in == summary.written + summary.duplicates + sum(summary.quarantined.values())
    assert summary.shards == len(art.shards()) == -(-(len(expect) - 1) // 4)  # every non-duplicate is planned
    assert art.complete and art.manifest["summary"] == summary.to_dict() and art.verify() == {}
    assert "too large 1" in str(summary) and "duplicates  1" in str(summary)
    shards = read_rows(art.path("shards.parquet"))
    assert [s["name"] for s in shards] == [s.name for s in art.shards()]
    assert sum(s["count"] for s in shards) == summary.written


def test_shards_read_back_with_webdataset(bad):
    root, _, art, summary = bad
    urls = [str(p) for p in sorted((root / "store" / art.id / "shards").glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    keys = []
    for sample in dataset:
        keys.append(sample["__key__"])
        assert "." not in sample["__key__"]
        assert sample["jpg"].mode == "RGB"
        assert sample["json"]["width"] == sample["jpg"].size[0] and sample["json"]["height"] == sample["jpg"].size[1]
        assert isinstance(sample["txt"], str)
    assert len(keys) == len(set(keys)) == summary.written
    assert keys == [r["key"] for r in read_rows(art.path("samples.parquet"))]


def test_resume_redoes_only_the_missing_shard(tmp_path):
    expect = build_bad_folder(tmp_path / "images")
    source = FolderSource(FolderConfig(path=str(tmp_path / "images")))
    art = ArtifactStore(str(tmp_path / "store")).artifact("ingest", {"n": 1})
    first = ingest(source, art, samples_per_shard=5, progress=False)
    assert len(first.shards_run) == first.shards == -(-(len(expect) - 1) // 5)
    shards = tmp_path / "store" / art.id / "shards"
    manifest = (tmp_path / "store" / art.id / "manifest.json").read_bytes()

    def stats():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(shards.glob("*.tar"))}

    for damage in ("delete", "truncate"):
        before = stats()
        victim = shards / "000001.tar"
        if damage == "delete":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[:1000])
        again = ingest(
            FolderSource(FolderConfig(path=str(tmp_path / "images"))), art, samples_per_shard=5, progress=False
        )
        after = stats()
        assert again.shards_run == ["000001.tar"]
        assert {n: s for n, s in after.items() if n != victim.name} == {
            n: s for n, s in before.items() if n != victim.name
        }
        assert (tmp_path / "store" / art.id / "manifest.json").read_bytes() == manifest
        assert again.to_dict() == first.to_dict()

    # a shard whose per-shard tables were lost is redone too; a different shard size is refused
    os.remove(art.path("parts", "000002.quarantine.parquet"))
    assert not shard_complete(art, "000002.tar")
    assert ingest(source, art, samples_per_shard=5, progress=False).shards_run == ["000002.tar"]
    with pytest.raises(ValueError, match="samples_per_shard=5"):
        ingest(source, art, samples_per_shard=6, progress=False)


def test_shards_run_one_at_a_time_in_any_order(tmp_path):
    """The orchestration shape: plan, save, shards independently (here last first), then ingest() only finishes."""
    build_bad_folder(tmp_path / "images")
    source = FolderSource(FolderConfig(path=str(tmp_path / "images")))
    art = ArtifactStore(str(tmp_path / "store")).artifact("ingest", {"n": 2})
    plan = plan_ingest(source, samples_per_shard=8)
    plan.save(art)
    assert IngestPlan.load(art) == plan
    results = [ingest_shard(source, IngestPlan.load(art), i, art) for i in reversed(range(len(plan.shards)))]
    assert all(shard_complete(art, r.name) for r in results)
    summary = ingest(source, art, samples_per_shard=8, progress=False)
    assert summary.shards_run == [] and summary.written == sum(len(r.samples) for r in results)


def test_source_failures_are_quarantined_and_the_run_finishes(tmp_path):
    class Flaky:
        """Raises after two samples, instead of yielding an error sample as sources should."""

        name = "flaky"

        def __iter__(self):
            for i in range(2):
                yield RawSample(source=f"ok{i}", key_hint=f"ok{i}", data=encode(gradient_rgb(40, 40, seed=i), "PNG"))
            yield RawSample(source="lost", key_hint="lost", data=None, error="unreadable: permission denied")
            raise ConnectionError("bucket went away")

    art = ArtifactStore(str(tmp_path)).artifact("ingest", {"n": 3})
    summary = ingest(Flaky(), art, samples_per_shard=10, progress=False)
    assert summary.written == 2 and summary.quarantined == {"unreadable": 2}
    details = {r["source"]: r["detail"] for r in read_rows(art.path("quarantine.parquet"))}
    assert details["lost"] == "permission denied" and "bucket went away" in details["flaky"]


def test_an_unexpected_validation_failure_is_quarantined_too(tmp_path, monkeypatch):
    import storage.ingest

    def check_image(data, rules):
        if data.startswith(b"\x89PNG"):
            raise MemoryError("out of memory decoding")
        return real(data, rules)

    real = storage.ingest.check_image
    monkeypatch.setattr(storage.ingest, "check_image", check_image)
    build_bad_folder(tmp_path / "images")
    art = ArtifactStore(str(tmp_path / "store")).artifact("ingest", {"n": 7})
    summary = ingest(
        FolderSource(FolderConfig(path=str(tmp_path / "images"))), art, samples_per_shard=5, progress=False
    )
    pngs = [p for p in (tmp_path / "images").rglob("*") if p.is_file() and p.read_bytes().startswith(b"\x89PNG")]
    assert summary.quarantined["error"] == len(pngs) and summary.written > 0
    assert summary.samples_in == summary.written + summary.duplicates + sum(summary.quarantined.values())


def test_a_source_that_changed_after_planning_is_caught(tmp_path):
    build_bad_folder(tmp_path / "images")
    source = FolderSource(FolderConfig(path=str(tmp_path / "images")))
    art = ArtifactStore(str(tmp_path / "store")).artifact("ingest", {"n": 4})
    plan = plan_ingest(source, samples_per_shard=100)
    (tmp_path / "images" / "gray.png").write_bytes(encode(Image.new("L", (40, 40), 7), "PNG"))
    result = ingest_shard(source, plan, 0, art)
    assert [(r["source"], r["reason"]) for r in result.quarantine if r["reason"] == "changed"] == [
        ("gray.png", "changed")
    ]


def test_sa1b_tar_with_hostile_member_names(tmp_path):
    members = sa1b_members([1, 2]) + [("../evil.jpg", b"x"), ("/abs/evil.jpg", b"y")] + sa1b_members([3])
    write_tar(tmp_path / "sa_000000.tar", members)
    art = ArtifactStore(str(tmp_path / "store")).artifact("ingest", {"n": 5})
    summary = ingest(SA1BSource(SA1BConfig(path=str(tmp_path))), art, samples_per_shard=2, progress=False)
    assert summary.written == 3 and summary.quarantined == {"unsafe member name": 2}
    assert not (tmp_path.parent / "evil.jpg").exists() and not os.path.exists("/abs/evil.jpg")
    rows = read_rows(art.path("samples.parquet"))
    assert [r["key"] for r in rows] == ["sa_1", "sa_2", "sa_3"]
    sample = next(iter_shard(art.shard_url("000000.tar")))
    assert json.loads(sample["json"])["meta"]["sam"]["annotations"] == 3


def test_ingest_into_a_memory_store(tmp_path):
    build_bad_folder(tmp_path / "images")
    store = ArtifactStore("memory://ingest-test")
    art = store.artifact("ingest", {"n": 6})
    summary = ingest(
        FolderSource(FolderConfig(path=str(tmp_path / "images"))), art, samples_per_shard=6, progress=False
    )
    assert art.complete and art.verify() == {} and summary.written > 0
    keys = [s["__key__"] for info in art.shards() for s in iter_shard(art.shard_url(info.name), info)]
    assert keys == [r["key"] for r in read_rows(art.path("samples.parquet"))]
    assert ingest(FolderSource(FolderConfig(path=str(tmp_path / "images"))), art, 6, progress=False).shards_run == []


def test_check_image_rules():
    image = encode(gradient_rgb(64, 64, seed=0), "PNG")
    assert check_image(image, ImageRules(max_pixels=64 * 64)).ok
    check = check_image(image, ImageRules(max_pixels=64 * 64 - 1))
    assert (check.reason, check.jpeg) == ("too large", None) and "max_pixels=4095" in check.detail
    assert check_image(image, ImageRules(min_side=65)).reason == "too small"
    # the crafted 100000 x 100000 header is refused from the header alone, whatever the limit
    assert check_image(png_with_declared_size(100_000, 100_000)).reason == "too large"
    assert check_image(png_with_declared_size(100, 100)).reason in ("truncated", "corrupt")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
    assert check_image(eps).reason == "not an image"  # no ghostscript for untrusted files


def test_keys_are_safe_unique_and_deterministic():
    assert safe_key("café_日本") == "cafe" and safe_key("a/b.c d") == "a_b_c_d" and safe_key("日本") == "sample"
    assert safe_key("__meta__") == "meta" and len(safe_key("x" * 500)) == 80
    used = set()
    keys = [unique_key(h, sha, used) for h, sha in [("a.b", "1" * 64), ("a_b", "2" * 64), ("a_b", "3" * 64)]]
    assert keys == ["a_b", "a_b_22222222", "a_b_33333333"]
