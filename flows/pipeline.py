"""The Prefect flows: ingest, caption, extract-features, train (one stage), evaluate and the whole pipeline.

    ingest ──▶ caption (LLaVA, a caption version) ──▶ extract-features (T5 + latents, per stage resolution)
                                                                   │
       samples, evaluation ◀── export ◀── stage 3 ◀── stage 2 ◀── stage 1 ◀────┘

Every flow takes the one `PipelineConfig` (Prefect renders it as a form) and returns a `StageReport` per step.
A flow whose upstream artifact is not given runs (or reuses) the upstream flow first, so `train --stage 3`
alone brings everything it needs up to date.

Resuming is the artifact store's: each step's artifact id hashes its config and its upstream ids, so a re-run
with the same config finds every artifact complete and skips it; a step whose config changed gets a new
artifact, and so does everything downstream of it. Inside a shard-parallel step only shards without a finished
record run (on Ray, one task per shard). A lock per artifact makes a concurrent run on the same workdir wait
for the first and then reuse its work.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.report import (
    StageReport,
    publish_caption,
    publish_evaluation,
    publish_features,
    publish_ingest,
    publish_outputs,
    publish_run_summary,
    publish_training,
)
from storage.artifacts import Artifact, ArtifactStore, artifact_id
from storage.captions import CaptionChoice, CaptionStore, caption_stats
from storage.fs import absolute, join, write_json
from storage.ingest import shard_complete
from storage.sources.shapes import ShapesConfig, heldout_prompts
from tasks.caption import caption_shard, caption_version
from tasks.components import latent_codec, resolve_components
from tasks.config import PipelineConfig
from tasks.evaluate import evaluate_model, evaluation_prompts, model_fingerprint
from tasks.execution import ray_session, run_on_ray
from tasks.export import export_model
from tasks.features import extract_shard, finish_features
from tasks.ingest import finish_ingest, ingest_shard, plan_ingest
from tasks.locks import locked
from tasks.sample import sample_grid
from tasks.train import train_stage

# ---------------------------------------------------------------------------------------------------
#                                     Helpers shared by the flows
# ---------------------------------------------------------------------------------------------------


def artifact_lock(artifact: Artifact):
    """The artifact's lock; logs when another run holds it."""
    logger = get_run_logger()
    return locked(
        artifact.url, on_wait=lambda s: logger.info(f"waited {s:.1f} s for another run to write {artifact.id}")
    )


def complete_upstream(store: ArtifactStore, artifact_id: str, what: str) -> Artifact:
    artifact = store.get(artifact_id)
    if not artifact.complete:
        raise ValueError(
            f"{what} artifact {artifact_id} is not complete: run its flow first (or omit it to run it now)"
        )
    return artifact


def report(step: str, artifact: Artifact, reused: bool, start: float, ran=(), total: int = 0) -> StageReport:
    return StageReport(
        step=step,
        artifact=artifact.id,
        url=artifact.url,
        reused=reused,
        seconds=time.perf_counter() - start,
        ran=list(ran),
        total=total,
        summary=artifact.manifest["summary"],
    )


def caption_root(config: PipelineConfig) -> str:
    return join(config.workdir, "captions")


def stage_resolution(config: PipelineConfig, stage: int) -> int:
    """Image side in pixels the stage trains at: its latent size times the codec's downsampling."""
    components = config.components
    if components.codec == "pixel":
        factor = components.pixel_factor
    else:
        factor = latent_codec(resolve_components(components, config.workdir).codec, "cpu").downsample_factor
    return config.stage(stage).model.input_size * factor


def resolutions(config: PipelineConfig) -> list[int]:
    """The image sides the training stages need features at, ascending."""
    return sorted({stage_resolution(config, n) for n in (1, 2, 3)})


def planned_ids(config: PipelineConfig) -> dict[str, str]:
    """{step: artifact id} of every step the config defines, computed without running (or writing) anything.

    The same ids the flows write (a test holds them to it): `pixart artifacts gc -c CONFIG` keeps these.
    """
    ids = {"ingest": artifact_id("ingest", config.ingest.identity())}
    feature_upstream = [ids["ingest"]]
    if config.caption.enabled:
        ids["caption"] = artifact_id("caption", config.caption.identity(config.components), [ids["ingest"]])
        if config.caption.use != "sidecar":
            feature_upstream.append(ids["caption"])
    for resolution in resolutions(config):
        ids[f"features-{resolution}px"] = artifact_id(
            "features", config.features_identity(resolution), feature_upstream
        )
    previous = None
    for n in (1, 2, 3):
        upstream = [ids[f"features-{stage_resolution(config, n)}px"]] + ([previous] if previous else [])
        ids[f"stage{n}"] = previous = artifact_id(f"stage{n}", config.stage(n).identity(), upstream)
    ids["export"] = artifact_id("export", config.export_identity(), [previous])
    if config.sample.enabled and (config.sample.prompts or config.ingest.source.kind == "shapes"):
        prompts = [p["prompt"] for p in sample_prompts(config)]
        ids["samples"] = artifact_id("samples", config.sample.identity(prompts), [ids["export"]])
    if config.evaluate.enabled and (pairs := evaluation_prompts(config.evaluate, config.ingest.source)):
        ids["evaluation"] = artifact_id("evaluation", config.evaluate.identity(pairs), [ids["export"]])
    return ids


def sample_prompts(config: PipelineConfig) -> list[dict]:
    """The grid's prompts: the configured ones, else the shapes source's held-out prompts per category."""
    if config.sample.prompts:
        return [{"category": "prompts", "prompt": p} for p in config.sample.prompts]
    source = config.ingest.source
    if source.kind != "shapes":
        raise ValueError(
            f"sample.prompts is empty and ingest.source.kind={source.kind!r} has no held-out prompts: "
            "set sample.prompts"
        )
    shapes = ShapesConfig.model_validate(source.model_dump(exclude={"kind"}))
    return [
        {"category": category, "prompt": prompt, "scene": scene.to_dict()}
        for category, prompt, scene in heldout_prompts(shapes, per_category=config.sample.per_category)
    ]


# ---------------------------------------------------------------------------------------------------
#                                              Flows
# ---------------------------------------------------------------------------------------------------


@flow(name="ingest")
def ingest(config: PipelineConfig) -> StageReport:
    """Source -> validated JPEG WebDataset shards: exact duplicates dropped, bad input quarantined with a reason."""
    store, start, ran, total = ArtifactStore(config.workdir), time.perf_counter(), [], 0
    artifact = store.artifact("ingest", config.ingest.identity())
    with ray_session(config.ray) as runner, artifact_lock(artifact):
        reused = artifact.complete
        if not reused:
            plan = plan_ingest(config.ingest, store.root, artifact.id)
            total = len(plan.shards)
            pending = [i for i, name in enumerate(plan.shard_names) if not shard_complete(artifact, name)]
            params = [
                {
                    "config": config.ingest,
                    "root": store.root,
                    "artifact_id": artifact.id,
                    "index": i,
                    "items": plan.shards[i],
                }
                for i in pending
            ]
            names = [plan.shard_names[i] for i in pending]
            run_on_ray(runner(), ingest_shard, params, config.ingest.resources, names, desc="ingest shards")
            ran = names
            finish_ingest(store.root, artifact.id)
    result = report("ingest", artifact, reused, start, ran, total or len(artifact.manifest["shards"]))
    publish_ingest(result)
    return result


@flow(name="caption")
def caption(config: PipelineConfig, images: str | None = None) -> StageReport:
    """Recaption every image shard with LLaVA as one caption version (shards captioned before are skipped)."""
    if not config.caption.enabled:
        raise ValueError("caption.enabled is false: set caption.enabled=true to recaption")
    with ray_session(config.ray) as runner:
        images = images or ingest(config).artifact
        store, start, ran = ArtifactStore(config.workdir), time.perf_counter(), []
        image_artifact = complete_upstream(store, images, "ingest")
        artifact = store.artifact("caption", config.caption.identity(config.components), upstream=[images])
        shards = image_artifact.shards()
        with artifact_lock(artifact):
            reused = artifact.complete
            if not reused:
                components = resolve_components(config.components, config.workdir)
                cfg = config.caption
                version_params = {"llava": components.llava, "prompt": cfg.prompt, "generation": cfg.generation}
                (version,) = run_on_ray(runner(), caption_version, [version_params], cfg.resources, desc="load LLaVA")
                captions = CaptionStore(caption_root(config))
                captions.register(version)
                pending = captions.missing(version.id, shards)
                params = [
                    {"llava": components.llava, "store_root": captions.root, "version": version}
                    | {"image_shard_url": image_artifact.shard_url(info.name), "image_shard": info}
                    | {"batch_size": cfg.batch_size}
                    for info in pending
                ]
                ran = [info.name for info in pending]
                run_on_ray(runner(), caption_shard, params, cfg.resources, ran, desc="caption shards")
                stats = caption_stats(captions, version.id, shards)
                artifact.finish({"version": version.id, "label": version.label, "stats": stats.to_dict()})
    result = report("caption", artifact, reused, start, ran, len(shards))
    publish_caption(result)
    return result


@flow(name="extract-features")
def extract_features(
    config: PipelineConfig, images: str | None = None, captions: str | None = None
) -> dict[int, StageReport]:
    """T5 features and latents of every sample, at each resolution a training stage needs: {pixels: report}."""
    with ray_session(config.ray) as runner:
        images = images or ingest(config).artifact
        cfg = config.caption
        choice, upstream = None, [images]
        if cfg.use != "sidecar":
            captions = captions or caption(config, images).artifact
            version = complete_upstream(ArtifactStore(config.workdir), captions, "caption").manifest["summary"][
                "version"
            ]
            choice = CaptionChoice(
                source=cfg.use, version=version, mix_prob=cfg.mix_prob, seed=cfg.mix_seed, reject_flags=cfg.reject_flags
            )
            upstream.append(captions)
        store = ArtifactStore(config.workdir)
        image_artifact = complete_upstream(store, images, "ingest")
        shards = image_artifact.shards()
        reports = {}
        for resolution in resolutions(config):
            start, ran = time.perf_counter(), []
            artifact = store.artifact("features", config.features_identity(resolution), upstream=upstream)
            with artifact_lock(artifact):
                reused = artifact.complete
                if not reused:
                    components = resolve_components(config.components, config.workdir)
                    common = {"root": store.root, "images_id": images, "features_id": artifact.id}
                    common |= {"components": components, "base_resolution": resolution}
                    pending = [info for info in shards if not artifact.shard_done(info.name)]
                    params = [
                        common
                        | {"image_shard": info, "batch_size": config.extract.batch_size, "choice": choice}
                        | {"caption_root": caption_root(config)}
                        for info in pending
                    ]
                    ran = [info.name for info in pending]
                    desc = f"features {resolution}px"
                    run_on_ray(runner(), extract_shard, params, config.extract.resources, ran, desc=desc)
                    run_on_ray(runner(), finish_features, [common], config.extract.resources, desc="finish features")
            reports[resolution] = report(f"features-{resolution}px", artifact, reused, start, ran, len(shards))
            publish_features(reports[resolution])
    return reports


@flow(name="train")
def train(
    config: PipelineConfig, stage: int = 1, features: str | None = None, previous: str | None = None
) -> StageReport:
    """Train one stage (1 pixel dependency, 2 text-image alignment, 3 aesthetics) with Ray Train.

    features: the feature artifact at the stage's resolution; previous: the previous stage's artifact. Either
    omitted is run (or reused) first.
    """
    run_config = config.stage(stage)
    with ray_session(config.ray) as runner:
        features = features or extract_features(config)[stage_resolution(config, stage)].artifact
        if previous is None and stage > 1:
            previous = train(config, stage - 1).artifact
        store, start = ArtifactStore(config.workdir), time.perf_counter()
        complete_upstream(store, features, "features")
        upstream = [features] + ([previous] if previous else [])
        artifact = store.artifact(f"stage{stage}", run_config.identity(), upstream=upstream)
        with artifact_lock(artifact):
            reused = artifact.complete
            if not reused:
                init = None
                if previous:
                    init = complete_upstream(store, previous, f"stage{stage - 1}").manifest["summary"]["outputs"][
                        "final"
                    ]
                components = resolve_components(config.components, config.workdir)
                runner()  # Ray up, as configured, before Ray Train places its workers on it
                train_stage(
                    run_config,
                    store.root,
                    features,
                    artifact.id,
                    components,
                    init_model=init,
                    ray_address=config.ray.resolved_address(),
                )
        result = report(f"stage{stage}", artifact, reused, start)
        publish_training(result)
    return result


# ---------------------------------------------------------------------------------------------------
#                                 Export, samples, evaluation (pipeline steps)
# ---------------------------------------------------------------------------------------------------


def export_step(config: PipelineConfig, stage_artifact: str, runner) -> StageReport:
    """The stage's EMA model as a diffusers directory (see tasks.export)."""
    store, start = ArtifactStore(config.workdir), time.perf_counter()
    source = complete_upstream(store, stage_artifact, "training stage")
    artifact = store.artifact("export", config.export_identity(), upstream=[stage_artifact])
    with artifact_lock(artifact):
        reused = artifact.complete
        if not reused:
            ema = source.manifest["summary"]["outputs"].get("ema")
            if ema is None:
                raise ValueError(
                    f"{stage_artifact} has no EMA PixArt checkpoint to export (a stage-1 DiT is not exported)"
                )
            params = {"ema_checkpoint": ema, "components": resolve_components(config.components, config.workdir)}
            params |= {"root": store.root, "export_id": artifact.id}
            run_on_ray(runner(), export_model, [params], config.export.resources, desc="export")
    result = report("export", artifact, reused, start)
    publish_outputs(result, "Export: where the diffusers directory is, and its agreement with the trained model")
    return result


def sample_step(config: PipelineConfig, export_artifact: str, runner) -> StageReport:
    """A grid of held-out prompts sampled from the export (see tasks.sample)."""
    store, start = ArtifactStore(config.workdir), time.perf_counter()
    export = complete_upstream(store, export_artifact, "export")
    prompts = sample_prompts(config)
    identity = config.sample.identity([p["prompt"] for p in prompts])
    artifact = store.artifact("samples", identity, upstream=[export_artifact])
    with artifact_lock(artifact):
        reused = artifact.complete
        if not reused:
            params = {"model_dir": export.manifest["summary"]["dir"], "prompts": prompts, "config": config.sample}
            params |= {"root": store.root, "samples_id": artifact.id}
            run_on_ray(runner(), sample_grid, [params], config.sample.resources, desc="sample grid")
    result = report("samples", artifact, reused, start)
    publish_outputs(result, "Samples: the held-out prompt grid")
    return result


def no_evaluation_prompts(config: PipelineConfig) -> str:
    return (
        f"evaluate.prompts is empty and ingest.source.kind={config.ingest.source.kind!r} has no held-out prompts: "
        "set evaluate.prompts ({category: [captions of the shapes grammar]}) or evaluate.enabled=false"
    )


def evaluation_step(
    config: PipelineConfig,
    prompts: list[tuple[str, str]],
    model: str,
    upstream: list[str],
    runner,
    model_identity: dict | None = None,
) -> StageReport:
    """The model sampled on (category, prompt) pairs and judged per category (see tasks.evaluate).

    upstream: the model's artifact; a model from outside the store has none, and `model_identity` names it.
    Metrics whose weights are missing are skipped, never fatal: the report records why, and so does the log.
    """
    store, start = ArtifactStore(config.workdir), time.perf_counter()
    identity = config.evaluate.identity(prompts) | (model_identity or {})
    artifact = store.artifact("evaluation", identity, upstream=upstream)
    with artifact_lock(artifact):
        reused = artifact.complete
        if not reused:
            params = {"model": model, "prompts": prompts, "config": config.evaluate}
            params |= {"components": resolve_components(config.components, config.workdir)}
            params |= {"root": store.root, "evaluation_id": artifact.id}
            run_on_ray(runner(), evaluate_model, [params], config.evaluate.resources, desc="evaluate")
    result = report("evaluation", artifact, reused, start)
    logger = get_run_logger()
    for name, metric in result.summary["metrics"].items():
        if not metric["available"]:
            logger.warning(f"evaluation: {name} skipped, {metric['reason']} (the report records it)")
    logger.info(f"evaluation: overall {result.summary['overall']:.3f}, report {result.summary['files']['markdown']}")
    publish_evaluation(result)
    return result


def model_to_evaluate(store: ArtifactStore, model: str) -> tuple[str, list[str], dict]:
    """(what to load, upstream artifact ids, model identity) for the `evaluate` flow's `model`: an artifact id
    (export, or a stage's EMA checkpoint) or a path outside the store (named by its fingerprint)."""
    if not re.fullmatch(r"[a-z0-9_]+-[0-9a-f]{16}", model):
        model = absolute(model)  # the evaluation task runs on Ray, in another directory
        return model, [], {"model": model_fingerprint(model)}
    artifact = complete_upstream(store, model, "model")
    summary = artifact.manifest["summary"]
    if artifact.stage == "export":
        return summary["dir"], [model], {}
    ema = summary.get("outputs", {}).get("ema")
    if ema is None:
        raise ValueError(
            f"{model} has no EMA PixArt checkpoint to evaluate (a stage-1 DiT is class-conditional): pass an "
            "export or a stage 2 or 3 artifact"
        )
    return ema, [model], {}


@flow(name="evaluate")
def evaluate(config: PipelineConfig, model: str | None = None) -> StageReport:
    """Judge a model on held-out shapes prompts, per T2I-CompBench category: report, grids, Prefect table.

    model: an artifact id of the workdir (export-..., stage2-..., stage3-...), an export or stage directory, or a
    checkpoint (ema.pth, final.pt); omitted: the config's export, run (or reused) first.
    """
    if not config.evaluate.enabled:
        raise ValueError("evaluate.enabled is false: set evaluate.enabled=true to evaluate")
    prompts = evaluation_prompts(config.evaluate, config.ingest.source)
    if not prompts:
        raise ValueError(no_evaluation_prompts(config))
    with ray_session(config.ray) as runner:
        if model is None:
            model = export_step(config, train(config, 3).artifact, runner).artifact
        path, upstream, identity = model_to_evaluate(ArtifactStore(config.workdir), model)
        return evaluation_step(config, prompts, path, upstream, runner, identity)


@flow(name="pipeline")
def pipeline(config: PipelineConfig) -> dict:
    """ingest -> caption -> extract -> stage 1 -> 2 -> 3 -> export -> samples, evaluation, up to `config.until`."""
    start, reports = time.perf_counter(), []
    with ray_session(config.ray) as runner:
        images = ingest(config)
        reports.append(images)
        captions = None
        if config.runs("caption") and config.caption.enabled:
            captions = caption(config, images.artifact)
            reports.append(captions)
        previous = None
        if config.runs("extract"):
            features = extract_features(config, images.artifact, captions.artifact if captions else None)
            reports += features.values()
            for n in (1, 2, 3):
                if config.runs(f"stage{n}"):
                    at = features[stage_resolution(config, n)].artifact
                    previous = train(config, n, at, previous.artifact if previous else None)
                    reports.append(previous)
        if previous is not None and config.runs("export") and config.export.enabled:
            export = export_step(config, previous.artifact, runner)
            reports.append(export)
            if config.runs("sample") and config.sample.enabled:
                reports.append(sample_step(config, export.artifact, runner))
            if config.runs("evaluate") and config.evaluate.enabled:
                if prompts := evaluation_prompts(config.evaluate, config.ingest.source):
                    model = export.summary["dir"]
                    reports.append(evaluation_step(config, prompts, model, [export.artifact], runner))
                else:
                    get_run_logger().warning(f"evaluation skipped: {no_evaluation_prompts(config)}")
    seconds = time.perf_counter() - start
    summary = {
        "workdir": config.workdir,
        "seconds": seconds,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flow_run": str(flow_run.get_id()),
        "steps": [r.to_dict() for r in reports],
    }
    name = f"{summary['finished'].replace(':', '')}-{summary['flow_run'][:8]}.json"
    summary["path"] = join(config.workdir, "runs", name)
    write_json(summary["path"], summary)
    summary["markdown"] = publish_run_summary(reports, seconds, config.workdir)
    get_run_logger().info(summary["markdown"])
    return summary
