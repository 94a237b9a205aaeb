"""What makes the demo's data usable by the other commands: a dataset manifest per split (as in
``manifests/``) and a proposals file named in it, so that ``rs-cache extract``, ``repair`` and
``eval --proposals`` can be tried on the demo as the README shows them on LVIS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from regionspot_cache.runtime.files import write_json

PROPOSALS_NAME = "jittered"  # the manifest's proposal set: `--boxes jittered`, `--proposals jittered`


def write_demo_manifest(data_dir: Path, split: str, annotations: Path, proposals: Path) -> Path:
    """``data_dir/demo_<split>.toml``: name, annotations, image root and the proposal set, as
    absolute paths (the manifest works from any directory, with the default ``--data-root .``)."""
    path = data_dir / f"demo_{split}.toml"
    lines = [
        f"# The demo's {split} split, written by `rs-cache demo`. Paths are absolute, so --data-root is not needed.",
        f'name = "demo_{split}"',
        f"annotations = {_toml_string(annotations)}",
        f"image_root = {_toml_string(data_dir / 'images')}",
        "",
        f"# Proposals: `rs-cache extract --boxes {PROPOSALS_NAME}` / `rs-cache eval --proposals {PROPOSALS_NAME}`.",
        "[proposals]",
        f"{PROPOSALS_NAME} = {_toml_string(proposals)}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jittered_proposals(annotations: Path, path: Path, seed: int, copies: int = 2, decoys: int = 1) -> Path:
    """A stand-in detector's output in COCO results format (``image_id``, ``bbox`` x y w h,
    ``score``): ``copies`` jittered boxes per ground-truth object, scored by how little they
    moved, and ``decoys`` random low-scored boxes per image (false positives to rank below)."""
    data = json.loads(annotations.read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    results = []
    for annotation in data["annotations"]:
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        for _ in range(copies):
            shift = rng.uniform(-0.15, 0.15, size=4)  # of the box's width and height
            box = _clipped([x + shift[0] * w, y + shift[1] * h, x + w + shift[2] * w, y + h + shift[3] * h], width, height)
            if box is not None:
                score = float(np.clip(1.0 - 2.5 * np.abs(shift).mean() - rng.uniform(0, 0.1), 0.05, 1.0))
                results.append({"image_id": annotation["image_id"], "bbox": box, "score": round(score, 4)})
    for image_id, (width, height) in sizes.items():
        for _ in range(decoys):
            x1, y1 = rng.uniform(0, 0.7) * width, rng.uniform(0, 0.7) * height
            box = _clipped([x1, y1, x1 + rng.uniform(0.1, 0.3) * width, y1 + rng.uniform(0.1, 0.3) * height], width, height)
            if box is not None:
                results.append({"image_id": image_id, "bbox": box, "score": round(float(rng.uniform(0.05, 0.3)), 4)})
    return write_json(path, results)


def _clipped(xyxy: list[float], width: int, height: int) -> list[float] | None:
    """x y w h of the box inside the image, rounded to 0.1 px; None if less than 2 px remain."""
    x1, y1 = max(0.0, xyxy[0]), max(0.0, xyxy[1])
    x2, y2 = min(float(width), xyxy[2]), min(float(height), xyxy[3])
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return [round(x1, 1), round(y1, 1), round(x2 - x1, 1), round(y2 - y1, 1)]


def _toml_string(path: Path) -> str:
    return json.dumps(str(Path(path).resolve()))  # a JSON string is a valid TOML basic string
