"""The SAM 3 adapter against a tiny random-weight ``Sam3Model``: loading, boxes and scores, a ``propose`` run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_cache.data.proposals import check_provenance, load_proposals
from regionspot_cache.propose.detectors import Sam3Detector, detector_family, load_detector, resolve_model_dir
from regionspot_cache.propose.runner import run_proposals
from regionspot_cache.propose.select import Selection, detect_image

pytest.importorskip("transformers.models.sam3")

NAMES = ["cat", "trash can", "bird"]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_a_local_sam3_directory_loads_as_the_sam3_adapter(tiny_sam3):
    directory = resolve_model_dir(str(tiny_sam3))
    assert directory == tiny_sam3 and detector_family(directory) == "sam3"
    detector = load_detector(directory, torch.device("cpu"))
    assert isinstance(detector, Sam3Detector) and not detector.boxes_shared


def test_sam3_boxes_and_scores_match_the_processor_post_processing_per_name(tiny_sam3):
    detector = load_detector(tiny_sam3, torch.device("cpu"))
    image = _image(90, 50)  # stretched to 56x56 by the processor
    found = detector.detect(detector.prepare(image), NAMES)
    queries = detector.model.config.detr_decoder_config.num_queries
    assert len(found) == len(NAMES) * queries
    for index, name in enumerate(NAMES):
        # The processor's own path: image and one prompt padded to 32 tokens, the full forward pass.
        inputs = detector.processor(images=image, text=name, return_tensors="pt")
        with torch.no_grad():
            outputs = detector.model(
                pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        expected = detector.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(50, 90)])[0]
        mine = found.classes == index
        np.testing.assert_allclose(found.xyxy[mine], np.clip(expected["boxes"].numpy(), 0, [90, 50, 90, 50]), atol=1e-3)
        np.testing.assert_allclose(found.scores[mine], expected["scores"].numpy(), rtol=1e-4, atol=1e-6)
        # and the scoring rule spelled out: sigmoid(logit) x sigmoid(presence)
        rule = outputs.pred_logits[0].sigmoid() * outputs.presence_logits[0].sigmoid()
        np.testing.assert_allclose(found.scores[mine], rule.numpy(), rtol=1e-4, atol=1e-6)
    assert (found.xyxy[:, 2] <= 90).all() and (found.xyxy[:, 3] <= 50).all() and (found.xyxy >= 0).all()


def test_sam3_chunks_merge_to_the_same_proposals_as_one_chunk(tiny_sam3):
    detector = load_detector(tiny_sam3, torch.device("cpu"))
    image, names = _image(60, 70, seed=1), NAMES + ["a name much longer than the thirty two tokens sam three reads"]
    whole = detect_image(detector, image, names, Selection(top_k=8, chunk_size=len(names)))
    chunked = detect_image(detector, image, names, Selection(top_k=8, chunk_size=1))
    assert 0 < len(whole) <= 8
    np.testing.assert_allclose(chunked.xyxy, whole.xyxy, atol=1e-4)
    np.testing.assert_array_equal(chunked.classes, whole.classes)
    np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-4)


def test_propose_with_sam3_writes_a_proposal_file_extract_can_read(toy_dataset, tiny_sam3, tmp_path):
    output = tmp_path / "sam3.json"
    summary = run_proposals(toy_dataset, output, str(tiny_sam3), Selection(top_k=6, chunk_size=4), shard_size=3, device="cpu")
    assert summary.images == 5 and summary.failed_images == 0 and summary.shards_written == 2
    recorded = check_provenance(output, toy_dataset.categories)
    assert recorded.detector_family == "sam3" and recorded.top_k == 6 and recorded.images == 5
    proposals = load_proposals(output, with_classes=True)
    known = {c.id for c in toy_dataset.categories}
    assert proposals and set(proposals) <= {entry.id for entry in toy_dataset.images}
    for entry in (e for e in toy_dataset.images if e.id in proposals):
        boxes = proposals[entry.id]
        assert 0 < len(boxes) <= 6 and set(boxes.category_ids.tolist()) <= known
        assert (boxes.xyxy[:, 2] <= entry.width).all() and (boxes.xyxy[:, 3] <= entry.height).all()
