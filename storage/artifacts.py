"""The artifact store: every stage's output is a directory named by what produced it.

    <root>/<stage>-<hash>/spec.json        stage, config, upstream ids, format version (written first)
    <root>/<stage>-<hash>/shards/NAME.tar  shard-parallel data
    <root>/<stage>-<hash>/shards/NAME.json one record per finished shard (ShardInfo), written after the tar
    <root>/<stage>-<hash>/...              anything else the stage writes (tables, checkpoints)
    <root>/<stage>-<hash>/manifest.json    written LAST: the artifact is complete iff it exists

The hash covers (stage, config, upstream ids, format version), so a re-run with the same inputs finds the
same directory and reuses it; a changed config, or a changed upstream, gives a new one. Inside a
shard-parallel artifact each shard completes on its own: a re-run redoes only shards whose record is
missing or whose file no longer matches it. Writes are atomic and content-addressed, so two runs racing
on the same artifact at worst both write identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from storage.fs import absolute, exists, filesystem, join, read_json, write_json
from storage.shards import ShardInfo, verify_shard, write_shard

FORMAT_VERSION = 1


def artifact_id(stage: str, config: dict, upstream: Iterable[str] = (), version: int = FORMAT_VERSION) -> str:
    """`<stage>-<16 hex>` from a canonical JSON of everything that determines the artifact's content."""
    if not re.fullmatch(r"[a-z0-9_]+", stage):
        raise ValueError(f"stage name {stage!r} must be lowercase letters, digits and underscores")
    payload = json.dumps(
        {"stage": stage, "config": config, "upstream": list(upstream), "version": version},
        sort_keys=True,
        default=str,
    )
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


class Artifact:
    """One stage output directory (see the module docstring for its layout)."""

    def __init__(self, root: str, artifact_id: str):
        self.root = root
        self.id = artifact_id
        self.url = join(root, artifact_id)

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    # -- spec ------------------------------------------------------------------------------------

    @property
    def spec(self) -> dict:
        return read_json(self.path("spec.json"))

    @property
    def stage(self) -> str:
        return self.spec["stage"]

    @property
    def upstream(self) -> list[str]:
        return self.spec["upstream"]

    # -- shards ----------------------------------------------------------------------------------

    def shard_url(self, name: str) -> str:
        return self.path("shards", name)

    def shard_record(self, name: str) -> ShardInfo | None:
        record = self.path("shards", name.removesuffix(".tar") + ".json")
        return ShardInfo(**read_json(record)) if exists(record) else None

    def shard_done(self, name: str, checksum: bool = True) -> bool:
        """True if the shard was finished and its file still matches the record (size, and sha256)."""
        info = self.shard_record(name)
        return info is not None and verify_shard(self.shard_url(name), info, checksum) is None

    def write_shard(self, name: str, samples: Iterable[dict]) -> ShardInfo:
        """Write a shard, then its record: a crash between the two only costs redoing this shard."""
        info = write_shard(self.shard_url(name), samples)
        write_json(self.path("shards", name.removesuffix(".tar") + ".json"), info.to_dict())
        return info

    def shard_records(self) -> list[ShardInfo]:
        """Records of every finished shard, by name."""
        fs, path = filesystem(self.path("shards"))
        if not fs.exists(path):
            return []
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".json"))
        return [ShardInfo(**read_json(self.path("shards", n))) for n in names]

    # -- completion ------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return exists(self.path("manifest.json"))

    def finish(self, summary: dict | None = None, shards: list[ShardInfo] | None = None) -> dict:
        """Write manifest.json (last): the shard records and a stage summary. Returns the manifest."""
        shards = self.shard_records() if shards is None else shards
        manifest = {
            "id": self.id,
            "stage": self.stage,
            "shards": [s.to_dict() for s in shards],
            "summary": summary or {},
        }
        write_json(self.path("manifest.json"), manifest)
        return manifest

    @property
    def manifest(self) -> dict:
        if not self.complete:
            raise FileNotFoundError(f"artifact {self.id} is not complete (no manifest.json)")
        return read_json(self.path("manifest.json"))

    def shards(self) -> list[ShardInfo]:
        """The shards of a complete artifact, as its manifest lists them."""
        return [ShardInfo(**s) for s in self.manifest["shards"]]

    def verify(self) -> dict[str, str]:
        """{shard name: problem} for every shard of the manifest that is missing, truncated or altered."""
        problems = {}
        for info in self.shards():
            if problem := verify_shard(self.shard_url(info.name), info):
                problems[info.name] = problem
        return problems


@dataclass
class ArtifactSummary:
    id: str
    stage: str
    complete: bool
    shards: int
    bytes: int


class ArtifactStore:
    """Artifacts under one root: a local directory or an fsspec URL."""

    def __init__(self, root: str):
        self.root = absolute(root).rstrip("/")  # absolute: Ray workers run in other directories
        fs, path = filesystem(self.root)
        fs.makedirs(path, exist_ok=True)

    def artifact(self, stage: str, config: dict, upstream: Iterable[str] = ()) -> Artifact:
        """The artifact for these inputs, created (spec.json) if new, reused if it exists."""
        upstream = list(upstream)
        art = Artifact(self.root, artifact_id(stage, config, upstream))
        if not exists(art.path("spec.json")):
            write_json(
                art.path("spec.json"),
                {"stage": stage, "config": config, "upstream": upstream, "version": FORMAT_VERSION},
            )
        return art

    def get(self, artifact_id: str) -> Artifact:
        art = Artifact(self.root, artifact_id)
        if not exists(art.path("spec.json")):
            raise FileNotFoundError(f"no artifact {artifact_id} under {self.root}")
        return art

    def ids(self) -> list[str]:
        fs, path = filesystem(self.root)
        return sorted(
            p.rstrip("/").rsplit("/", 1)[-1]
            for p in fs.ls(path, detail=False)
            if fs.exists(p.rstrip("/") + "/spec.json")
        )

    def ls(self) -> list[ArtifactSummary]:
        out = []
        for aid in self.ids():
            art = Artifact(self.root, aid)
            records = art.shard_records()
            out.append(ArtifactSummary(aid, art.stage, art.complete, len(records), sum(r.bytes for r in records)))
        return out

    def reachable(self, keep: Iterable[str]) -> dict[str, str]:
        """{artifact id: the kept id it is reached from} for each stored id of `keep` and everything upstream of
        them (a kept id maps to itself)."""
        live = {aid: aid for aid in keep if exists(join(self.root, aid, "spec.json"))}
        todo = list(live)
        while todo:
            aid = todo.pop(0)
            for up in Artifact(self.root, aid).upstream:
                if up not in live and exists(join(self.root, up, "spec.json")):
                    live[up] = live[aid]
                    todo.append(up)
        return live

    def gc(self, keep: Iterable[str], dry_run: bool = False) -> list[str]:
        """Delete every artifact not reachable from `keep` through upstream links; returns the deleted ids."""
        live = self.reachable(keep)
        dead = [aid for aid in self.ids() if aid not in live]
        if not dry_run:
            fs, _ = filesystem(self.root)
            for aid in dead:
                fs.rm(filesystem(join(self.root, aid))[1], recursive=True)
        return dead
