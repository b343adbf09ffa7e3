"""Image folders (local or any fsspec URL), recursively, with optional `NAME.txt` captions beside each image.

    photos/a.jpg            -> key_hint "a",        caption from photos/a.txt if it exists
    photos/trips/b.png      -> key_hint "trips/b",  no caption

Files are visited in sorted order of their path relative to the folder, so the order, and with it every shard, is
the same on every run and every machine. Each image is its own partition (see `storage.ingest`): ingest can read
exactly the files of one shard, with no re-reading. Files whose extension is not an image's are not candidates
(captions are found by name, anything else is not part of the dataset).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, Field

from storage.fs import filesystem, join
from storage.sources.base import RawSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_files(url: str, recursive: bool = True) -> list[str]:
    """Paths of the files under `url`, relative to it ('/'-separated), sorted. Raises if `url` is no folder."""
    fs, root = filesystem(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"folder {url} does not exist (or is not a folder)")
    root = root.rstrip("/")
    found = fs.find(root, maxdepth=None if recursive else 1)
    return sorted(p[len(root) + 1 :] for p in found if p.startswith(root + "/"))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def decode_caption(data: bytes) -> tuple[str | None, str | None]:
    """(caption, caption_error) from a caption file's bytes: UTF-8 (a UTF-8 BOM is dropped), stripped.

    Not UTF-8 -> (None, "not UTF-8: ..."); empty or only whitespace -> ("", "empty caption").
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8: {e}"
    text = text.strip()
    return (text, None) if text else ("", "empty caption")


class FolderConfig(BaseModel):
    """A folder of images, e.g. a user's own photos or a downloaded dataset unpacked to disk."""

    kind: Literal["folder"] = "folder"
    path: str = Field(description="local folder or fsspec URL (s3://bucket/photos)")
    recursive: bool = Field(True, description="include sub-folders")
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="file extensions read as images (any case)")
    captions: bool = Field(True, description="read NAME.txt beside NAME.jpg as its caption")


class FolderSource:
    """RawSamples of every image file under a folder, in sorted relative-path order."""

    def __init__(self, config: FolderConfig):
        self.config = config
        self.name = f"folder:{config.path}"

    @cached_property
    def _files(self) -> tuple[list[str], set[str]]:
        """(image paths, caption paths), listed once per instance so planning and shards see the same files."""
        files = list_files(self.config.path, self.config.recursive)
        extensions = tuple(e.lower() for e in self.config.extensions)
        images = [f for f in files if f.lower().endswith(extensions)]
        captions = {f for f in files if f.endswith(".txt")} if self.config.captions else set()
        return images, captions

    def partitions(self) -> list[str]:
        return list(self._files[0])

    def iter_partition(self, partition: str) -> Iterator[RawSample]:
        yield self._read(partition)

    def __iter__(self) -> Iterator[RawSample]:
        for rel in self.partitions():
            yield self._read(rel)

    def _read(self, rel: str) -> RawSample:
        stem = posixpath.splitext(rel)[0]
        try:
            data = read_bytes(join(self.config.path, rel))
        except OSError as e:
            return RawSample(source=rel, key_hint=stem, data=None, error=f"unreadable: {type(e).__name__}: {e}")
        caption = caption_error = None
        if stem + ".txt" in self._files[1]:
            try:
                caption, caption_error = decode_caption(read_bytes(join(self.config.path, stem + ".txt")))
            except OSError as e:
                caption_error = f"unreadable: {type(e).__name__}: {e}"
        return RawSample(source=rel, key_hint=stem, data=data, caption=caption, caption_error=caption_error)
