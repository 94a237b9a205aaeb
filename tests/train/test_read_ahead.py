"""The shard read-ahead (train/read_ahead.py): reads the shards the coming batches need, in order of
first use and at most ``ahead`` beyond the loader; stops cleanly; never changes the batches."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from regionspot_cache.cache import CacheReader, CacheWriter, ImageFeatures, Provenance
from regionspot_cache.cache.format import FEATURES_DIR, SHARDS_DIR, shard_name
from regionspot_cache.choices import TrainOrder
from regionspot_cache.config import TrainConfig
from regionspot_cache.data.datasets import BoxSet, Category
from regionspot_cache.identity import ClipIdentity, SamIdentity
from regionspot_cache.train import read_ahead
from regionspot_cache.train.data import open_sources
from regionspot_cache.train.distributed import Processes
from regionspot_cache.train.loader import training_loader
from regionspot_cache.train.local_reader import LocalShardReader
from regionspot_cache.train.loop import resume_identity
from regionspot_cache.train.order import BatchPlan, RankBatchSampler, ShardOrder
from regionspot_cache.train.read_ahead import ReadAheadSampler, ShardDir, ShardReadAhead, shard_directories
from regionspot_cache.train.shard_cache import shard_schedule, tree_bytes
from tests.helpers import wait_until

THREAD = "shard-read-ahead"


def fake_shards(root, sizes: list[int]):
    """Feature directories of shards ``0..len(sizes)-1``, shard ``i`` holding ``sizes[i]`` bytes in two files."""
    for shard, size in enumerate(sizes):
        where = root / SHARDS_DIR / shard_name(shard) / FEATURES_DIR
        (where / "c").mkdir(parents=True)
        (where / "zarr.json").write_bytes(os.urandom(size // 4))
        (where / "c" / "0").write_bytes(os.urandom(size - size // 4))
    return root


def recording(root, read: list[int], fetched: bool = False):
    """``directories`` for the shards under ``root``, recording each shard it is asked for (just before its read)."""

    def directories(key):
        read.append(key[1])
        return [ShardDir(root / SHARDS_DIR / shard_name(key[1]) / FEATURES_DIR, fetched)]

    return directories


def read_ahead_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD]


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_reads_each_shard_once_in_order_of_first_use_never_more_than_ahead_beyond_the_loader(tmp_path, ahead):
    sizes = [1000, 3000, 2000, 5000, 1500, 2500, 4000]
    root = fake_shards(tmp_path, sizes)
    shards = np.repeat(np.arange(len(sizes)), 4)
    order = ShardOrder(shards, seed=3, resident=2)
    keys = [(0, 0, int(i)) for i in order.permutation(0)]
    batches = [keys[i : i + 4] for i in range(0, len(keys), 4)]
    first_step = {}
    for step, step_shards in shard_schedule(batches, [shards], 0):
        for _, shard in step_shards:
            first_step.setdefault(shard, step)
    walk = list(first_step)  # shards in order of first use
    read: list[int] = []
    read_ahead = ShardReadAhead(shard_schedule(batches, [shards], 0), recording(root, read), ahead)
    read_ahead.start()
    try:
        expected_waits, expected = 0, []
        for reached in range(-1, len(batches)):
            if reached >= 0:
                read_ahead.reached(reached)
            allowed = sum(step <= reached for step in first_step.values()) + ahead
            now = walk[: min(allowed, len(walk))]
            if now == expected:
                continue  # nothing more may be read: it goes on waiting
            expected = now
            if len(expected) == len(walk):
                wait_until(lambda: not read_ahead_threads(), "the read-ahead to finish the schedule", poll_s=0.01)
            else:
                expected_waits += 1
                wait_until(lambda n=expected_waits: read_ahead.stats.waits == n, "the read-ahead to wait", poll_s=0.01)
            assert read == expected  # exactly these: never more than ``ahead`` beyond the loader
            assert read_ahead.stats.bytes == sum(sizes[shard] for shard in read)  # every file, whole
            assert read_ahead.stats.shards == len(read)
        assert read == walk
    finally:
        read_ahead.close()
    assert not read_ahead_threads()


def test_closing_stops_it_while_it_waits_for_the_loader_or_for_a_shard_to_arrive(tmp_path):
    root = fake_shards(tmp_path / "cache", [1000, 1000, 1000])
    shards = np.arange(3)
    batches = [[(0, 0, 0)], [(0, 0, 1)], [(0, 0, 2)]]
    read: list[int] = []
    waiting = ShardReadAhead(shard_schedule(batches, [shards], 0), recording(root, read), ahead=1).start()
    wait_until(lambda: waiting.stats.waits == 1, "the read-ahead to wait for the loader", poll_s=0.01)
    waiting.close()
    assert not read_ahead_threads() and read == [0]

    # A local shard cache's shard lands later (by a rename): it is read once there; one that never
    # lands holds the thread only until it is closed.
    local = tmp_path / "local"
    read = []
    arriving = ShardReadAhead(shard_schedule(batches, [shards], 0), recording(local, read, fetched=True), ahead=3)
    arriving.start()
    wait_until(lambda: read, "the read-ahead to look for shard 0", poll_s=0.01)
    assert read == [0] and arriving.stats.shards == 0
    (local / SHARDS_DIR).mkdir(parents=True)
    os.rename(root / SHARDS_DIR / shard_name(0), local / SHARDS_DIR / shard_name(0))
    wait_until(lambda: len(read) > 1, "the read-ahead to read shard 0 and look for shard 1", poll_s=0.01)
    assert read == [0, 1]  # waiting for shard 1 to land
    assert arriving.stats.shards == 1 and arriving.stats.bytes == 1000
    arriving.close()
    assert not read_ahead_threads()

    # A shard missing from a cache read in place is not waited for (the loader's read reports it).
    read = []
    missing = ShardReadAhead(shard_schedule(batches, [shards], 0), recording(root, read), ahead=3).start()
    wait_until(lambda: not read_ahead_threads(), "the read-ahead to finish the schedule", poll_s=0.01)
    assert read == [0, 1, 2] and missing.stats.shards == 3 and missing.stats.bytes == 2000


def test_an_endless_plan_over_a_few_shards_is_walked_only_so_far_ahead_and_closes(tmp_path, monkeypatch):
    """Once every shard is recent the steps read nothing: the walk still waits for the loader."""
    monkeypatch.setattr(read_ahead, "STEPS_AHEAD", 5)
    root = fake_shards(tmp_path / "cache", [1000, 1000])
    drawn: list[int] = []

    def endless():
        step = 0
        while True:
            drawn.append(step)
            yield step, [(0, step % 2)]
            step += 1

    walker = ShardReadAhead(endless(), recording(root, []), ahead=2).start()
    wait_until(lambda: walker.stats.step_waits == 1, "the walk to wait for the loader", poll_s=0.01)
    assert drawn[-1] == 5 and walker.stats.shards == 2  # step 5 waits for the loader to reach step 0
    walker.reached(3)
    wait_until(lambda: walker.stats.step_waits == 2, "the walk to wait again", poll_s=0.01)
    assert drawn[-1] == 9
    walker.close()
    assert not read_ahead_threads()


def test_the_walk_leads_by_two_windows_of_the_source_slowest_through_its_shards():
    shards = [np.repeat(np.arange(4), 8), np.repeat(np.arange(3), 4)]  # 8 and 4 images a shard
    plan = BatchPlan([32, 12], [3.0, 1.0], batch_size=8, seed=0)
    sampler = ReadAheadSampler(RankBatchSampler(plan, 0), shards, lambda key: [], ahead=2)
    # source 0: 2 windows x 2 shards x 8 images / (8 images a step x 3/4 of the steps) = 5.3 steps; source 1: 8
    assert sampler.window_steps() == 8


def toy_cache(root, images: int = 24, per_shard: int = 4) -> CacheReader:
    rng = np.random.default_rng(0)
    provenance = Provenance(
        dataset="toy",
        box_source="gt",
        shard_size=per_shard,
        planned_shards=-(-images // per_shard),
        sam=SamIdentity("tiny", "ab", 1024, 256, "", ""),
        clip=ClipIdentity("tiny", None, "cd", [8, 8], 8, 5, 4, 14.3, "", ""),
    )
    writer = CacheWriter(root, provenance)
    writer.write_vocabulary("toy", [Category(1, "a"), Category(2, "b")], np.eye(2, 6, dtype=np.float32))
    for shard, start in enumerate(range(0, images, per_shard)):
        batch = []
        for image_id in range(start, min(start + per_shard, images)):
            count = 1 + image_id % 3
            boxes = BoxSet(np.tile(np.float32([[0, 0, 9, 9]]), (count, 1)), 1 + np.arange(count) % 2, np.ones(count, np.float32))
            features = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(count, 256)).astype(np.float32)
            batch.append(ImageFeatures(image_id, f"{image_id}.jpg", 10, 10, boxes, *features))
        writer.write_shard(shard, batch)
    return CacheReader(root)


def test_shard_directories_are_the_feature_arrays_of_the_cache_or_of_its_local_copy(tmp_path):
    reader = toy_cache(tmp_path / "cache")
    where = shard_directories([[reader]])((0, 2))
    assert where == [ShardDir(tmp_path / "cache" / SHARDS_DIR / shard_name(2) / FEATURES_DIR)]
    assert tree_bytes(where[0].path) > 5 * 8 * 2 * 4  # the feature maps of its 4 images are there
    local = LocalShardReader.of(reader, tmp_path / "local" / "0")
    copy = tmp_path / "local" / "0" / SHARDS_DIR / shard_name(2) / FEATURES_DIR
    assert shard_directories([[], [local]])((1, 2)) == [ShardDir(copy, fetched=True)]
    assert shard_directories([[], [local]])((0, 2)) == []  # a source with nothing to read ahead


CONFIG = TrainConfig(iterations=9, batch_size=4, max_boxes_per_image=3, order=TrainOrder.SHARDS, resident_shards=2, device="cpu")


def loader_batches(cache, config: TrainConfig, start: int, count: int) -> tuple[list, object]:
    feed = training_loader(open_sources([cache], [], []), config, start, Processes(), pin_memory=False)
    try:
        return [batch for _, batch in zip(range(count), feed.batches)], feed
    finally:
        feed.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_training_reads_the_same_batches_with_read_ahead_and_leaves_no_thread(tmp_path, workers):
    toy_cache(tmp_path / "cache")
    config = replace(CONFIG, num_workers=workers)
    for start, count in ((0, 9), (3, 6), (2, 3)):  # to the end, resumed, and stopped early
        plain, _ = loader_batches(tmp_path / "cache", replace(config, read_ahead_shards=0), start, count)
        ahead, feed = loader_batches(tmp_path / "cache", config, start, count)
        assert isinstance(feed.read_ahead, ReadAheadSampler) and feed.read_ahead.last is not None
        assert len(ahead) == len(plain) == count
        for a, b in zip(ahead, plain):
            assert torch.equal(a.feature_maps, b.feature_maps) and torch.equal(a.tokens, b.tokens)
            assert torch.equal(a.labels, b.labels)
        assert not read_ahead_threads()


def test_read_ahead_is_the_next_window_by_default_for_the_shard_order_alone_and_not_part_of_a_run_s_identity(tmp_path):
    toy_cache(tmp_path / "cache")
    _, feed = loader_batches(tmp_path / "cache", replace(CONFIG, order=TrainOrder.UNIFORM), 0, 1)
    assert feed.read_ahead is None
    _, feed = loader_batches(tmp_path / "cache", CONFIG, 0, 1)
    assert feed.read_ahead.ahead == CONFIG.resident_shards  # by default: the next window
    _, feed = loader_batches(tmp_path / "cache", replace(CONFIG, read_ahead_shards=1), 0, 1)
    assert feed.read_ahead.ahead == 1
    sources = open_sources([tmp_path / "cache"], [], [])
    assert resume_identity(CONFIG, sources) == resume_identity(replace(CONFIG, read_ahead_shards=0), sources)
