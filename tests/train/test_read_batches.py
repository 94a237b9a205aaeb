"""Training batches through the fast read path: same items, every image once per epoch, workers."""

from __future__ import annotations

import numpy as np
import torch

from regionspot_cache.cache import CacheReader, CacheWriter, ImageFeatures, Provenance
from regionspot_cache.data.datasets import BoxSet, Category
from regionspot_cache.identity import ClipIdentity, SamIdentity
from regionspot_cache.train.data import CachedRegions, MultiSourceRegions, ReadBatch, collate_regions, region_loader
from regionspot_cache.train.order import BatchPlan, RankBatchSampler


def _cache(root, images: int = 11, feature_dtype: str = "float16") -> CacheReader:
    rng = np.random.default_rng(0)
    provenance = Provenance(
        dataset="toy",
        box_source="gt",
        shard_size=4,
        planned_shards=3,
        sam=SamIdentity("tiny", "ab", 1024, 256, "", ""),
        clip=ClipIdentity("tiny", None, "cd", [8, 8], 8, 5, 4, 14.3, "", ""),
        feature_dtype=feature_dtype,
    )
    writer = CacheWriter(root, provenance)
    writer.write_vocabulary("toy", [Category(1, "a"), Category(2, "b")], np.eye(2, 6, dtype=np.float32))
    for shard, start in enumerate(range(0, images, 4)):
        batch = []
        for image_id in range(start, min(start + 4, images)):
            count = 1 + image_id % 3
            xyxy = np.tile(np.asarray([[0, 0, 9, 9]], np.float32), (count, 1))
            batch.append(
                ImageFeatures(
                    image_id,
                    f"{image_id}.jpg",
                    10,
                    10,
                    BoxSet(xyxy, 1 + np.arange(count) % 3, np.ones(count, np.float32)),
                    feature_map=np.full((5, 8), image_id, np.float32),
                    box_tokens=rng.normal(size=(count, 256)).astype(np.float32),
                )
            )
        writer.write_shard(shard, batch)
    return CacheReader(root)


def test_batched_reads_equal_single_reads_and_labels_skip_unknown_classes(tmp_path):
    reader = _cache(tmp_path)
    regions = CachedRegions(reader, reader.vocabulary("toy"), max_boxes=100, seed=0)
    keys = [(0, i) for i in (5, 0, 10, 3)]
    for key, read in zip(keys, regions.read(keys)):
        tokens, feature_map, labels = read.tokens, read.feature_map, read.labels
        image_id = regions.image_ids[key[1]]
        item = reader.image(image_id)
        known = np.flatnonzero(item.category_ids <= 2)  # category 3 is not in the vocabulary
        np.testing.assert_array_equal(labels, item.category_ids[known] - 1)
        np.testing.assert_array_equal(tokens, item.tokens[known])
        np.testing.assert_array_equal(feature_map, item.feature_map)
        single = regions[key]
        np.testing.assert_array_equal(single.tokens, tokens)


def test_a_batch_is_read_into_its_tensor_and_collates_as_stacked_items_do(tmp_path):
    reader = _cache(tmp_path)
    sources = MultiSourceRegions([CachedRegions(reader, reader.vocabulary("toy"), 100, seed=0)])
    keys = [(0, 0, i) for i in (9, 2, 5, 0, 7)]  # across the three shards, out of order
    read = sources.__getitems__(keys)
    assert isinstance(read, ReadBatch) and read.maps.shape == (5, 5, 8)
    batch = collate_regions(read)
    assert batch.feature_maps is read.maps  # taken as read, not copied
    stacked = collate_regions(list(read))  # a plain list of the same items: stacked into a new tensor
    for name in ("tokens", "feature_maps", "box_mask", "labels"):
        assert torch.equal(getattr(batch, name), getattr(stacked, name))
    ids = [sources.sources[0].image_ids[i] for *_, i in keys]
    assert batch.feature_maps[:, 0, 0].long().tolist() == ids  # the image id is the map's value


def test_every_image_once_per_epoch_whatever_the_workers(tmp_path):
    reader = _cache(tmp_path)
    sources = MultiSourceRegions([CachedRegions(reader, reader.vocabulary("toy"), 100, seed=0)])
    size = sources.sizes()[0]
    plan = BatchPlan(sources.sizes(), [1.0], batch_size=size, seed=3)  # one batch = one epoch
    seen = {}
    for workers in (0, 1):
        loader = iter(region_loader(sources, RankBatchSampler(plan, 0), workers, 2, pin_memory=False))
        epochs = [next(loader) for _ in range(2)]
        assert all(b.feature_maps.dtype == torch.float16 and b.tokens.dtype == torch.float16 for b in epochs)
        maps = [b.feature_maps[:, 0, 0].long().tolist() for b in epochs]  # the image id is the map's value
        assert sorted(maps[0]) == sorted(maps[1]) == sorted(sources.sources[0].image_ids)
        assert maps[0] != maps[1]  # a new shuffle each epoch
        seen[workers] = maps
    assert seen[0] == seen[1]
    assert epochs[0].to(torch.device("cpu")).feature_maps.dtype == torch.float32


def test_int8_cache_trains_from_the_same_keys(tmp_path):
    half, int8 = _cache(tmp_path / "a"), _cache(tmp_path / "b", feature_dtype="int8")
    keys = [(0, i) for i in range(len(half.image_ids()))]
    a = CachedRegions(half, half.vocabulary("toy"), 100, seed=0).read(keys)
    b = CachedRegions(int8, int8.vocabulary("toy"), 100, seed=0).read(keys)
    for x, y in zip(a, b):
        (ta, ma, la), (tb, mb, lb) = (x.tokens, x.feature_map, x.labels), (y.tokens, y.feature_map, y.labels)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(mb.astype(np.float32), ma.astype(np.float32), rtol=0.01)  # constant rows: exact-ish
        assert np.linalg.norm(tb.astype(np.float32) - ta) / np.linalg.norm(ta.astype(np.float32)) < 0.02


def test_loader_workers_under_a_too_long_tmpdir_are_one_error_not_a_hang(tmp_path, too_long_tmpdir):
    """Python before 3.13 puts the sockets workers hand batches over through under TMPDIR: a path
    too long for one made the worker drop its batch and the loader wait forever."""
    import pytest

    from regionspot_cache.errors import ConfigError

    reader = _cache(tmp_path / "cache")
    sources = MultiSourceRegions([CachedRegions(reader, reader.vocabulary("toy"), 100, seed=0)])
    plan = BatchPlan(sources.sizes(), [1.0], batch_size=4, seed=3)
    refused = r"train.num_workers: loader workers .* too long .* set TMPDIR to a shorter directory, or train.num_workers=0"
    with pytest.raises(ConfigError, match=refused):
        region_loader(sources, RankBatchSampler(plan, 0), 1, 2, pin_memory=False)
    loader = region_loader(sources, RankBatchSampler(plan, 0), 0, 2, pin_memory=False)  # without workers: no socket
    assert next(iter(loader)).feature_maps.shape[0] == 4
