"""Mask AP's segmentations: SAM's mask for each detection's box, as a COCO RLE (``regions/masks.py``)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Iterable

import numpy as np

from regionspot_cache.progress import progress_bar
from regionspot_cache.regions.masks import box_mask_rles

if TYPE_CHECKING:  # handed in: importing this module loads no model code and reads no image
    from regionspot_cache.data.images import ImageSource
    from regionspot_cache.encoders.sam import SamBoxEncoder


def add_segmentations(detections: list[dict], images: ImageSource, sam: SamBoxEncoder) -> None:
    """Give every LVIS-format detection the RLE of SAM's mask for its box as ``segmentation``
    (in place). Each image is encoded once; a box scored for several classes is decoded once."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for detection in detections:
        by_image[detection["image_id"]].append(detection)
    with progress_bar("SAM masks", len(by_image)) as (bar, task):
        for image_id, image_detections in by_image.items():
            _add_image_segmentations(image_id, image_detections, images, sam)
            bar.update(task, advance=1)


def _add_image_segmentations(image_id: int, detections: list[dict], images: ImageSource, sam: SamBoxEncoder) -> None:
    image = images.load(image_id)
    boxes = sorted({tuple(d["bbox"]) for d in detections})
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32)
    embedding = sam.embed_images([sam.resizer()(np.asarray(image))])[0]
    rles = dict(zip(boxes, box_mask_rles(sam, embedding, xyxy, (image.height, image.width))))
    for detection in detections:
        detection["segmentation"] = rles[tuple(detection["bbox"])]


def without_boxes(detections: Iterable[dict]) -> list[dict]:
    """Copies without ``bbox``, so LVIS takes a detection's area from its mask (as detectron2
    does for segm evaluation) instead of from its box."""
    return [{key: value for key, value in d.items() if key != "bbox"} for d in detections]
