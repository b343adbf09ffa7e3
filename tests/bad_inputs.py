"""Builds the awkward inputs ingest must survive, at test time (no binary fixtures in the repository).

`build_bad_folder(path)` writes an image folder and returns what ingest should make of each file:
{relative path: Expect}. `write_tar` and `sam_json` build SA-1B style tars, including hostile member names.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 20), (20, 20, 220), (255, 255, 255)


@dataclass
class Expect:
    """The outcome ingest should reach for one file."""

    reason: str | None = None  # quarantine reason; None = ingested (or a duplicate)
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation
    pixels: dict | None = None  # {(x, y): (r, g, b)} checked on the ingested JPEG, within JPEG tolerance
    caption: str = ""
    caption_error: str | None = None  # prefix of the expected caption_error
    duplicate_of: str | None = None  # relative path of the file this one repeats byte for byte
    key: str | None = None  # expected sample key
    passthrough: bool = False  # KEY.jpg must be the source bytes unchanged


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def gradient_rgb(width: int, height: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, seed % 256)], -1).astype(np.uint8)
    return Image.fromarray(pixels)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims width x height, with a few bytes of pixel data: decoding
    it would need width * height * 3 bytes of memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    """Stored 64 wide x 32 high (left half red, right half blue) with EXIF Orientation 6 ("rotate 90 CW to view"):
    seen upright it is 32 wide x 64 high, red on top, blue below."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves((64, 32), RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def build_bad_folder(root: Path) -> dict[str, Expect]:
    """Write the bad-input folder under `root`; return {relative path: Expect} for every image candidate."""
    files: dict[str, bytes] = {}
    expect: dict[str, Expect] = {}

    def add(name: str, data: bytes, outcome: Expect) -> None:
        files[name], expect[name] = data, outcome

    rgb = encode(gradient_rgb(64, 48, seed=1), "JPEG", quality=90)
    add("rgb.jpg", rgb, Expect(size=(64, 48), key="rgb", passthrough=True))
    add("zero.jpg", b"", Expect(reason="empty"))
    truncated = encode(gradient_rgb(64, 64, seed=2), "JPEG", quality=90)
    add("truncated.jpg", truncated[: len(truncated) // 2], Expect(reason="truncated"))
    add("random.jpg", np.random.default_rng(0).bytes(4096), Expect(reason="not an image"))
    add("text.png", b"this is not a PNG, it is text\n" * 20, Expect(reason="not an image"))
    add("huge.png", png_with_declared_size(100_000, 100_000), Expect(reason="too large"))
    add("tiny.png", encode(Image.new("RGB", (1, 1), RED), "PNG"), Expect(reason="too small"))

    # alpha and palettes: transparent pixels land on white
    alpha = halves((40, 40), (0, 0, 0, 0), (*RED, 255), mode="RGBA")
    add("alpha.png", encode(alpha, "PNG"), Expect(size=(40, 40), pixels={(5, 20): WHITE, (35, 20): RED}))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, *GREEN] + [0] * (256 * 3 - 6))
    palette.paste(1, (20, 0, 40, 40))
    add(
        "palette.png",
        encode(palette, "PNG", transparency=0),
        Expect(size=(40, 40), pixels={(5, 20): WHITE, (35, 20): GREEN}),
    )
    la = halves((40, 40), (0, 0), (60, 255), mode="LA")
    add("la.png", encode(la, "PNG"), Expect(size=(40, 40), pixels={(5, 20): WHITE, (35, 20): (60, 60, 60)}))
    add("anim.gif", encode(halves((40, 40), RED, BLUE), "GIF"), Expect(size=(40, 40), pixels={(5, 20): RED}))

    # other modes
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # full magenta + yellow = red
    add("cmyk.jpg", encode(cmyk, "JPEG", quality=95), Expect(size=(40, 40), pixels={(20, 20): (255, 0, 0)}))
    bands = np.zeros((40, 48), dtype=np.uint16)
    bands[:, :16], bands[:, 16:32] = 65535, 128 * 257  # then 0: white, mid gray, black
    gray16 = Image.fromarray(bands)
    assert gray16.mode == "I;16"
    add(
        "gray16.png",
        encode(gray16, "PNG"),
        Expect(size=(48, 40), pixels={(8, 20): WHITE, (24, 20): (128, 128, 128), (40, 20): (0, 0, 0)}),
    )
    add("gray.png", encode(Image.new("L", (40, 40), 100), "PNG"), Expect(size=(40, 40), pixels={(9, 9): (100,) * 3}))
    bilevel = halves((40, 40), 0, 1, mode="1")
    add("bilevel.png", encode(bilevel, "PNG"), Expect(size=(40, 40), pixels={(5, 5): (0, 0, 0), (35, 5): WHITE}))
    add("photo.tiff", encode(Image.new("RGB", (40, 36), BLUE), "TIFF"), Expect(size=(40, 36)))
    add("pic.bmp", encode(Image.new("RGB", (36, 40), GREEN), "BMP"), Expect(size=(36, 40)))

    # orientation, names, duplicates
    add("rotated.jpg", exif_rotated_jpeg(), Expect(size=(32, 64), pixels={(16, 8): RED, (16, 56): BLUE}))
    add("café_日本.jpg", encode(gradient_rgb(40, 40, seed=3), "JPEG"), Expect(size=(40, 40), key="cafe"))
    add("rgb_copy.jpg", rgb, Expect(duplicate_of="rgb.jpg"))  # sorts after rgb.jpg: the copy
    add("sub/nested.webp", encode(gradient_rgb(40, 40, seed=4), "WEBP"), Expect(size=(40, 40), key="sub_nested"))
    add("x.y.png", encode(gradient_rgb(40, 40, seed=5), "PNG"), Expect(size=(40, 40), key="x_y"))
    add("x_y.png", encode(gradient_rgb(40, 40, seed=6), "PNG"), Expect(size=(40, 40)))  # key: x_y_<8 hex>

    # captions beside images
    add("captioned.png", encode(gradient_rgb(40, 40, seed=7), "PNG"), Expect(size=(40, 40), caption="a red square"))
    add("empty_caption.jpg", encode(gradient_rgb(40, 40, seed=8), "JPEG"), Expect(size=(40, 40), caption_error="empty"))
    add(
        "bad_caption.jpg",
        encode(gradient_rgb(40, 40, seed=9), "JPEG"),
        Expect(size=(40, 40), caption_error="not UTF-8"),
    )
    captions = {"captioned.txt": b"a red square\n", "empty_caption.txt": b"", "bad_caption.txt": b"\xff\xfe bad"}

    for name, data in {**files, **captions, "notes.md": b"not part of the dataset"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return expect


# ---------------------------------------------------------------------------------------------------
#                                        Tars (SA-1B style)
# ---------------------------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these member names (hostile ones included: tarfile stores whatever it is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sam_json(image_id: int, width: int, height: int, masks: int = 3) -> bytes:
    """A SAM annotation file as SA-1B has them: an `image` record and RLE-mask annotations."""
    annotations = [
        {"id": i, "segmentation": {"size": [height, width], "counts": "x" * 200}, "area": 10, "bbox": [0, 0, 4, 4]}
        for i in range(masks)
    ]
    image = {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"}
    return json.dumps({"image": image, "annotations": annotations}).encode()


def sa1b_members(ids: list[int], size: tuple[int, int] = (48, 40)) -> list[tuple[str, bytes]]:
    """`sa_N.jpg` + `sa_N.json` pairs, one distinct image each."""
    members = []
    for i in ids:
        members.append((f"sa_{i}.jpg", encode(gradient_rgb(*size, seed=100 + i), "JPEG")))
        members.append((f"sa_{i}.json", sam_json(i, *size)))
    return members
