"""Batches within a memory budget: parts sized up front, halved on out-of-memory, never a lost shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regionspot_cache.cache.format import STATUS_FAILED
from regionspot_cache.config import ConfigError, ExtractConfig, Recipe, apply_overrides
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.encoders.memory import FittingBatches, images_within, memory_budget_bytes, sam_image_bytes
from regionspot_cache.extract.mapper import OUT_OF_MEMORY, FeatureMapper
from regionspot_cache.extract.reader import ImageReader

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, encoders):
    """Four decoded images of differing sizes, as the extraction's reader hands them over."""
    root = tmp_path_factory.mktemp("memory")
    annotations = generate_split(root, "train", SyntheticSpec(images=4, seed=5, min_size=64, max_size=120))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    reader = ImageReader(dataset, dataset.images, encoders.sam.resizer(), encoders.clip.preprocess)
    return [reader[i] for i in range(len(reader))]


def _out_of_memory_above(limit: int, calls: list[int]):
    def run(chunk):
        calls.append(len(chunk))
        if len(chunk) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * 10 for item in chunk]

    return run


def test_fitting_batches_halve_on_out_of_memory_and_keep_the_smaller_size():
    calls: list[int] = []
    parts = FittingBatches(8, CPU)
    assert parts.map(list(range(11)), _out_of_memory_above(2, calls)) == [i * 10 for i in range(11)]
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1] and parts.limit == 2


def test_cpu_allocator_failure_counts_as_out_of_memory_but_other_errors_do_not():
    def cpu_oom(chunk):
        if len(chunk) > 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return list(chunk)

    assert FittingBatches(4, CPU).map([1, 2, 3], cpu_oom) == [1, 2, 3]

    def broken(chunk):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        FittingBatches(4, CPU).map([1, 2], broken)


def test_a_single_item_that_does_not_fit_raises():
    with pytest.raises(torch.OutOfMemoryError):
        FittingBatches(4, CPU).map([1, 2, 3], _out_of_memory_above(0, []))


def test_budget_holds_images_by_the_encoder_estimate():
    per_image = sam_image_bytes(768)
    assert images_within(3 * per_image + 2**28, per_image) == 3
    assert images_within(0, per_image) == 1
    assert memory_budget_bytes(2.5, CPU) == int(2.5 * 2**30)
    assert memory_budget_bytes(None, CPU) > 0
    assert sam_image_bytes(1280) > sam_image_bytes(768) > sam_image_bytes(32)


def test_memory_budget_is_validated_like_any_setting():
    recipe = apply_overrides(Recipe(), ["extract.memory_budget_gb=6"])
    assert recipe.extract.memory_budget_gb == 6.0
    with pytest.raises(ConfigError, match="extract.memory_budget_gb: 0.0 must be greater than 0"):
        apply_overrides(recipe, ["extract.memory_budget_gb=0"])  # refused as it is set
    with pytest.raises(ConfigError, match="extract.batch_size: 0 must be at least 1"):
        ExtractConfig(batch_size=0)


def test_small_budget_runs_the_batch_in_parts_with_the_same_features(encoders, loaded):
    whole = FeatureMapper(encoders, ExtractConfig(batch_size=4, device="cpu", memory_budget_gb=64))
    parts = FeatureMapper(encoders, ExtractConfig(batch_size=4, device="cpu", memory_budget_gb=1e-6))
    assert whole.parts.limit == 4 and parts.parts.limit == 1
    for ours, reference in zip(parts(loaded), whole(loaded)):
        assert ours.image_id == reference.image_id
        for name in ("box_tokens", "feature_map"):
            ours_values, reference_values = getattr(ours, name), getattr(reference, name)
            np.testing.assert_allclose(ours_values.astype(np.float32), reference_values.astype(np.float32), atol=2e-3)


def test_out_of_memory_retries_smaller_and_records_an_image_that_never_fits(encoders, loaded, monkeypatch):
    mapper = FeatureMapper(encoders, ExtractConfig(batch_size=4, device="cpu", memory_budget_gb=64))
    embed = encoders.sam.embed_images
    too_big = loaded[2].entry.id
    sizes: list[int] = []

    def embed_within_two(resized):
        sizes.append(len(resized))
        if len(resized) > 2 or any(x is loaded[2].sam_pixels for x in resized):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return embed(resized)

    monkeypatch.setattr(encoders.sam, "embed_images", embed_within_two)
    results = mapper(loaded)
    assert [r.image_id for r in results] == [item.entry.id for item in loaded]
    failed = [r for r in results if r.status == STATUS_FAILED]
    assert [(r.image_id, r.reason) for r in failed] == [(too_big, OUT_OF_MEMORY)]
    assert sizes == [4, 2, 2, 1, 1] and mapper.parts.limit == 1
