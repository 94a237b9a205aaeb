"""Training on cached views: both modes end to end, views drawn as a pure function of the key, exact resume."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import EvalConfig, ExtractConfig, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.evaluate import evaluate_head
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.extract.views import extract_views
from regionspot_cache.head.model import load_head
from regionspot_cache.train.data import CachedRegions
from regionspot_cache.train.loop import train_head
from regionspot_cache.train.views import open_views

CONFIG = TrainConfig(
    iterations=6,
    batch_size=2,
    lr=1e-3,
    warmup_iters=2,
    lr_steps=[4, 5],
    max_boxes_per_image=3,
    checkpoint_every=3,
    tensorboard=False,
    device="cpu",
)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models, encoders):
    """A base cache with released views and a copy with consistent views (hflip and one crop)."""
    root = tmp_path_factory.mktemp("views")
    annotations = generate_split(root, "train", SyntheticSpec(images=3, seed=2, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    config = ExtractConfig(shard_size=2, batch_size=3, num_workers=0, device="cpu", views=["hflip", "crop:0.5-0.8"])
    run_extraction(dataset, CacheTarget(root / "released"), encoders, config)
    shutil.copytree(root / "released", root / "consistent")
    for mode in ("released", "consistent"):
        extract_views(dataset, root / mode, replace(config, views_mode=mode), encoders=encoders)
    return {"released": root / "released", "consistent": root / "consistent", "annotations": annotations}


@pytest.mark.parametrize("mode", ["released", "consistent"])
def test_train_on_views_then_evaluate_on_the_identity(caches, mode, tmp_path):
    reader = CacheReader(caches[mode])
    views = open_views(reader, [])
    assert [v.name for v in views] == ["identity", "crop-0.5-0.8-0", "hflip"]
    assert all((v.boxes is reader) == (mode == "released" or v.name == "identity") for v in views)
    regions = CachedRegions(reader, reader.vocabulary("toy"), 3, seed=0, views=views)
    keys = [(epoch, index) for epoch in range(8) for index in range(len(regions))]
    picked = [regions.view_of(key) for key in keys]
    assert len(set(picked)) == 3  # every view is drawn
    # A pure function of the key: the same items whatever the batch they are read in.
    whole = regions.read(keys)
    for key, item in zip(keys[::5], whole[::5]):
        single = regions.read([key])[0]
        for field in ("tokens", "feature_map", "labels"):
            np.testing.assert_array_equal(getattr(item, field), getattr(single, field))
    summary = train_head(caches[mode], tmp_path / "head.safetensors", CONFIG)
    assert summary.steps == 6 and math.isfinite(summary.final_loss)
    head, _ = load_head(tmp_path / "head.safetensors")
    metrics = evaluate_head(caches[mode], head, caches["annotations"], EvalConfig(device="cpu")).metrics
    assert 0 <= metrics["AP"] <= 1


def test_views_resume_exactly_and_can_be_chosen(caches, tmp_path):
    reference, output = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    train_head(caches["consistent"], reference, CONFIG)
    train_head(caches["consistent"], output, replace(CONFIG, iterations=3))  # stops after the first state
    train_head(caches["consistent"], output, CONFIG)  # resumes at step 3
    (head_a, _), (head_b, _) = load_head(reference), load_head(output)
    for key, value in head_a.state_dict().items():
        assert head_b.state_dict()[key].equal(value), key
    with pytest.raises(ValueError, match="vflip"):
        train_head(caches["consistent"], tmp_path / "x.safetensors", replace(CONFIG, views=["identity", "vflip"]))
    reader = CacheReader(caches["consistent"])
    assert [v.name for v in open_views(reader, ["hflip"])] == ["hflip"]
