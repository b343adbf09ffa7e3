"""A judge for the shapes grammar that does not depend on the model under test: exact image analysis.

`analyse(image)` reads what an image shows (background; per object colour, shape, size, texture, centre);
`judge(image, scene)` compares that with what a prompt's scene asks for, attribute by attribute; `score` turns
verdicts into T2I-CompBench-style category results. No weights: the shapes source draws from a small palette on
a flat background and box-filters, so each step inverts a step of `storage.sources.shapes.render`:

1. Background: the border's median colour (kept as measured), named by the nearest palette background; the
   noise level from differences of neighbouring border pixels.
2. Pixels: a pixel of colour c is alpha * (c or its texture ink, mixed) + (1 - alpha) * background. Each pixel
   is explained by least squares under every colour allowed on that background; it belongs to the colour that
   explains it with coverage >= 1/2, unless the background (or less coverage) explains it as well.
3. Regions: connected pixels of one colour, holes filled, specks dropped. Where ink is collinear with the
   colour and the background (white or black on gray, anything on black), stripes can cut an object into
   bands: parts a few rows apart are grouped into objects by how well the groups fit outlines.
4. Shape and size together: the region is compared (soft IoU) with each (shape, size) outline drawn as the
   source draws it, placed by the region's centroid; the best fit wins. In a noisy image, a region whose best
   fit is poor (OBJECT_FIT) is clutter, not an object: noise must not be read as a shape that happens to
   match. Sizes are fractions of the short side, so "small" and "large" are absolute, as in the captions.
5. Texture: on pixels surely inside the object, the position between the plain colour and its ink is the ink
   coverage. Little ink is plain; ink that varies across rows but not along them is striped (the stripes are
   horizontal); otherwise dotted.
6. Relation: between the detections matched to the prompt's subject and reference, "above" needs the
   subject's centre higher and the vertical offset larger than the horizontal one (likewise the other three).

Noisy images (samples of a small diffusion model) are median-filtered for steps 2-4 and tolerances widen with
the measured noise; the judge then degrades towards chance instead of failing. Accuracy on fresh renders and
on degraded ones is measured in tests/test_judge.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from storage.sources.shapes import (
    BACKGROUND_COLORS,
    BACKGROUNDS,
    COLORS,
    POLYGONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    TEXTURE_INK,
    ObjectSpec,
    Scene,
)

ATTRIBUTES: tuple[str, ...] = ("count", "background", "color", "shape", "size", "texture", "relation")

MIN_OBJECT_FRACTION = 0.25  # regions below this fraction of the smallest drawable object are specks
PLAIN_INK = 0.05  # mean ink coverage below which an interior is plain (striped ~0.45, dotted ~0.3)
STRIPE_ROW_VARIANCE = 0.1  # share of the ink variance found along rows, below which ink is striped
CLIPPED_NOISE = 2.4  # underestimate of the noise on a background clipped at 0 or 255 (simulated)
NOISE_FILTER = 3.0  # border noise (std, 0-255 units) above which the image is median-filtered
MARGIN = 8.0  # RGB distance within which two explanations of a pixel are equally good (clean renders)
FILL_MIN = 0.35  # coverage below which a pixel explained as partly covered is not filled
BRIDGE = np.ones((5, 1), bool)  # vertical gaps of up to 3 rows between parts of one object are bridged
FIT_FLOOR = 0.5  # outline fit (soft IoU) below which a run of parts is better split
OBJECT_FIT = 0.66  # in a noisy image, the outline fit below which a region is clutter (noise blobs reach 0.65)
MAX_CHAIN = 12  # parts in a chain beyond which no split is searched
FULL = 0.99  # coverage by the inset outline above which a pixel is taken as inside the object
INSET = 0.4  # pixels: the fitted outline's placement error (centroid estimate, 1/4 px drawing grid)


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """One object found in an image. cx, cy: centre in pixels (x right, y down); fit: IoU of the best outline."""

    shape: str
    color: str
    size: str
    texture: str
    cx: float
    cy: float
    area: int
    fit: float


@dataclass(frozen=True)
class Analysis:
    """What an image shows, independently of any prompt."""

    background: str
    objects: tuple[Detection, ...]
    height: int
    width: int
    noise: float  # estimated std of the background, 0-255 units (0 for a clean render)
    clutter: int = 0  # regions that fit no outline (fit < OBJECT_FIT): not objects, never matched to the prompt


@dataclass(frozen=True)
class Verdict:
    """Per attribute, whether the image shows what the scene asks; relation is None for a one-object scene.

    An attribute holds when it holds for every object of the scene (objects are matched to detections first);
    an object with no matching detection fails every attribute.
    """

    count: bool
    background: bool
    color: bool
    shape: bool
    size: bool
    texture: bool
    relation: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Image in, pixels out
# --------------------------------------------------------------------------------------------------------------------


def to_rgb_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0-255 from a PIL image, a (3, H, W) tensor in [-1, 1] (rounded to 8-bit levels, as a
    saved image would be), or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor of shape {tuple(image.shape)}: expected (3, H, W) in [-1, 1]")
        x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()  # (3, H, W): 8-bit levels, as saved
        return x.permute(1, 2, 0).double().numpy()  # (H, W, 3)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image.astype(np.float64)
    raise TypeError(
        f"cannot judge a {type(image).__name__}: expected a PIL image, a (3, H, W) tensor in [-1, 1] or an "
        "(H, W, 3) uint8 array"
    )


def _nearest(rgb: np.ndarray, names: list[str], palette: dict[str, tuple[int, int, int]]) -> str:
    d = [math.dist(rgb, palette[n]) for n in names]
    return names[int(np.argmin(d))]


def _border(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])  # (2H + 2W - 4, 3)


def _noise(x: np.ndarray, background: str) -> float:
    """Std of the background's noise (0-255 units), from differences of neighbouring border pixels.

    Their median ignores objects touching the border (flat inside, one step at each edge). A white or black
    background is clipped on one side, which roughly halves the estimate: CLIPPED_NOISE corrects that.
    """
    sides = (x[0], x[-1], x[:, 0], x[:, -1])  # (W, 3) or (H, 3) each
    steps = np.concatenate([np.abs(np.diff(side, axis=0)) for side in sides])
    sigma = float(np.median(steps, axis=0).mean() / (0.6745 * math.sqrt(2)))  # |N(0, 2 s^2)| has median 0.954 s
    return sigma * (CLIPPED_NOISE if background in ("white", "black") else 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Pixels: which colour family explains each pixel, at what coverage
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Explanations:
    """The ways one family can explain pixels q (minus the background), each a coverage and a residual (RGB).

    plain / ink: that colour covers alpha of the pixel, the background the rest (an edge); full: the object
    covers the pixel, a mix of plain and ink (t_raw: the ink share, unclipped); mix: both at once, where the
    plain colour, the ink and the background are not collinear (else its residual is inf).
    """

    a_plain: np.ndarray
    r_plain: np.ndarray
    a_ink: np.ndarray
    r_ink: np.ndarray
    r_full: np.ndarray
    t_raw: np.ndarray
    a_mix: np.ndarray
    r_mix: np.ndarray


def _explain(q: np.ndarray, color: str, bg: np.ndarray) -> _Explanations:
    """Least squares on each side of the triangle {alpha (plain - bg) + alpha t (ink - plain)} and inside it."""
    plain, ink = np.array(COLORS[color], float), np.array(TEXTURE_INK[color], float)
    u, v = plain - bg, ink - plain
    w = u + v  # ink - bg
    uu, vv, ww, uv = u @ u, v @ v, w @ w, u @ v
    qq, qu, qv, qw = (q * q).sum(-1), q @ u, q @ v, q @ w

    def norm(sq: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(sq, 0.0))

    a_plain = np.clip(qu / uu, 0, 1)
    a_ink = np.clip(qw / ww, 0, 1)
    t_raw = (qv - uv) / vv  # unclipped: noise averages out
    t_full = np.clip(t_raw, 0, 1)
    r_full = norm(qq - 2 * qu + uu - 2 * t_full * (qv - uv) + t_full**2 * vv)
    det = uu * vv - uv**2
    if det > 0.05 * uu * vv:  # independent directions
        a, b = (vv * qu - uv * qv) / det, (uu * qv - uv * qu) / det
        feasible = (b >= 0) & (b <= a) & (a <= 1)
        r = norm(qq - 2 * a * qu - 2 * b * qv + a**2 * uu + 2 * a * b * uv + b**2 * vv)
        a_mix, r_mix = np.where(feasible, a, 0.0), np.where(feasible, r, np.inf)
    else:
        a_mix, r_mix = np.zeros_like(qq), np.full_like(qq, np.inf)
    return _Explanations(
        a_plain=a_plain,
        r_plain=norm(qq - 2 * a_plain * qu + a_plain**2 * uu),
        a_ink=a_ink,
        r_ink=norm(qq - 2 * a_ink * qw + a_ink**2 * ww),
        r_full=r_full,
        t_raw=t_raw,
        a_mix=a_mix,
        r_mix=r_mix,
    )


def _unmix(q: np.ndarray, families: list[str], bg: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Which family explains each pixel at coverage >= 1/2, and which families could fill it.

    q: (N, 3) pixels minus the background colour. Explanations within `margin` of the best are equally good and
    the least coverage among them is taken, so the background wins every tie.

    Returns labels (N,): family index, or -1 (background, coverage below one half); and fillable (N, F): family
    c explains the pixel as fully covered, and not as well as a small part covered by its plain colour or ink.
    That is how texture ink reads where it is collinear with the plain colour and the background (any colour on
    black, white or black on gray): the pixel can belong to an object only next to its labelled pixels.
    """
    # 1. Every explanation: the background (coverage 0), then four per family
    candidates = [(-1, np.zeros(len(q)), np.sqrt((q * q).sum(-1)))]
    fillable = np.zeros((len(q), len(families)), bool)
    for f, c in enumerate(families):
        e = _explain(q, c, bg)
        candidates += [(f, e.a_plain, e.r_plain), (f, e.a_ink, e.r_ink), (f, np.ones(len(q)), e.r_full)]
        candidates += [(f, e.a_mix, e.r_mix)]
        partial = ((e.a_plain < FILL_MIN) & (e.r_plain <= e.r_full + margin)) | (
            (e.a_ink < FILL_MIN) & (e.r_ink <= e.r_full + margin)
        )
        fillable[:, f] = (e.r_full <= margin) & ~partial
    # 2. Among those within `margin` of the best, the least coverage
    bound = np.minimum.reduce([r for _, _, r in candidates]) + margin  # (N,)
    alpha, owner = np.full(len(q), np.inf), np.full(len(q), -1)
    for f, a, r in candidates:
        better = (r <= bound) & (a < alpha)
        alpha[better], owner[better] = a[better], f
    return np.where(alpha >= 0.5, owner, -1), fillable


# --------------------------------------------------------------------------------------------------------------------
# Regions: one per object
# --------------------------------------------------------------------------------------------------------------------


def _join(pieces: list[np.ndarray]) -> np.ndarray:
    """One region from parts a few rows apart: their union with the rows between bridged and holes filled."""
    union = np.logical_or.reduce(pieces)
    return ndimage.binary_fill_holes(ndimage.binary_closing(union, structure=BRIDGE) | union)


def _group(pieces: list[np.ndarray], labelled: list[bool], short: int) -> list[np.ndarray]:
    """Objects from one family's parts in a vertical chain (top to bottom): the split into runs of consecutive
    parts that maximises the sum over runs of area * (fit - FIT_FLOOR), by dynamic programming.

    A run of only unlabelled (ambiguous) parts is no object. Long chains (noise) are not searched: each
    labelled part is then an object of its own.
    """
    if len(pieces) == 1 or len(pieces) > MAX_CHAIN:
        return [ndimage.binary_fill_holes(p) for p, ok in zip(pieces, labelled, strict=True) if ok]
    n = len(pieces)
    best = [0.0] + [-math.inf] * n  # best[j]: score of the first j parts
    back: list[tuple[int, np.ndarray | None]] = [(0, None)] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            region, score = None, 0.0
            if any(labelled[i:j]):
                region = _join(pieces[i:j])
                score = region.sum() * (fit_outline(region.astype(np.float64), short).fit - FIT_FLOOR)
            if best[i] + score > best[j]:
                best[j], back[j] = best[i] + score, (i, region)
    regions, j = [], n
    while j > 0:
        i, region = back[j]
        if region is not None:
            regions.append(region)
        j = i
    return regions


def _regions(labels: np.ndarray, fillable: np.ndarray, families: list[str], short: int) -> list[tuple[str, np.ndarray]]:
    """(colour, region mask) per object: connected pixels of one family, holes filled.

    A family's parts are its labelled pixels and the pixels it could fill, connected. Parts a few rows apart
    form a chain, split into objects by how well they fit outlines (`_group`): white or black stripes on gray
    pass through the background colour, which cuts such an object into horizontal bands.
    """
    min_area = MIN_OBJECT_FRACTION * MIN_FILL * (min(SIZES.values()) * short) ** 2
    out = []
    for f, color in enumerate(families):
        core = labels == f
        if not core.any():
            continue
        mask = core | fillable[..., f]
        parts, _ = ndimage.label(mask)
        chains, _ = ndimage.label(ndimage.binary_closing(mask, structure=BRIDGE) | mask)
        for c in np.unique(chains[core]):
            ids = np.unique(parts[(chains == c) & mask])
            pieces = sorted((parts == k for k in ids), key=lambda p: np.argmax(p.any(1)))  # top to bottom
            labelled = [bool((p & core).any()) for p in pieces]
            out += [(color, r) for r in _group(pieces, labelled, short) if r.sum() >= min_area]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Shape outlines (as the renderer draws them)
# --------------------------------------------------------------------------------------------------------------------


def _polygon_moments(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a simple polygon (shoelace)."""
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    return abs(a) / 2, cx / (3 * a), cy / (3 * a)


# Where each outline's centroid sits relative to its bounding-box centre, in units of the half side: a region's
# centroid then says where the bounding box of each candidate shape would be.
CENTROID_OFFSET: dict[str, tuple[float, float]] = {
    "circle": (0.0, 0.0),
    **{name: _polygon_moments(points)[1:] for name, points in POLYGONS.items()},
}
# The least area over bounding-box area of the five outlines (the star's, 0.37): what the smallest object covers.
MIN_FILL = min(math.pi / 4, *(_polygon_moments(points)[0] / 4 for points in POLYGONS.values()))


def outline_coverage(shape: str, cx: float, cy: float, r: float, top: int, left: int, h: int, w: int) -> np.ndarray:
    """(h, w) float in [0, 1]: how much of each pixel of the window at (top, left) the outline covers.

    The outline has centre (cx, cy) and half side r in image pixels, and is drawn like `render`: at SUPERSAMPLE x
    on a grid aligned with the image's pixels, then box-downscaled.
    """
    f = SUPERSAMPLE
    mask = Image.new("L", (w * f, h * f), 0)
    draw = ImageDraw.Draw(mask)
    x, y = cx - left, cy - top
    if shape == "circle":
        draw.ellipse([(x - r) * f, (y - r) * f, (x + r) * f, (y + r) * f], fill=255)
    else:
        draw.polygon([((x + px * r) * f, (y + py * r) * f) for px, py in POLYGONS[shape]], fill=255)
    return np.asarray(mask.reduce(f), dtype=np.float64) / 255.0


@dataclass(frozen=True)
class Outline:
    """A placed outline: centre (cx, cy) and half side r in pixels; fit is its soft IoU with the region."""

    shape: str
    size: str
    cx: float
    cy: float
    r: float
    fit: float

    def coverage(self, window: tuple[slice, slice], inset: float = 0.0) -> np.ndarray:
        """Coverage of the image window (rows, columns) by the outline shrunk by `inset` pixels of half side."""
        rows, cols = window
        h, w = rows.stop - rows.start, cols.stop - cols.start
        return outline_coverage(self.shape, self.cx, self.cy, self.r - inset, rows.start, cols.start, h, w)


def centroid(coverage: np.ndarray) -> tuple[float, float]:
    """(x, y) in pixels of the coverage-weighted centre of pixel centres."""
    ys, xs = np.indices(coverage.shape)
    total = coverage.sum()
    return float((xs * coverage).sum() / total + 0.5), float((ys * coverage).sum() / total + 0.5)


def fit_outline(coverage: np.ndarray, short: int) -> Outline:
    """The (shape, size) outline, placed by the centroid, that best matches an object's (H, W) pixel coverage.

    coverage: in [0, 1] (a bool region mask, or the coverage `_soft_coverage` measures). The match is the soft
    IoU, sum(min) / sum(max) of the two coverages.
    """
    mx, my = centroid(coverage)
    total = coverage.sum()
    pad = math.ceil(max(SIZES.values()) * short / 2) + 2
    top, left = max(int(my) - pad, 0), max(int(mx) - pad, 0)
    bottom, right = min(int(my) + pad + 1, coverage.shape[0]), min(int(mx) + pad + 1, coverage.shape[1])
    observed = coverage[top:bottom, left:right].astype(np.float64)
    outside = total - observed.sum()  # coverage the window misses counts against every fit
    best = None
    for shape, size in itertools.product(SHAPES, SIZES):
        r = SIZES[size] * short / 2
        ox, oy = CENTROID_OFFSET[shape]
        cx, cy = mx - ox * r, my - oy * r
        template = outline_coverage(shape, cx, cy, r, top, left, bottom - top, right - left)
        iou = float(np.minimum(template, observed).sum() / (np.maximum(template, observed).sum() + outside))
        if best is None or iou > best.fit:
            best = Outline(shape, size, float(cx), float(cy), r, iou)
    return best


def _soft_coverage(x: np.ndarray, region: np.ndarray, color: str, bg: np.ndarray, margin: float) -> np.ndarray:
    """(H, W) coverage of the object: 1 inside the region, the measured coverage on its anti-aliased rim.

    On the rim (the region's own boundary pixels, and the pixels just outside it) the coverage is the least that
    explains the pixel as this colour or its ink over the background, kept on the side of one half that the
    region's own decision took.
    """
    rim = ndimage.binary_dilation(region, structure=np.ones((3, 3), bool)) & ~ndimage.binary_erosion(region)
    window = ndimage.find_objects(rim.astype(np.uint8))[0]
    e = _explain(x[window] - bg, color, bg)
    candidates = [(e.a_plain, e.r_plain), (e.a_ink, e.r_ink), (e.a_mix, e.r_mix), (np.ones_like(e.r_full), e.r_full)]
    bound = np.minimum.reduce([r for _, r in candidates]) + margin
    alpha = np.minimum.reduce([np.where(r <= bound, a, np.inf) for a, r in candidates])
    inside = region[window]
    coverage = region.astype(np.float64)
    coverage[window] = np.where(rim[window], np.where(inside, np.maximum(alpha, 0.5), np.minimum(alpha, 0.5)), inside)
    return coverage


# --------------------------------------------------------------------------------------------------------------------
# Texture
# --------------------------------------------------------------------------------------------------------------------


def _ink_coverage(
    x: np.ndarray, region: np.ndarray, outline: Outline, color: str, bg: np.ndarray, margin: float
) -> np.ndarray:
    """Ink coverage t (unclipped, ~[0, 1]) of the pixels surely inside the object, NaN elsewhere, over the
    region's bounding box.

    Surely inside: the region's interior (8 neighbours in it), pixels the fitted outline covers fully even
    when shrunk by its placement error, and pixels that only full coverage explains (an edge pixel mixes the
    object with the background, which a chromatic object on gray or white cannot be confused with).
    """
    window = ndimage.find_objects(region.astype(np.uint8))[0]  # (rows, columns) of the bounding box
    x, region = x[window], region[window]
    e = _explain(x - bg, color, bg)
    partial = np.minimum(np.where(e.a_plain < 0.95, e.r_plain, np.inf), np.where(e.a_ink < 0.95, e.r_ink, np.inf))
    unambiguous = (e.r_full <= margin) & (partial > e.r_full + margin)
    interior = ndimage.binary_erosion(region, structure=np.ones((3, 3), bool))
    inside = region & (interior | (outline.coverage(window, inset=INSET) >= FULL) | unambiguous)
    return np.where(inside, e.t_raw, np.nan)


def _texture(t: np.ndarray) -> str:
    """ "plain", "striped" or "dotted" from ink coverage (NaN where unknown): is there ink, and is it in rows?"""
    if np.all(np.isnan(t)) or np.nanmean(t) < PLAIN_INK:
        return "plain"
    # Share of the ink's variance left after removing each row's mean: ~0 for horizontal stripes.
    total = np.nanvar(t)
    rows = [r[~np.isnan(r)] for r in t if np.any(~np.isnan(r))]
    within = sum(((r - r.mean()) ** 2).sum() for r in rows) / np.sum(~np.isnan(t))
    return "striped" if total == 0 or within / total < STRIPE_ROW_VARIANCE else "dotted"


# --------------------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------------------


def analyse(image: Image.Image | torch.Tensor | np.ndarray) -> Analysis:
    """The background and the objects an image shows (largest first), read without any prompt."""
    # 1. Background and noise level from the border (objects keep a margin from the edges)
    x = to_rgb_array(image)  # (H, W, 3)
    height, width = x.shape[:2]
    short = min(height, width)
    bg = np.median(_border(x), axis=0)  # (3,) the measured colour: a generated image's may be off
    background = _nearest(bg, list(BACKGROUNDS), BACKGROUNDS)
    noise = _noise(x, background)
    smooth, smooth_noise = x, noise  # what segmentation sees: median-filtered if noisy (texture reads x itself)
    if noise > NOISE_FILTER:
        smooth = ndimage.median_filter(x, size=(3, 3, 1))
        smooth_noise = _noise(smooth, background)

    # 2-3. Pixels to families, families to object regions
    families = list(BACKGROUND_COLORS[background])
    margin = MARGIN + 2 * smooth_noise
    q = smooth - bg  # (H, W, 3)
    todo = np.sqrt((q * q).sum(-1)) > margin  # the rest is background whatever else explains it
    labels, fillable = np.full((height, width), -1), np.zeros((height, width, len(families)), bool)
    labels[todo], fillable[todo] = _unmix(q[todo], families, bg, margin)
    regions = _regions(labels, fillable, families, short)

    # 4-5. Shape, size and texture of each region
    objects = []
    for color, region in regions:
        coverage = _soft_coverage(smooth, region, color, bg, margin)
        outline = fit_outline(coverage, short)
        cx, cy = centroid(coverage)
        objects.append(
            Detection(
                shape=outline.shape,
                color=color,
                size=outline.size,
                texture=_texture(_ink_coverage(x, region, outline, color, bg, MARGIN + 2 * noise)),
                cx=cx,
                cy=cy,
                area=int(region.sum()),
                fit=round(outline.fit, 4),
            )
        )
    objects.sort(key=lambda o: -o.area)
    # Noise makes blobs that match no outline well; clean renders keep every region (a small dotted star at 32 px
    # fits its outline at ~0.62)
    floor = OBJECT_FIT if noise > NOISE_FILTER else 0.0
    shapes = tuple(o for o in objects if o.fit >= floor)
    return Analysis(background, shapes, height, width, round(noise, 3), clutter=len(objects) - len(shapes))


# --------------------------------------------------------------------------------------------------------------------
# Judging against a scene
# --------------------------------------------------------------------------------------------------------------------


def relation_holds(subject: Detection, reference: Detection, relation: str) -> bool:
    """Whether subject <relation> reference: the right direction, and more offset along it than across it."""
    dx, dy = subject.cx - reference.cx, subject.cy - reference.cy
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy > 0 and abs(dy) > abs(dx)
    if relation == "to the left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "to the right of":
        return dx > 0 and abs(dx) > abs(dy)
    raise ValueError(f"unknown relation {relation!r}")


def _agreement(spec: ObjectSpec, det: Detection) -> tuple[bool, bool, bool, bool]:
    # Matching order: the shape first (what "spatial" asks about), then colour, size, texture.
    return (spec.shape == det.shape, spec.color == det.color, spec.size == det.size, spec.texture == det.texture)


def match(scene: Scene, analysis: Analysis) -> list[Detection | None]:
    """The detection assigned to each of the scene's objects (None where there are too few detections).

    The assignment maximises the number of matching shapes, then colours, sizes and textures: a red circle and
    a blue square drawn as a blue circle and a red square are matched by shape, so both colours are wrong.
    """
    n = len(scene.objects)
    k = min(n, len(analysis.objects))
    best, best_score = [None] * n, None
    for dets in itertools.permutations(analysis.objects, k):
        for slots in itertools.combinations(range(n), k):
            assigned = [None] * n
            for slot, det in zip(slots, dets, strict=True):
                assigned[slot] = det
            agreements = [_agreement(s, d) for s, d in zip(scene.objects, assigned, strict=True) if d is not None]
            score = tuple(sum(column) for column in zip(*agreements, strict=True))
            if best_score is None or score > best_score:
                best, best_score = assigned, score
    return best


def judge(image: Image.Image | torch.Tensor | np.ndarray | Analysis, scene: Scene) -> Verdict:
    """Per attribute, whether the image (or its analysis) shows what the scene asks for."""
    analysis = image if isinstance(image, Analysis) else analyse(image)
    assigned = match(scene, analysis)
    pairs = list(zip(scene.objects, assigned, strict=True))

    def holds(attr: str) -> bool:
        return all(d is not None and getattr(s, attr) == getattr(d, attr) for s, d in pairs)

    relation = None
    if scene.relation is not None:
        subject, reference = assigned
        relation = subject is not None and reference is not None and relation_holds(subject, reference, scene.relation)
    return Verdict(
        count=len(analysis.objects) == len(scene.objects),
        background=analysis.background == scene.background,
        color=holds("color"),
        shape=holds("shape"),
        size=holds("size"),
        texture=holds("texture"),
        relation=relation,
    )


# --------------------------------------------------------------------------------------------------------------------
# T2I-CompBench-style categories
# --------------------------------------------------------------------------------------------------------------------

# What a category's prompt is right about when the image is right for it. The "shape" holdout pairs a size with a
# shape ("a large triangle"), so that category asks for both; "complex" asks for everything the prompt says.
CATEGORY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("color", "shape"),
    "shape": ("shape", "size"),
    "texture": ("texture", "shape"),
    "spatial": ("shape", "relation"),
    "complex": ATTRIBUTES,
}


def category_holds(verdict: Verdict, category: str) -> bool:
    """Whether a verdict passes a category (a relation the scene does not have, None, is not asked)."""
    if category not in CATEGORY_ATTRIBUTES:
        raise ValueError(f"unknown category {category!r}; expected one of {list(CATEGORY_ATTRIBUTES)}")
    return all(getattr(verdict, a) is not False for a in CATEGORY_ATTRIBUTES[category])


def score(
    images: list[Image.Image | torch.Tensor | np.ndarray] | torch.Tensor, scenes: list[Scene], category: str
) -> list[bool]:
    """Per image, whether it is right for its scene under `category` (color, shape, texture, spatial, complex).

    images: PIL images, (3, H, W) tensors in [-1, 1], (H, W, 3) uint8 arrays, or one (N, 3, H, W) tensor.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes; expected one scene per image")
    return [category_holds(judge(image, scene), category) for image, scene in zip(images, scenes, strict=True)]
