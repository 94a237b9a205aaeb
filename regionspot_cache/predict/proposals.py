"""Boxes for ``predict`` without giving any: SAM's automatic mask generator on the image, or the
image's boxes in a proposal file (a manifest's proposal set, GLIP's or COCO results)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from regionspot_cache.config import AutoBoxesConfig
from regionspot_cache.data.boxes import split_boxes
from regionspot_cache.data.datasets import BoxSet, Manifest
from regionspot_cache.data.proposals import load_proposals
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.errors import InputError

logger = logging.getLogger(__name__)


def automatic_boxes(encoders: FrozenEncoders, pixels: np.ndarray, config: AutoBoxesConfig) -> BoxSet:
    """The boxes of the masks SAM's automatic mask generator finds in an (H, W, 3) uint8 image,
    with the loaded SAM (1 or 2.1); scores are SAM's predicted mask IoUs, best first, at most
    ``config.max_boxes``. Masks without area (a single pixel row or column) give no box.
    The generator embeds the image itself: SAM's image encoder runs once more than ``predict``'s."""
    generator = _generator(encoders, config)
    found = generator.generate(pixels)
    found.sort(key=lambda mask: -float(mask["predicted_iou"]))
    xywh = np.asarray([mask["bbox"] for mask in found], np.float32).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    scores = np.asarray([float(mask["predicted_iou"]) for mask in found], np.float32)
    keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
    xyxy, scores = xyxy[keep][: config.max_boxes], scores[keep][: config.max_boxes]
    logger.debug("automatic mask generator: %d masks, %d boxes kept", len(found), len(xyxy))
    return BoxSet(xyxy, np.full(len(xyxy), -1, np.int64), scores)


def _generator(encoders: FrozenEncoders, config: AutoBoxesConfig):
    settings = {
        "points_per_side": config.points_per_side,
        "points_per_batch": config.points_per_batch,
        "pred_iou_thresh": config.pred_iou_thresh,
        "stability_score_thresh": config.stability_score_thresh,
        "box_nms_thresh": config.box_nms_thresh,
        "output_mode": "coco_rle",  # only the boxes are used: RLE keeps the masks small
    }
    if encoders.is_sam2:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        generator = SAM2AutomaticMaskGenerator(encoders.sam.model, **settings)
        # Its predictor assumes a 1024-pixel input (feature maps 256, 128, 64 wide); other sizes
        # (the tests' tiny SAM 2.1) need theirs: 1/4, 1/8 and 1/16 of the input.
        side = encoders.sam.input_size
        generator.predictor._bb_feat_sizes = [(side // 4, side // 4), (side // 8, side // 8), (side // 16, side // 16)]
        return generator
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(encoders.sam.sam, **settings)


def proposal_boxes(
    path: Path, image: Path, size: tuple[int, int], image_id: int | None = None, manifest: Manifest | None = None
) -> tuple[BoxSet, int]:
    """The boxes of ``image`` ((width, height) ``size``) in the proposal file ``path`` (GLIP's
    object or COCO results), with their scores, best first, and how many of its boxes were
    dropped for having no area inside the image (a detector's, not the user's, so not an error).
    The image is ``image_id``, else found by its file among the manifest's images (which may
    have no proposals: a detector found nothing), else the file's only image."""
    proposals = load_proposals(path)
    if image_id is None and manifest is not None:
        image_id = manifest_image_id(manifest, image)
        proposals.setdefault(image_id, BoxSet.empty())
    if image_id is None:
        if len(proposals) != 1:
            raise InputError(
                f"{path}: proposals for {len(proposals)} images; say which is {image.name} with --image-id "
                "(or --manifest, whose images name it)"
            )
        image_id = next(iter(proposals))
    if image_id not in proposals:
        raise InputError(f"{path}: no proposals for image {image_id} ({image.name})")
    boxes = proposals[image_id]
    return _inside(boxes.take(np.argsort(-boxes.scores, kind="stable")), *size)


def manifest_image_id(manifest: Manifest, image: Path) -> int:
    """The id of ``image`` among the manifest's images: the entry whose file it is, else the
    only entry with its file name."""
    dataset = manifest.load()
    wanted = image.resolve()
    same_name = []
    for entry in dataset.images:
        if dataset.image_path(entry) == wanted:
            return entry.id
        if Path(entry.file_name).name == image.name:
            same_name.append(entry.id)
    if len(same_name) == 1:
        return same_name[0]
    where = f"{manifest.source or manifest.name}"
    if not same_name:
        raise InputError(f"{where}: no image {image.name} among the manifest's {len(dataset.images)} images; give --image-id")
    raise InputError(f"{where}: {len(same_name)} images named {image.name}; give --image-id")


def _inside(boxes: BoxSet, width: int, height: int) -> tuple[BoxSet, int]:
    """The boxes, as given (``predict`` clips and reports them), that keep area once clipped."""
    valid = np.array([not split_boxes(boxes.take([i]), width, height)[2] for i in range(len(boxes))], bool)
    return boxes.take(valid), int((~valid).sum())
