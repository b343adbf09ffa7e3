"""The synthetic shapes source: deterministic samples, exact captions, an enforced holdout, correct geometry."""

import io
import itertools
import math

import numpy as np
import pytest
from PIL import Image

from storage.buckets import bucket_size
from storage.sources.shapes import (
    BACKGROUND_COLORS,
    BACKGROUNDS,
    CLASS_NAMES,
    COLORS,
    GAP,
    MIN_CONTRAST,
    NUM_CLASSES,
    SHAPES,
    TEMPLATES,
    TEXTURE_INK,
    ObjectSpec,
    Scene,
    ShapesConfig,
    ShapesSource,
    bounding_box,
    caption,
    class_label,
    heldout_prompts,
    parse_caption,
    place,
    render,
)

RATIOS = ["1.0", "0.5", "2.0", "0.25", "4.0"]


def _scenes(config: ShapesConfig, n: int = 300) -> list[tuple[Scene, tuple[int, int]]]:
    src = ShapesSource(config.model_copy(update={"count": n}))
    return [src.scene(i)[:2] for i in range(n)]


def test_same_seed_same_bytes_and_any_index_range_reproduces_the_samples():
    config = ShapesConfig(count=12, seed=3, aspect_ratios=["1.0", "0.5"], phrasings=3)
    full = list(ShapesSource(config))
    again = list(ShapesSource(config))
    part = list(ShapesSource(config).iter_range(5, 9))
    assert [s.data for s in full] == [s.data for s in again]
    assert [(s.data, s.caption, s.meta, s.cls) for s in part] == [(s.data, s.caption, s.meta, s.cls) for s in full[5:9]]
    assert [s.source for s in part] == [f"shapes:seed=3:{i}" for i in range(5, 9)]
    assert [s.key_hint for s in part] == [f"shapes_{i:06d}" for i in range(5, 9)]
    other_seed = list(ShapesSource(config.model_copy(update={"seed": 4})))
    assert [s.data for s in other_seed] != [s.data for s in full]
    with pytest.raises(ValueError, match="not within"):
        list(ShapesSource(config).iter_range(10, 13))


def test_sample_is_a_png_of_its_bucket_size_with_scene_meta_and_class():
    config = ShapesConfig(count=16, aspect_ratios=RATIOS)
    for s in ShapesSource(config):
        image = Image.open(io.BytesIO(s.data))
        assert image.format == "PNG" and image.mode == "RGB"
        scene = Scene.from_dict(s.meta["scene"])
        assert (image.height, image.width) in {bucket_size(r, base=64) for r in RATIOS}
        assert np.array_equal(np.asarray(image), np.asarray(render(scene, image.height, image.width)))
        assert s.caption == s.meta["caption_dense"] == caption(scene)
        assert s.meta["caption_sparse"] == caption(scene, "sparse")
        assert 0 <= s.cls < NUM_CLASSES and s.cls == class_label(scene)
        first = scene.objects[0]
        assert CLASS_NAMES[s.cls] == f"{first.color} {first.shape}"


def test_render_non_square_has_requested_size():
    scene = place(Scene((ObjectSpec("star", "red", "large"), ObjectSpec("circle", "blue", "small")), "above", "white"))
    for height, width in [(40, 100), (100, 40), (33, 57), (64, 64)]:
        assert render(scene, height, width).size == (width, height)


def test_dense_caption_reads_as_the_grammar_and_round_trips():
    scene = Scene(
        (ObjectSpec("circle", "red", "large"), ObjectSpec("square", "blue", "small", texture="striped")),
        "above",
        "gray",
    )
    text = "a large red circle above a small blue striped square on a gray background"
    assert caption(scene) == text
    assert caption(scene, "sparse") == "a circle above a square"
    assert caption(scene, template=1) == "a photo of " + text
    assert parse_caption(text) == place(scene)
    assert parse_caption("  A Large RED circle above a small blue  striped square on a gray background ") == place(
        scene
    )
    for scene, _ in _scenes(ShapesConfig(phrasings=3), 200):
        for template in range(len(TEMPLATES)):
            assert parse_caption(caption(scene, template=template)) == place(scene)
    for bad in ["a circle above a square", "a large red circle", "a huge red circle on a gray background"]:
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            parse_caption(bad)


def test_train_split_never_shows_a_heldout_combination_and_heldout_prompts_use_only_them():
    config = ShapesConfig(aspect_ratios=RATIOS)
    train = _scenes(config)
    heldout = _scenes(config.model_copy(update={"split": "heldout"}))
    assert all(not config.holdout.held_out(s) for s, _ in train)
    assert all(config.holdout.held_out(s) for s, _ in heldout)
    pairs = {(o.color, o.shape) for s, _ in train for o in s.objects}
    assert ("red", "star") not in pairs and ("red", "circle") in pairs and ("green", "star") in pairs

    prompts = heldout_prompts(config, per_category=10)
    assert {c for c, _, _ in prompts} == {"color", "shape", "texture", "spatial", "complex"}
    assert len(prompts) == 50 and len({p for _, p, _ in prompts}) == 50
    for category, prompt, scene in prompts:
        held = config.holdout.held_out(scene)
        assert held == {category} if category != "complex" else ("spatial" in held and len(held) > 1)
        assert parse_caption(prompt) == scene
    assert not {p for _, p, _ in prompts} & {caption(s) for s, _ in train}
    assert heldout_prompts(config, per_category=10) == prompts


def test_two_object_layout_reads_as_the_relation_without_overlap_at_every_aspect_ratio():
    config = ShapesConfig(aspect_ratios=RATIOS, two_object_fraction=1.0)
    for scene, (height, width) in _scenes(config, 200):
        a, b = (bounding_box(o, height, width) for o in scene.objects)
        for left, top, right, bottom in (a, b):
            assert 0 <= left and right <= width and 0 <= top and bottom <= height
        (ax, ay), (bx, by) = [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) for box in (a, b)]
        along, across = {
            "above": (by - ay, bx - ax),
            "below": (ay - by, bx - ax),
            "to the left of": (bx - ax, by - ay),
            "to the right of": (ax - bx, by - ay),
        }[scene.relation]
        assert along > 0 and across == pytest.approx(0, abs=0.01)
        gap_x, gap_y = max(a[0], b[0]) - min(a[2], b[2]), max(a[1], b[1]) - min(a[3], b[3])
        assert max(gap_x, gap_y) >= GAP * min(height, width) - 0.01


def test_object_centres_show_the_nominal_colour_and_textures_are_visible_at_64px():
    config = ShapesConfig(aspect_ratios=RATIOS)
    for scene, (height, width) in _scenes(config, 80):
        pixels = np.asarray(render(scene, height, width))
        for o in scene.objects:
            centre = pixels[int(o.cy * height), int(o.cx * width)]
            assert tuple(centre) == COLORS[o.color], (scene, height, width)
    # A small textured object at 64 px still has clearly inked pixels (at least a few stripes or dots).
    for texture, shape, color in itertools.product(("striped", "dotted"), SHAPES, ("orange", "blue", "black")):
        scene = place(Scene((ObjectSpec(shape, color, "small", texture),), None, "gray"))
        left, top, right, bottom = (round(v) for v in bounding_box(scene.objects[0], 64, 64))
        inside = np.asarray(render(scene, 64, 64))[top:bottom, left:right].reshape(-1, 3)
        ink = (inside == TEXTURE_INK[color]).all(axis=1).sum()
        assert ink >= 8, f"small {color} {texture} {shape}: only {ink} ink pixels at 64 px"


def test_palette_colours_are_distinct_and_stand_out_on_their_backgrounds():
    for a, b in itertools.combinations(COLORS.values(), 2):
        assert math.dist(a, b) >= 100
    for bg, colors in BACKGROUND_COLORS.items():
        assert "gray" == bg or len(colors) == len(COLORS) - 1
        assert all(math.dist(COLORS[c], BACKGROUNDS[bg]) >= MIN_CONTRAST for c in colors)
    with pytest.raises(ValueError, match="does not stand out"):
        Scene((ObjectSpec("circle", "white", "small"),), None, "white")


def test_bad_config_and_scenes_are_rejected_with_the_accepted_values():
    with pytest.raises(ValueError, match="unknown aspect-ratio bucket '0.3'"):
        ShapesConfig(aspect_ratios=["0.3"])
    with pytest.raises(ValueError, match="split='heldout' needs"):
        ShapesConfig(split="heldout", max_objects=1, holdout={"color": [], "shape": [], "texture": []})
    with pytest.raises(ValueError, match="unknown held-out color 'pink'"):
        ShapesConfig(holdout={"color": [("pink", "star")]})
    with pytest.raises(ValueError, match="distinct shapes"):
        Scene((ObjectSpec("circle", "red", "small"), ObjectSpec("circle", "blue", "small")), "above")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        ObjectSpec("hexagon", "red", "small")


def test_layout_jitter_scales_the_distance_from_the_canonical_layout():
    def centres(jitter: float) -> list[tuple[float, ...]]:
        source = ShapesSource(ShapesConfig(count=60, image_size=32, layout_jitter=jitter))
        return [tuple(c for o in source.scene(i)[0].objects for c in (o.cx, o.cy)) for i in range(60)]

    default = ShapesSource(ShapesConfig(count=60, image_size=32))
    assert centres(1.0) == [tuple(c for o in default.scene(i)[0].objects for c in (o.cx, o.cy)) for i in range(60)]
    fixed = centres(0.0)
    source = ShapesSource(ShapesConfig(count=60, image_size=32, layout_jitter=0.0))
    assert fixed == [tuple(c for o in place(source.scene(i)[0]).objects for c in (o.cx, o.cy)) for i in range(60)]
    spread = {k: np.std([c[0] for c in centres(k) if len(c) == 2]) for k in (0.0, 0.5, 1.0)}
    assert spread[0.0] == 0 and 0 < spread[0.5] < spread[1.0]
