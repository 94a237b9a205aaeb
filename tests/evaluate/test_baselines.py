"""The training-free baselines (clip-box, clip-mask) and `rs-cache eval --method/--masks`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from typer.testing import CliRunner

from regionspot_cache.cache import CacheFormatError, CacheReader
from regionspot_cache.cli import app
from regionspot_cache.config import EvalConfig, ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.evaluate.baselines import CropEmbedder, crop_bounds, masked_box_crops, score_cache_with_baseline
from regionspot_cache.evaluate.with_images import cache_images, load_cache_encoders
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head
from regionspot_cache.identity import models_recorded_in

runner = CliRunner()
EVAL = EvalConfig(device="cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("baselines")
    spec = SyntheticSpec(images=3, seed=7, min_size=64, max_size=96, min_objects=1, max_objects=3)
    annotations = generate_split(root, "val", spec)
    dataset = load_coco_format(annotations, root / "images", name="toy")
    config = ExtractConfig(shard_size=8, batch_size=4, num_workers=0, device="cpu")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, config)
    return root, annotations, CacheReader(root / "cache")


def test_crop_bounds_cover_the_box_in_whole_pixels():
    assert crop_bounds(np.array([10.2, 5.0, 20.7, 9.9]), 100, 50) == (10, 5, 21, 10)
    assert crop_bounds(np.array([-3.0, 40.5, 120.0, 50.0]), 100, 50) == (0, 40, 100, 50)
    assert crop_bounds(np.array([99.5, 49.5, 99.6, 49.6]), 100, 50) == (99, 49, 100, 50)  # at least one pixel


def test_clip_box_scores_by_hand_with_open_clip(toy, tiny_models, encoders):
    """Crop by hand, embed with the model and transform open_clip itself builds, softmax with the
    logit scale: each detection's score is that probability (box score 1 for ground truth)."""
    root, _, reader = toy
    vocab = reader.vocabulary("toy")
    images = cache_images(reader, root / "images")
    detections = score_cache_with_baseline(reader, vocab, EVAL, "clip-box", encoders, images).records()
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_models.clip.model, pretrained=tiny_models.clip.pretrained)
    model.eval()
    item = reader.image(reader.image_ids()[0])
    image = Image.open(root / "images" / item.file_name).convert("RGB")
    x1, y1, x2, y2 = item.boxes[0].tolist()
    crop = image.crop((math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)))
    with torch.no_grad():
        embedding = model.encode_image(preprocess(crop)[None])
    embedding = embedding / embedding.norm(dim=-1, keepdim=True)
    probs = torch.softmax(model.logit_scale.exp() * embedding @ torch.from_numpy(vocab.embeddings).T, dim=-1)[0]
    box = np.concatenate([item.boxes[0, :2], item.boxes[0, 2:] - item.boxes[0, :2]]).tolist()  # float32 x, y, w, h
    mine = {d["category_id"]: d["score"] for d in detections if d["image_id"] == item.image_id and d["bbox"] == box}
    assert len(mine) == len(vocab.names)  # few boxes x 12 classes < top 900: every pair is kept
    for category_id, prob in zip(vocab.category_ids.tolist(), probs.tolist()):
        assert mine[category_id] == pytest.approx(prob, rel=1e-4, abs=1e-6)
    per_image = sum(d["image_id"] == item.image_id for d in detections)
    assert per_image == len(item.boxes) * len(vocab.names)


def test_clip_mask_paints_outside_sams_mask_in_the_clip_mean(toy, encoders):
    root, _, reader = toy
    item = reader.image(reader.image_ids()[1])
    image = load_rgb(root / "images" / item.file_name)
    pixels = np.asarray(image)
    fill = CropEmbedder(encoders.clip).mean_colour
    assert fill == tuple(round(255 * m) for m in encoders.clip.model.visual.preprocess_cfg["mean"])
    crops = masked_box_crops(image, item.boxes, encoders, fill, boxes_per_call=2)
    predictor = SamPredictor(encoders.sam.sam)
    predictor.set_image(pixels)
    for box, crop in zip(item.boxes, crops):
        mask = predictor.predict(box=box, multimask_output=False)[0][0]
        left, top, right, bottom = crop_bounds(box, image.width, image.height)
        inside = mask[top:bottom, left:right]
        crop_pixels = np.asarray(crop)
        np.testing.assert_array_equal(crop_pixels[inside], pixels[top:bottom, left:right][inside])
        assert (crop_pixels[~inside] == fill).all()


def test_models_come_from_the_cache_and_others_are_refused(toy, tiny_models, tmp_path):
    _, _, reader = toy
    assert models_recorded_in(reader.provenance) == tiny_models
    other = tmp_path / "clip_other.pt"
    state = torch.load(tiny_models.clip.pretrained, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, other)
    models = models_recorded_in(reader.provenance)
    models.clip.pretrained = str(other)
    with pytest.raises(CacheFormatError, match="clip.logit_scale.*clip.weights_sha256"):
        load_cache_encoders(reader, models, "cpu")


def eval_cli(reader, annotations, *args):
    return runner.invoke(app, ["eval", "-c", str(reader.root), "-a", str(annotations), "--set", "eval.device=cpu", *args])


def test_eval_command_runs_baselines_and_mask_ap(toy, encoders, tmp_path):
    root, annotations, reader = toy
    images = ["--image-root", str(root / "images")]
    output = tmp_path / "clip_box.json"
    result = eval_cli(reader, annotations, "--method", "clip-box", *images, "-o", str(output))
    assert result.exit_code == 0, result.output
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    assert set(metrics) >= {"AP", "APr", "APc", "APf"} and not output.with_suffix(".segm.metrics.json").exists()
    assert "clip-box" in result.output

    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=64))
    save_head(head, tmp_path / "head.safetensors")
    output = tmp_path / "regionspot.json"
    result = eval_cli(reader, annotations, "--head", str(tmp_path / "head.safetensors"), "--masks", *images, "-o", str(output))
    assert result.exit_code == 0, result.output
    assert "LVIS mask AP" in result.output
    segm = json.loads(output.with_suffix(".segm.metrics.json").read_text())
    assert set(segm) >= {"AP", "APr", "APc", "APf"} and all(v is None or 0 <= v <= 1 for v in segm.values())
    detections = json.loads(output.read_text())
    assert detections and all(isinstance(d["segmentation"]["counts"], str) for d in detections)
    assert json.loads(output.with_suffix(".metrics.json").read_text())["AP"] >= 0  # box AP as well


def test_eval_command_takes_model_files_moved_since_extraction(toy, tiny_models, tmp_path):
    """--sam-checkpoint / --clip-pretrained replace the paths cache.json recorded (same weights)."""
    root, annotations, reader = toy
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in (tiny_models.sam.checkpoint, tiny_models.clip.pretrained):
        (moved / Path(name).name).write_bytes(Path(name).read_bytes())
    result = eval_cli(
        reader,
        annotations,
        "--method",
        "clip-box",
        "--image-root",
        str(root / "images"),
        "--sam-checkpoint",
        str(moved / Path(tiny_models.sam.checkpoint).name),
        "--clip-pretrained",
        str(moved / Path(tiny_models.clip.pretrained).name),
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "clip-box" in result.output


def test_eval_command_explains_what_is_missing(toy):
    _, annotations, reader = toy
    result = eval_cli(reader, annotations)
    assert result.exit_code != 0 and "needs --head" in str(result.exception)
    result = eval_cli(reader, annotations, "--method", "clip-box")
    assert "--image-root" in str(result.exception)
    result = eval_cli(reader, annotations, "--method", "clip-boxes", "--image-root", ".")
    assert "clip-box, clip-mask" in str(result.exception)
