"""Scoring and LVIS AP on hand-made data with answers worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regionspot_cache.cache import CachedImage
from regionspot_cache.evaluate.cached import image_logits
from regionspot_cache.evaluate.lvis import lvis_ap, lvis_scores, numpy_float_alias
from regionspot_cache.evaluate.scoring import top_pairs
from regionspot_cache.head.model import HeadConfig, RegionSpotHead

CAT, DOG, EMU = 1, 2, 3
CAT_1, DOG_1, CAT_2 = [10, 10, 20, 20], [50, 50, 40, 40], [0, 0, 50, 50]  # x, y, w, h


@pytest.fixture()
def gt_file(tmp_path, lvis_annotation):
    ann = lvis_annotation
    data = {
        "images": [
            {
                "id": 1,
                "width": 100,
                "height": 100,
                "file_name": "a.jpg",
                "neg_category_ids": [EMU],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 2,
                "width": 100,
                "height": 100,
                "file_name": "b.jpg",
                "neg_category_ids": [DOG, EMU],
                "not_exhaustive_category_ids": [],
            },
        ],
        "annotations": [ann(1, 1, CAT, CAT_1), ann(2, 1, DOG, DOG_1), ann(3, 2, CAT, CAT_2)],
        "categories": [
            {"id": CAT, "name": "cat", "frequency": "f"},
            {"id": DOG, "name": "dog", "frequency": "c"},
            {"id": EMU, "name": "emu", "frequency": "r"},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def test_perfect_detections_score_one(gt_file):
    metrics = lvis_ap(gt_file, [det(1, CAT, CAT_1, 0.9), det(1, DOG, DOG_1, 0.8), det(2, CAT, CAT_2, 0.7)])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["APf"] == pytest.approx(1.0) and metrics["APc"] == pytest.approx(1.0)
    assert metrics["APr"] is None  # no rare category has ground truth: n/a (LVIS says -1), not 0.0


def test_wrong_classes_score_zero(gt_file):
    metrics = lvis_ap(gt_file, [det(1, DOG, CAT_1, 0.9), det(1, CAT, DOG_1, 0.8), det(2, EMU, CAT_2, 0.7)])
    assert metrics["AP"] == pytest.approx(0.0)


def test_missing_category_and_ranking(gt_file):
    # cat perfect, dog never detected: mean of 1 and 0.
    metrics = lvis_ap(gt_file, [det(1, CAT, CAT_1, 0.9), det(2, CAT, CAT_2, 0.7)])
    assert metrics["AP"] == pytest.approx(0.5)
    assert (metrics["APf"], metrics["APc"]) == (pytest.approx(1.0), pytest.approx(0.0))
    # A false cat ranked first: precision 1/2 at recall 1/2, 2/3 at recall 1 -> interpolated 2/3.
    dets = [det(2, CAT, [60, 60, 30, 30], 0.95), det(1, CAT, CAT_1, 0.9), det(2, CAT, CAT_2, 0.5), det(1, DOG, DOG_1, 0.8)]
    metrics = lvis_ap(gt_file, dets)
    assert metrics["APf"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["AP"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)


def test_ap_per_category_from_the_precision_array(gt_file):
    # As above: a false cat ranked first gives cat 2/3; dog found: 1; emu has no ground truth.
    dets = [det(2, CAT, [60, 60, 30, 30], 0.95), det(1, CAT, CAT_1, 0.9), det(2, CAT, CAT_2, 0.5), det(1, DOG, DOG_1, 0.8)]
    scores = lvis_scores(gt_file, dets)
    by_id = {c.category_id: c for c in scores.per_category}
    assert [c.category_id for c in scores.per_category] == [CAT, DOG, EMU]
    assert by_id[CAT].ap == pytest.approx(2 / 3, abs=1e-6) and by_id[DOG].ap == pytest.approx(1.0)
    assert (by_id[EMU].ap, by_id[EMU].gt_instances) == (None, 0)  # no ground truth: n/a, not 0.0
    assert (by_id[CAT].name, by_id[CAT].frequency, by_id[CAT].gt_instances) == ("cat", "f", 2)
    assert by_id[DOG].to_json() == {"name": "dog", "frequency": "c", "AP": pytest.approx(1.0), "gt_instances": 1}
    # LVIS's AP is the mean of the categories' APs.
    assert scores.metrics["AP"] == pytest.approx(np.mean([by_id[CAT].ap, by_id[DOG].ap]))


def test_no_detections_score_zero_where_there_is_ground_truth_and_none_elsewhere(gt_file):
    scores = lvis_scores(gt_file, [])
    assert scores.metrics["AP"] == 0.0 and scores.metrics["APf"] == 0.0 and scores.metrics["APc"] == 0.0
    assert scores.metrics["APr"] is None  # emu: nothing to miss
    # Areas 400, 1600 and 2500 px: small and medium have ground truth, large has none.
    assert (scores.metrics["APs"], scores.metrics["APm"], scores.metrics["APl"]) == (0.0, 0.0, None)
    assert [c.ap for c in scores.per_category] == [0.0, 0.0, None]


def test_numpy_float_alias_is_temporary():
    with numpy_float_alias():
        assert np.float is float
    assert not hasattr(np, "float")


def test_score_image_is_top_k_of_softmax_times_box_score():
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=16, text_dim=8, num_heads=4, ffn_dim=32)).eval()
    rng = np.random.default_rng(0)
    item = CachedImage(
        image_id=1,
        file_name="x",
        width=10,
        height=10,
        boxes=rng.uniform(size=(4, 4)).astype(np.float32),
        category_ids=np.full(4, -1),
        scores=np.array([1.0, 0.5, 0.25, 0.9], np.float32),
        tokens=rng.normal(size=(4, 256)).astype(np.float16),
        feature_map=rng.normal(size=(6, 16)).astype(np.float16),
    )
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    with torch.no_grad():
        embeddings = head(
            torch.tensor(item.tokens, dtype=torch.float32)[None], torch.tensor(item.feature_map, dtype=torch.float32)[None]
        )[0]
    probs = torch.softmax(30.0 * embeddings @ text.T, dim=-1).numpy() * item.scores[:, None]
    order = np.argsort(-probs.ravel(), kind="stable")[:7]

    def score_image(top_k):
        logits = image_logits(head, item, text, 30.0, torch.device("cpu"))
        return top_pairs(logits, torch.from_numpy(item.scores), "softmax", top_k)

    boxes, classes, scores = score_image(top_k=7)
    np.testing.assert_array_equal(boxes * 5 + classes, order)
    np.testing.assert_allclose(scores, probs.ravel()[order], rtol=1e-5)
    assert len(score_image(top_k=900)[0]) == 20
