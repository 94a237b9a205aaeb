"""Boxes with "label score" tags drawn on images: the PNG of `rs-cache predict` and the example
images of `eval --report`."""

from __future__ import annotations

from PIL import ImageDraw, ImageFont

# Distinct, readable colours (matplotlib's tab10).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def draw_labelled_box(
    draw: ImageDraw.ImageDraw,
    xyxy: tuple[float, float, float, float],
    label: str,
    colour: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
) -> None:
    """The box outline and a filled tag with ``label`` at its top left corner: above the box
    when there is room, else inside it (at the image's top edge)."""
    x1, y1, x2, y2 = xyxy
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
    left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
    lift = min(bottom - top + 2, y1)
    draw.rectangle([left, top - lift, right + 2, bottom - lift], fill=colour)
    draw.text((x1 + 1, y1 - lift), label, fill="white", font=font)
