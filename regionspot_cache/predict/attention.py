"""Where the head looks: each box's last-layer cross-attention over the CLIP grid, drawn.

CLIP sees the whole image resized to its input size (no crop), so the attention grid covers the
whole image and is upsampled to it directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from regionspot_cache.drawing import PALETTE, draw_labelled_box
from regionspot_cache.predict.io import region_label
from regionspot_cache.predict.region import Region

TILE_SIDE = 256  # long side of each drawn image
OVERLAY_ALPHA = 0.55


def attention_overlay(image: Image.Image, attention: np.ndarray) -> Image.Image:
    """``image`` with the (grid_h, grid_w) map, scaled to its own maximum, upsampled (bilinear)
    and blended on in the ``inferno`` colour map."""
    peak = float(attention.max())
    scaled = attention / peak if peak > 0 else attention
    heat = Image.fromarray((scaled * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    colours = colormaps["inferno"](np.asarray(heat, np.float32) / 255.0)[..., :3] * 255
    pixels = (1 - OVERLAY_ALPHA) * np.asarray(image.convert("RGB"), np.float32) + OVERLAY_ALPHA * colours
    return Image.fromarray(pixels.round().astype(np.uint8))


def draw_attention_grid(image: Image.Image, regions: list[Region], path: Path | str) -> Path:
    """One row per region: the image with its box and label, and the attention overlay (with
    the box outlined too); ``regions`` as ``Predictor.predict(..., attention=True)`` returns."""
    scale = TILE_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size, Image.BICUBIC)
    font = ImageFont.load_default(size=12)
    sheet = Image.new("RGB", (2 * size[0] + 12, len(regions) * (size[1] + 8) + 4), "white")
    for row, region in enumerate(regions):
        colour = PALETTE[row % len(PALETTE)]
        box = tuple(scale * v for v in region.box)
        left, right = base.copy(), attention_overlay(base, region.attention)
        draw_labelled_box(ImageDraw.Draw(left), box, region_label(region), colour, font, 2)
        ImageDraw.Draw(right).rectangle(box, outline=colour, width=1)
        top = 4 + row * (size[1] + 8)
        sheet.paste(left, (4, top))
        sheet.paste(right, (8 + size[0], top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
