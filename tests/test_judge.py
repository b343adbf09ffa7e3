"""The shapes judge: near-perfect on fresh renders, right about what is wrong, graceful on degraded images."""

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from models.judge import ATTRIBUTES, analyse, category_holds, judge, score
from storage.sources.shapes import CONVERSE, ObjectSpec, Scene, ShapesConfig, ShapesSource, parse_caption, place, render

TWO = parse_caption("a large red circle above a small blue striped square on a gray background")
ONE = parse_caption("a small green dotted star on a black background")


def _accuracy(size: int, n: int, seed: int, degrade=None) -> dict[str, float]:
    """Per attribute, the fraction of n fresh source samples the judge reads right (relation: two-object ones)."""
    source = ShapesSource(ShapesConfig(count=n, image_size=size, seed=seed))
    right = {a: [] for a in ATTRIBUTES}
    for i in range(n):
        scene, (height, width), _ = source.scene(i)
        image = render(scene, height, width)
        verdict = judge(degrade(image) if degrade else image, scene)
        for a in ATTRIBUTES:
            if getattr(verdict, a) is not None:
                right[a].append(getattr(verdict, a))
    return {a: float(np.mean(v)) for a, v in right.items()}


@pytest.mark.parametrize("size", [32, 64])
def test_judge_reads_fresh_renders_near_perfectly(size):
    # 500 samples of a seed the judge was never tuned on: textures, one and two objects, every background.
    accuracy = _accuracy(size, 500, seed=2024)
    print(f"judge accuracy on 500 fresh {size}px renders: {accuracy}")
    assert min(accuracy.values()) >= 0.99, accuracy
    assert accuracy["count"] == accuracy["color"] == accuracy["relation"] == 1.0, accuracy


def _noise(image: Image.Image, sigma: float = 8.0) -> Image.Image:
    x = np.asarray(image, float) + np.random.default_rng(0).normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8))


def _jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize(
    "degrade",
    [_noise, lambda im: im.filter(ImageFilter.GaussianBlur(0.7)), _jpeg],
    ids=["noise8", "blur0.7", "jpeg75"],
)
def test_judge_degrades_gracefully_on_generated_image_artefacts(degrade):
    accuracy = _accuracy(64, 100, seed=7, degrade=degrade)
    print(f"judge accuracy on 100 degraded 64px renders: {accuracy}")
    assert min(accuracy[a] for a in ("count", "background", "color", "shape", "size", "relation")) >= 0.95, accuracy
    assert accuracy["texture"] >= 0.75, accuracy  # JPEG's chroma subsampling blurs 6 px stripes


def _with(scene: Scene, i: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[i] = replace(objects[i], **changes)
    return replace(scene, objects=tuple(objects))


@pytest.mark.parametrize(
    "drawn, wrong",
    [
        (_with(TWO, 0, color="purple"), "color"),
        (_with(TWO, 1, size="large"), "size"),
        (_with(TWO, 1, texture="dotted"), "texture"),
        (_with(TWO, 0, shape="triangle"), "shape"),
        (replace(TWO, background="white"), "background"),
        (place(replace(TWO, relation=CONVERSE[TWO.relation])), "relation"),
    ],
)
def test_judge_names_exactly_the_attribute_that_is_wrong(drawn, wrong):
    verdict = judge(render(drawn, 64, 64), TWO)
    assert {a for a in ATTRIBUTES if getattr(verdict, a) is False} == {wrong}


def test_swapped_colours_are_a_binding_error_not_a_shape_error():
    # Asked: red circle above blue square. Drawn: blue circle above red square.
    drawn = _with(_with(TWO, 0, color="blue"), 1, color="red")
    verdict = judge(render(drawn, 64, 64), TWO)
    assert verdict.shape and verdict.relation and not verdict.color
    assert category_holds(verdict, "spatial") and not category_holds(verdict, "complex")


def test_missing_and_extra_objects_fail_the_count():
    alone = Scene((TWO.objects[0],), None, TWO.background)
    verdict = judge(render(alone, 64, 64), TWO)
    assert not verdict.count and verdict.relation is False
    extra = Scene((ObjectSpec("cross", "white", "small", cx=0.2, cy=0.2),), None, "black")
    crowded = render(extra, 64, 64)
    pixels = np.asarray(render(ONE, 64, 64)).copy()
    pixels[:24, :24] = np.asarray(crowded)[:24, :24]  # a second object in the top-left corner
    verdict = judge(Image.fromarray(pixels), ONE)
    assert not verdict.count and verdict.shape and verdict.color


def test_tensor_array_and_pil_inputs_read_the_same():
    image = render(TWO, 32, 48)  # non-square: sizes are fractions of the short side
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    readings = {analyse(image), analyse(tensor), analyse(np.asarray(image))}
    assert len(readings) == 1
    assert all(getattr(judge(image, TWO), a) for a in ATTRIBUTES)
    with pytest.raises(TypeError, match="PIL image"):
        analyse([1, 2, 3])


def test_images_of_nothing_are_judged_wrong_not_crashing():
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for image in (*noise, torch.zeros(3, 32, 32), torch.full((3, 32, 32), -1.0)):
        verdict = judge(image, TWO)
        assert not (category_holds(verdict, "spatial") or category_holds(verdict, "complex"))
    assert not judge(torch.zeros(3, 32, 32), TWO).count  # a flat gray image shows no object


def test_noise_is_not_read_as_the_shape_asked_for():
    # Noise blobs fit some outline a little (up to ~0.65 IoU); a judge matching by shape first must not
    # pick the one that happens to look like the prompt's shape.
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(24, 3, 32, 32, generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(noise, 3, 1, 1).mul(2).clamp(-1, 1)  # blob-sized structure
    clutter = 0
    for image in (*noise, *blurred):
        analysis = analyse(image)
        assert analysis.objects == ()
        assert not any(category_holds(judge(analysis, ONE), c) for c in ("color", "shape", "texture"))
        clutter += analysis.clutter
    assert clutter > 10  # blobs were found and rejected as clutter, not missed


def test_score_applies_each_categorys_rule():
    images = [render(ONE, 64, 64), render(_with(ONE, 0, texture="striped"), 64, 64)]
    assert score(images, [ONE, ONE], "color") == [True, True]  # colour and shape right in both
    assert score(images, [ONE, ONE], "texture") == [True, False]
    assert score(torch.stack([torch.zeros(3, 32, 32)]), [ONE], "shape") == [False]
    with pytest.raises(ValueError, match="unknown category 'colour'"):
        score(images, [ONE, ONE], "colour")
    with pytest.raises(ValueError, match="2 images for 1 scenes"):
        score(images, [ONE], "color")
