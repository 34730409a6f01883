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


def png_bytes(
    images: torch.Tensor, nrow: int | None = None, scale: int = 1, labels: list[str] | None = None
) -> bytes:
    """The PNG of the tiled grid of images (N, C, H, W), each pixel `scale` x `scale` (nearest neighbour), with
    one caption per image under its tile when `labels` are given."""
    from PIL import Image, ImageDraw

    grid = Image.fromarray(grid_array(images, nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    if labels is not None:
        n, _, h, w = images.shape
        nrow = nrow or math.ceil(math.sqrt(n))
        pad, band = 2 * scale, 12
        rows = math.ceil(n / nrow)
        canvas = Image.new(grid.mode, (grid.width, grid.height + rows * band), 0)
        draw = ImageDraw.Draw(canvas)
        for r in range(rows):  # each row of tiles, then a band of captions
            top = pad + r * (h * scale + pad)
            canvas.paste(grid.crop((0, top - pad, grid.width, top + h * scale)), (0, top - pad + r * band))
            for col in range(nrow):
                i = r * nrow + col
                if i < len(labels):
                    draw.text(
                        (pad + col * (w * scale + pad), top + h * scale + r * band), labels[i], fill=255
                    )
        grid = canvas
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(rows: list[str], weights: np.ndarray, dropped: np.ndarray, cell: int = 12) -> bytes:
    """A routing heatmap: one row per expert (`rows`), one column per evaluation; `weights` (E, S) in [0, 1]
    shade white -> blue, and a last row shades white -> red with the `dropped` (S,) routing mass."""
    from PIL import Image, ImageDraw

    e, steps = weights.shape
    left, top = 8 + 7 * max((len(r) for r in [*rows, "dropped"]), default=0), 16
    img = Image.new("RGB", (left + steps * cell + 4, top + (e + 1) * cell + 4), "white")
    draw = ImageDraw.Draw(img)
    for j in range(0, steps, max(1, steps // 10)):
        draw.text((left + j * cell, 2), str(j), fill="black")
    for i, name in enumerate([*rows, "dropped"]):
        y = top + i * cell
        draw.text((4, y), name, fill="black")
        for j in range(steps):
            v = float(np.clip(dropped[j] if i == e else weights[i, j], 0.0, 1.0))
            shade = int(round(255 * (1 - v)))
            colour = (255, shade, shade) if i == e else (shade, shade, 255)
            draw.rectangle((left + j * cell, y, left + (j + 1) * cell - 1, y + cell - 1), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    path.write_bytes(png_bytes(images, nrow))
