"""The processes of one node share one local shard cache (train/node_share.py): the node fetches
each shard once per epoch, within one budget for the node, and every process reads the same
batches as it reads from the cache itself. Each rank is a real process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from regionspot_cache.cache.format import SHARDS_DIR, shard_name
from regionspot_cache.choices import TrainOrder
from regionspot_cache.config import ConfigError, ExtractConfig, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.train.data import open_sources
from regionspot_cache.train.distributed import Processes
from regionspot_cache.train.loader import dataset_orders, training_loader, training_regions
from regionspot_cache.train.node_share import PROGRESS_FILE, NodeShare, node_root
from regionspot_cache.train.order import BatchPlan, RankBatchSampler
from regionspot_cache.train.shard_cache import ShardCache, shard_schedule, tree_bytes
from tests.helpers import ForkedPython, python, wait_until

ROOT = Path(__file__).resolve().parents[2]  # for the rank processes to import tests.*
IMAGES, SHARD_SIZE, BATCH, RANKS = 12, 2, 4, 2
CONFIG = TrainConfig(
    batch_size=BATCH, device="cpu", order=TrainOrder.SHARDS, resident_shards=2, max_boxes_per_image=3, num_workers=0
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_models, encoders):
    root = tmp_path_factory.mktemp("ranks_cache")
    annotations = generate_split(root, "train", SyntheticSpec(images=IMAGES, seed=4, min_size=64, max_size=80))
    dataset = load_coco_format(annotations, root / "images", name="toy")
    config = ExtractConfig(num_workers=0, device="cpu", shard_size=SHARD_SIZE)
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, config)
    return root / "cache"


def digest(batch) -> str:
    arrays = (batch.tokens, batch.feature_maps, batch.box_mask, batch.labels)
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in arrays)).hexdigest()


# One rank: its batches read through the node's shared cache (gloo only to gather the node's
# directory, as in training), a digest of each, and what it measured; it kills itself at step
# ``die_at`` (-1: never), as a process killed mid-run.
RANK = textwrap.dedent(
    """
    import json, os, signal, sys
    from dataclasses import replace
    import torch.distributed as dist
    from regionspot_cache.train.data import open_sources
    from regionspot_cache.train.distributed import Processes
    from regionspot_cache.train.loader import training_loader
    from regionspot_cache.train.shard_cache import tree_bytes
    from tests.train.test_shard_cache_ranks import CONFIG, digest

    cache, local, budget, start, iterations, die_at, out, store = sys.argv[1:]
    start, die_at = int(start), int(die_at)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    processes = Processes(rank, world, int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    config = replace(CONFIG, iterations=int(iterations), local_cache_dir=local, local_cache_gb=float(budget))
    feed = training_loader(open_sources([cache], [], []), config, start, processes, False)
    shards = feed.shard_cache.local_dir(0)
    digests, peak = [], 0
    for step, batch in zip(range(start, config.iterations), feed.batches):
        if step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        feed.shard_cache.delivered(step)
        digests.append(digest(batch))
        peak = max(peak, tree_bytes(shards))
    dist.barrier()  # as DDP's last step does: no process closes while another still reads
    stats = feed.shard_cache.stats
    feed.close()
    json.dump({"digests": digests, "fetches": stats.fetches, "fetched_bytes": stats.fetched_bytes,
               "evictions": stats.evictions, "peak": peak, "peak_stats": stats.peak_disk_bytes,
               "root": str(feed.shard_cache.local_root)}, open(out, "w"))
    """
)


def start_ranks(cache, local, budget_gb, start, iterations, tmp_path, name, die_at=-1, nodes=1) -> list[ForkedPython]:
    """RANKS processes per node, ``nodes`` nodes, as torchrun numbers them; node n's local
    directory is ``local`` on node 0, ``local-<n>`` on the others (each node its own disk)."""
    store = tmp_path / f"{name}.store"
    ranks = []
    for rank in range(RANKS * nodes):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            WORLD_SIZE=str(RANKS * nodes),
            LOCAL_RANK=str(rank % RANKS),
            LOCAL_WORLD_SIZE=str(RANKS),
            PYTHONPATH=str(ROOT),
        )
        node_local = f"{local}-{rank // RANKS}" if rank >= RANKS else local
        out = tmp_path / f"{name}-{rank}.json"
        args = [cache, node_local, budget_gb, start, iterations, die_at if rank == 1 else -1, out, store]
        with open(tmp_path / f"{name}-{rank}.log", "w") as log:
            ranks.append(python(["-c", RANK, *map(str, args)], env=env, stderr=log))
    return ranks


def finish(ranks: list[ForkedPython], tmp_path, name) -> list[dict]:
    """Wait for the ranks to end, with no deadline (a stuck rank fails the run, not a timer); one
    that fails ends the wait (the other may wait for it forever) and the test."""
    ended = lambda: all(p.poll() is not None for p in ranks) or any(p.poll() not in (None, 0) for p in ranks)  # noqa: E731
    try:
        wait_until(ended, "the ranks to end", watched=ranks, poll_s=0.01)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.wait()
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, f"rank {rank}: {(tmp_path / f'{name}-{rank}.log').read_text()[-3000:]}"
    return [json.loads((tmp_path / f"{name}-{rank}.json").read_text()) for rank in range(len(ranks))]


def direct_batches(cache, iterations: int, start: int = 0, world: int = RANKS) -> tuple[list[list[str]], list[list], np.ndarray]:
    """Each of ``world`` ranks' batch digests read from the cache itself (no local cache), its
    keys, and the shard of each image."""
    sources = open_sources([cache], [], [])
    config = replace(CONFIG, iterations=iterations)
    plan = BatchPlan([IMAGES], [1.0], BATCH, config.seed, dataset_orders(training_regions(sources, config), config))
    digests, keys = [], []
    for rank in range(world):
        feed = training_loader(sources, config, start, Processes(rank, world, rank, 1), pin_memory=False)
        digests.append([digest(batch) for _, batch in zip(range(start, iterations), feed.batches)])
        feed.close()
        keys.append(list(zip(range(start, iterations), RankBatchSampler(plan, start, rank, world))))
    return digests, keys, training_regions(sources, config).sources[0].shards()


def _largest(cache) -> int:
    return max(tree_bytes(p) for p in (cache / SHARDS_DIR).iterdir() if p.is_dir())


def test_the_ranks_of_a_node_fetch_each_shard_once_per_epoch_and_read_the_same_batches(cache, tmp_path):
    epoch = IMAGES // BATCH
    reference, keys, shard_of = direct_batches(cache, epoch)
    budget = 5 * _largest(cache)  # of the 6 shards; a step of the node reads up to 4
    local = tmp_path / "local"
    results = finish(start_ranks(cache, local, budget / 1e9, 0, epoch, tmp_path, "shared"), tmp_path, "shared")
    assert [r["digests"] for r in results] == reference
    # Every image once in the epoch, between the two ranks.
    images = sorted(index for rank_keys in keys for _, step_keys in rank_keys for _, _, index in step_keys)
    assert images == list(range(IMAGES))
    fetcher, reader = results
    cache_bytes = tree_bytes(cache / SHARDS_DIR)
    assert fetcher["fetches"] == IMAGES // SHARD_SIZE and fetcher["fetched_bytes"] == cache_bytes
    assert reader["fetches"] == 0 and reader["fetched_bytes"] == 0
    assert fetcher["evictions"] >= 1  # the budget made room, by both ranks' progress
    assert 0 < fetcher["peak_stats"] <= budget and max(r["peak"] for r in results) <= budget
    assert results[0]["root"] == results[1]["root"] == str(local / "node-0")
    # Separate caches would have fetched every shard each rank's own slices touch, each.
    alone = sum(len({shard_of[i] for _, step_keys in rank_keys for _, _, i in step_keys}) for rank_keys in keys)
    assert alone > IMAGES // SHARD_SIZE


def test_two_nodes_each_fetch_the_shards_of_their_own_ranks_once_into_their_own_directory(cache, tmp_path):
    epoch, nodes = IMAGES // BATCH, 2
    reference, keys, shard_of = direct_batches(cache, epoch, world=RANKS * nodes)
    budget = 5 * _largest(cache)
    local = tmp_path / "local"
    results = finish(start_ranks(cache, local, budget / 1e9, 0, epoch, tmp_path, "nodes", nodes=nodes), tmp_path, "nodes")
    assert [r["digests"] for r in results] == reference
    images = sorted(index for rank_keys in keys for _, step_keys in rank_keys for _, _, index in step_keys)
    assert images == list(range(IMAGES))
    for node, (fetcher, reader) in enumerate(zip(results[::RANKS], results[1::RANKS])):
        first = node * RANKS
        read = {shard_of[i] for rank_keys in keys[first : first + RANKS] for _, step_keys in rank_keys for _, _, i in step_keys}
        node_bytes = sum(tree_bytes(cache / SHARDS_DIR / shard_name(int(shard))) for shard in read)
        assert fetcher["fetches"] == len(read) and fetcher["fetched_bytes"] == node_bytes  # each once, no other
        assert reader["fetches"] == 0
        assert fetcher["root"] == reader["root"] == str((local if node == 0 else tmp_path / f"local-{node}") / f"node-{first}")
        assert 0 < fetcher["peak_stats"] <= budget


def test_ranks_killed_mid_run_restart_on_what_they_left(cache, tmp_path):
    iterations, killed_at = 2 * IMAGES // BATCH, 4
    reference, _, _ = direct_batches(cache, iterations, start=killed_at)
    budget = 5 * _largest(cache)
    local = tmp_path / "local"
    ranks = start_ranks(cache, local, budget / 1e9, 0, iterations, tmp_path, "killed", die_at=killed_at)
    wait_until(lambda: ranks[1].poll() is not None, "rank 1 to kill itself", watched=ranks, poll_s=0.01)
    assert ranks[1].returncode == -signal.SIGKILL
    ranks[0].kill()  # as torchrun stops the others when one dies
    ranks[0].wait()
    node = local / "node-0"
    # What a killed run may leave: a half-fetched shard, progress far ahead (trusted, it would let a
    # shard go while still needed), closing marks.
    (node / "0" / SHARDS_DIR / (shard_name(1) + ".fetching")).mkdir(parents=True, exist_ok=True)
    np.full(RANKS, 10**6, dtype=np.int64).tofile(node / PROGRESS_FILE)
    (node / "closed-1").touch()
    again = start_ranks(cache, local, budget / 1e9, killed_at, iterations, tmp_path, "again")
    results = finish(again, tmp_path, "again")
    assert [r["digests"] for r in results] == reference
    assert max(r["peak"] for r in results) <= budget
    assert not (node / "0" / SHARDS_DIR / (shard_name(1) + ".fetching")).exists()


def test_ranks_that_are_not_consecutive_are_refused():
    shared = [(NodeShare(0, 0, 2), "/a"), (NodeShare(2, 0, 2), "/b"), (NodeShare(0, 1, 2), None), (NodeShare(2, 1, 2), None)]
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        node_root(shared, NodeShare(0, 1, 2))
    ordered = [shared[0], shared[2], shared[1], shared[3]]
    assert str(node_root(ordered, NodeShare(2, 1, 2))) == "/b"


# The second process of a node reading a temporary node cache that the first one (the test) made.
READER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from regionspot_cache.cache.format import SHARDS_DIR, shard_name
    from regionspot_cache.train.node_share import NodeShare
    from regionspot_cache.train.shard_cache import ShardCache, tree_bytes
    from tests.train.test_shard_cache_ranks import temporary_steps, wait_for

    root, sizes = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    cache = ShardCache([root], root, 0, iter([]), temporary=True, node=NodeShare(0, 1, 2)).start()
    for step, shards in temporary_steps(1):
        for shard in shards:
            where = cache.local_dir(0) / SHARDS_DIR / shard_name(shard)
            wait_for(where)
            assert tree_bytes(where) == sizes[shard]
        cache.delivered(step)
    cache.close()
    """
)

SIZES = [4000, 2500, 3000, 4000, 1500, 3500]


def temporary_steps(rank: int) -> list[tuple[int, list[int]]]:
    """Each rank's shards of each step: the two ranks read different shards at some steps."""
    return [(step, [(step + rank) % len(SIZES)]) for step in range(2 * len(SIZES))]


def wait_for(where) -> None:
    while not where.is_dir():
        assert not (where.parents[2] / "FAILED").exists(), (where.parents[2] / "FAILED").read_text()
        time.sleep(0.001)


def test_a_temporary_node_cache_is_removed_by_the_last_process_to_close(tmp_path):
    from tests.train.test_shard_cache import fake_cache

    source = fake_cache(tmp_path / "cache", SIZES)
    node_steps = [(step, sorted({*a, *b})) for (step, a), (_, b) in zip(temporary_steps(0), temporary_steps(1))]
    schedule = shard_schedule([[(0, 0, shard) for shard in shards] for _, shards in node_steps], [np.arange(6)], 0)
    root = tmp_path / "node"
    root.mkdir()
    budget = 3 * max(SIZES)
    cache = ShardCache([source], root, budget, schedule, temporary=True, node=NodeShare(0, 0, 2))
    assert root.stat().st_mode & 0o777 == 0o700
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    reader = python(["-c", READER, str(root), ",".join(map(str, SIZES))], env=env)
    cache.start()
    try:
        for step, shards in temporary_steps(0):
            for shard in shards:
                where = cache.local_dir(0) / SHARDS_DIR / shard_name(shard)
                while not where.is_dir():
                    assert reader.poll() in (None, 0), "the other process failed"
                    time.sleep(0.001)
                assert tree_bytes(where) == SIZES[shard]
            cache.delivered(step)
        assert reader.wait() == 0  # closed first: the directory stays for this process
        assert root.is_dir()
    finally:
        cache.close()
    assert not root.exists()  # this process closed last
    # Each shard fetched by the node at most once per run of consecutive steps that need it.
    runs = sum(len(set(shards) - set(before)) for (_, before), (_, shards) in zip([(-1, [])] + node_steps, node_steps))
    assert len(SIZES) <= cache.stats.fetches <= runs and cache.stats.peak_disk_bytes <= budget
