"""Detector adapters: boxes in original pixels, chunked vocabularies, models that are refused."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_cache.data.proposals import load_proposals
from regionspot_cache.demo.tiny_detectors import write_not_a_detector
from regionspot_cache.propose.detectors import (
    DetectorError,
    detector_family,
    load_detector,
    resolve_model_dir,
    to_original_pixels,
)
from regionspot_cache.propose.select import Selection, class_agnostic_nms, detect_image
from regionspot_cache.propose.writer import records
from regionspot_cache.runtime.files import write_json

NAMES = ["cat", "dog", "trash can", "person", "bird", "cup", "tree", "boat", "horse"]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_normalised_centre_boxes_map_to_original_pixels_and_are_clipped():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.4, 0.4]])
    xyxy = to_original_pixels(boxes, 200, 100, (200, 100))
    np.testing.assert_allclose(xyxy, [[50, 25, 150, 75], [140, 0, 200, 30]])


def test_xyxy_written_as_xywh_reads_back_as_the_same_boxes(tmp_path):
    xyxy = np.array([[1.5, 2.25, 30.0, 40.5], [0, 0, 7, 9]], np.float32)
    path = write_json(tmp_path / "p.json", records(7, xyxy, np.array([3, 5]), np.array([0.9, 0.25], np.float32)))
    agnostic, own = load_proposals(path)[7], load_proposals(path, with_classes=True)[7]
    np.testing.assert_array_equal(agnostic.xyxy, xyxy)
    assert agnostic.category_ids.tolist() == [-1, -1]  # RegionSpot scores proposals class-agnostic
    assert own.category_ids.tolist() == [3, 5] and np.array_equal(own.scores, np.float32([0.9, 0.25]))


def test_owlv2_boxes_match_transformers_post_processing_on_a_resized_padded_image(tiny_owlv2):
    detector = load_detector(tiny_owlv2, torch.device("cpu"))
    image = _image(90, 50)  # padded to 90x90, resized to 32x32 by the processor
    _, _, xyxy = detector.prepare(image)
    inputs = detector.processor(text=[["cat"]], images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(**inputs)
    expected = detector.processor.image_processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(50, 90)])[
        0
    ]
    reference = np.clip(expected["boxes"].numpy(), 0, [90, 50, 90, 50])
    np.testing.assert_allclose(np.sort(xyxy, axis=0), np.sort(reference, axis=0), atol=1e-3)


def test_grounding_dino_boxes_match_transformers_post_processing(tiny_grounding_dino):
    detector = load_detector(tiny_grounding_dino, torch.device("cpu"))
    image = _image(100, 60)
    found = detector.detect(detector.prepare(image), ["cat", "dog"])
    inputs = detector.processor(images=image, text="cat. dog.", return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(**inputs)
    cxcywh = outputs.pred_boxes[0]
    reference = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1) * torch.tensor([100, 60] * 2)
    np.testing.assert_allclose(found.xyxy, np.clip(reference.numpy(), 0, [100, 60, 100, 60]), atol=1e-3)
    assert set(found.classes.tolist()) <= {0, 1} and ((found.scores >= 0) & (found.scores <= 1)).all()


def test_owlv2_chunks_merge_to_the_same_proposals_as_one_chunk(tiny_owlv2):
    detector = load_detector(tiny_owlv2, torch.device("cpu"))
    image = _image(70, 40, seed=1)
    whole = detect_image(detector, image, NAMES, Selection(top_k=20, chunk_size=len(NAMES)))
    for chunk_size in (1, 2, 4):
        chunked = detect_image(detector, image, NAMES, Selection(top_k=20, chunk_size=chunk_size))
        np.testing.assert_array_equal(chunked.xyxy, whole.xyxy)
        np.testing.assert_array_equal(chunked.classes, whole.classes)
        # The text tower runs on batches of another size: the last bits of a float32 score may differ.
        np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-5)


def test_grounding_dino_chunks_fit_its_text_length(tiny_grounding_dino):
    detector = load_detector(tiny_grounding_dino, torch.device("cpu"))
    names = NAMES * 4
    chunks = detector.chunks(names, chunk_size=100)
    assert [i for chunk in chunks for i in chunk] == list(range(len(names)))
    for chunk in chunks:  # [CLS] + each name's tokens and its period + [SEP] within max_text_len (32)
        assert 2 + sum(len(detector._tokens(names[i])) + 1 for i in chunk) <= 32
    found = detect_image(detector, _image(80, 64), names, Selection(top_k=15, chunk_size=100))
    assert len(found) <= 15 and found.classes.max() < len(names)


def test_grounding_dino_runs_its_backbone_once_per_image_and_finds_the_same_proposals(tiny_grounding_dino, monkeypatch):
    from regionspot_cache.propose import detectors

    detector = load_detector(tiny_grounding_dino, torch.device("cpu"))
    runs = []
    detector.model.model.backbone.conv_encoder.register_forward_hook(lambda *_: runs.append(1))
    names, selection = NAMES * 4, Selection(top_k=15, chunk_size=100)
    chunks = len(detector.chunks(names, selection.chunk_size))
    image = _image(90, 70, seed=2)
    reused = detect_image(detector, image, names, selection)
    assert chunks > 2 and len(runs) == 1
    # Before: every chunk's forward ran the backbone on the image itself.
    monkeypatch.setattr(detectors, "_reusing", lambda *_: contextlib.nullcontext())
    rerun = detect_image(detector, image, names, selection)
    assert len(runs) == 1 + 1 + chunks  # prepare's run, then one per chunk
    for field in ("xyxy", "classes", "scores"):
        np.testing.assert_array_equal(getattr(reused, field), getattr(rerun, field))
    assert len(reused) > 0


def test_class_agnostic_nms_keeps_the_best_of_overlapping_boxes_of_any_class():
    from regionspot_cache.propose.detectors import Detected

    found = Detected(
        np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30]], np.float32),
        np.array([1, 2, 3]),
        np.array([0.5, 0.9, 0.4], np.float32),
    )
    kept = class_agnostic_nms(found, 0.7, top_k=5)
    assert kept.classes.tolist() == [2, 3]
    assert class_agnostic_nms(found, 0.7, top_k=1).classes.tolist() == [2]


def test_a_model_without_a_detection_head_is_refused(tmp_path):
    directory = write_not_a_detector(tmp_path / "bert")
    with pytest.raises(DetectorError, match="model type 'bert' has no open-vocabulary detection head"):
        detector_family(directory)


def test_a_model_id_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DetectorError, match="not a local model directory, and not found on the Hugging Face Hub"):
        resolve_model_dir("no-such-org/no-such-detector")
