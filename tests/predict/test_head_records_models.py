"""A trained head records the SAM and CLIP of its training cache, so that `rs-cache predict --head`
needs no model flags while the weight files are where they were; flags still override, a moved
file is one error line naming it and the flag, and heads without the record work with flags."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from regionspot_cache import cli
from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ExtractConfig, Preprocessing, TextRecipe, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import load_frozen_encoders
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import load_head
from regionspot_cache.head.recorded import inputs_of_head
from regionspot_cache.identity import TrainedWith
from regionspot_cache.predict.predictor import Predictor
from regionspot_cache.train.loop import train_head
from tests.helpers import model_args

runner = CliRunner()
TRAIN = TrainConfig(iterations=2, batch_size=2, warmup_iters=1, lr_steps=[1], max_boxes_per_image=3, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny models in a directory of their own (a test moves them), a cache and a head trained on it."""
    root = tmp_path_factory.mktemp("recorded")
    models = write_tiny_checkpoints(root / "models", seed=0)
    annotations = generate_split(root, "val", SyntheticSpec(images=2, seed=5, min_size=48, max_size=64))
    encoders = load_frozen_encoders(models, torch.device("cpu"))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, ExtractConfig(num_workers=0, device="cpu"))
    train_head(root / "cache", root / "head.safetensors", TRAIN)
    image = root / "scene.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    return root, models, image


def _predict(root, image, *args: str):
    base = ["predict", str(image), "--head", str(root / "head.safetensors"), "--boxes", "2,2,40,30", "--vocab", "red,blue"]
    return runner.invoke(cli.app, [*base, "--text-cache", str(root / "text"), "--out", str(root / "o.png"), *args])


def test_the_head_records_its_training_caches_models(trained):
    root, models, _ = trained
    _, metadata = load_head(root / "head.safetensors")
    provenance = CacheReader(root / "cache").provenance
    assert metadata.encoders == TrainedWith(provenance.sam, provenance.clip, provenance.weights, "openclip")
    assert metadata.encoders.models() == models  # the same files, found again
    recorded = json.loads((root / "head.json").read_text())["encoders"]
    assert recorded["sam"]["checkpoint_sha256"] == provenance.sam.checkpoint_sha256
    assert recorded["paths"]["sam_checkpoint"] == models.sam.checkpoint


def test_predict_needs_no_model_flags_and_flags_still_override(trained):
    root, models, image = trained
    alone = _predict(root, image)
    assert alone.exit_code == 0, alone.output
    flagged = _predict(root, image, *model_args(models))
    assert flagged.exit_code == 0 and json.loads(flagged.stdout) == json.loads(alone.stdout)
    # A flag wins over the record: a CLIP weights file that does not exist is reported as given.
    wrong = _predict(root, image, "--clip-pretrained", str(root / "nowhere.pt"))
    assert wrong.exit_code != 0 and "nowhere.pt" in str(wrong.exception)
    predictor = Predictor.from_files(root / "head.safetensors", device="cpu", disk_cache=False)  # models: the head's
    assert predictor.encoders.spec == models


def test_a_moved_weight_file_is_one_error_line_naming_it_and_the_flag(trained, tmp_path, monkeypatch, capsys):
    root, models, image = trained
    moved = tmp_path / "sam.pth"
    shutil.move(models.sam.checkpoint, moved)
    try:
        argv = ["rs-cache", "predict", str(image), "--head", str(root / "head.safetensors"), "--boxes", "2,2,40,30"]
        monkeypatch.setattr(sys, "argv", [*argv, "--vocab", "red", "--out", str(tmp_path / "o.png")])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        error = " ".join(capsys.readouterr().err.split())
        assert exit_info.value.code == 2 and error.startswith("error:") and len(error.splitlines()) == 1
        assert models.sam.checkpoint in error and "head.json" in error and "pass --sam-checkpoint" in error
        given = _predict(root, image, "--sam-checkpoint", str(moved))
        assert given.exit_code == 0, given.output
    finally:
        shutil.move(moved, models.sam.checkpoint)


def test_a_head_without_the_record_needs_the_model_flags(trained, tmp_path):
    root, models, image = trained
    old = tmp_path / "old.safetensors"
    shutil.copy(root / "head.safetensors", old)
    config = json.loads((root / "head.json").read_text())
    config.pop("encoders")
    old.with_suffix(".json").write_text(json.dumps(config))
    base = ["predict", str(image), "--head", str(old), "--boxes", "2,2,40,30", "--vocab", "red", "--out", str(tmp_path / "o.png")]
    refused = runner.invoke(cli.app, base)
    assert (
        refused.exit_code != 0 and "--sam-checkpoint" in str(refused.exception) and "records no models" in str(refused.exception)
    )
    flagged = runner.invoke(cli.app, [*base, "--text-cache", str(tmp_path / "text"), *model_args(models)])
    assert flagged.exit_code == 0, flagged.output


def test_inputs_follow_the_recorded_cache(trained):
    root, _, _ = trained
    _, metadata = load_head(root / "head.safetensors")
    assert inputs_of_head(metadata) == (Preprocessing.DIRECT, TextRecipe.OPENCLIP)
    metadata.encoders.sam.preprocess = Preprocessing.RELEASED.sam_steps
    metadata.encoders.text_recipe = "released"
    assert inputs_of_head(metadata) == (Preprocessing.RELEASED, TextRecipe.RELEASED)
