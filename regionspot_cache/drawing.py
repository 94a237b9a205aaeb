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
    when there is room, else inside it; moved left or up to stay inside the image when it would
    run past its right or bottom edge (a box at the edge would lose its label)."""
    x1, y1, x2, y2 = xyxy
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
    image_width, image_height = draw.im.size
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tag_width, tag_height = right - left + 2, bottom - top + 2
    x = max(0.0, min(x1, image_width - 1 - tag_width))
    y = y1 - tag_height if y1 >= tag_height else max(0.0, min(y1, image_height - 1 - tag_height))
    draw.rectangle([x, y, x + tag_width, y + tag_height], fill=colour)
    draw.text((x + 1 - left, y + 1 - top), label, fill="white", font=font)
