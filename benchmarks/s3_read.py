"""The training loader reading a cache on object storage vs raw GETs of the same objects from the
same server, side by side in one run.

Writes a cache of ``--images`` random images with BB or BL shapes to ``--cache-url`` through the
real writer (``benchmarks/cache_read.py``'s ``write_cache``), then takes turns, ``--repeats`` rounds
after one untimed warm-up round:

- raw GET: every object of the committed shards, fetched with s3fs's concurrent ``cat`` (bytes/s);
- loader: the region loader on a fresh ``CacheReader`` in uniform order, each process fetching a
  shard when it first touches it (nothing fetched yet: the timed window includes fetching the
  shards it reads), ``--batches`` batches of ``--batch-size``, for each of ``--workers`` (payload
  bytes delivered/s: feature maps and box tokens as float16). Keep ``--images`` within
  ``CacheReader.remote_shards_kept`` shards: a larger cache makes each process fetch shards again.
- train: what ``rs-cache train`` reads through (``train.loop.training_loader``): shard order, the
  shards fetched ahead once by the training process into a temporary shard cache that its loader
  workers read; one epoch (every fetched byte delivered), timed from before the shard cache is
  made, for each of ``--resident`` resident shards.
- local: the same loader on a local copy of the cache (the page cache warm), the loader's own
  ceiling on this machine.

Medians over the rounds, with the spread. The server and credentials come from the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). A SeaweedFS server on loopback, for example::

    weed server -dir=/tmp/weed -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port=8333 -s3.port.iceberg=0 -s3.port.lance=0
    curl -X PUT http://127.0.0.1:8333/bench
    AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y AWS_REGION=us-east-1 \\
        python benchmarks/s3_read.py --cache-url s3://bench/cache --shape bb --images 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cache_read import SHAPES, batch_bytes, measure_loader, median_spread, write_cache  # noqa: E402

from regionspot_cache.cache import CacheReader  # noqa: E402
from regionspot_cache.cache.storage import SHARDS_DIR, CacheLocation  # noqa: E402
from regionspot_cache.config import TrainConfig  # noqa: E402
from regionspot_cache.train.data import CachedRegions, open_sources  # noqa: E402
from regionspot_cache.train.distributed import Processes  # noqa: E402
from regionspot_cache.train.loop import training_loader  # noqa: E402


def raw_get_rate(location: CacheLocation) -> tuple[float, int]:
    """(bytes/s, bytes) of one concurrent GET of every object of the committed shards."""
    fs = location.fs
    keys = [key for key in fs.find(location.path(SHARDS_DIR))]
    started = time.perf_counter()
    size = sum(len(data) for data in fs.cat(keys).values())
    return size / (time.perf_counter() - started), size


def train_loader_rates(cache_url: str, args, seed: int) -> dict:
    """{"resident_<r>_workers_<w>": MB/s} of ``training_loader`` reading one epoch from a fresh
    start, for each of ``args.resident`` and ``args.workers``."""
    sources = open_sources([cache_url], [], [])
    batches_per_epoch = len(sources[0].reader) // args.batch_size
    rates = {}
    for resident in args.resident:
        for workers in args.workers:
            config = TrainConfig(
                iterations=batches_per_epoch,
                batch_size=args.batch_size,
                max_boxes_per_image=args.max_boxes,
                num_workers=workers,
                resident_shards=resident,
            )
            config.seed = seed
            started, size = time.perf_counter(), 0
            batches, shard_cache = training_loader(sources, config, 0, Processes(), pin_memory=False)
            try:
                for step, batch in zip(range(batches_per_epoch), batches):
                    shard_cache.delivered(step)
                    size += batch_bytes(batch)
            finally:
                shard_cache.close()
            rates[f"resident_{resident}_workers_{workers}"] = size / (time.perf_counter() - started) / 1e6
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-url", required=True, help="s3://bucket/prefix (written if it holds no cache)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bb")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--boxes", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "int8"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 2])
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--resident",
        type=lambda s: [int(r) for r in s.split(",")],
        default=[8, 2],
        help="train.resident_shards of the train flow: 8 (the default) holds a 4-shard cache whole; 2 makes "
        "it span two windows, as a cache of many more shards than 8 does",
    )
    parser.add_argument("--max-boxes", type=int, default=100)
    args = parser.parse_args()
    location = CacheLocation.parse(args.cache_url)
    if not location.exists("cache.json"):
        write_cache(args.cache_url, args.images, args.shape, args.boxes, args.shard_size, args.feature_dtype)
    one_round = argparse.Namespace(**{**vars(args), "repeats": 1, "warmup": 0})
    local_copy = Path(tempfile.mkdtemp(prefix="rs-cache-bench-"))
    for part in (SHARDS_DIR, "vocabularies"):
        location.fetch_dir(part, local_copy / part)
    (local_copy / "cache.json").write_bytes(location.read_bytes("cache.json"))
    local_reader = CacheReader(local_copy)
    local_regions = CachedRegions(local_reader, local_reader.vocabulary("bench"), args.max_boxes, seed=0)
    raw, loader_rounds, local_rounds, train_rounds = [], [], [], []
    for round_ in range(args.repeats + 1):  # rounds take turns: each times both flows; the first is a warm-up
        rate, stored = raw_get_rate(location)
        reader = CacheReader(location)  # fresh: no shard fetched yet
        figures = measure_loader(CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=round_), one_round)
        local = measure_loader(local_regions, one_round)
        train = train_loader_rates(args.cache_url, args, seed=round_)
        if round_:
            raw.append(rate / 1e6)
            loader_rounds.append(figures)
            local_rounds.append(local)
            train_rounds.append(train)
    loader = {flow: [round_[flow]["MB_per_s"]["median"] for round_ in loader_rounds] for flow in loader_rounds[0]}
    images = {flow: [round_[flow]["images_per_s"]["median"] for round_ in loader_rounds] for flow in loader_rounds[0]}
    raw_median = median_spread(raw)["median"]
    figures = {
        "cache_url": args.cache_url,
        "shape": args.shape,
        "images": len(reader),
        "stored_shard_bytes": stored,
        "raw_get_MB_per_s": median_spread(raw),
        "loader": {
            flow: {
                "MB_per_s": median_spread(loader[flow]),
                "images_per_s": median_spread(images[flow]),
                "of_raw_get": round(median_spread(loader[flow])["median"] / raw_median, 3),
            }
            for flow in loader
        },
        "train_loader": {
            flow: {
                "MB_per_s": median_spread([r[flow] for r in train_rounds]),
                "of_raw_get": round(median_spread([r[flow] for r in train_rounds])["median"] / raw_median, 3),
            }
            for flow in train_rounds[0]
        },
        "local_copy_loader_MB_per_s": {
            flow: median_spread([r[flow]["MB_per_s"]["median"] for r in local_rounds]) for flow in loader
        },
    }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
