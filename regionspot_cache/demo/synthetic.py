"""A small LVIS-format detection dataset of rendered images, generated deterministically.

Categories are (colour, shape) pairs; each object also gets a random texture, size and place,
so a category is defined by colour and shape, not texture. Frequency tags follow how often a
category appears in the training split (as in LVIS): frequent, common and rare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 45, 40),
    "green": (40, 170, 70),
    "blue": (45, 80, 215),
    "yellow": (235, 205, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
# Shapes that differ in how much of their box they cover, which even the demo's random-weight
# encoders preserve (discs versus squares they barely tell apart).
SHAPES = ("square", "triangle")
TEXTURES = ("solid", "stripes", "dots")
# Share of each frequency group's categories in the training split: rare ones are seldom seen.
FREQUENCY_WEIGHT = {"f": 1.0, "c": 0.35, "r": 0.08}


@dataclass(frozen=True)
class SyntheticSpec:
    images: int
    seed: int
    min_size: int = 160
    max_size: int = 256
    min_objects: int = 2
    max_objects: int = 5
    balanced: bool = False  # evaluation splits show every category equally often


def demo_categories() -> list[dict]:
    names = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    frequencies = ["f"] * 5 + ["c"] * 4 + ["r"] * 3
    return [
        {"id": index + 1, "name": f"{colour} {shape}", "frequency": frequency, "synset": f"{colour}_{shape}.n.01"}
        for index, ((colour, shape), frequency) in enumerate(zip(names, frequencies))
    ]


def generate_split(directory: Path, split: str, spec: SyntheticSpec) -> Path:
    """Render ``spec.images`` images under ``directory/images/split`` and write
    ``directory/split.json`` (LVIS format); returns the annotation file."""
    rng = np.random.default_rng(spec.seed)
    categories = demo_categories()
    weights = np.array([1.0 if spec.balanced else FREQUENCY_WEIGHT[c["frequency"]] for c in categories])
    weights /= weights.sum()
    image_dir = directory / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, spec.images + 1):
        width, height = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, size=2))
        canvas = _background(rng, width, height)
        placed: list[list[float]] = []
        for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
            box = _free_box(rng, width, height, placed)
            if box is None:
                continue
            category = categories[int(rng.choice(len(categories), p=weights))]
            colour, shape = category["name"].split(" ")
            polygon = _draw_object(canvas, rng, box, COLOURS[colour], shape)
            placed.append(box)
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category["id"],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(_polygon_area(polygon)),
                    "segmentation": [[float(v) for xy in polygon for v in xy]],
                    "iscrowd": 0,
                }
            )
        file_name = f"{split}/{image_id:06d}.jpg"
        canvas.save(directory / "images" / file_name, quality=92)
        present = {a["category_id"] for a in annotations if a["image_id"] == image_id}
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                # Every object is labelled, so every absent category is a verified negative.
                "neg_category_ids": sorted(c["id"] for c in categories if c["id"] not in present),
                "not_exhaustive_category_ids": [],
            }
        )
    annotation_file = directory / f"{split}.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.uniform(90, 170, size=3)
    tilt = rng.uniform(-40, 40, size=3)
    ramp = np.linspace(0, 1, width)[None, :, None] * tilt
    noise = rng.normal(0, 8, size=(height, width, 3))
    pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _free_box(rng: np.random.Generator, width: int, height: int, placed: list[list[float]]) -> list[float] | None:
    for _ in range(20):
        size = float(rng.uniform(0.18, 0.42) * min(width, height))
        x1 = float(rng.uniform(0, width - size))
        y1 = float(rng.uniform(0, height - size))
        box = [x1, y1, x1 + size, y1 + size]
        if all(_iou(box, other) < 0.05 for other in placed):
            return box
    return None


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_object(
    canvas: Image.Image, rng: np.random.Generator, box: list[float], colour, shape: str
) -> list[tuple[float, float]]:
    """Paint a textured shape filling ``box``; returns its outline polygon."""
    x1, y1, x2, y2 = box
    cx, r = (x1 + x2) / 2, (x2 - x1) / 2
    if shape == "square":
        polygon = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    else:
        polygon = [(cx, y1), (x2, y2), (x1, y2)]
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, rng.integers(-20, 21, size=3)))
    darker = tuple(int(c * 0.6) for c in fill)
    layer = Image.new("RGB", canvas.size, fill)
    draw = ImageDraw.Draw(layer)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    if texture == "stripes":
        for offset in np.arange(x1, x2, max(4.0, r / 3)):
            draw.line([(offset, y1), (offset, y2)], fill=darker, width=2)
    elif texture == "dots":
        for px, py in rng.uniform([x1, y1], [x2, y2], size=(14, 2)):
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=darker)
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    canvas.paste(layer, mask=mask)
    return polygon


def _polygon_area(polygon: list[tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in polygon])
    ys = np.array([p[1] for p in polygon])
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
