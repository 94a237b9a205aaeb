"""Inputs and outputs of ``rs-cache predict``: boxes and vocabularies from arguments or files,
and a PNG of the image with labelled boxes (and masks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from regionspot_cache.data.datasets import Manifest
from regionspot_cache.drawing import PALETTE, draw_labelled_box
from regionspot_cache.errors import InputError, MissingFileError
from regionspot_cache.predict.region import Region
from regionspot_cache.regions.masks import decode_rle

MASK_ALPHA = 0.45
AUTO_BOXES = "auto"  # --boxes auto: SAM's automatic mask generator
ALL_CLASSES = "all"  # --top-k all: the whole vocabulary


def named_proposal_file(text: str, manifest: Manifest | None) -> Path | None:
    """The proposal file ``--boxes`` names (a proposal set of the manifest, or a file); None when
    it gives box coordinates. A word that is neither is an error listing what it could be."""
    if manifest is not None and text in manifest.proposals:
        return manifest.proposals[text]
    if Path(text).is_file():
        return Path(text)
    if "," not in text:  # no coordinates: a name or a file that is not there
        sets = f"a proposal set of {manifest.source} {sorted(manifest.proposals)}" if manifest else "a proposal set of --manifest"
        raise InputError(f'--boxes: {text!r} is neither boxes "x1,y1,x2,y2;...", {AUTO_BOXES!r}, {sets}, nor a file')
    return None


def parse_top_k(text: str) -> int:
    """``--top-k``: a count of classes, 0 or ``all`` for the whole vocabulary (0 for it)."""
    if text.strip().lower() == ALL_CLASSES:
        return 0
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise InputError(f"--top-k: {text!r} is not a count of classes (1, 2, ...; 0 or {ALL_CLASSES!r}: all)")
    return count


def parse_boxes(text: str, where: str = "--boxes") -> np.ndarray:
    """``"x1,y1,x2,y2;x1,y1,x2,y2"`` -> (N, 4) float32."""
    boxes = []
    for index, part in enumerate(p for p in text.split(";") if p.strip()):
        values = part.split(",")
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4:
            raise InputError(f"{where}: box {index + 1} {part.strip()!r} is not x1,y1,x2,y2 (four numbers)")
        boxes.append(box)
    if not boxes:
        raise InputError(f'{where}: no boxes given; expected "x1,y1,x2,y2;x1,y1,x2,y2;..."')
    return np.asarray(boxes, np.float32)


def read_boxes_file(path: Path) -> np.ndarray:
    """A JSON list of [x1, y1, x2, y2] (or an object with such a list under ``boxes``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: boxes file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from None
    boxes = data.get("boxes") if isinstance(data, dict) else data
    if not isinstance(boxes, list) or not boxes:
        raise InputError(f"{path}: expected a non-empty JSON list of [x1, y1, x2, y2] boxes")
    for index, box in enumerate(boxes):
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise InputError(f"{path}: box {index + 1} {box!r} is not [x1, y1, x2, y2] (four numbers)")
    return np.asarray(boxes, np.float32)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_vocabulary(text: str, where: str = "--vocab") -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError(f"{where}: the vocabulary is empty; expected class names separated by commas")
    return names


def read_vocabulary_file(path: Path) -> list[str]:
    """One class name per line; blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: vocabulary file not found") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a UTF-8 text file: {err}") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise InputError(f"{path}: the vocabulary file has no class names (expected one per line)")
    return names


def region_label(region: Region) -> str:
    """The caption drawn at a predicted box: its label and score; when rejected, "none" and the
    best guess it had (kept short: the tag must fit beside small boxes)."""
    if region.label is None:
        guess = region.best_guess
        return "none of these" if guess is None else f"none (best: {guess.label} {guess.score:.2f})"
    return f"{region.label} {region.score:.2f}"


def draw_regions(image: Image.Image, regions: list[Region], path: Path) -> None:
    """Write ``image`` with each region's box, ``label score`` and (if present) mask as a PNG."""
    colours = _label_colours([r.label for r in regions])
    canvas = _with_masks(image.convert("RGB"), regions, colours)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(canvas.size) // 40))
    width = max(1, min(canvas.size) // 200)
    for region in regions:
        draw_labelled_box(draw, tuple(region.box), region_label(region), colours[region.label], font, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")


def _label_colours(labels: list[str | None]) -> dict[str | None, str]:
    """One palette colour per label, in order of first appearance."""
    colours: dict[str | None, str] = {}
    for label in labels:
        colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
    return colours


def _with_masks(image: Image.Image, regions: list[Region], colours: dict[str | None, str]) -> Image.Image:
    with_masks = [r for r in regions if r.mask is not None]
    if not with_masks:
        return image.copy()
    pixels = np.asarray(image, np.float32).copy()
    for region, mask in zip(with_masks, decode_rle([r.mask for r in with_masks])):
        colour = np.array(ImageColor.getrgb(colours[region.label]), np.float32)
        pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * colour
    return Image.fromarray(pixels.round().astype(np.uint8))
