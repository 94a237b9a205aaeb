"""Training throughput: from the cache vs from tensors in memory vs the released code's flow.

All three run the same head, batch and steps, side by side in one run:
- cache: the loader of ``rs-cache train`` (workers reading zarr/parquet, prefetching, pinned memory);
- memory: the same items held as tensors in memory (the I/O overhead is the difference);
- released flow: each step decodes the batch's images and runs the frozen CLIP image encoder to
  get the feature maps, as the released RegionSpot training does (tokens precomputed).

    python benchmarks/train.py                 # tiny models, CPU (default)
    python benchmarks/train.py --real-size     # CLIP ViT-L/14 @224 (random weights), width 1024 (GPU)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ClipSpec, ExtractConfig, ModelsConfig, SamSpec, TrainConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import FrozenEncoders, SamBoxEncoder, build_sam, load_clip, load_frozen_encoders
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import RegionSpotHead
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.train.data import CachedRegions, MultiSourceRegions, collate_regions, region_loader
from regionspot_cache.train.loop import head_config_for, train_step
from regionspot_cache.train.order import BatchPlan, EpochSampler, RankBatchSampler


def timed_steps(batches, steps: int, head, optimizer, text, logit_scale, config, device) -> float:
    """Samples per second over ``steps`` training steps fed by the ``batches`` iterator."""
    iterator = iter(batches)
    train_step(head, optimizer, next(iterator).to(device), text, logit_scale, config)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, samples = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(iterator).to(device)
        train_step(head, optimizer, batch, text, logit_scale, config)
        samples += len(batch.labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def released_batches(dataset: CachedRegions, reader: CacheReader, clip, image_root: Path, batch_size: int, device):
    """Batches whose feature maps come from running CLIP on the decoded images, every step."""
    keys = iter(EpochSampler(len(dataset), 0))
    while True:
        batch = [next(keys) for _ in range(batch_size)]
        regions = collate_regions([dataset[key] for key in batch])
        image_ids = [dataset.image_ids[index] for _, index in batch]
        pixels = torch.stack([clip.preprocess(load_rgb(image_root / reader.image(i).file_name)) for i in image_ids])
        with torch.no_grad():
            regions.feature_maps = clip.feature_maps(pixels.to(device)).float()
        yield regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers reading the cache")
    parser.add_argument("--real-size", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations = generate_split(root, "bench", SyntheticSpec(args.images, seed=0))
        dataset = load_coco_format(annotations, root / "images", name="bench")
        if args.real_size:
            spec = ModelsConfig(SamSpec("tiny", None), ClipSpec("ViT-L-14", None))  # SAM is not timed here
            encoders = FrozenEncoders(SamBoxEncoder(build_sam("tiny", None), device), load_clip("ViT-L-14", None, device), spec)
        else:
            encoders = load_frozen_encoders(write_tiny_checkpoints(root / "models"), device)
        extract_config = ExtractConfig(num_workers=0, device=str(device))
        run_extraction(dataset, CacheTarget(root / "cache"), encoders, extract_config)
        reader = CacheReader(root / "cache")
        config = TrainConfig(batch_size=args.batch_size, lr=1e-4, warmup_iters=0, max_boxes_per_image=16)
        vocab = reader.vocabulary("bench")
        text = torch.from_numpy(vocab.embeddings).to(device)
        logit_scale = reader.provenance.clip.logit_scale
        regions = CachedRegions(reader, vocab, config.max_boxes_per_image, seed=0)

        def fresh_head():
            torch.manual_seed(0)
            head = RegionSpotHead(head_config_for(reader, config)).to(device).train()
            return head, torch.optim.AdamW(head.parameters(), lr=config.lr)

        sources = MultiSourceRegions([regions])
        plan = BatchPlan(sources.sizes(), [1.0], args.batch_size, seed=0)
        cache_loader = region_loader(
            sources, RankBatchSampler(plan, 0), args.workers, config.prefetch_batches, pin_memory=device.type == "cuda"
        )
        in_memory = [
            collate_regions([regions[(0, i)] for i in range(s, s + args.batch_size)])
            for s in range(0, len(regions) - args.batch_size + 1, args.batch_size)
        ]
        memory_batches = (in_memory[i % len(in_memory)] for i in range(10**9))
        rates = {}
        released = released_batches(regions, reader, encoders.clip, root / "images", args.batch_size, device)
        for name, batches in (("cache", cache_loader), ("memory", memory_batches), ("released", released)):
            head, optimizer = fresh_head()
            rates[name] = timed_steps(batches, args.steps, head, optimizer, text, logit_scale, config, device)
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "clip": "ViT-L/14@224 (random weights)" if args.real_size else "tiny",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "workers": args.workers,
        **{f"{name}_samples_per_s": rate for name, rate in rates.items()},
        "cache_vs_memory": rates["cache"] / rates["memory"],
        "cache_vs_released": rates["cache"] / rates["released"],
    }
    for key, value in figures.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
