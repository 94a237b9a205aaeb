"""SAM masks for box prompts against SamPredictor, COCO RLE round trips, and mask AP by hand."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from segment_anything import SamPredictor

from regionspot_cache.data.datasets import ImageEntry
from regionspot_cache.data.images import ImageSource
from regionspot_cache.evaluate.lvis import lvis_ap
from regionspot_cache.evaluate.masks import add_segmentations, without_boxes
from regionspot_cache.regions.masks import box_mask_rles, decode_rle, encode_rle

BOXES = np.array([[10, 5, 60, 40], [30, 20, 90, 60], [0, 0, 140, 90], [100, 50, 139, 89], [5.5, 7.25, 33, 80]], np.float32)


def predictor_masks(sam, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    return np.stack([predictor.predict(box=box, multimask_output=False)[0][0] for box in boxes])


def test_box_masks_are_sam_predictors_single_masks(encoders, rgb_image):
    sam = encoders.sam
    expected = predictor_masks(sam.sam, rgb_image, BOXES)
    assert expected.dtype == bool and 0 < expected.mean() < 1  # not trivially all or nothing
    embedding = sam.embed_images([sam.resizer()(rgb_image)])[0]
    for per_call in (1, 3):  # batching boxes (here 3 + 2) must not change a single pixel
        ours = sam.box_masks(embedding, BOXES, rgb_image.shape[:2], boxes_per_call=per_call)
        assert ours.dtype == torch.bool and ours.shape == (5, 90, 140)
        np.testing.assert_array_equal(ours.numpy(), expected)
    assert sam.box_masks(embedding, np.zeros((0, 4)), (90, 140)).shape == (0, 90, 140)
    rles = box_mask_rles(sam, embedding, BOXES[:3], (90, 140), boxes_per_call=2)
    np.testing.assert_array_equal(decode_rle(rles), expected[:3])


def test_rle_round_trip_is_exact_and_json_ready():
    rng = np.random.default_rng(0)
    masks = rng.uniform(size=(3, 37, 53)) > 0.6
    masks[1] = False
    masks[2, 5:20, 10:30] = True
    rles = encode_rle(masks)
    assert [rle["size"] for rle in rles] == [[37, 53]] * 3
    assert all(isinstance(rle["counts"], str) for rle in rles)
    rles = json.loads(json.dumps(rles))  # what a results file holds
    np.testing.assert_array_equal(decode_rle(rles), masks)
    # pycocotools reads them as they are: areas and boxes of the masks.
    np.testing.assert_array_equal(mask_utils.area(rles), masks.sum(axis=(1, 2)))
    np.testing.assert_array_equal(encode_rle(torch.from_numpy(masks)), rles)
    assert encode_rle(np.zeros((0, 4, 4), bool)) == []


def test_add_segmentations_gives_each_detection_its_boxs_mask(encoders, rgb_image, tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(rgb_image).save(tmp_path / "a" / "x.png")
    images = ImageSource(tmp_path, {7: ImageEntry(7, "a/x.png", 140, 90)})
    x1, y1, x2, y2 = BOXES[1].tolist()
    detections = [{"image_id": 7, "category_id": c, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.5} for c in (1, 2)] + [
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 140.0, 90.0], "score": 0.4}
    ]
    calls = []
    original = encoders.sam.embed_images
    monkeypatch.setattr(encoders.sam, "embed_images", lambda batch: calls.append(1) or original(batch))
    add_segmentations(detections, images, encoders.sam)
    assert len(calls) == 1  # the image is encoded once
    expected = predictor_masks(encoders.sam.sam, rgb_image, BOXES[[1, 2]])
    assert detections[0]["segmentation"] == detections[1]["segmentation"]
    np.testing.assert_array_equal(decode_rle([d["segmentation"] for d in detections[1:]]), expected)
    assert "bbox" not in without_boxes(detections)[0] and "bbox" in detections[0]


@pytest.fixture()
def square_gt(tmp_path):
    """One 40x30 image with one 10x10 square of category 1."""
    square = [[10, 10, 20, 10, 20, 20, 10, 20]]
    data = {
        "images": [
            {"id": 1, "width": 40, "height": 30, "file_name": "a.jpg", "neg_category_ids": [], "not_exhaustive_category_ids": []}
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 10, 10],
                "area": 100,
                "segmentation": square,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "square", "frequency": "f"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def mask_detection(top: int, left: int, size: int) -> dict:
    mask = np.zeros((1, 30, 40), bool)
    mask[0, top : top + size, left : left + size] = True
    return {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": encode_rle(mask)[0]}


def test_mask_ap_by_hand(square_gt):
    # The ground-truth square rasterised by pycocotools covers rows/columns 10..19.
    assert lvis_ap(square_gt, [mask_detection(10, 10, 10)], iou_type="segm")["AP"] == pytest.approx(1.0)
    # A mask shifted by 3 pixels: IoU 70/130 = 0.54 -> a hit at IoU 0.5 only, AP = 1/10 over the 10 thresholds.
    metrics = lvis_ap(square_gt, [mask_detection(10, 13, 10)], iou_type="segm")
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(0.1)
