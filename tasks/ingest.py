"""Ingest tasks: plan once, ingest one shard (on Ray), finish (tables, then the manifest). See storage.ingest."""

from __future__ import annotations

import sys

from prefect import task
from prefect.cache_policies import NO_CACHE

import storage.ingest as ingest_lib
from storage.artifacts import ArtifactStore
from storage.ingest import IngestPlan, PlanItem
from tasks.config import IngestConfig


@task(name="plan-ingest", cache_policy=NO_CACHE)
def plan_ingest(config: IngestConfig, root: str, artifact_id: str) -> IngestPlan:
    """The artifact's saved plan, or a new one (one pass over the source: hashes, duplicates, keys, shards)."""
    artifact = ArtifactStore(root).get(artifact_id)
    plan = IngestPlan.load(artifact)
    if plan is None:
        source = ingest_lib.build_source(config.source)
        plan = ingest_lib.plan_ingest(source, config.samples_per_shard, progress=sys.stderr.isatty())
        plan.save(artifact)
    return plan


@task(name="ingest-shard", retries=1, cache_policy=NO_CACHE)
def ingest_shard(config: IngestConfig, root: str, artifact_id: str, index: int, items: list[PlanItem]) -> dict:
    """Read, validate and write shard `index` (its planned `items`); returns its counts."""
    source = ingest_lib.build_source(config.source)
    # Only this shard's items travel to the worker: the other shards of the plan stay empty here.
    shards = [[] for _ in range(index)] + [items]
    plan = IngestPlan(source=source.name, samples_per_shard=config.samples_per_shard, shards=shards)
    result = ingest_lib.ingest_shard(source, plan, index, ArtifactStore(root).get(artifact_id), config.rules)
    return {"name": result.name, "written": len(result.samples), "quarantined": len(result.quarantine)}


@task(name="finish-ingest", cache_policy=NO_CACHE)
def finish_ingest(root: str, artifact_id: str) -> dict:
    """Gather the shards' tables and write the manifest; returns the IngestSummary as a dict."""
    artifact = ArtifactStore(root).get(artifact_id)
    return ingest_lib.finish_ingest(IngestPlan.load(artifact), artifact).to_dict()
