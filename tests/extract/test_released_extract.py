"""Extraction with the ``released`` preprocessing and text recipe: the cache holds what an
independent re-computation of the released steps gives, and a cache made one way is not resumed
the other way."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from regionspot_cache.cache import CacheFormatError, CacheReader
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from tests.encoders.test_encoders import _manual_vit_tokens
from tests.encoders.test_released_preprocess import hand_released_text, released_clip_input

RELEASED = ExtractConfig(shard_size=2, batch_size=2, num_workers=0, device="cpu", preprocess="released", text_recipe="released")


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def released_cache(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("released")
    annotations = generate_split(root, "val", SyntheticSpec(images=3, seed=5, min_size=64, max_size=120))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    cache = root / "cache"
    run_extraction(dataset, CacheTarget(cache), encoders, RELEASED)
    return dataset, cache


def test_feature_maps_and_text_equal_the_released_steps(released_cache, encoders):
    dataset, cache = released_cache
    reader = CacheReader(cache)
    clip = encoders.clip
    cfg = clip.model.visual.preprocess_cfg
    for entry in dataset.images:
        rgb = np.asarray(load_rgb(dataset.image_path(entry)))
        with torch.no_grad():
            pixels = released_clip_input(rgb, clip.image_size, cfg["mean"], cfg["std"])
            expected = _manual_vit_tokens(clip.model.visual, pixels[None])
        stored = reader.image(entry.id).feature_map.astype(np.float32)
        assert relative_error(stored, expected[0].numpy()) <= 1e-3  # float16 storage: ~3e-4
    vocabulary = reader.vocabulary("toy")
    assert vocabulary.text_recipe == "released"
    expected_text = hand_released_text(clip, vocabulary.names[:4]).numpy()
    assert relative_error(vocabulary.embeddings[:4], expected_text) <= 1e-3


def test_a_released_cache_is_not_resumed_as_direct(released_cache, tiny_models, encoders):
    dataset, cache = released_cache
    with pytest.raises(CacheFormatError, match="preprocess"):
        run_extraction(dataset, CacheTarget(cache), encoders, replace(RELEASED, preprocess="direct"))
    with pytest.raises(CacheFormatError, match="text recipe 'released', this run asks for 'openclip'"):
        run_extraction(dataset, CacheTarget(cache), encoders, replace(RELEASED, text_recipe="openclip"))
    summary = run_extraction(dataset, CacheTarget(cache), encoders, RELEASED)  # the same way resumes
    assert summary.shards_written == 0 and summary.shards_skipped == 2


def test_vocabulary_without_recipe_reads_as_openclip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from regionspot_cache.cache.format import vocabulary_schema, vocabulary_text_recipe

    table = pa.table(
        {
            "category_id": [1],
            "name": ["cat"],
            "frequency": ["f"],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0], pa.float32()), 2),
        },
        schema=vocabulary_schema(2),
    )
    pq.write_table(table, tmp_path / "old.parquet")
    assert vocabulary_text_recipe(pq.read_schema(tmp_path / "old.parquet")) == "openclip"


def test_imported_head_on_a_direct_cache_is_warned(released_cache, tmp_path, caplog):
    from regionspot_cache.cache import CacheWriter
    from regionspot_cache.evaluate.api import released_input_differences

    _, cache = released_cache
    assert released_input_differences("regionspot_bl.pth", cache) == []
    assert released_input_differences(None, cache) == []
    # The same cache as if made the direct way, with an openclip vocabulary.
    direct = tmp_path / "direct"
    provenance = CacheReader(cache).provenance
    provenance.sam.preprocess = "ResizeLongestSide+pixel_mean_std+pad (SamPredictor.set_image)"
    writer = CacheWriter(direct, provenance)
    vocabulary = CacheReader(cache).vocabulary("toy")
    from regionspot_cache.data.datasets import Category

    writer.write_vocabulary(
        "toy", [Category(i, n) for i, n in zip(vocabulary.category_ids, vocabulary.names)], vocabulary.embeddings
    )
    with caplog.at_level("WARNING"):
        found = released_input_differences("regionspot_bl.pth", direct)
    assert found == ["extract.preprocess is 'direct', not 'released'", "extract.text_recipe is 'openclip', not 'released'"]
    assert "regionspot_bl.pth" in caplog.text and "extract.preprocess is 'direct'" in caplog.text
