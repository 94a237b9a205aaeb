"""Region search speed: embedding rate of the index build, and brute-force query latency.

1. Embedding: a generated dataset is extracted with the tiny models, then the region index is
   built (``search.index.build_index``: batched feature-map reads + the head) `--repeats` times
   after one warm-up; regions/s, median and spread.
2. Queries: random L2-normalised embeddings of `--dim` (768: ViT-L/14's text dim) at each size;
   one text query (Q=1) and a batch of 16, top 50, through ``search.query.top_k_cosine``
   (chunked float32 matmul + top-k); median and spread of `--repeats` runs after a warm-up.

    python benchmarks/search.py                        # 10K, 100K, 1M regions
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.extract.runner import CacheTarget, extract_dataset
from regionspot_cache.head.model import HeadConfig, RegionSpotHead
from regionspot_cache.search.index import build_index
from regionspot_cache.search.query import top_k_cosine


def timed(run, repeats: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def spread(times: list[float]) -> str:
    return f"median {1e3 * statistics.median(times):.1f} ms (min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f})"


def embedding_rate(images: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = write_tiny_checkpoints(root / "models")
        annotations = generate_split(root, "bench", SyntheticSpec(images=images, seed=0))
        dataset = load_coco_format(annotations, root / "images", name="bench")
        extract_dataset(dataset, CacheTarget(root / "cache"), models, ExtractConfig(shard_size=64, num_workers=0, device="cpu"))
        reader = CacheReader(root / "cache")
        torch.manual_seed(0)
        head = RegionSpotHead(HeadConfig(clip_width=reader.provenance.clip.width, text_dim=reader.provenance.clip.text_dim))
        times = timed(lambda: build_index(reader, head, torch.device("cpu"), 32), repeats)
        rate = len(reader.boxes) / statistics.median(times)
        print(
            f"embedding: {len(reader.boxes)} regions of {images} images (tiny CLIP, full-size head), "
            f"{rate:.0f} regions/s; {spread(times)} per build"
        )


def query_latency(sizes: list[int], dim: int, repeats: int, top: int) -> None:
    rng = np.random.default_rng(0)
    for size in sizes:
        embeddings = torch.from_numpy(rng.standard_normal((size, dim), dtype=np.float32))
        embeddings /= embeddings.norm(dim=1, keepdim=True)
        for queries in (1, 16):
            q = torch.nn.functional.normalize(torch.randn(queries, dim), dim=1)
            times = timed(functools.partial(top_k_cosine, embeddings, q, top), repeats)
            print(f"query: {size:>9,} regions x {dim}, {queries:>2} queries, top {top}: {spread(times)}")
        del embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    embedding_rate(args.images, args.repeats)
    query_latency(args.sizes, args.dim, args.repeats, args.top)


if __name__ == "__main__":
    main()
