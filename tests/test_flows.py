"""The Prefect flows on Ray: artifacts reused on re-run, crashed stages resumed shard by shard, config changes
rerunning only what they change, concurrent runs, published Prefect artifacts, export / samples / evaluation, and
the CLI.

One Prefect test server and one local Ray instance serve every test (each costs seconds to start).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import PixArtAlphaPipeline
from PIL import Image
from prefect.artifacts import Artifact as PrefectArtifact
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import caption, evaluate, extract_features, ingest, pipeline, planned_ids
from flows.server import stop_server
from models.pixart import build_pixart
from models.pixart_checkpoint import save_pixart
from storage.artifacts import ArtifactStore
from storage.ingest import shard_complete
from storage.sources.shapes import CATEGORIES
from tasks.components import resolve_components
from tasks.config import ComponentsConfig, SampleConfig, load_config
from tasks.execution import ShardsFailed
from tasks.export import export_model, load_exported
from tasks.locks import is_locked, locked
from tasks.sample import sample_grid

# 40 shapes of 32 px in 5 shards of 8; LLaVA captions train (so features depend on captions); one resolution.
SMALL = [
    "ingest.source.count=40",
    "ingest.source.image_size=32",
    "ingest.samples_per_shard=8",
    "caption.generation.max_new_tokens=6",
    "caption.batch_size=8",
    "caption.use=llava",
    "stage3.model.input_size=16",
    "until=extract",
]
SHARDS = [f"{i:06d}.tar" for i in range(5)]
# One held-out prompt per category, two images each, two sampler steps: an evaluation in seconds.
EVALUATION = ["evaluate.per_category=1", "evaluate.images_per_prompt=2", "evaluate.steps=2"]
DEMO_CATEGORIES = tuple(c for c in CATEGORIES if c != "texture")  # the demo draws plain objects only


def small_config(workdir, *overrides):
    return load_config("demo", [*SMALL, *overrides], workdir=str(workdir))


@pytest.fixture(scope="module")
def first_run(flows_env, tmp_path_factory):
    """ingest -> caption -> features run once on a fresh workdir: (workdir, reports by step, seconds)."""
    workdir = tmp_path_factory.mktemp("first")
    start = time.perf_counter()
    summary = pipeline(small_config(workdir))
    return workdir, {s["step"]: s for s in summary["steps"]}, time.perf_counter() - start


def copy_of(first_run, tmp_path) -> Path:
    workdir = tmp_path / "workdir"
    shutil.copytree(first_run[0], workdir)
    return workdir


# ---------------------------------------------------------------------------------------------------
#                                     Resuming
# ---------------------------------------------------------------------------------------------------


def test_first_run_computes_every_shard_and_its_ids_are_the_planned_ones(first_run):
    workdir, steps, _ = first_run
    assert list(steps) == ["ingest", "caption", "features-32px"]
    for step in steps.values():
        assert not step["reused"] and sorted(step["ran"]) == SHARDS
    assert steps["ingest"]["summary"]["written"] == 40
    assert steps["caption"]["summary"]["stats"]["count"] == 40
    assert steps["features-32px"]["summary"]["samples"] == 40
    planned = planned_ids(small_config(workdir))
    assert {k: planned[k] for k in steps} == {k: s["artifact"] for k, s in steps.items()}


def test_rerun_with_the_same_config_reuses_everything_in_seconds(first_run):
    workdir, steps, first_seconds = first_run
    start = time.perf_counter()
    again = pipeline(small_config(workdir))
    seconds = time.perf_counter() - start
    assert [(s["step"], s["artifact"], s["reused"], s["ran"]) for s in again["steps"]] == [
        (step, s["artifact"], True, []) for step, s in steps.items()
    ]
    assert seconds < min(20.0, first_seconds), f"re-run took {seconds:.1f} s (first run {first_seconds:.1f} s)"


def test_a_crashed_stage_reruns_only_its_unfinished_shards(first_run, tmp_path):
    workdir = copy_of(first_run, tmp_path)
    config = small_config(workdir)
    store = ArtifactStore(str(workdir))
    features = store.get(first_run[1]["features-32px"]["artifact"])
    shutil.rmtree(features.url)  # extraction starts over: every feature shard must be made again
    images = store.get(first_run[1]["ingest"]["artifact"])
    broken = Path(images.shard_url("000003.tar"))
    broken.rename(broken.with_suffix(".away"))  # shard 3's task fails: its input is unreadable

    failed = r"(?s)1 of 5 extract-shard tasks failed.*000003\.tar: ShardMissing: .*no such file"
    with pytest.raises(ShardsFailed, match=failed):
        extract_features(config)
    assert not features.complete
    assert [n for n in SHARDS if features.shard_done(n)] == [n for n in SHARDS if n != "000003.tar"]

    broken.with_suffix(".away").rename(broken)
    (report,) = extract_features(config).values()
    assert report.artifact == features.id and report.ran == ["000003.tar"] and features.complete
    assert features.verify() == {}


def test_changing_one_stage_reruns_that_stage_and_what_depends_on_it(first_run, tmp_path):
    workdir = copy_of(first_run, tmp_path)
    ids = {step: s["artifact"] for step, s in first_run[1].items()}

    # A new caption prompt: a new caption version, so new captions and new features; the images are reused.
    steps = {s["step"]: s for s in pipeline(small_config(workdir, "caption.prompt=List the shapes."))["steps"]}
    assert steps["ingest"]["reused"] and steps["ingest"]["artifact"] == ids["ingest"]
    assert sorted(steps["caption"]["ran"]) == SHARDS and steps["caption"]["artifact"] != ids["caption"]
    assert (
        sorted(steps["features-32px"]["ran"]) == SHARDS and steps["features-32px"]["artifact"] != ids["features-32px"]
    )

    # A new training resolution (stages 1-3 at 64 px): new features only; images and captions are reused.
    config = small_config(workdir, *(f"stage{n}.model.input_size=32" for n in (1, 2, 3)))
    steps = {s["step"]: s for s in pipeline(config)["steps"]}
    assert [s for s, r in steps.items() if r["reused"]] == ["ingest", "caption"]
    assert sorted(steps["features-64px"]["ran"]) == SHARDS


def test_two_runs_at_once_on_one_workdir_do_the_work_once(flows_env, tmp_path):
    config = small_config(tmp_path / "shared")
    results, errors = [], []

    def run():
        try:
            results.append(pipeline(config))
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    a, b = ({s["step"]: s for s in r["steps"]} for r in results)
    assert {k: s["artifact"] for k, s in a.items()} == {k: s["artifact"] for k, s in b.items()}
    for step in a:
        assert sorted(a[step]["ran"] + b[step]["ran"]) == SHARDS, step  # each shard computed exactly once
    store = ArtifactStore(str(tmp_path / "shared"))
    for summary in store.ls():
        artifact = store.get(summary.id)
        assert artifact.complete and artifact.verify() == {}
    leftovers = [p for p in (tmp_path / "shared").rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert leftovers == []


def test_each_flow_run_publishes_its_counts_as_prefect_artifacts(first_run, tmp_path):
    workdir = copy_of(first_run, tmp_path)
    caption(small_config(workdir, "caption.prompt=Name the colours."))  # ingest reused, captions computed
    ingest_table = str(PrefectArtifact.get("ingest-counts").data)
    for row in ("ingested", "duplicates", "quarantined", "reused", first_run[1]["ingest"]["artifact"]):
        assert row in ingest_table
    caption_table = str(PrefectArtifact.get("caption-stats").data)
    for row in ("caption version", "mean tokens", "flagged: repetition", "images/s", "ran 5/5 shards"):
        assert row in caption_table


def test_ingest_flow_alone_skips_a_complete_artifact(first_run, tmp_path):
    workdir = copy_of(first_run, tmp_path)
    report = ingest(small_config(workdir))
    assert report.reused and report.artifact == first_run[1]["ingest"]["artifact"] and report.total == 5


# ---------------------------------------------------------------------------------------------------
#                                     Locks
# ---------------------------------------------------------------------------------------------------


def test_a_lock_makes_the_second_holder_wait(tmp_path):
    order, waited = [], []
    with locked(str(tmp_path / "art")):
        assert is_locked(str(tmp_path / "art"))

        def second():
            with locked(str(tmp_path / "art"), on_wait=waited.append):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join()
    assert order == ["first done", "second"] and waited and waited[0] > 0.2
    assert not is_locked(str(tmp_path / "art"))


# ---------------------------------------------------------------------------------------------------
#                                     Export, samples, generate
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny PixArt exported with the pixel codec: (workdir, components, export summary)."""
    workdir = tmp_path_factory.mktemp("export")
    components = resolve_components(ComponentsConfig(tiny=True, codec="pixel", pixel_factor=2), str(workdir))
    torch.manual_seed(0)
    model = build_pixart("PixArt-T/2", input_size=8, in_channels=12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = save_pixart(model, workdir / "ema.pth")
    artifact = ArtifactStore(str(workdir)).artifact("export", {"test": "pixel"})
    return workdir, components, export_model.fn(str(ckpt), components, str(workdir), artifact.id)


def test_export_with_the_pixel_codec_is_exact_and_samples_a_grid(exported):
    workdir, _, summary = exported
    assert summary["kind"] == "transformer" and summary["max_abs_diff_vs_model"] < 1e-5
    model, encoder, codec, negative = load_exported(summary["dir"])
    assert (codec.downsample_factor, negative, model.in_channels) == (2, "null", 12)

    prompts = [{"category": c, "prompt": f"a red circle {c}"} for c in ("a", "a", "b", "b")]
    artifact = ArtifactStore(str(workdir)).artifact("samples", {"test": 1})
    result = sample_grid.fn(summary["dir"], prompts, SampleConfig(steps=2), str(workdir), artifact.id)
    grid = Image.open(result["grid"])
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2 rows (categories) x 2 of 16 px, 2 px padding
    assert artifact.complete and len(list(Path(artifact.url, "images").glob("*.png"))) == 4


def test_export_with_a_vae_is_a_diffusers_pipeline(tmp_path):
    components = resolve_components(ComponentsConfig(tiny=True, codec="vae"), str(tmp_path))
    torch.manual_seed(0)
    ckpt = save_pixart(build_pixart("PixArt-T/2", input_size=8), tmp_path / "ema.pth")
    artifact = ArtifactStore(str(tmp_path)).artifact("export", {"test": "vae"})
    summary = export_model.fn(str(ckpt), components, str(tmp_path), artifact.id)
    assert summary["kind"] == "pipeline" and summary["max_abs_diff_vs_model"] < 1e-5
    assert isinstance(PixArtAlphaPipeline.from_pretrained(summary["dir"]), PixArtAlphaPipeline)
    assert load_exported(summary["dir"])[2].downsample_factor == 8


def test_generate_writes_a_png_and_names_what_is_missing(exported, tmp_path):
    runner = CliRunner()
    _, components, summary = exported
    out = tmp_path / "out.png"
    result = runner.invoke(
        app, ["generate", "a red circle", "--model", summary["dir"], "--out", str(out), "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (16, 16)

    ckpt = Path(summary["dir"]) / "pixart.pth"
    result = runner.invoke(app, ["generate", "x", "--model", str(ckpt), "--out", str(out)])
    assert result.exit_code == 1 and "holds no text encoder" in result.output and "--text-encoder" in result.output
    result = runner.invoke(
        app, ["generate", "x", "--model", str(ckpt), "--out", str(out), "--text-encoder", components.t5, "--steps", "2"]
    )
    assert result.exit_code == 1 and "--pixel-factor" in result.output
    result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_the_evaluate_flow_judges_an_export_per_category_and_reuses_its_artifact(flows_env, exported, tmp_path):
    workdir, _, export = exported
    export_id = Path(export["dir"]).parent.name
    config = small_config(workdir, *EVALUATION)

    report = evaluate(config, export_id)
    assert report.step == "evaluation" and not report.reused
    assert ArtifactStore(str(workdir)).get(report.artifact).upstream == [export_id]
    summary = report.summary
    assert summary["model"] == export["dir"] and summary["num_images"] == 2 * len(DEMO_CATEGORIES)
    assert [c["category"] for c in summary["categories"]] == list(DEMO_CATEGORIES)  # in order, also when reused
    for c in summary["categories"]:
        assert c["num_images"] == 2 and 0.0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 1.0
    assert summary["metrics"] == {}  # no metrics configured
    for name in ("markdown", "json", *(f"grid_{c}" for c in DEMO_CATEGORIES)):
        assert Path(summary["files"][name]).is_file(), name

    # The Prefect table: a row per category and the overall mean; where the report is, above it
    published = PrefectArtifact.get("evaluation")
    rows = json.loads(published.data)
    assert [row["category"] for row in rows] == [*DEMO_CATEGORIES, "overall (mean of categories)"]
    assert rows[0]["95% CI"].startswith("[") and summary["files"]["markdown"] in published.description

    # Again from the command line: the artifact is reused, the scores printed
    result = CliRunner().invoke(
        app,
        ["run", "evaluate", "-c", str(config_file(tmp_path / "c.yaml", *EVALUATION)), "--workdir", str(workdir)]
        + ["--model", export_id],
    )
    assert result.exit_code == 0, result.output
    assert report.artifact in result.output and "reused" in result.output
    assert f"Evaluation: overall {summary['overall']:.3f} (color" in " ".join(result.output.split())


def test_the_evaluate_flow_on_a_checkpoint_logs_the_metrics_it_cannot_compute(flows_env, exported, caplog):
    # ema.pth holds neither T5 nor codec: the config's components (the demo's tiny T5, pixel codec x2) supply them
    workdir, _, _ = exported
    missing = f"evaluate.metrics={{fid_weights: {workdir / 'no-inception.pth'}, clip_model: {workdir / 'no-clip'}}}"
    report = evaluate(small_config(workdir, *EVALUATION, missing), str(workdir / "ema.pth"))

    assert not report.reused and ArtifactStore(str(workdir)).get(report.artifact).upstream == []
    assert {k: m["available"] for k, m in report.summary["metrics"].items()} == {"fid": False, "clip_score": False}
    assert "**fid**: unavailable" in Path(report.summary["files"]["markdown"]).read_text()
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()]
    assert len(skipped) == 2 and any("evaluation: fid skipped" in m and "no-inception.pth" in m for m in skipped)


def test_the_plan_ends_with_the_evaluation_whose_id_follows_its_config_not_its_resources(tmp_path):
    ids = planned_ids(small_config(tmp_path))
    assert list(ids)[-1] == "evaluation" and ids["evaluation"].startswith("evaluation-")
    resources = ["evaluate.resources.num_cpus=2", "evaluate.resources.num_gpus=1"]
    assert planned_ids(small_config(tmp_path, *resources)) == ids
    for change in ("evaluate.steps=10", "evaluate.per_category=3", "evaluate.seed=1", "evaluate.metrics={fid: true}"):
        other = planned_ids(small_config(tmp_path, change))
        assert other.pop("evaluation") != ids["evaluation"], change
        assert other == {k: v for k, v in ids.items() if k != "evaluation"}, change
    assert "evaluation" not in planned_ids(small_config(tmp_path, "evaluate.enabled=false"))


# ---------------------------------------------------------------------------------------------------
#                                     Command line
# ---------------------------------------------------------------------------------------------------


def config_file(path: Path, *overrides: str) -> Path:
    data = {"base": "demo"}
    for text in [*SMALL, *overrides]:
        key, value = text.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_run_and_artifacts_ls_gc(first_run, tmp_path):
    runner = CliRunner()
    workdir = copy_of(first_run, tmp_path)
    cfg = config_file(tmp_path / "small.yaml")
    result = runner.invoke(app, ["run", "extract", "-c", str(cfg), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "features-32px" in result.output and "reused" in result.output

    orphan = ArtifactStore(str(workdir)).artifact("features", {"left": "over"})
    result = runner.invoke(app, ["artifacts", "ls", "--workdir", str(workdir), "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    for step, s in first_run[1].items():
        assert s["artifact"] in result.output and step in result.output
    assert orphan.id in result.output

    result = runner.invoke(app, ["artifacts", "gc", "--workdir", str(workdir)])
    assert result.exit_code == 1 and "name what to keep" in result.output
    result = runner.invoke(app, ["artifacts", "gc", "--workdir", str(workdir), "-c", str(cfg), "--dry-run"])
    assert result.exit_code == 0 and f"would delete {orphan.id}" in result.output
    assert Path(orphan.url).exists()
    result = runner.invoke(app, ["artifacts", "gc", "--workdir", str(workdir), "-c", str(cfg)])
    assert result.exit_code == 0 and f"deleted {orphan.id}" in result.output
    assert not Path(orphan.url).exists()
    assert sorted(ArtifactStore(str(workdir)).ids()) == sorted(s["artifact"] for s in first_run[1].values())


def test_gc_reads_the_config_as_run_does_and_says_why_it_keeps(first_run, tmp_path):
    runner = CliRunner()
    workdir = copy_of(first_run, tmp_path)
    built = {s["artifact"]: step for step, s in first_run[1].items()}
    # The preset alone is not what the runs were given: all their artifacts are garbage to it
    result = runner.invoke(app, ["artifacts", "gc", "-c", "demo", "--workdir", str(workdir), "--dry-run"])
    assert result.exit_code == 0 and all(f"would delete {aid}" in result.output for aid in built), result.output
    # With the same --set as the runs, every one of them is kept, each with the step that keeps it
    overrides = [arg for text in SMALL for arg in ("--set", text)]
    result = runner.invoke(app, ["artifacts", "gc", "-c", "demo", *overrides, "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert f"deleted 0 artifacts, kept {len(built)}" in result.output
    for aid, step in built.items():
        assert f"keep {aid}: demo {step}" in result.output
    assert sorted(ArtifactStore(str(workdir)).ids()) == sorted(built)


def test_artifacts_ls_takes_a_folder_source_config_as_run_does(tmp_path):
    cfg = tmp_path / "photos.yaml"
    cfg.write_text(yaml.safe_dump({"base": "demo", "ingest": {"source": {"kind": "folder", "path": "photos"}}}))
    ArtifactStore(str(tmp_path / "work")).artifact("features", {"left": "over"})
    result = CliRunner().invoke(app, ["artifacts", "ls", "-c", str(cfg), "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "features-" in result.output


def test_cli_errors_say_what_to_fix(tmp_path):
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["run", *args, "--workdir", str(tmp_path)])
        return result.exit_code, " ".join(result.output.split())

    code, out = run("ingest", "-c", "demo", "--set", "stage1.train.stepz=5")
    assert code == 1 and "unknown setting 'stage1.train.stepz': stage1.train has no field 'stepz'" in out
    code, out = run("ingest", "-c", "demo", "--set", "stage1.train.steps=-1")
    assert code == 1 and "stage1.train.steps: Input should be greater than 0 (got -1)" in out
    code, out = run("ingest", "-c", "demo", "--set", "stage1.train.steps")
    assert code == 1 and "expected KEY=VALUE" in out
    code, out = run("ingest", "-c", "no_such_preset")
    assert code == 1 and "config 'no_such_preset' not found" in out and "pixart_256" in out
    code, out = run("bake", "-c", "demo")
    assert code == 1 and "unknown flow 'bake'" in out and "'evaluate'" in out
    code, out = run("ingest", "-c", "demo", "--model", "export-0123456789abcdef")
    assert code == 1 and "flow 'ingest' takes none" in out
    code, out = run("ingest", "-c", "pixart_256", "--set", "caption.enabled=false")
    assert code == 1 and "caption.enabled is false" in out


def test_help_explains_every_command():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    for command in ("demo", "run", "deploy", "generate", "export", "convert", "artifacts"):
        assert command in result.output
    result = runner.invoke(app, ["run", "--help"])
    assert "--set" in result.output and "pixart_1024_ms" in result.output


# ---------------------------------------------------------------------------------------------------
#                                     Presets
# ---------------------------------------------------------------------------------------------------


def test_presets_hold_the_papers_recipe_and_derive_from_one_base():
    base = load_config("pixart_256")
    for n in (1, 2, 3):
        train = base.stage(n).train
        assert (train.optimizer.name, train.optimizer.lr, train.optimizer.weight_decay) == ("adamw", 2e-5, 3e-2)
        assert (train.optimizer.eps, train.optimizer.warmup_steps, train.optimizer.grad_clip) == (1e-10, 1000, 0.01)
        assert train.ema_decay == 0.9999
    assert base.components.t5 == "google/t5-v1_1-xxl" and base.components.vae == "stabilityai/sd-vae-ft-ema"
    assert base.components.llava == "llava-hf/llava-1.5-7b-hf" and base.caption.use == "llava"
    hi = load_config("pixart_1024_ms")
    assert (hi.stage2.model.input_size, hi.stage3.model.input_size, hi.stage3.model.lewei_scale) == (64, 128, 2.0)
    assert hi.stage3.train.optimizer == base.stage3.train.optimizer  # inherited, not copied
    demo = load_config("demo")
    assert demo.ingest.source.kind == "shapes" and demo.components.tiny and demo.components.codec == "pixel"
    assert demo.stage1.train.optimizer.weight_decay == 3e-2  # the demo overrides lr, keeps the rest
    long = load_config("demo_long")  # the demo with a longer stage 2; everything upstream is the demo's
    assert (long.stage2.train.steps, long.stage2.train.ema_decay, demo.stage2.train.steps) == (15000, 0.999, 2000)
    assert long.stage2.train.optimizer == demo.stage2.train.optimizer and long.stage1 == demo.stage1
    assert long.ingest == demo.ingest and long.stage3 == demo.stage3
    bases = {n: yaml.safe_load(Path("configs", f"{n}.yaml").read_text()).get("base") for n in ("demo", "pixart_512")}
    assert bases == {"demo": "pixart_256.yaml", "pixart_512": "pixart_256.yaml"}


def test_deployment_parameters_derive_from_a_preset():
    from tasks.config import PipelineConfig

    config = PipelineConfig.model_validate({"base": "demo", "until": "ingest", "ingest": {"source": {"count": 8}}})
    assert config.until == "ingest" and config.ingest.source.count == 8 and config.components.tiny
    assert config.ingest.source.image_size == 32  # the rest comes from configs/demo.yaml


# ---------------------------------------------------------------------------------------------------
#                                     The whole pipeline (training included)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_whole_pipeline_trains_exports_samples_evaluates_then_reuses_everything(flows_env, tmp_path):
    steps = [f"stage{n}.train.steps=4" for n in (1, 2, 3)] + [f"stage{n}.train.checkpoint_every=2" for n in (1, 2, 3)]
    config = small_config(
        tmp_path, "until=evaluate", "caption.use=sidecar", "stage3.model.input_size=32", *steps, *EVALUATION
    )
    summary = pipeline(config)
    reports = {s["step"]: s for s in summary["steps"]}
    assert list(reports) == [
        "ingest", "caption", "features-32px", "features-64px", "stage1", "stage2", "stage3", "export", "samples",
        "evaluation",
    ]  # fmt: skip
    assert all(not r["reused"] for r in reports.values())
    assert reports["stage3"]["summary"]["training"]["steps"] == 4
    export = reports["export"]["summary"]
    assert export["kind"] == "transformer" and export["max_abs_diff_vs_model"] < 1e-5
    assert Image.open(reports["samples"]["summary"]["grid"]).size[0] > 64
    evaluation = reports["evaluation"]["summary"]
    assert evaluation["model"] == export["dir"]
    assert [c["category"] for c in evaluation["categories"]] == list(DEMO_CATEGORIES)
    assert Path(evaluation["files"]["markdown"]).is_file() and "Evaluation: overall" in summary["markdown"]
    assert Path(summary["path"]).is_file() and "stage3" in summary["markdown"]
    assert planned_ids(config) == {step: r["artifact"] for step, r in reports.items()}

    start = time.perf_counter()
    again = pipeline(config)
    assert all(s["reused"] for s in again["steps"]) and time.perf_counter() - start < 30


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_shards_it_had_not_finished(flows_env, tmp_path):
    """Ctrl-C (SIGINT) in the middle of ingest: the next run keeps every shard the killed one finished."""
    workdir = tmp_path / "work"
    # 12 shards of 8, all distinct (random layouts: the demo's canonical ones repeat scenes, which dedup drops)
    cfg = config_file(tmp_path / "big.yaml", "ingest.source.count=96", "ingest.source.layout_jitter=1", "until=ingest")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    command = [str(Path(sys.executable).parent / "pixart"), "run", "ingest", "-c", str(cfg), "--workdir", str(workdir)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(workdir.glob("ingest-*/parts/*.quarantine.parquet"))) < 2:  # a shard's last file
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        stop_server(workdir / ".server")  # the workdir's Prefect server, which the command started
    (artifact_dir,) = workdir.glob("ingest-*")
    killed = ArtifactStore(str(workdir)).get(artifact_dir.name)
    done = [f"{i:06d}.tar" for i in range(12) if shard_complete(killed, f"{i:06d}.tar")]
    assert 2 <= len(done) < 12 and not killed.complete

    report = ingest(load_config(str(cfg), workdir=str(workdir)))
    assert sorted(report.ran + done) == [f"{i:06d}.tar" for i in range(12)]
    assert report.summary["written"] == 96 and ArtifactStore(str(workdir)).get(report.artifact).verify() == {}


def test_how_a_stage_executes_does_not_change_its_artifact(tmp_path):
    # FSDP vs DDP, reservations and retries leave the weights as they are (tests/test_fsdp.py): reuse the stage.
    ids = planned_ids(small_config(tmp_path))
    execution = ["stage2.parallel_strategy=fsdp", "stage2.cpus_per_worker=2", "stage2.max_failures=5"]
    assert planned_ids(small_config(tmp_path, *execution)) == ids
    changed = planned_ids(small_config(tmp_path, "stage2.train.steps=7"))
    assert changed["stage1"] == ids["stage1"] and changed["stage2"] != ids["stage2"]
    assert changed["export"] != ids["export"]


def test_a_local_ray_instance_starts_its_dashboard_for_ray_trains_state_queries(tmp_path):
    # Ray Train's placement-group cleaner polls the State API, which the dashboard serves: without it every
    # stage logs a warning a second and its placement group outlives the run.
    assert small_config(tmp_path).ray.init_kwargs()["include_dashboard"] is True
    assert small_config(tmp_path, "ray.dashboard=false").ray.init_kwargs()["include_dashboard"] is False
    assert small_config(tmp_path, "ray.address=auto").ray.init_kwargs() == {"address": "auto"}
