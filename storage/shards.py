"""WebDataset shards: plain tars of `KEY.ext` members, written atomically, checked by sha256 on read.

A sample is a dict `{"__key__": key, ext: value, ...}`; values are encoded by webdataset's TarWriter from
the extension (`jpg`/`png` bytes pass through, `json` dicts, `txt` str, `cls` int, `*.npy` arrays).
Keys never contain dots (webdataset splits the extension at the first dot) nor path separators.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import webdataset as wds

from storage.fs import atomic_write, filesystem, sha256_of

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardError(ValueError):
    """A shard is missing, truncated, altered or malformed."""


@dataclass(frozen=True)
class ShardInfo:
    """What a manifest records of one shard; enough to tell a complete shard from a damaged one."""

    name: str
    count: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern} (no dots, no path separators)")
    return key


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def write_shard(url: str, samples: Iterable[dict]) -> ShardInfo:
    """Write `samples` as one tar at `url` (temporary name, renamed when complete); returns its record."""
    count = 0
    with atomic_write(url) as out:
        # mtime fixed: the same samples give the same bytes, so checksums identify content.
        with wds.TarWriter(out, mtime=0) as tar:
            for sample in samples:
                check_key(sample["__key__"])
                tar.write(sample)
                count += 1
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return ShardInfo(name=name, count=count, bytes=out.bytes, sha256=out.sha256.hexdigest())


def verify_shard(url: str, info: ShardInfo, checksum: bool = True) -> str | None:
    """None if the stored shard matches its record, else the reason it does not."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return "missing"
    size = fs.size(path)
    if size != info.bytes:
        return f"size {size} != recorded {info.bytes} (truncated or altered)"
    if checksum:
        digest, _ = sha256_of(url)
        if digest != info.sha256:
            return "sha256 differs from the record (altered)"
    return None


def iter_shard(url: str, info: ShardInfo | None = None) -> Iterator[dict]:
    """Samples of one shard as `{"__key__": key, ext: bytes}`, read with webdataset's tar iterators.

    With `info`, the shard is checked first and a damaged one raises ShardError instead of being read.
    """
    if info is not None and (problem := verify_shard(url, info)):
        raise ShardError(f"shard {url}: {problem}")
    fs, path = filesystem(url)
    with fs.open(path, "rb") as stream:
        members = ({**m, "__url__": url} for m in wds.tariterators.tar_file_iterator(stream))
        for sample in wds.tariterators.group_by_keys(members):
            sample.pop("__url__", None)
            yield sample


# ---------------------------------------------------------------------------------------------------
#                                     Decoding sample fields
# ---------------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
