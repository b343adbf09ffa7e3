"""Image grids for sample sheets and reports."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_grid(images: torch.Tensor, rows: int = 1, pad: int = 2) -> Image.Image:
    """(N, 3, H, W) images in [-1, 1] -> one RGB grid with `rows` rows and `pad` px of gray between cells."""
    n, _, h, w = images.shape
    rows = max(1, min(rows, n))
    cols = -(-n // rows)
    grid = torch.zeros(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images.float().clamp(-1, 1)):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, top : top + h, left : left + w] = img
    arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
