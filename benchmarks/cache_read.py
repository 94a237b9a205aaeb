"""Reading the cache at real-size shapes, on a CPU: the loader alone, and training steps fed from the
cache vs from tensors in memory, with the page cache warm.

Writes a cache of ``--images`` images through the real writer with BB or BL shapes (CLIP ViT-B/16:
197 x 768, ViT-L/14: 257 x 1024 feature maps; ``--boxes`` boxes per image on average; random
values), reads the files once (page cache warm), then measures side by side:

- loader: batches of ``--batch-size`` delivered by ``rs-cache train``'s loader, no model, for each
  of ``--workers``; the flows take turns, ``--repeats`` rounds of ``--batches`` batches each, after
  ``--warmup`` batches (worker start-up, first reads) that are not timed;
- train: the same training steps fed from the cache loader and from batches already in memory,
  alternating step by step, in ``--repeats`` rounds of ``--steps`` steps each;
- eval: ``CacheReader.image`` (the read of evaluation's scoring loop) vs the head's forward pass
  per image;
- checks: what the read path's crc32c check costs: a first pass over ``--check-batches`` batches
  through freshly started loaders in the training order, nothing checked yet (an empty ledger:
  the worst case; a chunk once checked is not checked again on the machine), with and without the
  check, ``--repeats`` rounds, for each of ``--workers``.

Medians over the rounds, with the spread (min-max) in brackets. Only public APIs are used, so the
same script measures an older checkout: ``PYTHONPATH=<checkout> python benchmarks/cache_read.py``.

    python benchmarks/cache_read.py --shape bl
    python benchmarks/cache_read.py --shape bl --feature-dtype int8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from regionspot_cache.cache import CacheReader, CacheWriter, ImageFeatures, Provenance
from regionspot_cache.cache.arrays import RowArray
from regionspot_cache.config import TrainConfig
from regionspot_cache.data.datasets import BoxSet, Category
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, region_logits
from regionspot_cache.train.data import CachedRegions, MultiSourceRegions, region_loader
from regionspot_cache.train.loop import train_step
from regionspot_cache.train.order import BatchPlan, RankBatchSampler

try:  # older checkouts: no checks shared between processes, no shard order
    from regionspot_cache.cache.ledger import LEDGER_ENV, SETTLED_S
    from regionspot_cache.choices import TrainOrder
    from regionspot_cache.train.order import epoch_order
except ImportError:
    LEDGER_ENV, SETTLED_S, epoch_order = "RS_CACHE_CHECKED_DIR", 0.0, None
try:  # older checkouts: no read-ahead
    from regionspot_cache.train.read_ahead import ReadAheadSampler, shard_directories
except ImportError:
    ReadAheadSampler = shard_directories = None

SHAPES = {"bb": (197, 768, 512), "bl": (257, 1024, 768)}  # tokens, width, text dim
CLASSES = 100


def model_identities(shape: str, tokens: int, width: int, text_dim: int) -> dict:
    """``sam`` and ``clip`` of the provenance: typed identities, or the dicts of older checkouts."""
    sam = {"variant": "vit_b", "checkpoint_sha256": None, "input_size": 1024, "token_dim": 256, "preprocess": "", "token": ""}
    clip = {
        "model": shape,
        "pretrained": None,
        "weights_sha256": None,
        "image_size": [224, 224],
        "width": width,
        "num_tokens": tokens,
        "text_dim": text_dim,
        "logit_scale": 100.0,
        "preprocess": "",
        "feature_map": "",
    }
    try:
        from regionspot_cache.cache.format import ClipIdentity, SamIdentity
    except ImportError:
        return {"sam": sam, "clip": clip}
    return {"sam": SamIdentity(**sam), "clip": ClipIdentity(**clip)}


def write_cache(root: Path, images: int, shape: str, boxes: int, shard_size: int, feature_dtype: str) -> None:
    tokens, width, text_dim = SHAPES[shape]
    extra = {} if feature_dtype == "float16" else {"feature_dtype": feature_dtype}  # older checkouts lack it
    provenance = Provenance(
        dataset="bench",
        box_source="gt",
        shard_size=shard_size,
        planned_shards=-(-images // shard_size),
        **model_identities(shape, tokens, width, text_dim),
        **extra,
    )
    writer = CacheWriter(root, provenance)
    rng = np.random.default_rng(0)
    writer.write_vocabulary(
        "bench", [Category(i + 1, f"class {i}") for i in range(CLASSES)], rng.normal(size=(CLASSES, text_dim)).astype(np.float32)
    )
    for shard, start in enumerate(range(0, images, shard_size)):
        batch = []
        for image_id in range(start, min(start + shard_size, images)):
            count = int(rng.integers(1, 2 * boxes))
            xy = rng.uniform(0, 400, size=(count, 2)).astype(np.float32)
            box_set = BoxSet(
                np.concatenate([xy, xy + 50], axis=1), rng.integers(1, CLASSES + 1, count), np.ones(count, np.float32)
            )
            batch.append(
                ImageFeatures(
                    image_id,
                    f"{image_id}.jpg",
                    640,
                    480,
                    box_set,
                    feature_map=rng.normal(size=(tokens, width)).astype(np.float16),
                    box_tokens=rng.normal(size=(count, 256)).astype(np.float16),
                )
            )
        writer.write_shard(shard, batch)


def warm_page_cache(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def batch_bytes(batch) -> int:
    real_tokens = int(batch.box_mask.sum()) * batch.tokens.shape[-1] * 2
    return batch.feature_maps.numel() * 2 + real_tokens  # as float16, the cache's delivered precision


def loader_for(regions: CachedRegions, batch_size: int, workers: int, start: int):
    sources = MultiSourceRegions([regions])
    plan = BatchPlan(sources.sizes(), [1.0], batch_size, seed=0)
    return iter(region_loader(sources, RankBatchSampler(plan, start), workers, 4, pin_memory=False))


def measure_loader(regions: CachedRegions, args) -> dict:
    loaders = {w: loader_for(regions, args.batch_size, w, start=1000 * w) for w in args.workers}
    for iterator in loaders.values():
        for _ in range(args.warmup):
            next(iterator)
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    megabytes: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for workers, iterator in loaders.items():  # interleaved: each round times every flow
            started, images, size = time.perf_counter(), 0, 0
            for _ in range(args.batches):
                batch = next(iterator)
                images += len(batch.labels)
                size += batch_bytes(batch)
            seconds = time.perf_counter() - started
            rates[workers].append(images / seconds)
            megabytes[workers].append(size / seconds / 1e6)
    return {
        f"workers_{w}": {"images_per_s": median_spread(rates[w]), "MB_per_s": median_spread(megabytes[w])} for w in args.workers
    }


def measure_training(regions: CachedRegions, reader: CacheReader, args) -> dict:
    _, width, text_dim = SHAPES[args.shape]
    config = TrainConfig(batch_size=args.batch_size, lr=1e-4, warmup_iters=0, max_boxes_per_image=args.max_boxes)
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=width, text_dim=text_dim)).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr)
    text = torch.from_numpy(reader.vocabulary("bench").embeddings)
    device = torch.device("cpu")
    cache = loader_for(regions, args.batch_size, args.train_workers, start=50_000)
    memory_batches = [next(cache) for _ in range(8)]  # the same kind of batches, held in memory

    def step_seconds(batches) -> float:
        started = time.perf_counter()
        train_step(head, optimizer, next(batches).to(device), text, 100.0, config)
        return time.perf_counter() - started

    memory = (memory_batches[i % len(memory_batches)] for i in range(10**9))
    for _ in range(2):  # warm-up
        step_seconds(memory), step_seconds(cache)
    rates: dict[str, list[float]] = {"cache": [], "memory": []}
    for _ in range(args.repeats):
        # Steps alternate between the flows, so a change of load on a shared machine hits both.
        seconds = {"cache": 0.0, "memory": 0.0}
        for _ in range(args.steps):
            seconds["memory"] += step_seconds(memory)
            seconds["cache"] += step_seconds(cache)
        for name, total in seconds.items():
            rates[name].append(args.steps * args.batch_size / total)
    ratios = [c / m for c, m in zip(rates["cache"], rates["memory"])]
    return {
        "workers": args.train_workers,
        "cache_images_per_s": median_spread(rates["cache"]),
        "memory_images_per_s": median_spread(rates["memory"]),
        "cache_vs_memory": median_spread(ratios),
    }


@torch.no_grad()
def measure_eval(reader: CacheReader, args) -> dict:
    _, width, text_dim = SHAPES[args.shape]
    head = RegionSpotHead(HeadConfig(clip_width=width, text_dim=text_dim)).eval()
    text = torch.from_numpy(reader.vocabulary("bench").embeddings)
    ids = reader.image_ids()[: args.eval_images]
    read, forward = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        items = [reader.image(i) for i in ids]
        read.append((time.perf_counter() - started) / len(ids) * 1e3)
        started = time.perf_counter()
        for item in items:
            tokens = torch.from_numpy(item.tokens).float()[None]
            region_logits(head(tokens, torch.from_numpy(item.feature_map).float()[None])[0], text, 100.0)
        forward.append((time.perf_counter() - started) / len(ids) * 1e3)
    return {
        "read_ms_per_image": median_spread(read),
        "head_ms_per_image": median_spread(forward),
        "read_vs_head": median_spread([r / f for r, f in zip(read, forward)]),
    }


def measure_checks(regions: CachedRegions, args) -> dict:
    """Each flow's first pass through a fresh loader in the training order (shards, 2 resident),
    nothing checked yet (an empty ledger): with the check, and without."""
    if not hasattr(RowArray, "check_reads"):
        return {"skipped": "this checkout's read path has no crc32c check"}
    flows = ["unchecked", "checked"]
    settle(regions.reader.root)
    rates: dict[str, list[float]] = {}
    for workers in args.workers:
        for _ in range(args.repeats):
            for flow in flows:
                with tempfile.TemporaryDirectory() as ledger:
                    os.environ[LEDGER_ENV] = ledger  # nothing flagged by an earlier flow
                    RowArray.check_reads = flow != "unchecked"
                    regions.reader._opened.clear()  # forked workers must not inherit checked chunks
                    iterator = shard_order_loader(regions, args.batch_size, workers)
                    next(iterator)  # worker start-up, not timed (its chunks are checked too)
                    started, images = time.perf_counter(), 0
                    for _ in range(args.check_batches):
                        images += len(next(iterator).labels)
                    rates.setdefault(f"workers_{workers}_{flow}", []).append(images / (time.perf_counter() - started))
                    del iterator
    RowArray.check_reads = True
    figures = {name: median_spread(values) for name, values in rates.items()}
    for workers in args.workers:
        unchecked = rates[f"workers_{workers}_unchecked"]
        for flow in flows[1:]:
            checked = rates[f"workers_{workers}_{flow}"]
            figures[f"workers_{workers}_{flow}_vs_unchecked"] = median_spread([c / u for c, u in zip(checked, unchecked)])
    return figures


def shard_order_loader(regions: CachedRegions, batch_size: int, workers: int):
    """``rs-cache train``'s loader in shard order (2 resident), with its read-ahead where the checkout has one."""
    sources = MultiSourceRegions([regions])
    order = epoch_order(TrainOrder.SHARDS, regions.shards(), 0, 0, 2) if epoch_order else None
    sampler = RankBatchSampler(BatchPlan(sources.sizes(), [1.0], batch_size, seed=0, orders=order and [order]), 0)
    if ReadAheadSampler is not None:
        sampler = ReadAheadSampler(sampler, [regions.shards()], shard_directories([[regions.reader]]), ahead=2)
    return iter(region_loader(sources, sampler, workers, 4, pin_memory=False))


def settle(root: Path) -> None:
    """Wait until the cache's files are older than the ledger's SETTLED_S: flags of files written
    moments ago are not shared between processes (cache/ledger.py)."""
    newest = max(p.stat().st_ctime for p in root.rglob("*"))
    time.sleep(max(0.0, newest + SETTLED_S + 0.1 - time.time()))


def summary(figures: dict) -> dict:
    """The figures with each measurement shown as 'median [min-max]'."""
    if isinstance(figures, dict) and "median" in figures:
        return f"{figures['median']:.4g} [{figures['min']:.4g}-{figures['max']:.4g}]"
    if isinstance(figures, dict):
        return {key: summary(value) for key, value in figures.items()}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bl")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--boxes", type=int, default=12, help="mean boxes per image (LVIS val: ~12 annotations)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "int8"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches per loader")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per flow and round")
    parser.add_argument("--train-workers", type=int, default=1)
    parser.add_argument("--max-boxes", type=int, default=100)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--check-batches", type=int, default=40, help="timed batches per flow of the checks' first pass")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: loader,train,eval,checks")
    parser.add_argument("--cache", type=Path, help="write the cache here (default: a temporary folder)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache or Path(tmp) / "cache"
        if not root.exists():
            write_cache(root, args.images, args.shape, args.boxes, args.shard_size, args.feature_dtype)
        stored = warm_page_cache(root / "shards")
        reader = CacheReader(root)
        regions = CachedRegions(reader, reader.vocabulary("bench"), args.max_boxes, seed=0)
        figures = {
            "shape": args.shape,
            "images": len(reader),
            "feature_dtype": args.feature_dtype,
            "stored_bytes_per_image": stored / len(reader),
            "batch_size": args.batch_size,
            "cpu_threads": torch.get_num_threads(),
        }
        if "loader" not in skip:
            figures["loader"] = measure_loader(regions, args)
        if "train" not in skip:
            figures["train"] = measure_training(regions, reader, args)
        if "eval" not in skip:
            figures["eval"] = measure_eval(reader, args)
        if "checks" not in skip:
            figures["checks"] = measure_checks(regions, args)
    print(json.dumps(summary(figures), indent=1))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
