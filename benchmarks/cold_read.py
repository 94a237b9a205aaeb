"""Reading a cache whose pages are not in memory: uniform-random vs shard-aware order against the
disk's sequential bandwidth, and training steps fed through a small local shard cache vs from memory.

Writes a cache of ``--images`` images at BB or BL shapes (``cache_read.py``'s writer), then, in
``--repeats`` rounds that take turns (a change of load on a shared machine hits every flow):

- sequential: every cache file read in order in 8 MiB blocks, pages evicted first (the physical
  limit); sequential_no_copy: the same by ``sendfile`` to /dev/null (no copy into the process, as
  the read-ahead reads; the higher of the two on a loaded machine);
- uniform / shards: ``--batches`` batches of ``--batch-size`` images read by the training dataset
  (``CachedRegions.read``) in ``train.order`` uniform and shards (``--resident`` shards at a
  time), handed out by the training sampler, pages evicted first; MB/s of the images' feature
  bytes read per second;
- shards_read_ahead_N, for each N of ``--read-ahead``: the shard order with the sampler of
  ``train.read_ahead_shards = N`` (a thread reading the coming shards into the page cache);
- shards_warm: the shard order with every page in memory: the reader's own (CPU-bound) rate,
  the other limit of an overlapped read; with each read flow, why it took its time (``ordered_read``);
- fetch: the shard cache alone over whole epochs: bytes fetched per epoch vs the cache's size;
- train: training steps fed by the loader reading through a ``ShardCache`` (budget
  ``--budget-fraction`` of the cache, fetched cold from the cache) vs steps fed from batches
  held in memory, alternating step by step, ``--steps`` each per round, after ``--warmup``
  untimed steps; with the bytes fetched per epoch read.

Pages are evicted with ``posix_fadvise(DONTNEED)`` on every cache file (no root needed; dirty
pages are synced first). Medians over the rounds, spread (min-max) in brackets.

    python benchmarks/cold_read.py --shape bl --images 2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_read import SHAPES, median_spread, summary, write_cache  # noqa: E402

from regionspot_cache.cache import CacheReader  # noqa: E402
from regionspot_cache.config import TrainConfig  # noqa: E402
from regionspot_cache.head.model import HeadConfig, RegionSpotHead  # noqa: E402
from regionspot_cache.train.data import CachedRegions, MultiSourceRegions, region_loader  # noqa: E402
from regionspot_cache.train.loop import train_step  # noqa: E402
from regionspot_cache.train.order import BatchPlan, RankBatchSampler, ShardOrder, UniformOrder  # noqa: E402
from regionspot_cache.train.read_ahead import PageSink, ReadAheadSampler, shard_directories  # noqa: E402
from regionspot_cache.train.shard_cache import LocalShardReader, ShardCache, shard_schedule, tree_bytes  # noqa: E402

BLOCK = 8 << 20


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def evict(root: Path) -> None:
    """Drop the cache's pages from the page cache."""
    os.sync()
    for path in cache_files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_mb_per_s(root: Path) -> float:
    evict(root)
    started, total = time.perf_counter(), 0
    for path in cache_files(root / "shards"):
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(BLOCK):
                total += len(chunk)
    return total / (time.perf_counter() - started) / 1e6


def sequential_no_copy_mb_per_s(root: Path, evict_first: bool = True) -> float:
    """The same read without the copy into this process (``sendfile`` to /dev/null, as the
    read-ahead reads): the disk's rate with less CPU per byte, on a loaded machine the higher one."""
    evict(root)
    started, total = time.perf_counter(), 0
    with PageSink() as sink:
        for path in cache_files(root / "shards"):
            with open(path, "rb", buffering=0) as handle:
                total += sum(sink.read(handle, BLOCK))
    return total / (time.perf_counter() - started) / 1e6


def ordered_read(root: Path, order, args, read_ahead: int = 0, warm: bool = False) -> tuple[float, dict]:
    """Cold reads of ``--batches`` batches in ``order``, by the training dataset's batched read, the
    batches handed out by ``rs-cache train``'s sampler (with ``read_ahead``: wrapped in its
    ``ReadAheadSampler``, reading that many shards ahead; timed from its start); with ``warm``, the
    files are read into the page cache first (the reader's own CPU-bound rate).

    Returns (MB/s, why): the reading thread's CPU seconds per second (1: CPU-bound; less: waiting
    for the disk, or for a core on a loaded machine), the major page faults per GB it read (its
    memory maps touching pages no read had asked for yet); with the read-ahead, how often it waited
    for the reader (it was ahead), the share of the time it was reading (1: the disk never idled)
    and its rate while reading (the disk's, against the sequential flows)."""
    evict(root)
    if warm:
        sequential_no_copy_mb_per_s(root, evict_first=False)
    reader = CacheReader(root)
    regions = CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=0)
    sampler = RankBatchSampler(BatchPlan([len(regions)], [1.0], args.batch_size, 0, [order]), 0)
    if read_ahead:
        directories = shard_directories([[reader]])
        sampler = ReadAheadSampler(sampler, [regions.shards()], directories, read_ahead, steps=args.batches)
    faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, time.thread_time()
    started, total = time.perf_counter(), 0
    for keys in itertools.islice(iter(sampler), args.batches):
        for item in regions.read([key[1:] for key in keys]):
            total += item.feature_map.nbytes + item.tokens.nbytes
    seconds = time.perf_counter() - started
    why = {
        "reader_cpu_per_s": (time.thread_time() - cpu) / seconds,
        "major_faults_per_GB": (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults) / (total / 1e9),
    }
    if read_ahead:
        sampler.close()
        stats = sampler.last.stats
        why["read_ahead_waits"] = stats.waits
        why["read_ahead_busy_per_s"] = stats.reading_seconds / seconds  # 1: the disk never idled
        why["read_ahead_MB_per_s_while_busy"] = stats.bytes / max(stats.reading_seconds, 1e-9) / 1e6
    return total / seconds / 1e6, why


def cold_reads(root: Path, shards: np.ndarray, args) -> dict:
    """The read flows of the module's docstring, ``--repeats`` rounds taking turns."""
    orders = {"uniform": UniformOrder(len(shards), 0), "shards": ShardOrder(shards, 0, args.resident)}
    flows = {name: (order, 0, False) for name, order in orders.items()}
    ahead = args.read_ahead or [args.resident]
    flows.update({f"shards_read_ahead_{n}": (orders["shards"], n, False) for n in ahead})
    flows["shards_warm"] = (orders["shards"], 0, True)
    rates: dict[str, list[float]] = {"sequential": [], "sequential_no_copy": [], **{name: [] for name in flows}}
    why: dict[str, list[dict]] = {name: [] for name in flows}
    for _ in range(args.repeats):
        rates["sequential"].append(sequential_mb_per_s(root))
        rates["sequential_no_copy"].append(sequential_no_copy_mb_per_s(root))
        for name, (order, read_ahead, warm) in flows.items():
            rate, reasons = ordered_read(root, order, args, read_ahead, warm)
            rates[name].append(rate)
            why[name].append(reasons)
    figures = {"cold_read_MB_per_s": {name: median_spread(values) for name, values in rates.items()}}
    for baseline in ("sequential", "sequential_no_copy"):
        figures[f"cold_read_vs_{baseline}"] = {
            name: median_spread([r / s for r, s in zip(rates[name], rates[baseline])]) for name in flows
        }
    figures["cold_read_why"] = {
        name: {key: median_spread([r[key] for r in rounds]) for key in rounds[0]} for name, rounds in why.items()
    }
    return figures


def local_cache_training(root: Path, local: Path, args) -> dict:
    """Steps fed through a ShardCache of ``--budget-fraction`` of the cache vs steps fed from memory."""
    _, width, text_dim = SHAPES[args.shape]
    reader = CacheReader(root)
    plain = CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=0)
    shards = plain.shards()
    plan = BatchPlan([len(plain)], [1.0], args.batch_size, 0, [ShardOrder(shards, 0, args.resident)])
    cache_bytes = tree_bytes(root / "shards")
    # Exactly the batches the run reads (the loader's prefetch past them waits, untimed): every
    # byte fetched is read.
    total_steps = max(args.warmup, 4) + args.repeats * args.steps
    schedule = shard_schedule(itertools.islice(iter(RankBatchSampler(plan, 0)), total_steps), [shards], 0)
    cache = ShardCache([root], local, int(args.budget_fraction * cache_bytes), schedule)
    largest = max(cache.shard_bytes((0, int(s))) for s in np.unique(shards))
    cache.check_room(min(2 * args.resident, args.batch_size) * largest)
    local_reader = LocalShardReader(root, cache.local_dir(0))
    regions = MultiSourceRegions([CachedRegions(local_reader, local_reader.vocabulary("bench"), args.max_boxes, seed=0)])
    evict(root)
    cache.start()
    loader = iter(region_loader(regions, RankBatchSampler(plan, 0), args.train_workers, 4, pin_memory=False))
    config = TrainConfig(batch_size=args.batch_size, lr=1e-4, warmup_iters=0, max_boxes_per_image=args.max_boxes)
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=width, text_dim=text_dim)).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr)
    text = torch.from_numpy(reader.vocabulary("bench").embeddings)
    step = itertools.count()

    def cached_batch():
        batch = next(loader)
        cache.delivered(next(step))
        return batch

    memory_batches = [cached_batch() for _ in range(4)]
    memory = (memory_batches[i % len(memory_batches)] for i in itertools.count())

    def seconds_of(batches) -> float:
        started = time.perf_counter()
        batch = next(batches) if not callable(batches) else batches()
        train_step(head, optimizer, batch.to(torch.device("cpu")), text, 100.0, config)
        return time.perf_counter() - started

    for _ in range(max(0, args.warmup - 4)):
        seconds_of(memory), seconds_of(cached_batch)
    rates: dict[str, list[float]] = {"local_cache": [], "memory": []}
    for _ in range(args.repeats):
        seconds = {"local_cache": 0.0, "memory": 0.0}
        for _ in range(args.steps):
            seconds["memory"] += seconds_of(memory)
            seconds["local_cache"] += seconds_of(cached_batch)
        for name, total in seconds.items():
            rates[name].append(args.steps * args.batch_size / total)
    images_read = next(step) * args.batch_size
    cache.close()
    return {
        "workers": args.train_workers,
        "budget_bytes": cache.budget,
        "cache_bytes": cache_bytes,
        "local_cache_images_per_s": median_spread(rates["local_cache"]),
        "memory_images_per_s": median_spread(rates["memory"]),
        "local_vs_memory": median_spread([c / m for c, m in zip(rates["local_cache"], rates["memory"])]),
        "images_read": images_read,
        "fetched_bytes": cache.stats.fetched_bytes,
        "peak_disk_bytes": cache.stats.peak_disk_bytes,
    }


def fetch_epochs(root: Path, local: Path, args) -> dict:
    """The shard cache alone over ``--fetch-epochs`` whole epochs (no training: a reader that
    waits for each step's shards, then marks the step read): bytes fetched per epoch, peak on disk."""
    reader = CacheReader(root)
    shards = CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=0).shards()
    plan = BatchPlan([len(shards)], [1.0], args.batch_size, 0, [ShardOrder(shards, 0, args.resident)])
    steps = -(-args.fetch_epochs * len(shards) // args.batch_size)
    batches = list(itertools.islice(iter(RankBatchSampler(plan, 0)), steps))
    cache_bytes = tree_bytes(root / "shards")
    cache = ShardCache([root], local, int(args.budget_fraction * cache_bytes), shard_schedule(batches, [shards], 0))
    evict(root)
    started = time.perf_counter()
    cache.start()
    for step, keys in enumerate(batches):
        for shard in {int(shards[index]) for _, _, index in keys}:
            while not (cache.local_dir(0) / "shards" / f"{shard:06d}").is_dir():
                time.sleep(0.001)
        cache.delivered(step)
    cache.close()
    epochs = steps * args.batch_size / len(shards)
    return {
        "epochs": epochs,
        "budget_vs_cache": cache.budget / cache_bytes,
        "seconds": time.perf_counter() - started,
        "fetched_per_epoch_vs_cache": cache.stats.fetched_bytes / epochs / cache_bytes,
        "peak_disk_vs_budget": cache.stats.peak_disk_bytes / cache.budget,
        "fetches": cache.stats.fetches,
        "shards": int(len(np.unique(shards))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bl")
    parser.add_argument("--images", type=int, default=2048, help="cache size (BL: ~0.55 MB an image)")
    parser.add_argument("--boxes", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--resident", type=int, default=2, help="train.resident_shards")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=24, help="cold-read batches per order and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--read-ahead",
        type=lambda text: [int(n) for n in text.split(",") if n],
        help="comma-separated train.read_ahead_shards values, each a flow of its own beside the plain shard "
        "order (default: --resident, as training reads by default)",
    )
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per flow and round")
    parser.add_argument("--warmup", type=int, default=6, help="untimed training steps per flow")
    parser.add_argument("--train-workers", type=int, default=1)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--fetch-epochs", type=int, default=2)
    parser.add_argument("--max-boxes", type=int, default=100)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: read,fetch,train")
    parser.add_argument("--cache", type=Path, help="write the cache here (default: a temporary folder)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory(dir=args.cache.parent if args.cache else None) as tmp:
        root = args.cache or Path(tmp) / "cache"
        if not root.exists():
            write_cache(root, args.images, args.shape, args.boxes, args.shard_size, "float16")
        reader = CacheReader(root)
        shards = CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=0).shards()
        figures = {
            "shape": args.shape,
            "images": len(reader),
            "shards": int(len(np.unique(shards))),
            "cache_bytes": tree_bytes(root / "shards"),
            "batch_size": args.batch_size,
            "resident": args.resident,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        }
        if "read" not in skip:
            figures.update(cold_reads(root, shards, args))
        if "fetch" not in skip:
            figures["fetch"] = fetch_epochs(root, Path(tmp) / "fetch", args)
        if "train" not in skip:
            figures["train"] = local_cache_training(root, Path(tmp) / "local", args)
    print(json.dumps(summary(figures), indent=1))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
