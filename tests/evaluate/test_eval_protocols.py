"""Scoring protocols (softmax / sigmoid, standard / fixed AP) on hand-made logits whose
surviving pairs, scores and LVIS APs are worked out by hand in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from regionspot_cache.config import ConfigError, EvalConfig, Recipe, apply_overrides, load_recipe
from regionspot_cache.evaluate.lvis import lvis_ap
from regionspot_cache.evaluate.scoring import (
    Detections,
    FixedProtocol,
    Pairs,
    PerClassTopK,
    StandardProtocol,
    cap_per_class,
    cap_per_image,
    detections_from_logits,
    protocol_for,
    rank_within_groups,
    top_pairs,
    write_results_json,
)

LN3, LN4 = math.log(3), math.log(4)
CAT, DOG, EMU = 1, 2, 3
VOCAB = np.array([CAT, DOG, EMU])


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --- which (box, class) pairs survive top-k, and their scores --------------------------------

# box 0: logits (ln 3, 0, 0), box score 1 (ground truth); box 1: (0, ln 4, ln 3), proposal score 0.5.
LOGITS = torch.tensor([[LN3, 0.0, 0.0], [0.0, LN4, LN3]], dtype=torch.float64)
BOX_SCORES = torch.tensor([1.0, 0.5])


def test_softmax_top_k():
    # softmax: box 0 (3, 1, 1)/5 = .6 .2 .2; box 1 (1, 4, 3)/8 x 0.5 = .0625 .25 .1875.
    # Top 3: (0, cat) .6, (1, dog) .25, then the tie .2: (0, dog) before (0, emu) by flat index.
    boxes, classes, scores = top_pairs(LOGITS, BOX_SCORES, "softmax", 3)
    assert boxes.tolist() == [0, 1, 0] and classes.tolist() == [0, 1, 1]
    np.testing.assert_allclose(scores, [0.6, 0.25, 0.2], rtol=1e-12)


def test_sigmoid_top_k_keeps_other_pairs():
    # sigmoid: box 0 .75 .5 .5 (sigmoid(ln 3) = 3/4); box 1 x 0.5: .25 .4 .375 (sigmoid(ln 4) = 4/5).
    # Top 3 are all box 0's: the proposal's dog (.25 under softmax) no longer makes it.
    boxes, classes, scores = top_pairs(LOGITS, BOX_SCORES, "sigmoid", 3)
    assert boxes.tolist() == [0, 0, 0] and classes.tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores, [0.75, 0.5, 0.5], rtol=1e-12)
    # Any k >= 6 gives all six, best first, the 0.5 tie in flat-index order; None all six in flat order.
    boxes, classes, every = top_pairs(LOGITS, BOX_SCORES, "sigmoid", 900)
    assert boxes.tolist() == [0, 0, 0, 1, 1, 1] and classes.tolist() == [0, 1, 2, 1, 2, 0]
    np.testing.assert_allclose(every, [0.75, 0.5, 0.5, 0.4, 0.375, 0.25], rtol=1e-12)
    boxes, classes, every = top_pairs(LOGITS, BOX_SCORES, "sigmoid", None)
    assert boxes.tolist() == [0, 0, 0, 1, 1, 1] and classes.tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_allclose(every, [0.75, 0.5, 0.5, 0.25, 0.4, 0.375], rtol=1e-12)


def test_sigmoid_scores_do_not_saturate_to_ties():
    # float32 sigmoid is exactly 1.0 for both logits; the float64 scores keep them ordered.
    boxes, _, scores = top_pairs(torch.tensor([[20.0], [25.0]]), torch.ones(2), "sigmoid", 2)
    assert boxes.tolist() == [1, 0] and scores[0] > scores[1]


def test_top_of_top_is_top():
    # The released code's top 900 followed by LVIS's 300 equals the top 300, also with many ties,
    # and both equal a stable sort of all 2,000 pairs.
    logits = torch.tensor(np.random.default_rng(0).integers(0, 3, size=(40, 50)), dtype=torch.float32)
    probs = torch.softmax(logits.double(), dim=-1).flatten().numpy()
    expected = np.argsort(-probs, kind="stable")
    big = top_pairs(logits, torch.ones(40), "softmax", 900)
    small = top_pairs(logits, torch.ones(40), "softmax", 300)
    np.testing.assert_array_equal(big[0] * 50 + big[1], expected[:900])
    for a, b in zip(big, small):
        np.testing.assert_array_equal(a[:300], b)


def test_per_image_limits_of_the_protocols():
    standard = protocol_for(EvalConfig())
    assert standard.per_image_limit == 300 and standard.lvis_max_dets == 300
    assert protocol_for(EvalConfig(top_k_per_image=50)).per_image_limit == 50
    assert protocol_for(EvalConfig(max_dets_per_image=-1)).per_image_limit == 900
    fixed = protocol_for(EvalConfig(protocol="fixed"))
    assert fixed.per_image_limit is None and fixed.lvis_max_dets == -1


def test_protocol_objects_come_from_the_config_string():
    assert type(protocol_for(EvalConfig())) is StandardProtocol
    fixed = protocol_for(EvalConfig(protocol="fixed", fixed_dets_per_class=7))
    assert type(fixed) is FixedProtocol and fixed.name == "fixed"
    keep = fixed.collector(num_classes=3)
    assert isinstance(keep, PerClassTopK) and keep.k == 7
    keep = protocol_for(EvalConfig(top_k_per_image=5)).collector(num_classes=3)
    keep.add(Pairs(np.arange(8), np.zeros(8, np.int32), np.linspace(1, 0, 8)))
    assert len(keep.result().scores) == 5  # the per-image limit, applied to what arrives
    config = EvalConfig()
    config.protocol = "fixd"  # as --set assigns it, after __init__
    with pytest.raises(ConfigError, match="eval.protocol: 'fixd'"):
        protocol_for(config)


def test_settings_name_every_limit():
    standard = protocol_for(EvalConfig(max_dets_per_image=-1)).settings()
    assert standard == {
        "scoring": "softmax",
        "protocol": "standard",
        "top_k_per_image": 900,
        "max_dets_per_image": -1,
        "dets_per_class": None,
        "description": "softmax scoring; standard: top 900 (box, class) pairs per image, no LVIS per-image cap",
    }
    fixed = protocol_for(EvalConfig(protocol="fixed", scoring="sigmoid", fixed_dets_per_class=20)).settings()
    assert (fixed["protocol"], fixed["scoring"], fixed["top_k_per_image"]) == ("fixed", "sigmoid", None)
    assert (fixed["max_dets_per_image"], fixed["dets_per_class"]) == (-1, 20)


# --- the fixed protocol's per-class cap -------------------------------------------------------

# Pairs arriving image by image (box row, class, score); k = 2 per class:
#   class 0: .9 (box 0), .3 (box 1), .3 (box 2), .95 (box 3) -> keeps .95 and .9
#   class 1: .1 (box 0), .5 (box 1), .7 (box 2), .5 (box 3)  -> keeps .7 and the earlier .5 (box 1)
ARRIVING = Pairs(np.arange(8) // 2, np.array([0, 1] * 4, np.int32), np.array([0.9, 0.1, 0.3, 0.5, 0.3, 0.7, 0.95, 0.5]))


@pytest.mark.parametrize("budget", [1, 3, 100])
def test_per_class_cap_streaming(budget):
    keep = PerClassTopK(num_classes=2, k=2, budget=budget)
    for start in range(0, 8, 2):
        keep.add(ARRIVING.take(slice(start, start + 2)))
    kept = keep.result()
    assert list(zip(kept.box_rows.tolist(), kept.classes.tolist(), kept.scores.tolist())) == [
        (0, 0, 0.9),
        (1, 1, 0.5),
        (2, 1, 0.7),
        (3, 0, 0.95),
    ]
    assert keep.threshold.tolist() == [0.9, 0.5]  # each class's 2nd best


def test_streaming_cap_equals_cap_on_the_whole_list():
    rng = np.random.default_rng(1)
    n = 5000
    pairs = Pairs(np.arange(n), rng.integers(0, 7, n).astype(np.int32), rng.integers(0, 40, n) / 40)  # many ties
    keep = PerClassTopK(7, 25, budget=300)
    for start in range(0, n, 97):
        keep.add(pairs.take(slice(start, start + 97)))
    streamed = keep.result()
    whole = Detections(np.zeros(n, np.int64), pairs.classes.astype(np.int64), np.zeros((n, 4), np.float32), pairs.scores)
    expected = cap_per_class(whole, 25)
    np.testing.assert_array_equal(streamed.box_rows, np.flatnonzero(np.isin(np.arange(n), streamed.box_rows)))
    np.testing.assert_array_equal(streamed.scores, expected.scores)
    np.testing.assert_array_equal(streamed.classes, expected.category_ids)
    assert np.bincount(streamed.classes).max() == 25


def test_rank_within_groups_breaks_ties_by_position():
    ranks = rank_within_groups(np.array([5, 1, 5, 5, 1]), np.array([0.2, 0.4, 0.9, 0.2, 0.4]))
    assert ranks.tolist() == [1, 0, 0, 2, 1]


def test_cap_per_image_is_lvis_semantics():
    dets = Detections(
        np.array([1, 1, 2, 1, 2]), np.array([1, 2, 1, 3, 2]), np.zeros((5, 4), np.float32), np.array([0.5, 0.9, 0.1, 0.5, 0.2])
    )
    # image 1 keeps .9 and the first .5; image 2 has two, both kept; order of arrival kept.
    assert cap_per_image(dets, 2).scores.tolist() == [0.5, 0.9, 0.1, 0.2]
    assert cap_per_image(dets, -1).scores.tolist() == dets.scores.tolist()


# --- LVIS AP: the standard and fixed protocols differ -----------------------------------------

# Ground truth (x, y, w, h): image 1: cat A, dog B (emu on its negative list); image 2: cat C (dog
# negative). The boxes scored are A, B, C; sigmoid class probabilities are chosen directly.
A, B, C = [10, 10, 20, 20], [50, 50, 40, 40], [0, 0, 50, 50]
PROBS = {1: [(A, [0.9, 0.2, 0.1]), (B, [0.3, 0.6, 0.1])], 2: [(C, [0.8, 0.7, 0.05])]}


@pytest.fixture()
def gt_file(tmp_path, lvis_annotation):
    ann = lvis_annotation
    data = {
        "images": [
            {"id": 1, "width": 100, "height": 100, "neg_category_ids": [EMU], "not_exhaustive_category_ids": []},
            {"id": 2, "width": 100, "height": 100, "neg_category_ids": [DOG], "not_exhaustive_category_ids": []},
        ],
        "annotations": [ann(1, 1, CAT, A), ann(2, 1, DOG, B), ann(3, 2, CAT, C)],
        "categories": [
            {"id": CAT, "name": "cat", "frequency": "f"},
            {"id": DOG, "name": "dog", "frequency": "c"},
            {"id": EMU, "name": "emu", "frequency": "r"},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def _scored(config: EvalConfig) -> Detections:
    def images():
        for image_id, rows in PROBS.items():
            xyxy = np.array([[x, y, x + w, y + h] for (x, y, w, h), _ in rows], np.float32)
            logits = torch.tensor([[logit(p) for p in probs] for _, probs in rows], dtype=torch.float64)
            yield image_id, xyxy, np.ones(len(rows), np.float32), logits

    return detections_from_logits(images(), VOCAB, config)


def _ap(gt_file, config: EvalConfig) -> dict[str, float]:
    return lvis_ap(gt_file, _scored(config), protocol_for(config).lvis_max_dets)


@pytest.mark.parametrize(
    "config", [EvalConfig(scoring="sigmoid", top_k_per_image=1), EvalConfig(scoring="sigmoid", max_dets_per_image=1)]
)
def test_standard_protocol_with_one_detection_per_image(gt_file, config):
    # Each image keeps its best pair: (A, cat) .9 and (C, cat) .8. Cat: both found -> AP 1;
    # dog: never detected -> 0. AP = 0.5, APf (cat) 1, APc (dog) 0, APr n/a: None (no emu ground truth).
    assert _scored(config).scores.tolist() == pytest.approx([0.9, 0.8])
    metrics = _ap(gt_file, config)
    assert metrics["AP"] == pytest.approx(0.5) and metrics["APf"] == pytest.approx(1.0)
    assert metrics["APc"] == pytest.approx(0.0) and metrics["APr"] is None


def test_fixed_protocol_keeps_every_pair(gt_file):
    # All 9 pairs. Cat ranking: .9 A (TP), .8 C (TP), .3 B (FP) -> precision 1 up to recall 1: AP 1.
    # Dog: .7 C (image 2 has dog on its negative list: FP), .6 B (TP), .2 A (FP): recall 1 only at
    # precision 1/2 -> AP 0.5. Emu has no ground truth (excluded). AP = (1 + 0.5) / 2 = 0.75.
    config = EvalConfig(scoring="sigmoid", protocol="fixed")
    assert len(_scored(config)) == 9
    metrics = _ap(gt_file, config)
    assert metrics["AP"] == pytest.approx(0.75) and metrics["APf"] == pytest.approx(1.0)
    assert metrics["APc"] == pytest.approx(0.5)


def test_fixed_protocol_cap_per_class(gt_file):
    # One detection per class over the dataset: cat .9 A (TP: recall 1/2, precision 1 -> precision 1 at the
    # 51 recall thresholds 0, .01, ..., .50 of 101, else 0: AP 51/101); dog .7 C (FP): AP 0; emu .1.
    config = EvalConfig(scoring="sigmoid", protocol="fixed", fixed_dets_per_class=1)
    dets = _scored(config)
    assert dets.category_ids.tolist() == [CAT, EMU, DOG]  # arrival order: image 1's A, A (.1 before B's .1), C
    assert dets.scores.tolist() == pytest.approx([0.9, 0.1, 0.7])
    metrics = _ap(gt_file, config)
    assert metrics["APf"] == pytest.approx(51 / 101) and metrics["APc"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(51 / 202)


# --- LVIS sees the same detections however they reach it ----------------------------------------


@pytest.fixture()
def random_case(tmp_path):
    """12 images, 6 categories, boxes jittered around the ground truth, random classes and scores."""
    rng = np.random.default_rng(3)
    images, annotations, dets = [], [], []
    for image_id in range(1, 13):
        present = rng.choice(6, size=2, replace=False) + 1
        absent = [c for c in range(1, 7) if c not in present]
        images.append(
            {
                "id": image_id,
                "width": 200,
                "height": 200,
                "neg_category_ids": absent[:2],
                "not_exhaustive_category_ids": [int(present[0])] if image_id % 4 == 0 else [],
            }
        )
        for category_id in present:
            x, y, w, h = (float(v) for v in rng.uniform(0, 100, 2).tolist() + rng.uniform(10, 90, 2).tolist())
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category_id),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            for _ in range(4):
                jitter = rng.normal(0, 6, 4)
                dets.append(
                    (
                        image_id,
                        int(rng.integers(1, 7)),
                        [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                        float(rng.integers(0, 20)) / 20,
                    )
                )
    gt = tmp_path / "gt.json"
    gt.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c, "name": f"c{c}", "frequency": "rcf"[c % 3]} for c in range(1, 7)],
            }
        )
    )
    columns = list(zip(*dets))
    detections = Detections(np.array(columns[0]), np.array(columns[1]), np.array(columns[2], np.float32), np.array(columns[3]))
    return gt, detections


@pytest.mark.parametrize("max_dets", [3, -1])
def test_pruned_columns_equal_plain_records(random_case, max_dets):
    # Detections are capped per image and cut to the evaluable categories before LVIS; records go in whole.
    gt, detections = random_case
    pruned = lvis_ap(gt, detections, max_dets)
    assert 0 < pruned["AP"] < 1
    assert pruned == lvis_ap(gt, detections.records(), max_dets)


def test_results_file_holds_the_records(random_case, tmp_path):
    _, detections = random_case
    path = write_results_json(detections, tmp_path / "out" / "results.json", chunk=7)
    assert json.loads(path.read_text()) == detections.records()


def test_results_of_unknown_images_are_refused(random_case):
    gt, detections = random_case
    detections.image_ids[0] = 999
    with pytest.raises(ValueError, match="999"):
        lvis_ap(gt, detections)


# --- configuration --------------------------------------------------------------------------------


def test_protocol_fields_are_validated_with_allowed_values():
    with pytest.raises(ConfigError, match="eval.scoring: 'softmx' is not one of softmax, sigmoid"):
        EvalConfig(scoring="softmx")
    with pytest.raises(ConfigError, match="eval.protocol: 'fixd' is not one of standard, fixed"):
        apply_overrides(Recipe(), ["eval.protocol=fixd"])  # --set validates the recipe after assigning
    with pytest.raises(ConfigError, match="fixed_dets_per_class"):
        EvalConfig(fixed_dets_per_class=0)


def test_protocol_from_overrides_and_recipes(tmp_path):
    recipe = apply_overrides(Recipe(), ["eval.scoring=sigmoid", "eval.protocol=fixed", "eval.fixed_dets_per_class=50"])
    assert (recipe.eval.scoring, recipe.eval.protocol, recipe.eval.fixed_dets_per_class) == ("sigmoid", "fixed", 50)
    settings = protocol_for(recipe.eval).settings()
    assert settings["max_dets_per_image"] == -1 and settings["top_k_per_image"] is None
    assert settings["description"] == (
        "sigmoid scoring; fixed AP (Dave et al. 2021): no per-image cap, top 50 detections per class"
    )
    path = tmp_path / "r.toml"
    path.write_text('[eval]\nscoring = "sigmod"\n')
    with pytest.raises(ConfigError, match="sigmod"):
        load_recipe(path)
    assert protocol_for(EvalConfig()).settings()["description"] == (
        "softmax scoring; standard: top 900 (box, class) pairs per image, LVIS max 300 per image"
    )
