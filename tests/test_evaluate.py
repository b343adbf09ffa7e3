"""Compositional evaluation: a perfect model scores ~1, a random PixArt runs end to end, the report is complete,
and the pipeline's evaluation task judges a checkpoint into an artifact (missing metric weights skipped, not fatal)."""

import json

import pytest
import torch
from PIL import Image

from models.evaluate import (
    EvalReport,
    evaluate,
    evaluate_images,
    generate_images,
    render_images,
    wilson_interval,
)
from models.metrics import MetricsConfig
from models.pixart import PixArt
from models.pixart_checkpoint import save_pixart
from models.pixel_codec import PixelCodec
from models.text_encoder import T5TextEncoder
from storage.artifacts import ArtifactStore
from storage.sources.shapes import CATEGORIES, ShapesConfig, heldout_prompts
from tasks.components import Components
from tasks.config import EvaluateConfig, ShapesSourceConfig
from tasks.evaluate import evaluate_model, evaluation_prompts

PROMPTS = heldout_prompts(ShapesConfig(), per_category=6)


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k=11, n=10"):
        wilson_interval(11, 10)


def test_a_perfect_model_scores_one_in_every_category_and_the_report_is_written(tmp_path):
    # The "model" draws each prompt's scene with the source's own renderer, in two random layouts.
    images = render_images([scene for _, _, scene in PROMPTS], images_per_prompt=2, height=32, width=32)
    report = evaluate_images(images, PROMPTS, images_per_prompt=2, settings={"source": "render"}, out_dir=tmp_path)

    assert list(report.categories) == list(CATEGORIES)
    for c in report.categories.values():
        assert (c.num_prompts, c.num_images) == (6, 12)
        assert c.accuracy == 1.0 and c.ci_high == 1.0 and c.ci_low > 0.7, c
    assert report.overall == 1.0 and report.num_images == 60

    # Markdown, JSON (the Prefect artifact) and one labelled grid per category
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    markdown = (tmp_path / "report.md").read_text()
    assert "| spatial | 6 | 12 | 12 | 1.000 |" in markdown and "![grid_complex](grid_complex.png)" in markdown
    for category in CATEGORIES:
        grid = Image.open(tmp_path / f"grid_{category}.png")
        assert grid.size[1] == 6 * (96 + 8) and report.files[f"grid_{category}"] == str(
            tmp_path / f"grid_{category}.png"
        )


def test_wrong_images_are_scored_wrong_with_the_failing_attribute_named():
    # Every prompt answered with the first prompt's image: right only where the prompts agree.
    scenes = [scene for _, _, scene in PROMPTS]
    images = render_images(scenes[:1] * len(scenes), height=32, width=32)
    report = evaluate_images(images, PROMPTS)
    assert report.categories["color"].correct == 1  # its own prompt
    assert report.categories["spatial"].accuracy == 0.0  # one object is never two
    assert report.categories["spatial"].attributes["count"] == 0.0
    assert report.results[0].correct and report.results[0].detected[0].startswith(scenes[0].objects[0].size)
    with pytest.raises(ValueError, match="30 images for 30 prompts x 2 images per prompt; expected 60"):
        evaluate_images(images, PROMPTS, images_per_prompt=2)


def test_missing_metric_weights_are_reported_as_unavailable_not_faked(tmp_path):
    images = render_images([scene for _, _, scene in PROMPTS[:4]], height=32, width=32)
    metrics = MetricsConfig(fid_weights=str(tmp_path / "no-inception.pth"), clip_model=str(tmp_path / "no-clip"))
    report = evaluate_images(images, PROMPTS[:4], metrics=metrics)
    assert {k: v["available"] for k, v in report.metrics.items()} == {"fid": False, "clip_score": False}
    assert "no-inception.pth" in report.metrics["fid"]["reason"]
    assert "no-clip" in report.metrics["clip_score"]["reason"]
    assert "**fid**: unavailable: fid_weights=" in report.markdown()


def tiny_pixart(seed: int = 0) -> PixArt:
    """A random 32 px PixArt on the 4x pixel codec (8 x 8 latents of 48 channels), with gentle weights."""
    torch.manual_seed(seed)
    model = PixArt(
        input_size=8, in_channels=48, depth=2, hidden_size=48, num_heads=3, patch_size=2, caption_channels=32
    )
    with torch.no_grad():
        for p in model.parameters():  # unit-gain random weights: 20 guided steps stay in range
            p.copy_(torch.randn_like(p) * (0.5 * p[0].numel() ** -0.5 if p.ndim > 1 else 0.02))
    return model


def test_a_random_pixart_is_evaluated_end_to_end(tiny, tmp_path):
    model, encoder, codec = tiny_pixart(), T5TextEncoder.from_pretrained(tiny.t5_dir), PixelCodec(factor=4)
    prompts = heldout_prompts(ShapesConfig(), per_category=2)
    model.train()
    report = evaluate(model, encoder, codec, prompts, images_per_prompt=2, batch_size=8, out_dir=tmp_path)

    assert model.training  # evaluation samples in eval mode and gives the model back as it was
    assert isinstance(report, EvalReport) and report.num_images == 20 and set(report.categories) == set(CATEGORIES)
    assert all(0.0 <= c.ci_low <= c.accuracy <= c.ci_high <= 1.0 for c in report.categories.values())
    assert report.settings["sampler"] == "dpm-solver" and report.settings["steps"] == 20
    assert report.settings["cfg_scale"] == 4.5 and report.settings["image_size"] == [32, 32]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "grid_spatial.png").is_file()
    json.dumps(report.to_dict())

    # Fixed seeds: the same images again, other images under another seed
    texts = [p for _, p, _ in prompts[:3]]
    first = generate_images(model, encoder, codec, texts, images_per_prompt=2, steps=4, batch_size=4)
    again = generate_images(model, encoder, codec, texts, images_per_prompt=2, steps=4, batch_size=4)
    other = generate_images(model, encoder, codec, texts, images_per_prompt=2, steps=4, batch_size=4, seed=1)
    assert first.shape == (6, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_the_evaluation_task_judges_a_stage_checkpoint_into_an_artifact(tiny, tmp_path):
    # A stage's ema.pth holds neither T5 nor codec: the pipeline's components supply them.
    checkpoint = str(save_pixart(tiny_pixart(), tmp_path / "stage2" / "ema.pth"))
    components = Components(t5=str(tiny.t5_dir), vae=str(tiny.vae_dir), llava="", codec={"kind": "pixel", "factor": 4})
    metrics = MetricsConfig(fid_weights=str(tmp_path / "no-inception.pth"), clip_model=str(tmp_path / "no-clip"))
    config = EvaluateConfig(per_category=1, images_per_prompt=2, steps=2, metrics=metrics)
    prompts = evaluation_prompts(config, ShapesSourceConfig())
    assert [c for c, _ in prompts] == list(CATEGORIES)
    artifact = ArtifactStore(str(tmp_path / "work")).artifact("evaluation", config.identity(prompts))

    summary = evaluate_model.fn(checkpoint, prompts, config, components, str(tmp_path / "work"), artifact.id)

    assert artifact.complete and artifact.manifest["summary"] == json.loads(json.dumps(summary))
    assert summary["model"] == checkpoint and (summary["num_images"], summary["images_per_prompt"]) == (10, 2)
    assert [c["category"] for c in summary["categories"]] == list(CATEGORIES)
    for c in summary["categories"]:
        assert c["num_images"] == 2 and 0.0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 1.0
    assert summary["overall"] == pytest.approx(sum(c["accuracy"] for c in summary["categories"]) / 5)
    # Metrics without weights: skipped with the reason, in the summary and the report; the run still finishes
    assert {k: m["available"] for k, m in summary["metrics"].items()} == {"fid": False, "clip_score": False}
    assert "no-inception.pth" in summary["metrics"]["fid"]["reason"]
    markdown = (tmp_path / "work" / artifact.id / "report.md").read_text()
    assert "**fid**: unavailable" in markdown and "steps: 2" in markdown
    for name in ("report.md", "report.json", *(f"grid_{c}.png" for c in CATEGORIES)):
        assert (tmp_path / "work" / artifact.id / name).is_file(), name
    assert summary["files"]["markdown"] == str(tmp_path / "work" / artifact.id / "report.md")


def test_evaluation_prompts_are_the_given_ones_or_the_shapes_held_out_ones():
    given = EvaluateConfig(prompts={"spatial": ["a large red circle above a small blue square on a gray background"]})
    assert evaluation_prompts(given, ShapesSourceConfig()) == [
        ("spatial", "a large red circle above a small blue square on a gray background")
    ]
    held_out = evaluation_prompts(EvaluateConfig(per_category=3), ShapesSourceConfig())
    assert [(c, p) for c, p, _ in heldout_prompts(ShapesSourceConfig(), per_category=3)] == held_out
    with pytest.raises(ValueError, match="caption 'a red thing' is not in the shapes grammar"):
        EvaluateConfig(prompts={"color": ["a red thing"]})
    with pytest.raises(ValueError, match="unknown category 'colour'"):
        EvaluateConfig(prompts={"colour": []})
