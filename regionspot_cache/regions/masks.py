"""SAM masks for box prompts as COCO run-length encodings.

RLEs come from ``pycocotools.mask.encode`` (Fortran-order uint8, as it requires) with ``counts``
decoded to ``str`` so they serialise to JSON; LVIS and pycocotools accept them as they are.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pycocotools.mask as mask_utils
import torch

if TYPE_CHECKING:  # the encoder is handed in: importing this module loads no model code
    from regionspot_cache.encoders.sam import SamBoxEncoder


def encode_rle(masks: np.ndarray | torch.Tensor) -> list[dict]:
    """(N, H, W) boolean masks -> N COCO RLEs ``{"size": [H, W], "counts": str}``."""
    if isinstance(masks, torch.Tensor):
        masks = masks.cpu().numpy()
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rles: list[dict]) -> np.ndarray:
    """COCO RLEs (``counts`` as str or bytes) -> (N, H, W) bool."""
    if not rles:
        return np.zeros((0, 0, 0), bool)
    with warnings.catch_warnings():
        # pycocotools' decode predates NumPy 2's copy keyword; the result is unaffected.
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
        return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)


def box_mask_rles(
    sam: SamBoxEncoder,
    image_embedding: torch.Tensor,
    boxes_xyxy: np.ndarray,
    original_size: tuple[int, int],
    boxes_per_call: int = 16,
) -> list[dict]:
    """RLEs of SAM's single-mask output per box, encoded chunk by chunk so that only
    ``boxes_per_call`` full-size masks are held at a time."""
    boxes_xyxy = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    rles: list[dict] = []
    for start in range(0, len(boxes_xyxy), boxes_per_call):
        chunk = boxes_xyxy[start : start + boxes_per_call]
        rles.extend(encode_rle(sam.box_masks(image_embedding, chunk, original_size, boxes_per_call)))
    return rles
