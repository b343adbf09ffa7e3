"""Image validation: decode untrusted bytes with PIL, reject what cannot be trained on, normalise the rest to RGB.

One rule for every source. `check_image(data, rules)` either returns the sample as an RGB JPEG (the source bytes
themselves when they already are one, else re-encoded) with its size after EXIF rotation, or a rejection: a short
stable `reason` code for tables and summaries, plus a human `detail`.

    reason          when
    empty           zero bytes
    not an image    PIL cannot identify it (text, random bytes), or a format outside `rules.formats`
    too large       width * height above `rules.max_pixels` (checked from the header, before any pixel is decoded)
    too small       shorter side below `rules.min_side`
    truncated       the pixel data ends early
    corrupt         any other decoding failure
    unsupported     a mode PIL cannot convert to RGB
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, Field


class ImageRules(BaseModel):
    """What ingest accepts, and how it encodes what it keeps."""

    min_side: int = Field(32, ge=1, description="shorter side in pixels below which an image is 'too small'")
    max_pixels: int = Field(
        89_478_485,  # PIL's default MAX_IMAGE_PIXELS (about 9459 x 9459)
        ge=1,
        description="width * height above which an image is 'too large' (decompression-bomb guard)",
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality when an image has to be re-encoded")
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB that transparent pixels land on")
    formats: tuple[str, ...] = Field(
        ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"),
        description="PIL formats tried (JPEG includes camera MPO files); others (EPS, PSD, ...) are 'not an image' "
        "so untrusted files never reach their decoders",
    )


@dataclass(frozen=True)
class ImageCheck:
    """The outcome of `check_image`: `jpeg` and the size on success, `reason` and `detail` on rejection."""

    jpeg: bytes | None = None
    width: int = 0  # after EXIF rotation
    height: int = 0
    source_format: str | None = None  # as PIL identified the source bytes ("PNG", "JPEG", ...)
    source_mode: str | None = None  # the source's pixel mode before conversion ("CMYK", "P", "I;16", ...)
    reencoded: bool = False  # False when `jpeg` is the source bytes unchanged
    reason: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


class ImageRejected(ValueError):
    """Raised by `load_rgb` for an image ingest must not keep; `reason` is one of the codes in the module doc."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------
#                                     Decoding and conversion
# ---------------------------------------------------------------------------------------------------


def open_checked(data: bytes, rules: ImageRules) -> Image.Image:
    """Open `data` and check its declared size; pixels are not decoded yet. Raises ImageRejected."""
    if not data:
        raise ImageRejected("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own global limit; our limit is `rules.max_pixels`, checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(rules.formats))
    except Image.DecompressionBombError as e:  # above twice PIL's limit: PIL refuses before we can look
        raise ImageRejected("too large", str(e)) from None
    except Image.UnidentifiedImageError:
        # PIL's own message names the in-memory file object (an address): say something stable instead.
        raise ImageRejected("not an image", f"no decoder among {list(rules.formats)}; starts {data[:8]!r}") from None
    except Exception as e:  # PIL's plugins raise many types on hostile headers (struct.error, IndexError, ...)
        raise decode_error(e) from None
    width, height = image.size
    if width * height > rules.max_pixels:
        raise ImageRejected("too large", f"{width}x{height} = {width * height} pixels > max_pixels={rules.max_pixels}")
    if min(width, height) < rules.min_side:
        raise ImageRejected("too small", f"{width}x{height}: shorter side < min_side={rules.min_side}")
    return image


def decode_error(e: Exception) -> ImageRejected:
    """A decoding failure as a rejection: "truncated" when PIL says the data ended early, else "corrupt"."""
    if isinstance(e, OSError) and "truncat" in str(e).lower():
        return ImageRejected("truncated", str(e))
    return ImageRejected("corrupt", f"{type(e).__name__}: {e}")


def decode_fully(image: Image.Image) -> None:
    """Decode every pixel (PIL is lazy), so truncated and corrupt data fail here and not in a training worker."""
    try:
        image.load()
    except Exception as e:  # any failure to decode untrusted bytes: the image is not usable
        raise decode_error(e) from None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha (RGBA, LA, PA, palette or gray with transparency) over `background`,
    16/32-bit integer and float gray scaled from the 16-bit range to 8 bits, CMYK/1/L/YCbCr by PIL's convert."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit PNG/TIFF gray: 0..65535 -> 0..255 (x / 257 maps 65535 to 255 exactly). PIL's own convert("L")
        # clips instead of scaling, which turns most 16-bit images white.
        pixels = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    # CMYK is converted naively (no ICC profile): close enough for training data.
    return image.convert("RGB")


def load_rgb(data: bytes, rules: ImageRules | None = None) -> tuple[Image.Image, Image.Image]:
    """(source image as opened, fully decoded RGB image after EXIF rotation). Raises ImageRejected."""
    rules = rules or ImageRules()
    image = open_checked(data, rules)
    decode_fully(image)
    try:
        rotated = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost the pixels: keep them as stored
        rotated = image
    try:
        rgb = to_rgb(rotated, rules.background)
    except Exception as e:
        raise ImageRejected("unsupported", f"mode {image.mode}: {type(e).__name__}: {e}") from None
    return image, rgb


def _needs_rotation(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) != 1  # 0x0112: EXIF Orientation; 1 is "as stored"
    except Exception:  # unreadable EXIF: load_rgb kept the pixels as stored too
        return False


def check_image(data: bytes, rules: ImageRules | None = None) -> ImageCheck:
    """Validate `data` and return it as an RGB JPEG, or the reason it is rejected. Never raises on bad input."""
    rules = rules or ImageRules()
    try:
        image, rgb = load_rgb(data, rules)
    except ImageRejected as e:
        return ImageCheck(reason=e.reason, detail=e.detail)
    width, height = rgb.size
    common = dict(width=width, height=height, source_format=image.format, source_mode=image.mode)
    # An RGB JPEG stored upright is already what a shard holds: keep its bytes (no generation loss).
    if image.format == "JPEG" and image.mode == "RGB" and not _needs_rotation(image):
        return ImageCheck(jpeg=data, reencoded=False, **common)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=rules.jpeg_quality, subsampling=0)  # 4:4:4: sharp colour edges
    return ImageCheck(jpeg=buf.getvalue(), reencoded=True, **common)
