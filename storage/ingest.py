"""Ingest: any source -> validated RGB JPEG WebDataset shards in an artifact, one shard at a time, resumable.

Three steps, each usable alone so an orchestrator can run the middle one shard-parallel (Ray) and redo only what
is missing:

    plan = plan_ingest(source, samples_per_shard)      # 1. one pass: hash, dedup, name, assign samples to shards
    plan.save(artifact)
    for i in range(len(plan.shards)):                  # 2. any order, any worker; skip those already complete
        if not shard_complete(artifact, plan.shard_name(i)):
            ingest_shard(source, plan, i, artifact)
    summary = finish_ingest(plan, artifact)            # 3. tables, then the manifest (last)

`ingest(source, artifact)` does all three in-process, reusing a saved plan and every complete shard.

Reading each shard's samples again without re-reading the source from the start: sources may be *partitioned*
(`partitions()` -> stable ids, `iter_partition(id)` -> that part's RawSamples, the same order every time). The plan
stores each sample's (partition, position); a shard reads only its partitions, and within each stops after its
last position. A folder is one partition per file (a shard reads exactly its own files); SA-1B and img2dataset are
one partition per tar (a tar is streamed once per shard drawing from it: pick samples_per_shard near the tar's
sample count for a single pass). A numbered source (`len()` and `iter_range(start, stop)`, like the synthetic
shapes) is cut into ranges of RANGE_PARTITION samples. Any other source is one partition: fine for small ones,
quadratic for big ones.

Artifact layout (beside spec.json, shards/NAME.tar and shards/NAME.json of the artifact store):

    plan.parquet                  one row per source sample: where it is read, its hash and outcome of planning
    parts/NAME.samples.parquet    per shard, written after the shard: its manifest rows   } a shard is complete when
    parts/NAME.quarantine.parquet per shard: what it rejected                              } the tar, its record and
    samples.parquet, shards.parquet, quarantine.parquet, duplicates.parquet                  both parts exist
    manifest.json                 last (artifact.finish), with the IngestSummary

Quarantine reasons (quarantine.parquet `reason`; `detail` says more):
    from the image       empty, not an image, too large, too small, truncated, corrupt, unsupported
                         (storage.images)
    from the source      unreadable, unsafe member name, unexpected member, missing image, download failed: a
                         source reports a sample it could not read as `RawSample.error = "<reason>: <detail>"`
    from ingest itself   changed (the bytes at a planned position differ from the plan's hash), error (validation
                         raised unexpectedly)
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import pyarrow as pa
from pydantic import BaseModel
from tqdm.auto import tqdm

from storage.artifacts import Artifact
from storage.buckets import nearest_bucket
from storage.fs import exists
from storage.images import ImageRules, check_image
from storage.shards import ShardInfo, shard_name
from storage.sources.base import RawSample, Source
from storage.sources.folder import FolderConfig, FolderSource
from storage.sources.img2dataset import Img2DatasetConfig, Img2DatasetSource
from storage.sources.sa1b import SA1BConfig, SA1BSource
from storage.sources.sidecar import SidecarCaptions, with_captions
from storage.tables import read_rows, read_table, write_table

# ---------------------------------------------------------------------------------------------------
#                                     Sources: building and reading
# ---------------------------------------------------------------------------------------------------


class PartitionedSource(Source, Protocol):
    """A source that can be read part by part (see the module docstring)."""

    def partitions(self) -> list[str]: ...

    def iter_partition(self, partition: str) -> Iterator[RawSample]: ...


class RangeSource(Source, Protocol):
    """A source whose samples are numbered: `len(source)` of them, any `iter_range(start, stop)` on its own."""

    def __len__(self) -> int: ...

    def iter_range(self, start: int, stop: int) -> Iterator[RawSample]: ...


SOURCE_KINDS = ("folder", "sa1b", "img2dataset", "shapes")
RANGE_PARTITION = 64  # samples per partition of a RangeSource


def _kind(config: BaseModel | dict) -> str | None:
    if isinstance(config, dict):
        return config.get("kind")
    if hasattr(config, "kind"):
        return config.kind
    from storage.sources.shapes import ShapesConfig  # the one source config without a `kind` field

    return "shapes" if isinstance(config, ShapesConfig) else None


def build_source(config: BaseModel | dict) -> Source:
    """The source a config (a pydantic model or its dict) describes; its `kind` is one of SOURCE_KINDS.

    "shapes" is imported only when asked for: `storage.sources.shapes.ShapesSource(ShapesConfig)`; as a dict it
    is {"kind": "shapes", **ShapesConfig fields}. An SA-1B config with `captions` gets them attached by stem.
    """
    kind = _kind(config)
    if kind == "shapes":
        from storage.sources.shapes import ShapesConfig, ShapesSource

        if isinstance(config, dict):
            config = ShapesConfig.model_validate({k: v for k, v in config.items() if k != "kind"})
        return ShapesSource(config)
    models = {"folder": FolderConfig, "sa1b": SA1BConfig, "img2dataset": Img2DatasetConfig}
    if kind not in models:
        raise ValueError(f"source kind={kind!r} is not one of {list(SOURCE_KINDS)}")
    config = models[kind].model_validate(config.model_dump() if isinstance(config, BaseModel) else config)
    if kind == "folder":
        return FolderSource(config)
    if kind == "img2dataset":
        return Img2DatasetSource(config)
    source = SA1BSource(config)
    return with_captions(source, SidecarCaptions(config.captions)) if config.captions else source


def source_partitions(source: Source | PartitionedSource | RangeSource) -> list[str]:
    """The partition ids of `source`: its own, "start:stop" ranges of a RangeSource, or [""] (all of it)."""
    if hasattr(source, "partitions"):
        return list(source.partitions())
    if hasattr(source, "iter_range"):
        n = len(source)
        return [f"{start}:{min(start + RANGE_PARTITION, n)}" for start in range(0, n, RANGE_PARTITION)]
    return [""]


def iter_source_partition(source: Source | PartitionedSource | RangeSource, partition: str) -> Iterator[RawSample]:
    if hasattr(source, "partitions"):
        return source.iter_partition(partition)
    if hasattr(source, "iter_range"):
        start, stop = map(int, partition.split(":"))
        return source.iter_range(start, stop)
    return iter(source)


# ---------------------------------------------------------------------------------------------------
#                                     Keys, metadata, table schemas
# ---------------------------------------------------------------------------------------------------

MAX_KEY_CHARS = 80


def safe_key(hint: str) -> str:
    """`hint` as a shard key: accents folded to ASCII, anything outside [A-Za-z0-9_-] (dots, '/') -> '_'."""
    ascii_hint = unicodedata.normalize("NFKD", hint).encode("ascii", "ignore").decode()
    # no leading '_' either: webdataset skips members named like "__meta__"
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_hint).strip("_-")[:MAX_KEY_CHARS].strip("_-")
    return key or "sample"


def unique_key(hint: str, sha256: str, used: set[str]) -> str:
    """safe_key(hint), or on a collision the same + '_' + 8 hex of the content hash (deterministic); adds to `used`."""
    key = base = safe_key(hint)
    n = 0
    while key in used:
        key = f"{base}_{sha256[:8]}" if n == 0 else f"{base}_{sha256[:8]}_{n}"
        n += 1
    used.add(key)
    return key


def json_safe(value):
    """`value` with only JSON types: non-finite floats -> None, bytes and other objects -> str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def split_error(error: str) -> tuple[str, str]:
    """("reason", "detail") from a source's "<reason>: <detail>"."""
    reason, _, detail = error.partition(": ")
    return reason, detail


SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("sha256", pa.string()),  # of the source bytes (the dedup key), not of KEY.jpg when re-encoded
        ("width", pa.int32()),  # after EXIF rotation
        ("height", pa.int32()),
        ("aspect_ratio", pa.float64()),  # height / width, as PixArt's buckets are keyed
        ("bucket", pa.string()),  # storage.buckets ratio key, e.g. "0.57"
        ("has_caption", pa.bool_()),
        ("caption_chars", pa.int32()),
        ("caption_error", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
SHARD_SCHEMA = pa.schema([("name", pa.string()), ("count", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])
DUPLICATE_SCHEMA = pa.schema([("source", pa.string()), ("sha256", pa.string()), ("duplicate_of", pa.string())])
PLAN_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("partition", pa.string()),
        ("position", pa.int64()),  # index within the partition; null for a partition that failed as a whole
        ("outcome", pa.string()),  # "planned" | "duplicate" | "rejected"
        ("sha256", pa.string()),
        ("key", pa.string()),  # planned: its key; duplicate: the key of the sample it repeats
        ("shard", pa.string()),  # planned only
        ("reason", pa.string()),  # rejected only
        ("detail", pa.string()),
    ]
)


# ---------------------------------------------------------------------------------------------------
#                                             1. Plan
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanItem:
    """One sample to ingest: where to read it again, what its bytes must hash to, and its key."""

    source: str
    partition: str
    position: int
    sha256: str
    key: str


@dataclass
class IngestPlan:
    """Which source samples go to which shard, after exact-duplicate removal; plus what planning set aside."""

    source: str  # the source's name, checked when a saved plan is reused
    samples_per_shard: int
    shards: list[list[PlanItem]]
    duplicates: list[dict] = field(default_factory=list)  # DUPLICATE_SCHEMA rows
    rejected: list[dict] = field(default_factory=list)  # unreadable at planning: quarantine rows + partition, position

    @staticmethod
    def shard_name(index: int) -> str:
        return shard_name(index)

    @property
    def shard_names(self) -> list[str]:
        return [shard_name(i) for i in range(len(self.shards))]

    @property
    def planned(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def samples_in(self) -> int:
        return self.planned + len(self.duplicates) + len(self.rejected)

    # -- persistence: plan.parquet in the artifact -------------------------------------------------

    def to_table(self) -> pa.Table:
        rows = [
            {**asdict(item), "outcome": "planned", "shard": shard_name(i)}
            for i, items in enumerate(self.shards)
            for item in items
        ]
        rows += [
            {"source": d["source"], "outcome": "duplicate", "sha256": d["sha256"], "key": d["duplicate_of"]}
            for d in self.duplicates
        ]
        rows += [{**r, "outcome": "rejected"} for r in self.rejected]
        metadata = {"source": self.source, "samples_per_shard": str(self.samples_per_shard)}
        return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA.with_metadata(metadata))

    @classmethod
    def from_table(cls, table: pa.Table) -> IngestPlan:
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        plan = cls(source=metadata["source"], samples_per_shard=int(metadata["samples_per_shard"]), shards=[])
        shards: dict[str, list[PlanItem]] = {}
        for row in table.to_pylist():
            if row["outcome"] == "planned":
                item = PlanItem(row["source"], row["partition"], row["position"], row["sha256"], row["key"])
                shards.setdefault(row["shard"], []).append(item)
            elif row["outcome"] == "duplicate":
                plan.duplicates.append({"source": row["source"], "sha256": row["sha256"], "duplicate_of": row["key"]})
            else:
                plan.rejected.append({k: row[k] for k in ("source", "partition", "position", "reason", "detail")})
        plan.shards = [shards[name] for name in sorted(shards)]
        return plan

    def save(self, artifact: Artifact) -> None:
        write_table(artifact.path("plan.parquet"), self.to_table())

    @classmethod
    def load(cls, artifact: Artifact) -> IngestPlan | None:
        url = artifact.path("plan.parquet")
        return cls.from_table(read_table(url)) if exists(url) else None


def plan_ingest(source: Source, samples_per_shard: int = 1000, progress: bool = False) -> IngestPlan:
    """One pass over `source`: hash every sample's bytes, drop exact duplicates (the first occurrence is kept), give
    each remaining sample a unique key and a shard (in source order, `samples_per_shard` each). Images are not
    decoded here; samples the source could not read become quarantine rows."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be at least 1")
    first_key: dict[str, str] = {}  # sha256 -> key of its first occurrence
    used: set[str] = set()
    planned: list[PlanItem] = []
    plan = IngestPlan(source=source.name, samples_per_shard=samples_per_shard, shards=[])
    bar = tqdm(desc=f"plan {source.name}", unit="sample", disable=not progress)
    for partition in source_partitions(source):
        position = -1
        try:
            for position, raw in enumerate(iter_source_partition(source, partition)):
                bar.update(1)
                if raw.error is not None or raw.data is None:
                    reason, detail = split_error(raw.error or "unreadable: the source gave no bytes")
                    plan.rejected.append(
                        {"source": raw.source, "partition": partition, "position": position}
                        | {"reason": reason, "detail": detail}
                    )
                    continue
                sha = hashlib.sha256(raw.data).hexdigest()
                if sha in first_key:
                    plan.duplicates.append({"source": raw.source, "sha256": sha, "duplicate_of": first_key[sha]})
                    continue
                first_key[sha] = unique_key(raw.key_hint, sha, used)
                planned.append(PlanItem(raw.source, partition, position, sha, first_key[sha]))
        except Exception as e:  # a source that raises instead of yielding an error sample: keep what it gave
            plan.rejected.append(
                {"source": f"{source.name}::{partition}" if partition else source.name}
                | {"partition": partition, "position": None}
                | {"reason": "unreadable", "detail": f"stopped after {position + 1} samples: {type(e).__name__}: {e}"}
            )
    bar.close()
    plan.shards = [planned[i : i + samples_per_shard] for i in range(0, len(planned), samples_per_shard)]
    return plan


# ---------------------------------------------------------------------------------------------------
#                                             2. One shard
# ---------------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    """What one shard wrote: its record, its samples.parquet rows and its quarantine rows."""

    name: str
    info: ShardInfo
    samples: list[dict]
    quarantine: list[dict]


def parts_url(artifact: Artifact, name: str, table: str) -> str:
    """parts/NAME.<table>.parquet: per-shard rows ("samples" or "quarantine")."""
    return artifact.path("parts", f"{name.removesuffix('.tar')}.{table}.parquet")


def shard_complete(artifact: Artifact, name: str, checksum: bool = True) -> bool:
    """True if shard `name` was fully ingested: tar matching its record, and both per-shard tables written."""
    return (
        artifact.shard_done(name, checksum)
        and exists(parts_url(artifact, name, "samples"))
        and exists(parts_url(artifact, name, "quarantine"))
    )


def _quarantine(source: str, reason: str, detail: str) -> dict:
    return {"source": source, "reason": reason, "detail": detail}


def _sample(raw: RawSample, item: PlanItem, shard: str, rules: ImageRules) -> tuple[dict | None, dict]:
    """(WebDataset sample, samples.parquet row), or (None, quarantine row)."""
    if raw.error is not None or raw.data is None:
        return None, _quarantine(item.source, *split_error(raw.error or "unreadable: the source gave no bytes"))
    sha = hashlib.sha256(raw.data).hexdigest()
    if sha != item.sha256:
        return None, _quarantine(item.source, "changed", f"sha256 {sha} != {item.sha256} when planned")
    check = check_image(raw.data, rules)
    if not check.ok:
        return None, _quarantine(item.source, check.reason, check.detail)
    caption = raw.caption or ""
    row = {
        "key": item.key,
        "source": item.source,
        "shard": shard,
        "sha256": sha,
        "width": check.width,
        "height": check.height,
        "aspect_ratio": check.height / check.width,
        "bucket": nearest_bucket(check.height, check.width),
        "has_caption": bool(caption.strip()),
        "caption_chars": len(caption),
        "caption_error": raw.caption_error,
    }
    record = {k: v for k, v in row.items() if k != "shard"} | {
        "source_format": check.source_format,
        "source_mode": check.source_mode,
        "reencoded": check.reencoded,
        "meta": json_safe(raw.meta),
    }
    sample = {"__key__": item.key, "jpg": check.jpeg, "json": record, "txt": caption}
    if raw.cls is not None:
        sample["cls"] = int(raw.cls)
    return sample, row


def ingest_shard(
    source: Source,
    plan: IngestPlan,
    index: int,
    artifact: Artifact,
    rules: ImageRules | None = None,
    on_sample: Callable[[], None] | None = None,
) -> ShardResult:
    """Read, validate and write shard `index` of `plan` (tar + record, then parts/ tables). Idempotent: the same
    inputs write the same bytes, so re-running a shard, or two workers racing on it, is harmless."""
    rules = rules or ImageRules()
    name, items = shard_name(index), plan.shards[index]
    rows: list[dict] = []
    rejected: list[dict] = []

    def samples() -> Iterator[dict]:
        by_partition: dict[str, dict[int, PlanItem]] = {}
        for item in items:  # plan order: partitions in source order, positions ascending
            by_partition.setdefault(item.partition, {})[item.position] = item
        for partition, wanted in by_partition.items():
            last, failure = max(wanted), None
            stream = iter_source_partition(source, partition)
            try:
                for position, raw in enumerate(stream):
                    if position > last:
                        break
                    if (item := wanted.pop(position, None)) is None:
                        continue
                    try:
                        sample, row = _sample(raw, item, name, rules)
                    except Exception as e:  # a failure in validation itself still must not lose the sample
                        sample, row = None, _quarantine(item.source, "error", f"{type(e).__name__}: {e}")
                    (rows if sample is not None else rejected).append(row)
                    if on_sample:
                        on_sample()
                    if sample is not None:
                        yield sample
            except Exception as e:  # the source raised: what it could not give is quarantined below
                failure = f"{type(e).__name__}: {e}"
            finally:
                if hasattr(stream, "close"):
                    stream.close()
            for item in wanted.values():  # planned but not seen this time
                detail = f"read failed: {failure}" if failure else f"position {item.position} of {partition!r} gone"
                rejected.append(_quarantine(item.source, "unreadable" if failure else "changed", detail))
                if on_sample:
                    on_sample()

    info = artifact.write_shard(name, samples())
    write_table(parts_url(artifact, name, "samples"), rows, SAMPLE_SCHEMA)
    write_table(parts_url(artifact, name, "quarantine"), rejected, QUARANTINE_SCHEMA)
    return ShardResult(name=name, info=info, samples=rows, quarantine=rejected)


# ---------------------------------------------------------------------------------------------------
#                                        3. Tables and manifest
# ---------------------------------------------------------------------------------------------------


@dataclass
class IngestSummary:
    """What an ingest produced. Everything but `shards_run` goes into the manifest (and is the same on re-runs)."""

    source: str
    samples_in: int  # every sample the source offered, = written + duplicates + sum(quarantined)
    written: int
    duplicates: int
    quarantined: dict[str, int]  # reason -> count
    shards: int
    bytes: int
    shards_run: list[str] = field(default_factory=list)  # shards this call (re)wrote; the rest were reused

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "shards_run"}

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.quarantined.items())) or "none"
        return (
            f"ingest of {self.source}\n"
            f"  in          {self.samples_in}\n"
            f"  written     {self.written} in {self.shards} shards ({self.bytes / 1e6:.1f} MB)"
            f"{f'; {len(self.shards_run)} shards written now' if self.shards_run else ''}\n"
            f"  duplicates  {self.duplicates}\n"
            f"  quarantined {sum(self.quarantined.values())} ({reasons})"
        )


def finish_ingest(plan: IngestPlan, artifact: Artifact) -> IngestSummary:
    """Gather the per-shard tables into samples/shards/quarantine/duplicates.parquet, then write the manifest."""
    samples, quarantine, records = [], list(plan.rejected), []
    for name in plan.shard_names:
        if not shard_complete(artifact, name, checksum=False):
            raise RuntimeError(f"shard {name} of artifact {artifact.id} is not complete: ingest it before finishing")
        samples += read_rows(parts_url(artifact, name, "samples"))
        quarantine += read_rows(parts_url(artifact, name, "quarantine"))
        records.append(artifact.shard_record(name))
    quarantine = [{k: r[k] for k in QUARANTINE_SCHEMA.names} for r in quarantine]
    write_table(artifact.path("samples.parquet"), samples, SAMPLE_SCHEMA)
    write_table(artifact.path("shards.parquet"), [r.to_dict() for r in records], SHARD_SCHEMA)
    write_table(artifact.path("quarantine.parquet"), quarantine, QUARANTINE_SCHEMA)
    write_table(artifact.path("duplicates.parquet"), plan.duplicates, DUPLICATE_SCHEMA)
    summary = IngestSummary(
        source=plan.source,
        samples_in=plan.samples_in,
        written=len(samples),
        duplicates=len(plan.duplicates),
        quarantined=dict(sorted(Counter(r["reason"] for r in quarantine).items())),
        shards=len(records),
        bytes=sum(r.bytes for r in records),
    )
    artifact.finish(summary.to_dict(), shards=records)
    return summary


def ingest(
    source: Source,
    artifact: Artifact,
    samples_per_shard: int = 1000,
    rules: ImageRules | None = None,
    progress: bool = True,
    checksum: bool = True,
) -> IngestSummary:
    """Plan (or reuse the saved plan), ingest every shard not already complete, write the tables and manifest.

    `checksum=False` trusts a complete shard whose size matches its record without re-hashing it.
    """
    # 1. Plan, unless an earlier run of this artifact saved one
    plan = IngestPlan.load(artifact)
    if plan is None:
        plan = plan_ingest(source, samples_per_shard, progress)
        plan.save(artifact)
    elif (plan.source, plan.samples_per_shard) != (source.name, samples_per_shard):
        raise ValueError(
            f"artifact {artifact.id} was planned for source={plan.source!r}, samples_per_shard="
            f"{plan.samples_per_shard}; got {source.name!r}, {samples_per_shard}: use a new artifact"
        )
    # 2. Shards, skipping complete ones
    shards_run = []
    with tqdm(total=plan.planned, desc=f"ingest {source.name}", unit="img", disable=not progress) as bar:
        for index, name in enumerate(plan.shard_names):
            if shard_complete(artifact, name, checksum):
                bar.update(len(plan.shards[index]))
                continue
            ingest_shard(source, plan, index, artifact, rules, on_sample=lambda: bar.update(1))
            shards_run.append(name)
    # 3. Tables and manifest
    summary = finish_ingest(plan, artifact)
    summary.shards_run = shards_run
    return summary
