"""Box validation: clip boxes to the image, reject the degenerate ones with a reason."""

from __future__ import annotations

import numpy as np

from regionspot_cache.data.datasets import BoxSet


def split_boxes(boxes: BoxSet, width: int, height: int) -> tuple[BoxSet, BoxSet, list[str]]:
    """Clip boxes to the image; those left without area, not finite, or reaching more than the
    image's own size beyond an edge (corrupt coordinates, which clipping would turn into a
    plausible box) are rejected with a reason. Returns the kept boxes (clipped), the rejected ones
    (as given) and the reasons."""
    finite = np.isfinite(boxes.xyxy).all(axis=1)
    xyxy = np.nan_to_num(boxes.xyxy, nan=0.0, posinf=0.0, neginf=0.0)
    positive = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    xs, ys = xyxy[:, [0, 2]], xyxy[:, [1, 3]]
    near = ((xs >= -width) & (xs <= 2 * width)).all(axis=1) & ((ys >= -height) & (ys <= 2 * height)).all(axis=1)
    clipped = xyxy.copy()
    clipped[:, [0, 2]] = xs.clip(0, width)
    clipped[:, [1, 3]] = ys.clip(0, height)
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep = finite & positive & near & inside
    reasons = [
        "coordinates not finite"
        if not f
        else "zero or negative size"
        if not p
        else "coordinates far outside the image"
        if not n
        else "outside the image"
        for f, p, n in zip(finite[~keep], positive[~keep], near[~keep])
    ]
    kept = BoxSet(clipped[keep], boxes.category_ids[keep], boxes.scores[keep])
    rejected = boxes.take(~keep)
    return kept, rejected, reasons
