"""The shard-aware order (train/order.py): every image exactly once per epoch, few shards at a
time, a pure function of (seed, step) that DDP ranks share and dataset weights still drive."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from regionspot_cache.choices import TrainOrder
from regionspot_cache.config import ConfigError, Recipe, TrainConfig, apply_overrides
from regionspot_cache.train.order import BatchPlan, EpochSampler, RankBatchSampler, ShardOrder, UniformOrder, epoch_order


def uneven_shards(count: int, seed: int) -> np.ndarray:
    """Shard of each index: ``count`` shards of 1 to 9 images, interleaved (as a cache's failed
    images leave them), with shard ids that are not 0..count-1."""
    rng = np.random.default_rng(seed)
    shards = np.repeat(np.arange(count) * 3 + 1, rng.integers(1, 10, count))
    return rng.permutation(shards)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("count", [1, 5, 13])
@pytest.mark.parametrize("resident", [1, 2, 4, 20])
def test_each_epoch_reads_every_image_once_a_window_of_shards_at_a_time(seed, count, resident):
    shards = uneven_shards(count, seed)
    order = ShardOrder(shards, seed, resident)
    for epoch in range(3):
        permutation = order.permutation(epoch)
        assert sorted(permutation.tolist()) == list(range(len(shards)))
        position = 0
        for window in order.windows(epoch):
            assert 1 <= len(window) <= resident
            size = int(np.isin(shards, window).sum())
            assert set(shards[permutation[position : position + size]].tolist()) == set(window.tolist())
            position += size
        assert position == len(shards)
    assert sorted(np.concatenate(order.windows(0)).tolist()) == sorted(set(shards.tolist()))


def test_epochs_and_seeds_differ_and_images_mix_within_a_window():
    shards = np.repeat(np.arange(8), 16)
    order = ShardOrder(shards, seed=0, resident=4)
    assert not np.array_equal(order.permutation(0), order.permutation(1))
    assert not np.array_equal(order.permutation(0), ShardOrder(shards, seed=1, resident=4).permutation(0))
    first_batch = shards[order.permutation(0)[:16]]
    assert len(set(first_batch.tolist())) > 1  # a batch mixes the resident shards


def test_uniform_order_is_the_earlier_shuffle_draw_for_draw():
    assert np.array_equal(UniformOrder(50, 3, 1).permutation(2), np.random.default_rng([3, 1, 2]).permutation(50))
    assert isinstance(epoch_order(TrainOrder.UNIFORM, np.zeros(5), 0, 0, 4), UniformOrder)


@pytest.mark.parametrize("start", [0, 5, 23, 41])
def test_a_sampler_started_anywhere_continues_the_same_sequence(start):
    shards = uneven_shards(6, 3)
    order = ShardOrder(shards, 3, 2)
    full = list(itertools.islice(EpochSampler(len(shards), 3, order=order), 60))
    assert list(itertools.islice(EpochSampler(len(shards), 3, start=start, order=order), 60 - start)) == full[start:]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_share_each_global_batch_and_a_resumed_plan_repeats_it(world_size):
    sizes = [40, 24]
    orders = [ShardOrder(np.repeat(np.arange(5), 8), 5, 2, 0), ShardOrder(np.repeat(np.arange(3), 8), 5, 2, 1)]
    plan = BatchPlan(sizes, [3.0, 1.0], 8, 5, orders)
    steps = 60
    batches = list(itertools.islice(plan.global_batches(0), steps))
    ranks = [list(itertools.islice(RankBatchSampler(plan, 0, rank, world_size), steps)) for rank in range(world_size)]
    for step in range(steps):
        assert [key for rank in ranks for key in rank[step]] == batches[step]
    resumed = list(itertools.islice(RankBatchSampler(plan, 17, world_size - 1, world_size), steps - 17))
    assert resumed == ranks[-1][17:]


def test_dataset_weights_hold_and_each_dataset_reads_its_images_once_per_epoch():
    sizes, batch = [64, 32], 8
    orders = [ShardOrder(np.repeat(np.arange(8), 8), 0, 3, 0), ShardOrder(np.repeat(np.arange(4), 8), 0, 3, 1)]
    plan = BatchPlan(sizes, [3.0, 1.0], batch, 0, orders)
    batches = list(itertools.islice(plan.global_batches(0), 4000))
    sources = np.array([keys[0][0] for keys in batches])
    assert abs((sources == 0).mean() - 0.75) < 0.03
    for source, size in enumerate(sizes):
        keys = [key for keys in batches for key in keys if key[0] == source]
        epochs = {}
        for _, epoch, index in keys:
            epochs.setdefault(epoch, []).append(index)
        complete = [indices for epoch, indices in epochs.items() if epoch < max(epochs)]
        assert complete and all(sorted(indices) == list(range(size)) for indices in complete)


def test_config_parses_the_order_and_refuses_a_local_cache_with_the_uniform_order():
    assert apply_overrides(Recipe(), ["train.order=uniform"]).train.order is TrainOrder.UNIFORM
    assert apply_overrides(Recipe(), ["train.resident_shards=3"]).train.resident_shards == 3
    with pytest.raises(ConfigError, match="train.order"):
        apply_overrides(Recipe(), ["train.order=sequential"])
    with pytest.raises(ConfigError, match="local_cache_dir needs train.order"):
        TrainConfig(order=TrainOrder.UNIFORM, local_cache_dir="/tmp/x").validate()
