"""Image output: PNG grids and raw arrays (pillow; no torchvision needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """images: (N, C, H, W) in [0, 1] -> (H', W') or (H', W', 3) uint8 tiled grid."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = arr[i]
    return canvas[..., 0] if c == 1 else canvas


def png_bytes(images: torch.Tensor, nrow: int | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grid_array(images, nrow)).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    path.write_bytes(png_bytes(images, nrow))
