"""The TAP protocol (Tokenize Anything's scripts/eval_cls.py) on hand-made logits, worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import torch

from regionspot_cache.config import EvalConfig, Recipe, apply_overrides
from regionspot_cache.evaluate.scoring import TapProtocol, detections_from_logits, protocol_for

# Softmax of log-probabilities gives the probabilities back.
PROBS = [[0.9, 0.0995, 0.0005], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]
LOGITS = torch.tensor([[math.log(p) for p in row] for row in PROBS], dtype=torch.float64)
BOX_SCORES = torch.tensor([1.0, 0.5, 1.0])
# Boxes 0 and 1 overlap at IoU 81/119 = 0.68 > 0.5; box 2 overlaps neither.
BOXES = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)


def test_tap_threshold_nms_and_cap():
    # Pairs with p > 0.001 (box 0's class 2 at 0.0005 is not one), score sqrt(p x box score):
    #   class 0: box 0 .949, box 1 sqrt(.4) = .632 (suppressed by box 0), box 2 .447
    #   class 1: box 0 .315, box 1 sqrt(.05) = .224 (suppressed by box 0), box 2 .548
    #   class 2: box 1 .224 (box 0 has no class-2 pair to suppress it), box 2 .707
    # Kept, best first: (0,0) .949, (2,2) .707, (2,1) .548, (2,0) .447, (0,1) .315, (1,2) .224.
    tap = protocol_for(EvalConfig(protocol="tap"))
    boxes, classes, scores = tap.image_pairs(LOGITS, BOX_SCORES, BOXES)
    assert list(zip(boxes.tolist(), classes.tolist())) == [(0, 0), (2, 2), (2, 1), (2, 0), (0, 1), (1, 2)]
    np.testing.assert_allclose(scores, np.sqrt([0.9, 0.5, 0.3, 0.2, 0.0995, 0.05]), rtol=1e-9)
    # A cap of 4 keeps the pairs scoring at least the 4th best (.447).
    capped = protocol_for(EvalConfig(protocol="tap", max_dets_per_image=4))
    boxes, classes, _ = capped.image_pairs(LOGITS, BOX_SCORES, BOXES)
    assert list(zip(boxes.tolist(), classes.tolist())) == [(0, 0), (2, 2), (2, 1), (2, 0)]


def test_tap_keeps_ties_at_the_cap():
    # Two separate boxes with equal probabilities: a cap of 1 keeps both of the tied best pairs.
    logits = torch.log(torch.tensor([[0.6, 0.4], [0.6, 0.4]], dtype=torch.float64))
    boxes = np.array([[0, 0, 5, 5], [10, 10, 15, 15]], np.float32)
    _, classes, _ = protocol_for(EvalConfig(protocol="tap", max_dets_per_image=1)).image_pairs(logits, torch.ones(2), boxes)
    assert classes.tolist() == [0, 0]


def test_tap_through_detections_and_overrides():
    recipe = apply_overrides(Recipe(), ["eval.protocol=tap"])
    protocol = protocol_for(recipe.eval)
    assert isinstance(protocol, TapProtocol) and protocol.lvis_max_dets == 300
    assert protocol.settings()["protocol"] == "tap" and "NMS 0.5" in protocol.settings()["description"]
    detections = detections_from_logits([(7, BOXES, BOX_SCORES.numpy(), LOGITS)], np.array([11, 12, 13]), recipe.eval)
    assert detections.category_ids.tolist() == [11, 13, 12, 11, 12, 13]
    assert (detections.image_ids == 7).all()
    np.testing.assert_allclose(detections.boxes[0], [0, 0, 10, 10])
