"""What predict says about each region: the top k classes, the best guess beside a rejection, a
box clipped to the image; labels drawn at the image's edge; and regions without given boxes
(SAM's automatic mask generator, a proposal set)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from regionspot_cache import cli
from regionspot_cache.config import AutoBoxesConfig, OpenSetConfig
from regionspot_cache.data.datasets import BoxSet
from regionspot_cache.drawing import draw_labelled_box
from regionspot_cache.errors import InputError
from regionspot_cache.predict.io import region_label
from regionspot_cache.predict.predictor import Predictor
from tests.helpers import model_args
from tests.predict.conftest import BOXES, VOCAB

runner = CliRunner()
# Thresholds low enough that the tiny random SAM's masks pass (not a statement on their quality).
LOW_THRESHOLDS = AutoBoxesConfig(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def predictor(head_path, encoders):
    return Predictor.from_head_file(head_path, encoders, disk_cache=False)


def test_top_k_ranks_the_vocabulary_and_top_1_keeps_the_plain_shape(predictor, rgb_image):
    plain = predictor.predict(rgb_image, BOXES[:2], VOCAB)
    assert all(r.classes is None and set(r.to_json()) == {"box", "label", "score"} for r in plain)
    everything = predictor.predict(rgb_image, BOXES[:2], VOCAB, top_k=0)
    two = predictor.predict(rgb_image, BOXES[:2], VOCAB, top_k=2)
    for one, ranked, best_two in zip(plain, everything, two):
        scores = [c.score for c in ranked.classes]
        assert sorted(c.label for c in ranked.classes) == sorted(VOCAB) and scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert all(VOCAB[c.category_id] == c.label for c in ranked.classes)
        assert (ranked.classes[0].label, ranked.classes[0].score) == (one.label, pytest.approx(one.score, rel=1e-6))
        assert best_two.classes == ranked.classes[:2]
        assert best_two.to_json()["classes"] == [
            {"label": c.label, "category_id": c.category_id, "score": c.score} for c in ranked.classes[:2]
        ]
    assert len(predictor.predict(rgb_image, BOXES[:1], VOCAB, top_k=10)[0].classes) == len(VOCAB)
    with pytest.raises(InputError, match="top_k: -1 is not a count"):
        predictor.predict(rgb_image, BOXES, VOCAB, top_k=-1)


def test_a_rejected_region_keeps_its_best_guess(predictor, rgb_image):
    plain = predictor.predict(rgb_image, BOXES, VOCAB)
    rejected = predictor.predict(rgb_image, BOXES, VOCAB, open_set=OpenSetConfig("max-sigmoid", threshold=1.0))
    for one, region in zip(plain, rejected):
        assert region.label is None and region.rejected
        assert (region.best_guess.label, region.best_guess.category_id) == (one.label, VOCAB.index(one.label))
        assert region.best_guess.score == pytest.approx(one.score, rel=1e-6)
        shown = region.to_json()
        assert shown["rejected"] is True and shown["label"] is None
        assert shown["best_guess"] == {
            "label": one.label,
            "category_id": VOCAB.index(one.label),
            "score": region.best_guess.score,
        }
        assert region_label(region) == f"none (best: {one.label} {region.best_guess.score:.2f})"
    kept = predictor.predict(rgb_image, BOXES, VOCAB, open_set=OpenSetConfig("max-sigmoid", threshold=0.0))
    assert all(not r.rejected and "rejected" not in r.to_json() and "best_guess" not in r.to_json() for r in kept)


def test_a_clipped_box_says_so_and_keeps_the_box_given(predictor, rgb_image):
    regions = predictor.predict(rgb_image, BOXES, VOCAB)
    assert [r.clipped for r in regions] == [False, False, True]
    assert regions[2].box == [0, 0, 140, 90] and regions[2].given_box == [-5, 0, 150, 95]
    shown = regions[2].to_json()
    assert shown["clipped"] is True and shown["given_box"] == [-5, 0, 150, 95] and shown["box"] == [0, 0, 140, 90]
    assert "clipped" not in regions[0].to_json() and "given_box" not in regions[0].to_json()


def _text_pixels(canvas: Image.Image) -> int:
    """Pixels of the white (anti-aliased) text: redder than the tag (red 31) and the black ground."""
    return int((np.asarray(canvas)[..., 0] > 60).sum())


@pytest.mark.parametrize(
    "box",
    [
        (70, 30, 99, 60),  # at the right edge: the tag is wider than the room left of the edge
        (0, 0, 30, 20),  # at the top left corner: no room above
        (75, 65, 99, 79),  # in the bottom right corner of a short image
    ],
)
def test_a_label_at_the_image_edge_is_drawn_whole(box):
    """The same tag on a canvas with room all around shows as many text pixels: none cut off."""
    font = ImageFont.load_default(size=12)
    label = "traffic light 0.97"
    canvas = Image.new("RGB", (100, 80), "black")
    draw_labelled_box(ImageDraw.Draw(canvas), box, label, "#1f77b4", font, 1)
    roomy = Image.new("RGB", (400, 300), "black")
    draw_labelled_box(ImageDraw.Draw(roomy), tuple(v + 150 for v in box), label, "#1f77b4", font, 1)
    assert _text_pixels(canvas) == _text_pixels(roomy) > 50


def test_auto_boxes_come_from_sams_automatic_mask_generator(predictor, rgb_image):
    found = predictor.auto_boxes(rgb_image, LOW_THRESHOLDS)
    assert len(found) >= 1
    assert (found.xyxy[:, 2:] > found.xyxy[:, :2]).all() and (found.xyxy >= 0).all()
    assert (found.xyxy[:, [0, 2]] <= 140).all() and (found.xyxy[:, [1, 3]] <= 90).all()
    assert list(found.scores) == sorted(found.scores, reverse=True)
    assert len(predictor.auto_boxes(rgb_image, AutoBoxesConfig(points_per_side=1, pred_iou_thresh=1.0))) == 0  # nothing passes
    regions = predictor.predict(rgb_image, found, VOCAB)
    assert [r.box for r in regions] == found.xyxy.tolist()
    assert [r.proposal_score for r in regions] == pytest.approx(found.scores.tolist())
    assert all("proposal_score" in r.to_json() for r in regions)


def test_auto_boxes_with_sam_2(tmp_path, rgb_image):
    """SAM 2.1's own generator, with the loaded model (the tiny one's input is 256, not 1024)."""
    from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
    from regionspot_cache.encoders import load_frozen_encoders
    from regionspot_cache.predict.proposals import automatic_boxes

    encoders = load_frozen_encoders(write_tiny_checkpoints(tmp_path, sam_variant="sam2_tiny"), torch.device("cpu"))
    found = automatic_boxes(encoders, rgb_image, LOW_THRESHOLDS)
    assert len(found) >= 1 and (found.xyxy[:, 2:] > found.xyxy[:, :2]).all()
    assert len(automatic_boxes(encoders, rgb_image, AutoBoxesConfig(points_per_side=1, pred_iou_thresh=1.0))) == 0


def test_predict_with_given_scores_keeps_them(predictor, rgb_image):
    boxes = BoxSet(np.asarray(BOXES[:2], np.float32), np.full(2, -1), np.asarray([0.9, 0.4], np.float32))
    regions = predictor.predict(rgb_image, boxes, VOCAB)
    assert [r.proposal_score for r in regions] == pytest.approx([0.9, 0.4])
    assert [r.label for r in regions] == [r.label for r in predictor.predict(rgb_image, BOXES[:2], VOCAB)]


@pytest.fixture()
def scene(tmp_path, rgb_image, tiny_models, head_path):
    """An image, a manifest whose annotations list it and a second image, a COCO-results proposal
    set for both, and the command line up to the boxes."""
    (tmp_path / "images").mkdir()
    Image.fromarray(rgb_image).save(tmp_path / "images" / "scene.png")
    images = [{"id": 7, "file_name": "scene.png", "width": 140, "height": 90}]
    images.append({"id": 8, "file_name": "other.png", "width": 140, "height": 90})
    images.append({"id": 9, "file_name": "empty.png", "width": 140, "height": 90})  # the detector found nothing
    Image.fromarray(rgb_image).save(tmp_path / "images" / "empty.png")
    categories = [{"id": 1, "name": "thing"}]
    (tmp_path / "annotations.json").write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    proposals = [
        {"image_id": 7, "bbox": [10, 5, 50, 35], "score": 0.4, "category_id": 1},
        {"image_id": 7, "bbox": [100, 40, 60, 60], "score": 0.8, "category_id": 1},  # runs past the right edge
        {"image_id": 7, "bbox": [300, 300, 10, 10], "score": 0.9, "category_id": 1},  # outside the image
        {"image_id": 8, "bbox": [0, 0, 20, 20], "score": 0.7, "category_id": 1},
    ]
    (tmp_path / "proposals.json").write_text(json.dumps(proposals))
    (tmp_path / "scene.toml").write_text(
        'name = "scene"\nannotations = "annotations.json"\nimage_root = "images"\n[proposals]\ndetector = "proposals.json"\n'
    )
    out = tmp_path / "scene.regions.png"
    command = ["predict", str(tmp_path / "images" / "scene.png"), "--head", str(head_path), *model_args(tiny_models)]
    return tmp_path, [*command, "--text-cache", str(tmp_path / "text"), "--vocab", ",".join(VOCAB), "--out", str(out)]


def test_predict_command_takes_a_manifests_proposal_set(scene):
    root, command = scene
    result = runner.invoke(
        cli.app, [*command, "--manifest", str(root / "scene.toml"), "--data-root", str(root), "--boxes", "detector"]
    )
    assert result.exit_code == 0, result.output
    regions = json.loads(result.stdout)
    assert [r["proposal_score"] for r in regions] == pytest.approx([0.8, 0.4])  # best first, the outside one left out
    assert regions[0]["clipped"] is True and regions[0]["given_box"] == [100, 40, 160, 100]
    assert regions[0]["box"] == [100, 40, 140, 90] and "clipped" not in regions[1]
    assert "1 of its boxes for scene.png have no area inside the image" in " ".join(result.stderr.split())
    assert "1 clipped to the image 140x90" in " ".join(result.stderr.split())
    assert (root / "scene.regions.png").is_file()

    command[1] = str(root / "images" / "empty.png")
    empty = runner.invoke(
        cli.app, [*command, "--manifest", str(root / "scene.toml"), "--data-root", str(root), "--boxes", "detector"]
    )
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout) == [] and "no regions: the proposal file of --boxes detector" in " ".join(
        empty.stderr.split()
    )


def test_predict_command_takes_a_proposal_file_for_one_image(scene):
    root, command = scene
    refused = runner.invoke(cli.app, [*command, "--boxes", str(root / "proposals.json")])
    assert refused.exit_code != 0 and "proposals for 2 images" in " ".join(str(refused.exception).split())
    chosen = runner.invoke(cli.app, [*command, "--boxes", str(root / "proposals.json"), "--image-id", "8", "--top-k", "all"])
    assert chosen.exit_code == 0, chosen.output
    (region,) = json.loads(chosen.stdout)
    assert region["box"] == [0, 0, 20, 20] and len(region["classes"]) == len(VOCAB)
    named = runner.invoke(cli.app, [*command, "--boxes", "detector"])
    assert named.exit_code != 0 and "neither boxes" in str(named.exception)


def test_predict_command_auto_boxes(scene):
    root, command = scene
    low = ["points_per_side=2", "pred_iou_thresh=0", "stability_score_thresh=0"]
    sets = [arg for setting in low for arg in ("--set", f"predict.auto_boxes.{setting}")]
    result = runner.invoke(
        cli.app, [*command, "--boxes", "auto", *sets, "--reject", "max-sigmoid", "--set", "eval.open_set.threshold=1.0"]
    )
    assert result.exit_code == 0, result.output
    regions = json.loads(result.stdout)
    assert regions and all(r["label"] is None and r["best_guess"]["label"] in VOCAB and "proposal_score" in r for r in regions)
    assert (root / "scene.regions.png").is_file()

    nothing = ["--set", "predict.auto_boxes.points_per_side=1", "--set", "predict.auto_boxes.pred_iou_thresh=1.0"]
    none = runner.invoke(cli.app, [*command, "--boxes", "auto", *nothing])
    assert none.exit_code == 0, none.output
    assert json.loads(none.stdout) == []
    message = " ".join(none.stderr.split())
    assert message.startswith("no regions: SAM's automatic mask generator") and "found no boxes" in message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--boxes", "10,5,60,40", "--top-k", "two"], "--top-k: 'two' is not a count"),
        (["--boxes", "10,5,60,40", "--image-id", "3"], "--image-id picks the image in a proposal file"),
        (["--boxes", "auto", "--image-id", "3"], "--image-id picks the image in a proposal file"),
        (["--boxes", "glip"], "--boxes: 'glip' is neither boxes"),
    ],
)
def test_predict_command_refuses_bad_box_sources(scene, args, message):
    _, command = scene
    result = runner.invoke(cli.app, [*command, *args])
    assert result.exit_code != 0 and message in str(result.exception)
