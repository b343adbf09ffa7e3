"""One way to reach storage: local paths or fsspec URLs (s3://, gs://, memory://), with atomic writes.

Everything that writes a file a later run may trust (shards, tables, manifests) goes through
`atomic_write`: the bytes land under a temporary name first and are renamed only when complete, so a
crash never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    return url_to_fs(str(url))


def is_url(path: str) -> bool:
    """True for an fsspec URL (s3://, gs://, memory://, file://), False for a local path."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """A local path made absolute (`~` expanded) against this process's current directory; a URL as it is.

    Ray tasks and Ray Train workers do not run in the directory a command was started from, so every path
    handed to them must be absolute or a URL.
    """
    if is_url(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(str(path)))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    return "/".join([str(url).rstrip("/"), *[p.strip("/") for p in parts]])


class HashingWriter:
    """A write-only stream that forwards to `raw` and keeps the sha256 and byte count of what passed."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[HashingWriter]:
    """Write `url` via a temporary sibling, renamed into place only if the block finishes without error."""
    fs, path = filesystem(url)
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json(url: str, obj) -> None:
    with atomic_write(url) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def read_json(url: str):
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def sha256_of(url: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a stored file, streamed."""
    fs, path = filesystem(url)
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
