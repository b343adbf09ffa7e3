"""Sidecar caption sets keyed by image stem, and a wrapper that attaches them to any source.

The SAM-LLaVA-Captions10M layout is one `sa_N.txt` per SA-1B image, as a folder or as tars of them:

    captions = SidecarCaptions("/data/sam_llava")       # folder of sa_N.txt and/or sa_*.tar, or one .tar
    source = with_captions(SA1BSource(config), captions) # sa_N's caption replaces the source's own, if any

A folder's `.txt` files are listed once and read when asked for; tars are read whole when the set is built (a
caption is ~100 bytes, so even ten million fit in memory). Tar member names are only dictionary keys, never paths.
Entries that cannot be used (an unsafe member name, a stem seen twice: the first in sorted order wins, an
unreadable tar) are listed in `SidecarCaptions.rejected` instead of being silently dropped.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
from collections.abc import Iterator, Mapping

from storage.fs import join
from storage.sources.base import RawSample, Source
from storage.sources.folder import decode_caption, list_files, read_bytes
from storage.sources.sa1b import UNSAFE_MEMBER, iter_tar, unsafe_member


class SidecarCaptions(Mapping[str, bytes]):
    """stem ("sa_1") -> the caption file's raw bytes (decoded by `with_captions`, so bad UTF-8 is reported)."""

    def __init__(self, url: str):
        self.url = url
        self.rejected: list[tuple[str, str]] = []  # (where, why)
        self._where: dict[str, str] = {}  # stem -> the .txt URL, or "tar::member" for captions held in memory
        self._data: dict[str, bytes] = {}
        if url.endswith(".tar"):
            self._add_tar(url, url.rpartition("/")[2])
            return
        for rel in list_files(url):
            if rel.endswith(".txt"):
                self._add(posixpath.splitext(posixpath.basename(rel))[0], join(url, rel))
            elif rel.endswith(".tar"):
                self._add_tar(join(url, rel), rel)

    def _add(self, stem: str, where: str, data: bytes | None = None) -> None:
        if stem in self._where:
            self.rejected.append((where, f"duplicate stem {stem!r}: first seen in {self._where[stem]}"))
            return
        self._where[stem] = where
        if data is not None:
            self._data[stem] = data

    def _add_tar(self, url: str, label: str) -> None:
        try:
            for name, data in iter_tar(url):
                if unsafe_member(name):
                    self.rejected.append((f"{label}::{name}", UNSAFE_MEMBER))
                elif data is not None and name.endswith(".txt"):
                    self._add(posixpath.splitext(posixpath.basename(name))[0], f"{label}::{name}", data)
        except (tarfile.TarError, OSError, EOFError) as e:
            self.rejected.append((label, f"unreadable: {type(e).__name__}: {e}"))

    def __getitem__(self, stem: str) -> bytes:
        if stem in self._data:
            return self._data[stem]
        return read_bytes(self._where[stem])  # KeyError for an unknown stem, as a Mapping should

    def __contains__(self, stem: object) -> bool:
        return stem in self._where  # without reading the file

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class CaptionedSource:
    """`source` with each sample's caption replaced by `captions[stem]` where the set has one for its stem."""

    def __init__(self, source: Source, captions: Mapping[str, bytes | str]):
        self.source = source
        self.captions = captions
        self.name = source.name

    def attach(self, raw: RawSample) -> RawSample:
        stem = raw.key_hint.rsplit("/", 1)[-1]
        if raw.error is not None or stem not in self.captions:
            return raw
        try:
            value = self.captions[stem]
        except OSError as e:
            return dataclasses.replace(raw, caption=None, caption_error=f"unreadable: {type(e).__name__}: {e}")
        caption, error = decode_caption(value.encode() if isinstance(value, str) else value)
        return dataclasses.replace(raw, caption=caption, caption_error=error)

    def __iter__(self) -> Iterator[RawSample]:
        return map(self.attach, self.source)


class PartitionedCaptionedSource(CaptionedSource):
    """The same, for a source read partition by partition (see `storage.ingest`)."""

    def partitions(self) -> list[str]:
        return self.source.partitions()

    def iter_partition(self, partition: str) -> Iterator[RawSample]:
        return map(self.attach, self.source.iter_partition(partition))


def with_captions(source: Source, captions: Mapping[str, bytes | str]) -> CaptionedSource:
    """`source` with captions from `captions` (e.g. SidecarCaptions) attached by the stem of each key_hint."""
    cls = PartitionedCaptionedSource if hasattr(source, "partitions") else CaptionedSource
    return cls(source, captions)
