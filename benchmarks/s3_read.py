"""The training loader reading a cache on object storage vs raw GETs of the same objects from the
same server, side by side in one run.

Writes a cache of ``--images`` random images with BB or BL shapes to ``--cache-url`` through the
real writer (``benchmarks/cache_read.py``'s ``write_cache``), then takes turns, ``--repeats`` rounds
after one untimed warm-up round:

- raw GET: every object of the committed shards, fetched with s3fs's concurrent ``cat`` (bytes/s),
  and, when obstore is installed, the same GETs all at once through obstore (the server's rate
  without s3fs's Python CPU; the shares of both are reported). ``RS_CACHE_S3_CLIENT=s3fs`` keeps
  the loader's GETs in s3fs (the comparison of the two clients);
- epoch (the steady state): what ``rs-cache train`` reads through (``train.loader.training_loader``:
  shard order, the shards fetched ahead by the training process into a temporary shard cache that
  its loader workers read; up to 8 shards at once, each by its GETs alone, its objects known from
  the one listing of ``shards/`` taken when the loader starts), one epoch of a cache of many more shards than ``--resident`` (e.g.
  2,048 images in 64 shards), for each of ``--resident`` and ``--workers``. Timed from the first
  batch delivered (worker start-up and the first window's fetch excluded, as the other benchmarks
  exclude warm-up) to the epoch's end. Reported: the payload delivered per second (feature maps
  and box tokens as float16), the stored bytes fetched per second from the start of timing to
  the last shard's landing (the fetcher may be ahead by up to the shard cache's budget when timing
  starts: ``fetched_before_timing``; it waits for room when the reader is behind it, for
  ``fetcher_waiting_share`` of the window), the steady-state rate (the smaller of the two: a long
  epoch runs at the slower of fetching and reading; both converge to it as the epoch grows
  against the budget), and the CPU seconds of the training process (its fetch threads included),
  of its loader workers and of the server (``--server-pid``) per second. With no loader workers
  the fetched shards stay in the training process's memory; ``--files-too`` adds that flow with
  them in files (``/dev/shm`` or the temporary directory), as when memory is short.
- with ``--old-flows``: the uniform flow (a fresh ``CacheReader``, each process fetching a shard
  when it first touches it, ``--batches`` batches, start-up timed; keep ``--images`` within
  ``CacheReader.remote_shards_kept`` shards for it) and the same loader on a local copy.

Medians over the rounds, with the range. The server and credentials come from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). A SeaweedFS server on loopback, for example::

    weed server -dir=/tmp/weed -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port=8333 -s3.port.iceberg=0 -s3.port.lance=0
    curl -X PUT http://127.0.0.1:8333/bench
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y AWS_REGION=us-east-1 \\
        python benchmarks/s3_read.py --cache-url s3://bench/bb2048 --shape bb --images 2048 --shard-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import psutil

sys.path.insert(0, str(Path(__file__).parent))

from cache_read import SHAPES, batch_bytes, measure_loader, median_spread, write_cache  # noqa: E402

from regionspot_cache.cache import CacheReader  # noqa: E402
from regionspot_cache.cache.storage import SHARDS_DIR, CacheLocation  # noqa: E402
from regionspot_cache.config import TrainConfig  # noqa: E402
from regionspot_cache.train import loader  # noqa: E402
from regionspot_cache.train.data import CachedRegions, open_sources  # noqa: E402
from regionspot_cache.train.distributed import Processes  # noqa: E402
from regionspot_cache.train.loader import training_loader  # noqa: E402


def raw_get_rate(location: CacheLocation) -> tuple[float, int]:
    """(bytes/s, bytes) of one concurrent GET of every object of the committed shards."""
    fs = location.fs
    keys = [key for key in fs.find(location.path(SHARDS_DIR))]
    started = time.perf_counter()
    size = sum(len(data) for data in fs.cat(keys).values())
    return size / (time.perf_counter() - started), size


def raw_get_rate_obstore(location: CacheLocation) -> float | None:
    """Bytes/s of the same GETs through obstore (all objects at once), or None without it: the
    server's raw rate without s3fs's Python CPU in the way."""
    from regionspot_cache.cache.s3_get import get_parts

    fs = location.fs
    parts = [
        (key.partition("/")[2], 0, int(info["size"])) for key, info in fs.find(location.path(SHARDS_DIR), detail=True).items()
    ]
    started = time.perf_counter()
    found = get_parts(location.bucket, parts)
    return sum(len(data) for data in found) / (time.perf_counter() - started) if found is not None else None


class Clock:
    """CPU seconds of this process (all its threads), of its children (loader workers) and of
    the server, at one instant."""

    def __init__(self, server: psutil.Process | None):
        me = psutil.Process()
        self.wall = time.perf_counter()
        self.main = _cpu(me)
        self.workers = sum(_cpu(child) for child in me.children(recursive=True))
        self.server = _cpu(server) + sum(_cpu(c) for c in server.children(recursive=True)) if server else 0.0


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def epoch_figures(cache_url: str, args, seed: int, resident: int, workers: int, server: psutil.Process | None) -> dict:
    """One epoch of ``training_loader`` (see the module's docstring), timed from its first batch."""
    sources = open_sources([cache_url], [], [])
    batches_per_epoch = len(sources[0].reader) // args.batch_size
    config = TrainConfig(
        iterations=batches_per_epoch,
        batch_size=args.batch_size,
        max_boxes_per_image=args.max_boxes,
        num_workers=workers,
        resident_shards=resident,
    )
    config.seed = seed
    created = time.perf_counter()
    feed = training_loader(sources, config, 0, Processes(), pin_memory=False)
    batches, shard_cache = feed.batches, feed.shard_cache
    landed: list[float] = []  # when each fetch finished
    fetch = shard_cache.fetch

    def timed_fetch(*fetch_args) -> int:
        size = fetch(*fetch_args)
        landed.append(time.perf_counter())
        return size

    shard_cache.fetch = timed_fetch
    size = 0
    try:
        iterator = iter(batches)
        next(iterator)
        shard_cache.delivered(0)
        before, fetched_before, waited_before = Clock(server), shard_cache.stats.fetched_bytes, shard_cache.stats.wait_seconds
        for step, batch in zip(range(1, batches_per_epoch), iterator):
            shard_cache.delivered(step)
            size += batch_bytes(batch)
        after = Clock(server)
        fetched, waited = shard_cache.stats.fetched_bytes, shard_cache.stats.wait_seconds
    finally:
        feed.close()
    seconds = after.wall - before.wall
    fetch_end = max([t for t in landed if t > before.wall], default=before.wall)
    delivered = size / seconds / 1e6
    fetch_rate = (fetched - fetched_before) / max(fetch_end - before.wall, 1e-9) / 1e6 if fetched > fetched_before else None
    return {
        "delivered_MB_per_s": delivered,
        "fetched_MB_per_s": fetch_rate,
        "steady_MB_per_s": min(delivered, fetch_rate) if fetch_rate else delivered,
        "fetched_before_timing": fetched_before / max(fetched, 1),
        # the fetcher's share of the window spent waiting for room (the reader is behind it)
        "fetcher_waiting_share": (waited - waited_before) / seconds,
        "first_batch_s": before.wall - created,
        "timed_s": seconds,
        "cpu_main": (after.main - before.main) / seconds,
        "cpu_workers": (after.workers - before.workers) / seconds,
        "cpu_server": (after.server - before.server) / seconds,
    }


def old_flows(location: CacheLocation, args, local_regions, round_: int) -> tuple[dict, dict]:
    """The uniform flow on a fresh reader and the same loader on a local copy (``--old-flows``)."""
    one_round = argparse.Namespace(**{**vars(args), "repeats": 1, "warmup": 0})
    reader = CacheReader(location)  # fresh: no shard fetched yet
    figures = measure_loader(CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=round_), one_round)
    return figures, measure_loader(local_regions, one_round)


def local_copy_regions(location: CacheLocation, args) -> CachedRegions:
    local_copy = Path(tempfile.mkdtemp(prefix="rs-cache-bench-"))
    for part in (SHARDS_DIR, "vocabularies"):
        location.fetch_dir(part, local_copy / part)
    (local_copy / "cache.json").write_bytes(location.read_bytes("cache.json"))
    local_reader = CacheReader(local_copy)
    return CachedRegions(local_reader, local_reader.vocabulary("bench"), args.max_boxes, seed=0)


def summary(rounds: list[dict], raw: list[float]) -> dict:
    """Median and range of each figure over the rounds; the steady and delivered rates' shares of
    the raw GET rate of the same round (side by side), median and range."""
    out = {}
    for flow in rounds[0]:
        keys = [k for k in rounds[0][flow] if all(r[flow][k] is not None for r in rounds)]
        out[flow] = {k: median_spread([r[flow][k] for r in rounds]) for k in keys}
        for rate in ("steady", "delivered"):
            shares = [r[flow][f"{rate}_MB_per_s"] / get for r, get in zip(rounds, raw)]
            out[flow][f"{rate}_of_raw_get"] = median_spread([round(share, 3) for share in shares])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-url", required=True, help="s3://bucket/prefix (written if it holds no cache)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bb")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--boxes", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "int8"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--resident",
        type=lambda s: [int(r) for r in s.split(",")],
        default=[8, 2],
        help="train.resident_shards of the epoch flow (8: the default)",
    )
    parser.add_argument("--max-boxes", type=int, default=100)
    parser.add_argument("--server-pid", type=int, help="the server's process, for its CPU seconds")
    parser.add_argument("--old-flows", action="store_true", help="also the uniform flow and the local copy's loader")
    parser.add_argument(
        "--files-too",
        action="store_true",
        help="also the default flow (resident 8, 0 workers) with the shards fetched into files instead of memory",
    )
    parser.add_argument("--batches", type=int, default=12, help="timed batches per round of the old flows")
    args = parser.parse_args()
    location = CacheLocation.parse(args.cache_url)
    if not location.exists("cache.json"):
        write_cache(args.cache_url, args.images, args.shape, args.boxes, args.shard_size, args.feature_dtype)
    server = psutil.Process(args.server_pid) if args.server_pid else None
    local_regions = local_copy_regions(location, args) if args.old_flows else None
    load = [os.getloadavg()]
    raw, raw_obstore, epochs, loader_rounds, local_rounds = [], [], [], [], []
    for round_ in range(args.repeats + 1):  # rounds take turns: each times every flow; the first is a warm-up
        rate, stored = raw_get_rate(location)
        rate_obstore = raw_get_rate_obstore(location)
        epoch = {
            f"resident_{resident}_workers_{workers}": epoch_figures(args.cache_url, args, round_, resident, workers, server)
            for resident in args.resident
            for workers in args.workers
        }
        if args.files_too:  # the same flow with the fetched shards in files, as when memory is short
            with mock.patch.object(loader, "host_available_bytes", lambda: 0):
                epoch["resident_8_workers_0_files"] = epoch_figures(args.cache_url, args, round_, 8, 0, server)
        if args.old_flows:
            uniform, local = old_flows(location, args, local_regions, round_)
        if round_:
            raw.append(rate / 1e6)
            raw_obstore.append(rate_obstore / 1e6 if rate_obstore else None)
            epochs.append(epoch)
            if args.old_flows:
                loader_rounds.append(uniform)
                local_rounds.append(local)
        load.append(os.getloadavg())
    raw_median = median_spread(raw)["median"]  # the old flows' shares
    figures = {
        "cache_url": args.cache_url,
        "shape": args.shape,
        "images": len(CacheReader(location)),
        "stored_shard_bytes": stored,
        "load_average_1min": [round(a[0], 1) for a in load],
        "raw_get_MB_per_s": median_spread(raw),
        "epoch": summary(epochs, raw),
    }
    if all(raw_obstore):  # the shares of the raw GET through obstore, the larger of the two
        figures["raw_get_obstore_MB_per_s"] = median_spread(raw_obstore)
        figures["epoch_of_raw_get_obstore"] = {
            flow: {rate: shares[f"{rate}_of_raw_get"] for rate in ("steady", "delivered")}
            for flow, shares in summary(epochs, raw_obstore).items()
        }
    if args.old_flows:
        uniform_rates = {flow: median_spread([r[flow]["MB_per_s"]["median"] for r in loader_rounds]) for flow in loader_rounds[0]}
        figures["uniform_loader"] = {
            flow: {"MB_per_s": rate, "of_raw_get": round(rate["median"] / raw_median, 3)} for flow, rate in uniform_rates.items()
        }
        figures["local_copy_loader_MB_per_s"] = {
            flow: median_spread([r[flow]["MB_per_s"]["median"] for r in local_rounds]) for flow in uniform_rates
        }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
