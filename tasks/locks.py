"""One writer per artifact: an exclusive file lock held while a stage fills an artifact.

Writes are atomic and content-addressed already, so two runs racing on one artifact could not corrupt it; the
lock keeps them from doing the same work twice. The second run waits, then finds the artifact complete and
reuses it. `flock` locks belong to an open file, so they work between threads, processes and (on file systems
that support it) machines, and are released when the holder dies: a crashed run never leaves a stale lock.
Remote stores (s3://, gs://) have no such lock; there the atomic writes alone keep runs correct.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from storage.fs import filesystem

LOCK_NAME = ".lock"


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in fs.protocol or "local" in fs.protocol


@contextlib.contextmanager
def locked(url: str, on_wait=None) -> Iterator[None]:
    """Hold the exclusive lock of the directory `url` (created if needed) for the block; no-op on remote stores.

    `on_wait(seconds)` is called once if another holder makes this one wait.
    """
    if not is_local(url):
        yield
        return
    _, path = filesystem(url)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, LOCK_NAME), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            start = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            if on_wait:
                on_wait(time.perf_counter() - start)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(url: str) -> bool:
    """True if some run holds the lock of `url` right now (always False on remote stores)."""
    if not is_local(url):
        return False
    _, path = filesystem(url)
    lock = os.path.join(path, LOCK_NAME)
    if not os.path.exists(lock):
        return False
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
