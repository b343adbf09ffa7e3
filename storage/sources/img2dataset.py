"""img2dataset output: `NNNNN.tar` (KEY.jpg, KEY.txt, KEY.json per downloaded image) + `NNNNN.parquet` (one row per
URL tried, downloaded or not: key, caption, url, width, height, status, error_message, ...).

Each NNNNN is one partition (see `storage.ingest`), yielded in this order:
1. rows whose status is not "success" (failed_to_download, failed_to_resize): no image, so quarantined with their
   error_message (reason "download failed");
2. the tar's samples in stored order, with the parquet row as metadata and its caption (the tar's KEY.txt and
   KEY.json stand in when a row is missing);
3. "success" rows whose image is not in the tar (reason "missing image").
The parquet is small (one row per URL) and read whole; the tar is streamed.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, Field

from storage.fs import join
from storage.sources.base import RawSample
from storage.sources.folder import decode_caption, list_files
from storage.sources.sa1b import group_members, iter_tar, rejected_member
from storage.tables import read_rows

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices


class Img2DatasetConfig(BaseModel):
    """A folder img2dataset wrote with `output_format="webdataset"`."""

    kind: Literal["img2dataset"] = "img2dataset"
    path: str = Field(description="the img2dataset output folder (local or fsspec URL)")


class Img2DatasetSource:
    """RawSamples of every img2dataset shard in the folder, shard by shard (sorted)."""

    def __init__(self, config: Img2DatasetConfig):
        self.config = config
        self.name = f"img2dataset:{config.path}"

    @cached_property
    def _files(self) -> set[str]:
        return set(list_files(self.config.path, recursive=False))

    def partitions(self) -> list[str]:
        return sorted({f.rsplit(".", 1)[0] for f in self._files if f.endswith((".tar", ".parquet"))})

    def __iter__(self) -> Iterator[RawSample]:
        for shard in self.partitions():
            yield from self.iter_partition(shard)

    def iter_partition(self, partition: str) -> Iterator[RawSample]:
        tar, parquet = f"{partition}.tar", f"{partition}.parquet"
        rows: dict[str, dict] = {}
        if parquet in self._files:
            try:
                rows = {str(r["key"]): r for r in read_rows(join(self.config.path, parquet))}
            except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are OSError / ValueError subclasses
                yield RawSample(source=parquet, key_hint="", data=None, error=f"unreadable: {type(e).__name__}: {e}")
        # 1. URLs img2dataset could not fetch
        for key, row in rows.items():
            if row.get("status") != "success":
                yield RawSample(
                    source=f"{parquet}::{key}",
                    key_hint=key,
                    data=None,
                    meta=_meta(row),
                    error=f"download failed: {row.get('status')}: {row.get('error_message')}",
                )
        # 2. the images
        seen = set()
        if tar in self._files:
            read = 0
            try:
                for stem, files, names in group_members(iter_tar(join(self.config.path, tar))):
                    read += len(names)
                    seen.add(stem)
                    yield self._sample(tar, stem, files, names, rows.get(stem))
            except (tarfile.TarError, OSError, EOFError) as e:
                yield RawSample(
                    source=tar, key_hint="", data=None, error=f"unreadable: tar damaged after {read} members: {e}"
                )
        # 3. downloaded according to the parquet, yet absent from the tar
        for key, row in rows.items():
            if row.get("status") == "success" and key not in seen:
                yield RawSample(
                    source=f"{parquet}::{key}",
                    key_hint=key,
                    data=None,
                    meta=_meta(row),
                    error=f"missing image: {key} is 'success' in {parquet} but not in {tar}",
                )

    def _sample(self, tar: str, stem: str, files: dict[str, bytes], names: list[str], row: dict | None) -> RawSample:
        if not files:
            return rejected_member(tar, names[0])
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            return RawSample(source=f"{tar}::{names[0]}", key_hint=stem, data=None, error=f"missing image: {names}")
        meta, caption, caption_error = {}, None, None
        if row is None and "json" in files:
            try:
                row = json.loads(files["json"])
            except ValueError as e:
                meta["json_error"] = f"{type(e).__name__}: {e}"
            row = row if isinstance(row, dict) else None
        if row is not None:
            meta.update(_meta(row))
            if isinstance(row.get("caption"), str):
                caption, caption_error = decode_caption(row["caption"].encode())
        if caption is None and caption_error is None and "txt" in files:
            caption, caption_error = decode_caption(files["txt"])
        return RawSample(
            source=f"{tar}::{stem}.{ext}",
            key_hint=stem,
            data=files[ext],
            caption=caption,
            caption_error=caption_error,
            meta=meta,
        )


def _meta(row: dict) -> dict:
    """img2dataset's columns except the caption (that goes to KEY.txt); ingest makes the values JSON-safe."""
    return {k: v for k, v in row.items() if k != "caption"}
