"""Sources on small generated data: folders, SA-1B tars, img2dataset output, sidecar caption sets, the factory."""

import json
import math

import pytest
from bad_inputs import encode, gradient_rgb, sa1b_members, write_tar

from storage.artifacts import ArtifactStore
from storage.ingest import build_source, ingest, source_partitions
from storage.shards import iter_shard
from storage.sources.base import RawSample
from storage.sources.folder import FolderConfig, FolderSource
from storage.sources.img2dataset import Img2DatasetConfig, Img2DatasetSource
from storage.sources.sa1b import SA1BConfig, SA1BSource
from storage.sources.sidecar import PartitionedCaptionedSource, SidecarCaptions, with_captions
from storage.tables import read_rows, write_table


def by_partition(source):
    return [s for p in source.partitions() for s in source.iter_partition(p)]


def comparable(samples):
    """Samples as tuples; meta by repr, since NaN != NaN."""
    return [(s.source, s.key_hint, s.data, s.caption, s.caption_error, repr(s.meta), s.error) for s in samples]


# ---------------------------------------------------------------------------------------------------
#                                             Folders
# ---------------------------------------------------------------------------------------------------


def test_folder_source_is_sorted_recursive_and_reiterable(tmp_path):
    for name, fmt in [("b.png", "PNG"), ("a.JPG", "JPEG"), ("sub/c.webp", "WEBP"), ("sub/deeper/d.bmp", "BMP")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(encode(gradient_rgb(40, 40, len(name)), fmt))
    (tmp_path / "b.txt").write_bytes("  a café at night\n".encode())
    (tmp_path / "readme.md").write_text("not an image")
    source = FolderSource(FolderConfig(path=str(tmp_path)))
    samples = list(source)
    assert [s.source for s in samples] == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.bmp"]
    assert [s.key_hint for s in samples] == ["a", "b", "sub/c", "sub/deeper/d"]
    assert comparable(samples) == comparable(source) == comparable(by_partition(source))
    assert samples[1].caption == "a café at night" and samples[0].caption is None
    assert [s.source for s in FolderSource(FolderConfig(path=str(tmp_path), recursive=False))] == ["a.JPG", "b.png"]
    assert all(s.caption is None for s in FolderSource(FolderConfig(path=str(tmp_path), captions=False)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(FolderSource(FolderConfig(path=str(tmp_path / "nope"))))


# ---------------------------------------------------------------------------------------------------
#                                             SA-1B
# ---------------------------------------------------------------------------------------------------


def test_sa1b_pairs_keep_the_sam_summary_not_the_masks(tmp_path):
    write_tar(tmp_path / "sa_000001.tar", sa1b_members([3, 4]))
    write_tar(
        tmp_path / "sa_000000.tar", sa1b_members([1, 2]) + [("./sub/sa_9.jpg", encode(gradient_rgb(40, 40, 9), "JPEG"))]
    )
    source = SA1BSource(SA1BConfig(path=str(tmp_path)))
    samples = list(source)
    assert source.partitions() == ["sa_000000.tar", "sa_000001.tar"]
    assert [s.key_hint for s in samples] == ["sa_1", "sa_2", "sub/sa_9", "sa_3", "sa_4"]
    assert samples[0].source == "sa_000000.tar::sa_1.jpg" and samples[0].data[:2] == b"\xff\xd8"
    assert samples[0].meta == {
        "sam": {"image": {"image_id": 1, "width": 48, "height": 40, "file_name": "sa_1.jpg"}, "annotations": 3}
    }
    assert "segmentation" not in json.dumps([s.meta for s in samples])
    assert samples[2].meta == {"sam": None} and samples[2].error is None  # an image without its json is still one
    assert comparable(samples) == comparable(by_partition(source))
    # one tar on its own
    assert [s.key_hint for s in SA1BSource(SA1BConfig(path=str(tmp_path / "sa_000001.tar")))] == ["sa_3", "sa_4"]


def test_sa1b_hostile_and_broken_tars_become_error_samples(tmp_path):
    members = sa1b_members([1]) + [
        ("../evil.jpg", b"x"),
        ("/etc/evil.jpg", b"y"),
        ("C:\\evil.jpg", b"z"),
        ("sa_5.json", b"{not json"),  # a json without its image
        ("sa_6.jpg", encode(gradient_rgb(40, 40, 6), "JPEG")),
        ("sa_6.json", b"{not json"),
    ]
    write_tar(tmp_path / "a" / "sa_000000.tar", members)
    samples = list(SA1BSource(SA1BConfig(path=str(tmp_path / "a"))))
    errors = [(s.source, s.error.split(":")[0]) for s in samples if s.error]
    assert errors == [
        ("sa_000000.tar::../evil.jpg", "unsafe member name"),
        ("sa_000000.tar::/etc/evil.jpg", "unsafe member name"),
        ("sa_000000.tar::C:\\evil.jpg", "unsafe member name"),
        ("sa_000000.tar::sa_5.json", "missing image"),
    ]
    assert all(s.data is None for s in samples if s.error)
    assert samples[-1].key_hint == "sa_6" and samples[-1].meta["sam"] is None and "sam_error" in samples[-1].meta

    # a tar cut short: what came before the damage is kept, the damage is one error sample
    whole = write_tar(tmp_path / "b" / "sa_000000.tar", sa1b_members([1, 2, 3], size=(64, 64))).read_bytes()
    (tmp_path / "b" / "sa_000000.tar").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "b" / "sa_000001.tar").write_bytes(b"this is not a tar at all" * 40)
    samples = list(SA1BSource(SA1BConfig(path=str(tmp_path / "b"))))
    assert [s.key_hint for s in samples if not s.error] == ["sa_1"]
    assert [(s.source, s.error.split(":")[0]) for s in samples if s.error] == [
        ("sa_000000.tar", "unreadable"),
        ("sa_000001.tar", "unreadable"),
    ]


# ---------------------------------------------------------------------------------------------------
#                                           img2dataset
# ---------------------------------------------------------------------------------------------------


def img2dataset_row(key, status="success", caption=None, error=None):
    return {
        "key": key,
        "caption": caption,
        "url": f"https://example.com/{key}.jpg",
        "width": 40,
        "height": 40,
        "status": status,
        "error_message": error,
        "original_width": 400 if status == "success" else None,
        "original_height": 400 if status == "success" else math.nan,
    }


def write_img2dataset(root):
    rows = [
        img2dataset_row("000000000", caption="a cat on a mat"),
        img2dataset_row("000000001", status="failed_to_download", error="HTTP Error 404: Not Found"),
        img2dataset_row("000000002"),  # no caption column value: the tar's KEY.txt is used
        img2dataset_row("000000003"),  # 'success' but absent from the tar
    ]
    write_table(str(root / "00000.parquet"), rows)
    members = []
    for key, seed in [("000000000", 0), ("000000002", 2)]:
        members += [
            (f"{key}.jpg", encode(gradient_rgb(40, 40, seed), "JPEG")),
            (f"{key}.txt", b"from the tar"),
            (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()),
        ]
    write_tar(root / "00000.tar", members)
    # a second shard whose parquet is missing: the tar's json stands in
    write_tar(root / "00001.tar", [("000010000.jpg", encode(gradient_rgb(40, 40, 10), "JPEG"))])
    (root / "00000_stats.json").write_text("{}")


def test_img2dataset_joins_tar_and_parquet(tmp_path):
    write_img2dataset(tmp_path)
    source = Img2DatasetSource(Img2DatasetConfig(path=str(tmp_path)))
    samples = list(source)
    assert source.partitions() == ["00000", "00001"]
    assert [(s.key_hint, s.error.split(":")[0] if s.error else None) for s in samples] == [
        ("000000001", "download failed"),
        ("000000000", None),
        ("000000002", None),
        ("000000003", "missing image"),
        ("000010000", None),
    ]
    failed, cat, untitled = samples[0], samples[1], samples[2]
    assert failed.error == "download failed: failed_to_download: HTTP Error 404: Not Found" and failed.data is None
    assert cat.caption == "a cat on a mat" and cat.source == "00000.tar::000000000.jpg"
    assert cat.meta["url"] == "https://example.com/000000000.jpg" and "caption" not in cat.meta
    assert untitled.caption == "from the tar"
    assert comparable(samples) == comparable(by_partition(source))


def test_img2dataset_ingest_quarantines_failed_rows(tmp_path):
    write_img2dataset(tmp_path / "out")
    art = ArtifactStore(str(tmp_path / "store")).artifact("ingest", {"n": 1})
    source = build_source({"kind": "img2dataset", "path": str(tmp_path / "out")})
    summary = ingest(source, art, samples_per_shard=10, progress=False)
    assert summary.written == 3 and summary.quarantined == {"download failed": 1, "missing image": 1}
    quarantine = read_rows(art.path("quarantine.parquet"))
    assert quarantine[0] == {
        "source": "00000.parquet::000000001",
        "reason": "download failed",
        "detail": "failed_to_download: HTTP Error 404: Not Found",
    }
    first = next(iter_shard(art.shard_url("000000.tar")))
    record = json.loads(first["json"])  # strict JSON: the NaN column became null
    assert record["meta"]["status"] == "success" and record["meta"]["original_width"] == 400
    assert first["txt"] == b"a cat on a mat"


# ---------------------------------------------------------------------------------------------------
#                                       Sidecar caption sets
# ---------------------------------------------------------------------------------------------------


def test_sidecar_captions_from_a_folder_and_tars(tmp_path):
    (tmp_path / "caps" / "part1").mkdir(parents=True)
    (tmp_path / "caps" / "part1" / "sa_1.txt").write_text("a second opinion")  # after more.tar in sorted order
    (tmp_path / "caps" / "sa_2.txt").write_bytes(b"\xff\xfe bad")
    write_tar(
        tmp_path / "caps" / "more.tar",
        [("sa_3.txt", b"a red car"), ("../sa_4.txt", b"sneaky"), ("sa_1.txt", b"a dog on a beach")],
    )
    captions = SidecarCaptions(str(tmp_path / "caps"))
    assert sorted(captions) == ["sa_1", "sa_2", "sa_3"] and captions["sa_3"] == b"a red car"
    assert [why.split(" ")[0] for _, why in captions.rejected] == ["unsafe", "duplicate"]
    tar_only = SidecarCaptions(str(tmp_path / "caps" / "more.tar"))
    assert dict(tar_only) == {"sa_3": b"a red car", "sa_1": b"a dog on a beach"}

    write_tar(tmp_path / "sa" / "sa_000000.tar", sa1b_members([1, 2, 3, 7]))
    source = with_captions(SA1BSource(SA1BConfig(path=str(tmp_path / "sa"))), captions)
    assert isinstance(source, PartitionedCaptionedSource) and source_partitions(source) == ["sa_000000.tar"]
    got = {s.key_hint: (s.caption, s.caption_error and s.caption_error.split(":")[0]) for s in source}
    assert got == {
        "sa_1": ("a dog on a beach", None),
        "sa_2": (None, "not UTF-8"),
        "sa_3": ("a red car", None),
        "sa_7": (None, None),
    }
    # the same through the factory's `captions` field
    built = build_source({"kind": "sa1b", "path": str(tmp_path / "sa"), "captions": str(tmp_path / "caps")})
    assert {s.key_hint: s.caption for s in built}["sa_3"] == "a red car"


def test_with_captions_wraps_a_plain_source():
    class Plain:
        name = "plain"

        def __iter__(self):
            yield RawSample(source="x/a.png", key_hint="x/a", data=b"1", caption="own caption")
            yield RawSample(source="b.png", key_hint="b", data=b"2", caption="own caption")

    source = with_captions(Plain(), {"a": "from the sidecar"})
    assert not hasattr(source, "partitions")
    assert [s.caption for s in source] == ["from the sidecar", "own caption"]


# ---------------------------------------------------------------------------------------------------
#                                             Factory
# ---------------------------------------------------------------------------------------------------


def test_build_source_from_configs(tmp_path):
    assert isinstance(build_source(FolderConfig(path=str(tmp_path))), FolderSource)
    assert isinstance(build_source({"kind": "folder", "path": str(tmp_path)}), FolderSource)
    assert isinstance(build_source({"kind": "sa1b", "path": str(tmp_path)}), SA1BSource)
    assert isinstance(build_source(Img2DatasetConfig(path=str(tmp_path))), Img2DatasetSource)
    with pytest.raises(ValueError, match="kind='laion' is not one of"):
        build_source({"kind": "laion", "path": "x"})


def test_build_source_shapes_and_ingest_it_by_ranges(tmp_path):
    shapes = pytest.importorskip("storage.sources.shapes")
    source = build_source({"kind": "shapes", "count": 70, "image_size": 32})
    assert isinstance(source, shapes.ShapesSource) and source_partitions(source) == ["0:64", "64:70"]
    assert isinstance(build_source(shapes.ShapesConfig(count=3)), shapes.ShapesSource)
    art = ArtifactStore(str(tmp_path)).artifact("ingest", {"n": 2})
    summary = ingest(source, art, samples_per_shard=32, progress=False)
    assert summary.written + summary.duplicates == 70 and summary.quarantined == {}
    sample = next(iter_shard(art.shard_url("000002.tar")))
    assert "cls" in sample and sample["txt"]
