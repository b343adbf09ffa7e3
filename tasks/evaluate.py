"""Evaluation of a trained model: held-out shapes prompts sampled, judged exactly and reported (models.evaluate).

<evaluation>/report.md            per category: accuracy with a 95% interval, attribute pass rates; metrics, settings
<evaluation>/report.json          the same as data, every image's verdict included
<evaluation>/grid_<category>.png  the category's prompts x their images, framed green (right) or red (wrong)

The model is an export directory, a stage directory (ema.pth) or a checkpoint; what it does not hold itself (a
stage's T5 and codec) comes from the pipeline's components.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.evaluate import evaluate
from storage.artifacts import ArtifactStore
from storage.fs import filesystem
from storage.sources.shapes import heldout_prompts, parse_caption
from tasks.components import Components, device
from tasks.config import EvaluateConfig, SourceConfig
from tasks.export import load_exported
from tasks.locks import is_local


def evaluation_prompts(config: EvaluateConfig, source: SourceConfig) -> list[tuple[str, str]]:
    """(category, prompt) pairs to evaluate: `config.prompts`, else a shapes source's held-out prompts.

    Empty for another source without `config.prompts`: the judge reads only images of the shapes grammar.
    """
    if config.prompts:
        return [(category, prompt) for category, prompts in config.prompts.items() for prompt in prompts]
    if source.kind != "shapes":
        return []
    return [(category, prompt) for category, prompt, _ in heldout_prompts(source, per_category=config.per_category)]


def model_fingerprint(path: str) -> str:
    """What identifies a model outside the artifact store: its path and each file's size and modification time
    (a checkpoint written again at the same path is another model)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"model {path} does not exist: pass an artifact id of the workdir (export-..., stage3-...), an export "
            "or stage directory, or a checkpoint"
        )
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = json.dumps({"path": str(root.resolve()), "files": stats})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_model(model: str, components: Components, on: str):
    """`load_exported`'s (model, T5, codec, negative), with the pipeline's T5 and codec where the model holds none."""
    path = Path(model)
    pipeline = (path / "model_index.json").is_file()  # a diffusers pipeline directory holds its T5 and VAE
    t5 = None if pipeline or (path / "text_encoder").is_dir() else components.t5
    codec = None if pipeline or (path / "codec.json").is_file() else components.codec
    return load_exported(path, t5, codec, device=on)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(
    model: str,
    prompts: list[tuple[str, str]],
    config: EvaluateConfig,
    components: Components,
    root: str,
    evaluation_id: str,
) -> dict:
    """Sample every (category, prompt) from the model, judge and report into the evaluation artifact, finish it.

    Returns the artifact's summary: the overall score, each category's (accuracy, 95% Wilson interval), the metrics
    (or why each was skipped), and the files written.
    """
    # 1. Load the model
    artifact = ArtifactStore(root).get(evaluation_id)
    if not is_local(artifact.url):
        raise ValueError(f"evaluation writes a local directory; workdir {root!r} is remote")
    net, encoder, codec, negative = load_model(model, components, device())

    # 2. Sample, judge, write the report
    report = evaluate(
        net,
        encoder,
        codec,
        [(category, prompt, parse_caption(prompt)) for category, prompt in prompts],
        images_per_prompt=config.images_per_prompt,
        seed=config.seed,
        sampler=config.sampler,
        steps=config.steps,
        cfg_scale=config.cfg_scale,
        batch_size=config.batch_size,
        negative=negative,
        metrics=config.metrics,
        out_dir=filesystem(artifact.url)[1],
    )

    # 3. Finish: the scores, not every image's verdict (those are in report.json). Categories in a list and metrics
    #    by name, so that a reused summary (the manifest's JSON sorts keys) reads as this one does
    data = report.to_dict()
    summary = {"model": model, **{k: data[k] for k in ("overall", "num_images", "images_per_prompt")}}
    summary |= {"categories": list(data["categories"].values()), "metrics": dict(sorted(data["metrics"].items()))}
    summary["files"] = data["files"]
    artifact.finish(summary)
    return summary
