"""PixArt's aspect-ratio buckets: each image is trained at the bucket whose h/w is nearest its own.

The table is the PixArt-alpha / diffusers `ASPECT_RATIO_1024_BIN` (height, width in pixels, sides multiples
of 64); the 512 and 256 tables are the same table halved and quartered. Other base resolutions (the CPU
demo's 64 px) scale it the same way, rounding each side to a multiple of `base // 16`.
"""

from __future__ import annotations

# ratio (h / w, as the reference keys it) -> (height, width) at 1024
ASPECT_RATIO_1024: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}  # fmt: skip


def bucket_table(base: int = 1024, multiple: int | None = None) -> dict[str, tuple[int, int]]:
    """The ratio table at `base` resolution: (h, w) scaled by base / 1024, each side a multiple of `multiple`."""
    multiple = multiple or max(base // 16, 1)
    scale = base / 1024

    def snap(side: int) -> int:
        return max(multiple, int(round(side * scale / multiple)) * multiple)

    return {ratio: (snap(h), snap(w)) for ratio, (h, w) in ASPECT_RATIO_1024.items()}


def nearest_bucket(height: int, width: int, ratios: list[str] | None = None) -> str:
    """The ratio key nearest to height / width (the reference's get_closest_ratio)."""
    ratios = ratios or list(ASPECT_RATIO_1024)
    return min(ratios, key=lambda r: abs(float(r) - height / width))


def bucket_size(ratio: str, base: int = 1024, multiple: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels of bucket `ratio` at `base` resolution."""
    table = bucket_table(base, multiple)
    if ratio not in table:
        raise KeyError(f"unknown aspect-ratio bucket {ratio!r}; known: {sorted(table, key=float)}")
    return table[ratio]
