"""SA-1B as Meta distributes it: tars of `sa_N.jpg` + `sa_N.json` (the SAM annotations), read as streams.

Also the tar reading every tar-based source shares (`iter_tar`, `group_members`, `unsafe_member`): a tar is read
front to back with Python's `tarfile` in stream mode, straight from local disk or any fsspec URL. Nothing is ever
extracted: member names are only strings. A member whose name is absolute or climbs out of the archive
(`../evil.jpg`, `/etc/x.jpg`) cannot come from a well-formed dataset tar, so rather than guess what it meant it is
quarantined with reason "unsafe member name" (the file's bytes are not used at all).

Members of one sample must be adjacent in the tar, as in every WebDataset, SA-1B and img2dataset tar: a sample is
complete when the next stem starts, so memory holds one sample, never one tar. Each tar is one partition (see
`storage.ingest`).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, Field

from storage.fs import filesystem, join
from storage.sources.base import RawSample
from storage.sources.folder import list_files

UNSAFE_MEMBER = "unsafe member name"


def unsafe_member(name: str) -> bool:
    """True for member names that would escape a directory if ever used as a path (absolute, '..', drive)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]


def member_stem(name: str) -> tuple[str, str]:
    """('dir/sa_1', 'jpg') for 'dir/sa_1.jpg' or './dir/sa_1.jpg': the sample's stem, and its extension."""
    path = "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    stem, ext = posixpath.splitext(path)
    return stem, ext[1:].lower()


def iter_tar(url: str) -> Iterator[tuple[str, bytes | None]]:
    """(member name, bytes) of each member in stored order; bytes None for links and devices; folders skipped.

    Raises (tarfile.ReadError, OSError, EOFError) where the tar is damaged: callers turn it into a quarantine row.
    """
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.isdir():
                continue
            yield info.name, (tar.extractfile(info).read() if info.isreg() else None)
            tar.members = []  # stream mode keeps every TarInfo otherwise: memory would grow with the tar


def group_members(members: Iterable[tuple[str, bytes | None]]) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """(stem, {extension: bytes}, member names) per run of adjacent members sharing a stem (WebDataset grouping).

    Unsafe and non-regular members come out alone, as (name, {}, [name]): the caller quarantines them.
    """
    stem, files, names = None, {}, []
    for name, data in members:
        if data is None or unsafe_member(name):
            if names:
                yield stem, files, names
                stem, files, names = None, {}, []
            yield name, {}, [name]
            continue
        member, ext = member_stem(name)
        if member != stem and names:
            yield stem, files, names
            files, names = {}, []
        stem = member
        files[ext] = data
        names.append(name)
    if names:
        yield stem, files, names


def rejected_member(archive: str, name: str) -> RawSample:
    """The quarantine record for a member `group_members` put alone: unsafe name, or a link/device."""
    reason = f"{UNSAFE_MEMBER}: {name!r}" if unsafe_member(name) else f"unexpected member: {name!r} is not a file"
    return RawSample(source=f"{archive}::{name}", key_hint="", data=None, error=reason)


def tar_urls(path: str) -> tuple[str, list[str]]:
    """(folder, tar names in it, sorted) for a folder of tars, or (its folder, [name]) for one `.tar` URL."""
    if path.endswith(".tar"):
        folder, _, name = path.rstrip("/").rpartition("/")
        return folder, [name]
    return path, [f for f in list_files(path, recursive=False) if f.endswith(".tar")]


# ---------------------------------------------------------------------------------------------------
#                                           SA-1B
# ---------------------------------------------------------------------------------------------------


class SA1BConfig(BaseModel):
    """SA-1B tars, optionally with a sidecar caption set such as SAM-LLaVA-Captions10M."""

    kind: Literal["sa1b"] = "sa1b"
    path: str = Field(description="one sa_NNNNNN.tar, or a folder of them (local or fsspec URL)")
    captions: str | None = Field(None, description="sidecar captions keyed by stem: a folder or tar of sa_N.txt")


def sam_summary(data: bytes) -> dict:
    """The part of a SAM json kept in meta["sam"]: its `image` record and the number of annotations.

    The annotations themselves (~100 RLE masks per image, often megabytes) stay in the original tar: copying them
    into every KEY.json would multiply the shard size, and no training stage reads them.
    """
    doc = json.loads(data)
    return {"image": doc.get("image"), "annotations": len(doc.get("annotations") or [])}


class SA1BSource:
    """RawSamples of SA-1B tars, tar by tar (sorted by name), members in stored order."""

    def __init__(self, config: SA1BConfig):
        self.config = config
        self.name = f"sa1b:{config.path}"

    @cached_property
    def _tars(self) -> tuple[str, list[str]]:
        return tar_urls(self.config.path)

    def partitions(self) -> list[str]:
        return list(self._tars[1])

    def __iter__(self) -> Iterator[RawSample]:
        for tar in self.partitions():
            yield from self.iter_partition(tar)

    def iter_partition(self, partition: str) -> Iterator[RawSample]:
        read = 0
        try:
            for stem, files, names in group_members(iter_tar(join(self._tars[0], partition))):
                read += len(names)
                yield self._sample(partition, stem, files, names)
        except (tarfile.TarError, OSError, EOFError) as e:
            yield RawSample(
                source=partition,
                key_hint="",
                data=None,
                error=f"unreadable: tar damaged after {read} members: {type(e).__name__}: {e}",
            )

    def _sample(self, tar: str, stem: str, files: dict[str, bytes], names: list[str]) -> RawSample:
        if not files:
            return rejected_member(tar, names[0])
        image = next((n for n in names if member_stem(n)[1] in ("jpg", "jpeg")), None)
        if image is None:
            return RawSample(source=f"{tar}::{names[0]}", key_hint=stem, data=None, error=f"missing image: {names}")
        meta: dict = {"sam": None}
        if "json" in files:
            try:
                meta["sam"] = sam_summary(files["json"])
            except (ValueError, AttributeError) as e:
                meta["sam_error"] = f"{type(e).__name__}: {e}"
        return RawSample(source=f"{tar}::{image}", key_hint=stem, data=files[member_stem(image)[1]], meta=meta)
