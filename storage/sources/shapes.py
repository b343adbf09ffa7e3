"""Synthetic compositional shapes: the project's embedded default data set, with exact captions.

Every image is rendered from a typed scene, so its caption, its class and its layout are known exactly and
a held-out prompt says exactly what it asks for (T2I-CompBench categories: color, shape, texture, spatial,
complex). The CPU demo trains all three PixArt stages on it, at 32-64 px.

Grammar (a dense caption is one sentence of it; `parse_caption` inverts it):

    caption  := [template] object [relation object] "on a" background "background"
    object   := "a" size color [texture] shape         (the texture word is left out when "plain")
    relation := "above" | "below" | "to the left of" | "to the right of"

    "a large red circle above a small blue striped square on a gray background"
    "a small green dotted star on a black background"

The sparse caption keeps the shapes and the relation only ("a circle above a square", "a star"): the short,
under-specified caption of the dense-vs-short ablation.

Layout: positions are fractions of the canvas, sizes fractions of its short side, so one scene renders at
any aspect ratio; the relation is read from the centres (objects[0] is the subject, image y grows
downwards) and the bounding boxes never overlap.

Determinism: sample i is drawn from `random.Random(f"{seed}:{i}")` alone, so any index range can be
generated on its own and PNG bytes are identical between runs.
"""

from __future__ import annotations

import io
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.buckets import ASPECT_RATIO_1024, bucket_size
from storage.sources.base import RawSample

# --------------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------------

# Shapes whose outlines stay distinct at 8-10 px (a small object at 32 px): no rotations, no look-alikes
# (a diamond is a rotated square; a heart is a blob at that size).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Saturated, well-separated colours: every pair is >= 100 apart in RGB (orange-yellow, the closest, is 102).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 128, 0),
    "yellow": (255, 230, 0),
    "green": (20, 160, 40),
    "blue": (20, 70, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"gray": (128, 128, 128), "white": (255, 255, 255), "black": (0, 0, 0)}

# A colour goes on a background only if they are this far apart in RGB: gray takes every colour, white
# every colour but white, black every colour but black.
MIN_CONTRAST = 100.0
BACKGROUND_COLORS: dict[str, tuple[str, ...]] = {
    bg: tuple(c for c, rgb in COLORS.items() if math.dist(rgb, bg_rgb) >= MIN_CONTRAST)
    for bg, bg_rgb in BACKGROUNDS.items()
}

# Bounding-box side as a fraction of the canvas's short side. Two large objects must fit side by side
# (2 * 0.44 + gap + margins <= 1), which is why "large" is not larger; the ratio (1.7) stays obvious.
SIZES: dict[str, float] = {"small": 0.26, "large": 0.44}

TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")

# Subject (objects[0]) relative to reference (objects[1]).
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
CONVERSE: dict[str, str] = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}

# Dense-caption phrasings; template 0 is the canonical one (what `parse_caption` is built for, and what
# meta["caption_dense"] and the held-out prompts use). Every template parses.
TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "an image showing {}")

MARGIN = 0.02  # free border around every object, as a fraction of the short side
GAP = 0.05  # minimum space between the two bounding boxes along the relation's axis
SUPERSAMPLE = 4  # draw at 4x and box-downscale: anti-aliased and exact in flat regions

# Textures are laid in canvas units (not object units) so a small object at 64 px still shows 2-3 periods;
# the pattern is phased so the object's centre pixel is always the plain colour. A period is never below
# MIN_PERIOD output pixels: finer patterns would blur into a flat shade (and cover the centre pixel).
STRIPE_PERIOD = 0.09  # horizontal stripes: period as a fraction of the short side (5.8 px at 64 px)
STRIPE_INK = 0.45  # fraction of each period in ink
DOT_PERIOD = 0.11  # dot grid period (7 px at 64 px)
DOT_RADIUS = 0.32  # dot radius as a fraction of the period
MIN_PERIOD = 4.0  # pixels


def _ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Stripe/dot colour: a dark shade of the object's colour (keeps its hue); light gray for a black object."""
    if rgb == (0, 0, 0):
        return (160, 160, 160)
    return tuple(round(0.4 * v) for v in rgb)


TEXTURE_INK: dict[str, tuple[int, int, int]] = {name: _ink(rgb) for name, rgb in COLORS.items()}


def _check(kind: str, value: object, allowed: tuple[str, ...] | dict) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {list(allowed)}")


# --------------------------------------------------------------------------------------------------------------------
# Scene grammar
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object. cx, cy: centre as fractions of the canvas width / height (0 left / top, 1 right / bottom)."""

    shape: str
    color: str
    size: str
    texture: str = "plain"
    cx: float = 0.5
    cy: float = 0.5

    def __post_init__(self):
        _check("shape", self.shape, SHAPES)
        _check("color", self.color, COLORS)
        _check("size", self.size, SIZES)
        _check("texture", self.texture, TEXTURES)
        if not (0.0 <= self.cx <= 1.0 and 0.0 <= self.cy <= 1.0):
            raise ValueError(
                f"object centre ({self.cx}, {self.cy}) is outside the canvas; expected fractions in [0, 1]"
            )


@dataclass(frozen=True)
class Scene:
    """One or two objects on a plain background. Two objects have distinct shapes and a relation that reads
    "objects[0] <relation> objects[1]"; one object has relation None."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str = "gray"

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError(f"a one-object scene has no relation, got {self.relation!r}")
        if len(self.objects) == 2:
            _check("relation", self.relation, RELATIONS)
            if self.objects[0].shape == self.objects[1].shape:
                raise ValueError(f"the two objects must have distinct shapes, both are {self.objects[0].shape!r}")
        _check("background", self.background, BACKGROUNDS)
        for o in self.objects:
            if o.color not in BACKGROUND_COLORS[self.background]:
                raise ValueError(
                    f"a {o.color} object does not stand out on a {self.background} background; "
                    f"allowed colours: {list(BACKGROUND_COLORS[self.background])}"
                )

    def to_dict(self) -> dict:
        """JSON-able form (what meta["scene"] holds)."""
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation, "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(ObjectSpec(**o) for o in d["objects"]), d["relation"], d["background"])


# --------------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------------


def place(scene: Scene, rng: random.Random | None = None, jitter: float = 1.0) -> Scene:
    """The scene with object centres laid out: random with `rng`, canonical (centred, even spacing) without.

    jitter in [0, 1] scales how far from the canonical layout `rng` may move objects (1: anywhere they fit).
    Coordinates are computed on a unit square whose side is the canvas's short side; on a longer axis the
    same fractions only move objects further apart, so the layout holds at every aspect ratio.
    """
    if rng is None:
        u = lambda: 0.5  # noqa: E731
    elif jitter == 1.0:
        u = rng.random
    else:
        u = lambda: 0.5 + jitter * (rng.random() - 0.5)  # noqa: E731
    objs = scene.objects
    if len(objs) == 1:
        lo = MARGIN + SIZES[objs[0].size] / 2
        cx, cy = lo + u() * (1 - 2 * lo), lo + u() * (1 - 2 * lo)
        return replace(scene, objects=(replace(objs[0], cx=round(cx, 4), cy=round(cy, 4)),))

    # 1. Order the pair along the relation's axis: the subject comes first if it is above / to the left.
    subject_first = scene.relation in ("above", "to the left of")
    first, second = (objs[0], objs[1]) if subject_first else (objs[1], objs[0])
    r1, r2 = SIZES[first.size] / 2, SIZES[second.size] / 2
    # 2. Spread the slack: extra gap first (more separation is clearer), then the offset of the pair.
    slack = 1 - 2 * MARGIN - 2 * r1 - 2 * r2 - GAP  # >= 0.03 with the SIZES above
    extra_gap = u() * slack
    offset = u() * (slack - extra_gap)
    c1 = MARGIN + offset + r1
    c2 = c1 + r1 + GAP + extra_gap + r2
    # 3. Both objects share the other coordinate, so the relation has no diagonal ambiguity.
    lo = MARGIN + max(r1, r2)
    shared = lo + u() * (1 - 2 * lo)
    horizontal = scene.relation in ("to the left of", "to the right of")

    def at(o: ObjectSpec, c: float) -> ObjectSpec:
        cx, cy = (c, shared) if horizontal else (shared, c)
        return replace(o, cx=round(cx, 4), cy=round(cy, 4))

    a, b = at(first, c1), at(second, c2)
    return replace(scene, objects=(a, b) if subject_first else (b, a))


def bounding_box(obj: ObjectSpec, height: int, width: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in pixels of the object rendered on a height x width canvas."""
    r = SIZES[obj.size] / 2 * min(height, width)
    x, y = obj.cx * width, obj.cy * height
    return (x - r, y - r, x + r, y + r)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _fit_unit_box(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale and centre a polygon so its bounding box fits [-1, 1]^2 (keeping its proportions)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    s = 2 / max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - mx) * s, (y - my) * s) for x, y in points]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    # A fat star (inner radius 0.45 of the outer) so its arms survive downscaling; one point up.
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * points)]
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    # A plus sign; arm is the half-width of each bar.
    w = arm
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


# Outlines in a unit box [-1, 1]^2, y downwards; the circle is drawn as an ellipse.
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _fit_unit_box(_star()),
    "cross": _cross(),
}


def _texture_mask(texture: str, x: np.ndarray, y: np.ndarray, short: int) -> np.ndarray | None:
    """Where the ink goes, given pixel-centre coordinates relative to the object's centre (output pixels)."""
    if texture == "striped":
        # phase 0.5 at the centre: the middle of a plain band
        phase = (y / max(STRIPE_PERIOD * short, MIN_PERIOD) + 0.5) % 1.0
        return np.abs(phase - 0.5) > (1 - STRIPE_INK) / 2
    if texture == "dotted":
        p = max(DOT_PERIOD * short, MIN_PERIOD)
        fx, fy = (x / p) % 1.0 - 0.5, (y / p) % 1.0 - 0.5  # dots sit half a period off the centre
        return fx**2 + fy**2 < DOT_RADIUS**2
    return None


def render(scene: Scene, height: int, width: int) -> Image.Image:
    """The scene as an RGB image of height x width: drawn at SUPERSAMPLE x, then box-downscaled.

    Deterministic (same scene and size, same pixels); flat regions keep their exact nominal colour.
    """
    if height < 8 or width < 8:
        raise ValueError(f"render size {height}x{width} is too small; expected at least 8x8")
    f = SUPERSAMPLE
    short = min(height, width)
    canvas = Image.new("RGB", (width * f, height * f), BACKGROUNDS[scene.background])
    # Pixel-centre coordinates of the supersampled grid, in output pixels.
    ys = (np.arange(height * f)[:, None] + 0.5) / f  # (H*f, 1)
    xs = (np.arange(width * f)[None, :] + 0.5) / f  # (1, W*f)
    for obj in scene.objects:
        # 1. The outline as a mask.
        x0, y0, x1, y1 = bounding_box(obj, height, width)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        mask = Image.new("L", canvas.size, 0)
        draw = ImageDraw.Draw(mask)
        if obj.shape == "circle":
            draw.ellipse([x0 * f, y0 * f, x1 * f, y1 * f], fill=255)
        else:
            draw.polygon([((cx + px * r) * f, (cy + py * r) * f) for px, py in POLYGONS[obj.shape]], fill=255)
        # 2. The fill: the plain colour, with the texture's ink where its pattern says.
        fill = np.empty((height * f, width * f, 3), dtype=np.uint8)  # (H*f, W*f, 3)
        fill[:] = COLORS[obj.color]
        ink = _texture_mask(obj.texture, xs - cx, ys - cy, short)
        if ink is not None:
            fill[np.broadcast_to(ink, fill.shape[:2])] = TEXTURE_INK[obj.color]
        canvas.paste(Image.fromarray(fill, "RGB"), (0, 0), mask)
    return canvas.reduce(f)


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes (fixed compression level, no metadata: identical bytes for identical pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: ObjectSpec, dense: bool) -> str:
    words = [obj.shape]
    if dense:
        words = [obj.size, obj.color, *([obj.texture] if obj.texture != "plain" else []), obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, style: Literal["dense", "sparse"] = "dense", template: int = 0) -> str:
    """The scene's caption: "dense" names every attribute (and parses back), "sparse" only shapes and relation.

    template picks a phrasing from TEMPLATES (0, the default, is the bare description).
    """
    if style not in ("dense", "sparse"):
        raise ValueError(f"unknown caption style {style!r}; expected 'dense' or 'sparse'")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"caption template {template} out of range; expected 0..{len(TEMPLATES) - 1}")
    dense = style == "dense"
    text = _noun_phrase(scene.objects[0], dense)
    if scene.relation is not None:
        text += f" {scene.relation} {_noun_phrase(scene.objects[1], dense)}"
    if dense:
        text += f" on {_article(scene.background)} {scene.background} background"
    return TEMPLATES[template].format(text)


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _object_pattern(n: int) -> str:
    return (
        rf"an? (?P<size{n}>{_alternatives(SIZES)}) (?P<color{n}>{_alternatives(COLORS)})"
        rf"(?: (?P<texture{n}>{_alternatives(TEXTURES)}))? (?P<shape{n}>{_alternatives(SHAPES)})"
    )


_TEMPLATE_PREFIXES = [t.removesuffix("{}") for t in TEMPLATES if t != "{}"]
_CAPTION_RE = re.compile(
    rf"^(?:{_alternatives(_TEMPLATE_PREFIXES)})?{_object_pattern(0)}"
    rf"(?: (?P<relation>{_alternatives(RELATIONS)}) {_object_pattern(1)})?"
    rf" on an? (?P<background>{_alternatives(BACKGROUNDS)}) background$"
)


def parse_caption(text: str) -> Scene:
    """The scene a dense caption describes, with the canonical layout of `place` (the inverse of `caption`).

    Case and runs of whitespace are ignored. Raises ValueError on anything outside the grammar (sparse
    captions included: they do not say enough to make a scene).
    """
    m = _CAPTION_RE.match(" ".join(text.lower().split()))
    if m is None:
        raise ValueError(
            f"caption {text!r} is not in the shapes grammar; expected e.g. "
            f"'a large red circle above a small blue striped square on a gray background'"
        )
    g = m.groupdict()
    objects = tuple(
        ObjectSpec(shape=g[f"shape{n}"], color=g[f"color{n}"], size=g[f"size{n}"], texture=g[f"texture{n}"] or "plain")
        for n in (0, 1)
        if g[f"shape{n}"] is not None
    )
    return place(Scene(objects, g["relation"], g["background"]))


# --------------------------------------------------------------------------------------------------------------------
# Classes (stage 1, class-conditional)
# --------------------------------------------------------------------------------------------------------------------

# Class = (shape, colour) of objects[0], the subject: label = SHAPES.index(shape) * len(COLORS) +
# list(COLORS).index(color), so "red circle" is 0, "orange circle" 1, ..., "black cross" 39.
NUM_CLASSES = len(SHAPES) * len(COLORS)
CLASS_NAMES: tuple[str, ...] = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)


def class_label(scene: Scene) -> int:
    """Stage-1 class of the scene: its subject's (shape, colour), an index into CLASS_NAMES."""
    obj = scene.objects[0]
    return SHAPES.index(obj.shape) * len(COLORS) + list(COLORS).index(obj.color)


# --------------------------------------------------------------------------------------------------------------------
# Configuration and the held-out rule
# --------------------------------------------------------------------------------------------------------------------


class Holdout(BaseModel):
    """Attribute combinations that never occur in the train split; the held-out prompts use only these.

    Each list is named by the evaluation category it feeds. A relation triple also holds out its converse
    ("circle above square" is the same picture as "square below circle"). Empty lists hold nothing out.
    """

    model_config = ConfigDict(extra="forbid")

    color: list[tuple[str, str]] = Field(
        default=[("red", "star"), ("green", "circle"), ("blue", "triangle"), ("yellow", "square"), ("purple", "cross")],
        description="(colour, shape) pairs never drawn together in training; one per shape by default.",
    )
    shape: list[tuple[str, str]] = Field(
        default=[("large", "triangle"), ("small", "cross")],
        description="(size, shape) pairs never drawn together in training.",
    )
    texture: list[tuple[str, str]] = Field(
        default=[("striped", "circle"), ("dotted", "square")],
        description="(texture, shape) pairs never drawn together in training (only when textures are on).",
    )
    spatial: list[tuple[str, str, str]] = Field(
        default=[
            ("circle", "above", "square"),
            ("triangle", "to the left of", "star"),
            ("cross", "below", "circle"),
            ("square", "to the right of", "triangle"),
        ],
        description="(shape, relation, shape) triples (and their converses) never drawn in training.",
    )

    @model_validator(mode="after")
    def _known_words(self) -> Holdout:
        for color, shape in self.color:
            _check("held-out color", color, COLORS)
            _check("held-out shape", shape, SHAPES)
        for size, shape in self.shape:
            _check("held-out size", size, SIZES)
            _check("held-out shape", shape, SHAPES)
        for texture, shape in self.texture:
            _check("held-out texture", texture, TEXTURES[1:])
            _check("held-out shape", shape, SHAPES)
        for a, relation, b in self.spatial:
            _check("held-out shape", a, SHAPES)
            _check("held-out relation", relation, RELATIONS)
            _check("held-out shape", b, SHAPES)
        return self

    def held_out(self, scene: Scene) -> set[str]:
        """The categories ("color", "shape", "texture", "spatial") in which the scene has a held-out combination."""
        found = set()
        for o in scene.objects:
            if (o.color, o.shape) in self.color:
                found.add("color")
            if (o.size, o.shape) in self.shape:
                found.add("shape")
            if (o.texture, o.shape) in self.texture:
                found.add("texture")
        if scene.relation is not None:
            a, b = scene.objects[0].shape, scene.objects[1].shape
            if (a, scene.relation, b) in self.spatial or (b, CONVERSE[scene.relation], a) in self.spatial:
                found.add("spatial")
        return found


class ShapesConfig(BaseModel):
    """What the shapes source draws. Sample i depends only on these fields and i."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(1024, ge=0, description="Number of samples in the source.")
    seed: int = Field(0, description="Seed; sample i is drawn from random.Random(f'{seed}:{i}').")
    image_size: int = Field(
        64,
        ge=16,
        description="Base resolution: the side of a square image; other aspect ratios render at their "
        "storage.buckets bucket for this base (about the same pixel count), so training never resizes them.",
    )
    aspect_ratios: list[str] = Field(
        default=["1.0"],
        min_length=1,
        description="Aspect-ratio bucket keys (h/w, as in storage.buckets); each sample draws one uniformly.",
    )
    max_objects: int = Field(2, ge=1, le=2, description="1: single objects only; 2: also two-object scenes.")
    two_object_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability of a two-object scene when max_objects is 2."
    )
    textures: bool = Field(True, description="Draw striped / dotted textures (else every object is plain).")
    caption_style: Literal["dense", "sparse"] = Field(
        "dense", description="Caption given to training: dense (every attribute) or sparse (shapes and relation)."
    )
    phrasings: int = Field(
        1,
        ge=1,
        le=len(TEMPLATES),
        description="Number of caption templates drawn from per sample (1: only the canonical phrasing).",
    )
    layout_jitter: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="How far objects stray from the canonical layout (one object centred, a pair evenly spaced "
        "about the centre): 1 anywhere they fit, 0 never. Lower is an easier task for a tiny model (the CPU demo).",
    )
    holdout: Holdout = Field(default_factory=Holdout, description="Combinations kept out of the train split.")
    split: Literal["train", "heldout"] = Field(
        "train", description="train: scenes with no held-out combination; heldout: scenes with at least one."
    )

    @field_validator("aspect_ratios")
    @classmethod
    def _known_ratios(cls, ratios: list[str]) -> list[str]:
        for r in ratios:
            if r not in ASPECT_RATIO_1024:
                raise ValueError(f"unknown aspect-ratio bucket {r!r}; known: {list(ASPECT_RATIO_1024)}")
        return ratios

    @model_validator(mode="after")
    def _heldout_reachable(self) -> ShapesConfig:
        if self.split == "heldout":
            h = self.holdout
            single_ok = bool(h.color or h.shape or (h.texture and self.textures))
            single_drawn = self.max_objects == 1 or self.two_object_fraction < 1
            two_drawn = self.max_objects == 2 and self.two_object_fraction > 0
            if (single_drawn and not single_ok) or (two_drawn and not (single_ok or h.spatial)):
                raise ValueError(
                    "split='heldout' needs a held-out combination that every drawn scene can contain: "
                    f"holdout={h.model_dump()} textures={self.textures} max_objects={self.max_objects} "
                    f"two_object_fraction={self.two_object_fraction}"
                )
        return self


# --------------------------------------------------------------------------------------------------------------------
# Sampling: the source
# --------------------------------------------------------------------------------------------------------------------

MAX_DRAWS = 10_000  # rejection sampling budget per sample (the usual acceptance is 0.1-0.6)


def _draw_scene(rng: random.Random, n_objects: int, textures: bool) -> Scene:
    """Attributes drawn uniformly; distinct shapes; a background that every colour stands out on. Unplaced."""
    shapes = rng.sample(SHAPES, n_objects)
    objects = tuple(
        ObjectSpec(
            shape=s,
            color=rng.choice(list(COLORS)),
            size=rng.choice(list(SIZES)),
            texture=rng.choice(TEXTURES) if textures else "plain",
        )
        for s in shapes
    )
    relation = rng.choice(RELATIONS) if n_objects == 2 else None
    backgrounds = [bg for bg, ok in BACKGROUND_COLORS.items() if all(o.color in ok for o in objects)]
    return Scene(objects, relation, rng.choice(backgrounds))


class ShapesSource:
    """The synthetic shapes as a Source: `count` RawSamples, sample i a pure function of (config, i)."""

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config or ShapesConfig()
        self.name = f"shapes:seed={self.config.seed}" + (":heldout" if self.config.split == "heldout" else "")

    def __len__(self) -> int:
        return self.config.count

    def __iter__(self) -> Iterator[RawSample]:
        return self.iter_range(0, self.config.count)

    def iter_range(self, start: int, stop: int) -> Iterator[RawSample]:
        """Samples start..stop-1, identical to the same indices of a full iteration."""
        if not 0 <= start <= stop <= self.config.count:
            raise ValueError(f"index range [{start}, {stop}) is not within [0, {self.config.count}]")
        for i in range(start, stop):
            yield self.sample(i)

    def scene(self, i: int) -> tuple[Scene, tuple[int, int], int]:
        """Sample i's placed scene, its (height, width) in pixels and its caption template."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{i}")
        # 1. Canvas, scene kind and phrasing are drawn once, so the split does not skew their frequencies.
        height, width = bucket_size(rng.choice(cfg.aspect_ratios), base=cfg.image_size)
        two = cfg.max_objects == 2 and rng.random() < cfg.two_object_fraction
        template = rng.randrange(cfg.phrasings)
        # 2. Attributes by rejection until the scene belongs to the split.
        want_heldout = cfg.split == "heldout"
        for _ in range(MAX_DRAWS):
            scene = _draw_scene(rng, 2 if two else 1, cfg.textures)
            if bool(cfg.holdout.held_out(scene)) == want_heldout:
                break
        else:
            raise RuntimeError(f"no {cfg.split} scene in {MAX_DRAWS} draws for sample {i}; check the holdout config")
        # 3. Layout.
        return place(scene, rng, cfg.layout_jitter), (height, width), template

    def sample(self, i: int) -> RawSample:
        scene, (height, width), template = self.scene(i)
        cfg = self.config
        # Held-out samples are other images under the same indices: their names say so.
        tag = "" if cfg.split == "train" else "heldout"
        return RawSample(
            source=f"shapes:seed={cfg.seed}:{tag + ':' if tag else ''}{i}",
            key_hint=f"shapes_{tag + '_' if tag else ''}{i:06d}",
            data=encode_png(render(scene, height, width)),
            caption=caption(scene, cfg.caption_style, template),
            meta={
                "scene": scene.to_dict(),
                "caption_dense": caption(scene, "dense"),
                "caption_sparse": caption(scene, "sparse"),
                "split": cfg.split,
            },
            cls=class_label(scene),
        )


# --------------------------------------------------------------------------------------------------------------------
# Held-out prompts (evaluation)
# --------------------------------------------------------------------------------------------------------------------

CATEGORIES: tuple[str, ...] = ("color", "shape", "texture", "spatial", "complex")


def heldout_prompts(config: ShapesConfig, per_category: int = 20) -> list[tuple[str, str, Scene]]:
    """(category, prompt, scene) triples whose prompts combine attributes never seen together in training.

    color / shape / texture: one object whose only held-out combination is of that category (plain textures
    except in "texture"); spatial: two plain objects whose only held-out combination is their relation;
    complex: a held-out relation and at least one held-out attribute. Categories the config cannot produce
    are left out. Prompts are canonical dense captions (parse back to `scene`, laid out by `place`), unique,
    deterministic in config.seed; a category has fewer than per_category only if fewer exist.
    """
    h = config.holdout
    two = config.max_objects == 2
    # category -> (objects, textures, accept(held-out categories of a scene), applicable)
    rules: dict[str, tuple[int, bool, Callable[[set[str]], bool], bool]] = {
        "color": (1, False, lambda held: held == {"color"}, bool(h.color)),
        "shape": (1, False, lambda held: held == {"shape"}, bool(h.shape)),
        "texture": (1, True, lambda held: held == {"texture"}, bool(h.texture) and config.textures),
        "spatial": (2, False, lambda held: held == {"spatial"}, two and bool(h.spatial)),
        "complex": (2, config.textures, lambda held: "spatial" in held and len(held) > 1, two and bool(h.spatial)),
    }
    out = []
    for category, (n_objects, textures, accept, applicable) in rules.items():
        if not applicable:
            continue
        rng = random.Random(f"{config.seed}:heldout-prompts:{category}")
        found: dict[str, Scene] = {}
        for _ in range(1000 + 200 * per_category):
            if len(found) == per_category:
                break
            scene = _draw_scene(rng, n_objects, textures)
            if accept(h.held_out(scene)):
                found.setdefault(caption(scene), place(scene))
        out += [(category, prompt, scene) for prompt, scene in found.items()]
    return out
