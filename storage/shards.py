"""WebDataset shards: plain tars of `KEY.ext` members, written atomically, checked by sha256 on read.

A sample is a dict `{"__key__": key, ext: value, ...}`; values are encoded by webdataset's TarWriter from
the extension (`jpg`/`png` bytes pass through, `json` dicts, `txt` str, `cls` int, `*.npy` arrays).
Keys never contain dots (webdataset splits the extension at the first dot) nor path separators.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import webdataset as wds

from storage.fs import atomic_write, filesystem, sha256_of

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


class ShardError(ValueError):
    """A shard is missing, truncated, altered or malformed."""


class ShardMissing(ShardError):
    """No file where a shard's record says it is: a wrong path (or a deleted shard), not a damaged one."""


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


# Shards this process has checked, by (url, sha256, size, mtime): later epochs skip the full re-hash.
_VERIFIED: set[tuple] = set()
READ_BLOCK = 1 << 22  # large reads: tar members arrive in few system calls (or few requests on s3)


def _identity(url: str, info: ShardInfo) -> tuple:
    fs, path = filesystem(url)
    try:
        stat = fs.info(path)
    except FileNotFoundError:
        return (url, info.sha256, None, None)
    return (url, info.sha256, stat.get("size"), stat.get("mtime") or stat.get("LastModified"))


def iter_shard(url: str, info: ShardInfo | None = None) -> Iterator[dict]:
    """Samples of one shard as `{"__key__": key, ext: bytes}`, read with webdataset's tar iterators.

    With `info`, the shard is checked first (once per process while its size and mtime stay the same) and a
    damaged one raises ShardError instead of being read.
    """
    if info is not None:
        identity = _identity(url, info)
        if identity not in _VERIFIED:
            if (problem := verify_shard(url, info)) == "missing":
                raise ShardMissing(
                    f"shard {url}: no such file (looked up {filesystem(url)[1]} from the current directory "
                    f"{os.getcwd()})"
                )
            if problem:
                raise ShardError(f"shard {url}: {problem}")
            _VERIFIED.add(identity)
    fs, path = filesystem(url)
    with fs.open(path, "rb", block_size=READ_BLOCK) as stream:
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
    """A read-only array viewing `data` (no copy): parse the .npy header, then np.frombuffer the rest."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        return np.load(io.BytesIO(data), allow_pickle=False)  # other format versions: the copying reader
    shape, fortran, dtype = read_header[version](stream)
    if dtype.hasobject:
        raise ValueError("refusing a .npy of Python objects (pickled data) in a shard")
    array = np.frombuffer(data, dtype=dtype, offset=stream.tell(), count=int(np.prod(shape)))
    return array.reshape(shape, order="F" if fortran else "C")
