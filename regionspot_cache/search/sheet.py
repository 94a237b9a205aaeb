"""A contact sheet of search hits: per query a title and its best regions' crops, best first."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from PIL import Image, ImageDraw, ImageFont

from regionspot_cache.data.datasets import DatasetError, image_path_under
from regionspot_cache.data.images import ImageDecodeError, load_rgb
from regionspot_cache.search.query import Hit

THUMB = 112  # side of each crop's square cell
CAPTION = 14
COLUMNS = 10
CONTEXT = 0.1  # share of the box's size shown around it


def _inside(value: int, size: int) -> int:
    return min(max(0, value), size - 1)


def crop_of(image: Image.Image, box: list[float]) -> Image.Image:
    """The box with a little context, fitted into a THUMB x THUMB cell (aspect kept)."""
    x1, y1, x2, y2 = box
    pad_x, pad_y = CONTEXT * (x2 - x1), CONTEXT * (y2 - y1)
    # Whole pixels, rounded outward and kept inside the image: a sub-pixel box is at least one
    # pixel, and a box beyond the border (an image file other than the cached one) its nearest edge.
    left, top = _inside(math.floor(x1 - pad_x), image.width), _inside(math.floor(y1 - pad_y), image.height)
    right = min(image.width, max(left + 1, math.ceil(x2 + pad_x)))
    bottom = min(image.height, max(top + 1, math.ceil(y2 + pad_y)))
    crop = image.crop((left, top, right, bottom))
    scale = THUMB / max(crop.size)
    return crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)


def contact_sheet(results: Mapping[str, list[Hit]], file_names: Mapping[int, str], image_root: Path, path: Path | str) -> Path:
    """Write a PNG: for each query its title, then its hits' crops in rows of COLUMNS with
    "rank score / image id" captions. An unreadable image leaves a grey cell saying so."""
    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=14)
    cell_h = THUMB + CAPTION
    heights = [22 + max(1, -(-len(hits) // COLUMNS)) * (cell_h + 4) for hits in results.values()]
    columns = min(COLUMNS, max((len(hits) for hits in results.values()), default=1))
    sheet = Image.new("RGB", (max(columns * (THUMB + 4) + 4, 320), sum(heights) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    images: dict[int, Image.Image | None] = {}
    top = 4
    for (query, hits), height in zip(results.items(), heights):
        draw.text((4, top), f"{query}  ({len(hits)} best regions)", fill="black", font=title_font)
        for rank, hit in enumerate(hits):
            x = 4 + (rank % COLUMNS) * (THUMB + 4)
            y = top + 22 + (rank // COLUMNS) * (cell_h + 4)
            image = _image(images, hit.image_id, file_names, image_root)
            if image is None:
                draw.rectangle([x, y, x + THUMB, y + THUMB], fill="#cccccc")
                draw.text((x + 4, y + THUMB // 2), "image missing", fill="black", font=font)
            else:
                crop = crop_of(image, hit.box)
                sheet.paste(crop, (x + (THUMB - crop.width) // 2, y + (THUMB - crop.height) // 2))
            draw.text((x, y + THUMB + 1), f"{rank + 1}. {hit.score:.3f} / {hit.image_id}", fill="black", font=font)
        top += height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def _image(images: dict, image_id: int, file_names: Mapping[int, str], image_root: Path) -> Image.Image | None:
    if image_id not in images:
        try:
            images[image_id] = load_rgb(image_path_under(image_root, file_names[image_id], image_id))
        except (DatasetError, ImageDecodeError, KeyError, OSError):
            images[image_id] = None
    return images[image_id]
