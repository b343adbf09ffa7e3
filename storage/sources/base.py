"""What every source yields: raw, untrusted samples for ingest to validate.

A source only reads; it never decides whether an image is good (ingest does, one rule for all sources)
and never uses names from untrusted archives as paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class RawSample:
    """One candidate sample as a source found it.

    source:   where it came from, for manifests and the quarantine ("dir/a.jpg", "sa_000.tar::sa_1.jpg",
              "shapes:seed=0:17"); never used as a path by anything downstream.
    key_hint: a stem to derive the sample key from (made safe and unique by ingest), e.g. "sa_1".
    data:     the encoded image bytes, or None if the source could not read them (then `error` says why).
    caption:  a caption the source provides (sidecar .txt, img2dataset caption, synthetic caption), or None.
    caption_error: why a provided caption could not be used (e.g. not UTF-8); the image is still ingested.
    meta:     source metadata kept in KEY.json (SAM json, img2dataset columns, the synthetic scene spec).
    cls:      class label for stage 1, where the source has one.
    """

    source: str
    key_hint: str
    data: bytes | None
    caption: str | None = None
    caption_error: str | None = None
    meta: dict = field(default_factory=dict)
    cls: int | None = None
    error: str | None = None


class Source(Protocol):
    """A re-iterable, deterministic stream of RawSample (same order every time, so shards are stable)."""

    name: str

    def __iter__(self) -> Iterator[RawSample]: ...
