"""Peak memory of extraction with SAM ViT-B, eager attention vs fused SDPA, per image batch size.

Each (attention, batch) runs ``run_extraction`` in a fresh subprocess (CPU, fp32, no loader
workers, no memory budget splitting, real-size SAM ViT-B and CLIP ViT-B/16 with random weights)
on the same generated images; its peak resident memory (``getrusage`` ru_maxrss) and the resident
memory after the models are loaded are reported, and the memory each image adds to the batch as
the least-squares slope of peak over batch size.

On a GPU (``--gpu``) it also times SAM's image encoder alone, eager vs SDPA in bf16 autocast:
images/s (median of repeats after warm-up) and ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py --images 8 --batches 1 2 4 8 --eager-batches 1 2 4 [--jobs 3]
    python benchmarks/memory.py --gpu --batches 1 2 4 8 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from regionspot_cache.config import ClipSpec, ExtractConfig, ModelsConfig, SamSpec
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.encoders import FrozenEncoders, SamBoxEncoder, build_sam, load_clip
from regionspot_cache.extract.runner import CacheTarget, run_extraction

CLIP_MODEL = "ViT-B-16"


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(attention: str, batch: int, images: int) -> dict:
    """One extraction in this process; returns its peak and after-load resident memory (GB)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    spec = ModelsConfig(SamSpec("vit_b", None), ClipSpec(CLIP_MODEL, None))
    encoders = FrozenEncoders(
        SamBoxEncoder(build_sam("vit_b", None, attention), device), load_clip(CLIP_MODEL, None, device), spec
    )
    loaded_gb = _rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations = generate_split(root, "bench", SyntheticSpec(images, seed=0, min_size=480, max_size=640))
        dataset = load_coco_format(annotations, root / "images", name="bench")
        config = ExtractConfig(shard_size=images, batch_size=batch, num_workers=0, device="cpu", memory_budget_gb=1e6)
        run_extraction(dataset, CacheTarget(root / "cache"), encoders, config)
    return {"attention": attention, "batch": batch, "images": images, "loaded_gb": loaded_gb, "peak_gb": _rss_gb()}


def run_child(attention: str, batch: int, images: int) -> dict:
    command = [sys.executable, __file__, "--child", attention, str(batch), "--images", str(images)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def slope_gb_per_image(rows: list[dict]) -> float:
    if len(rows) < 2:
        return float("nan")
    batches = np.array([r["batch"] for r in rows], dtype=float)
    peaks = np.array([r["peak_gb"] for r in rows])
    return float(np.polyfit(batches, peaks, 1)[0])


def cpu_table(args: argparse.Namespace) -> None:
    plan = [("eager", b) for b in args.eager_batches] + [("sdpa", b) for b in args.batches]
    # Peak RSS is per process, so children may run side by side (--jobs) without changing it.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: run_child(job[0], job[1], args.images), plan))
    print("| attention | batch | images | RSS after load GB | peak RSS GB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['batch']} | {r['images']} | {r['loaded_gb']:.2f} | {r['peak_gb']:.2f} |")
    slopes = {a: slope_gb_per_image([r for r in rows if r["attention"] == a]) for a in ("eager", "sdpa")}
    print(
        f"peak GB per image in the batch (slope): eager {slopes['eager']:.2f}, sdpa {slopes['sdpa']:.2f}, "
        f"ratio {slopes['sdpa'] / slopes['eager']:.2f}"
    )


def gpu_table(args: argparse.Namespace) -> None:
    """SAM ViT-B image encoder alone on CUDA, bf16 autocast, eager vs SDPA."""
    device = torch.device("cuda")
    print("| attention | batch | img/s (median, spread) | max_memory_allocated GB |")
    print("|---|---|---|---|")
    for attention in ("eager", "sdpa"):
        encoder = build_sam("vit_b", None, attention).image_encoder.to(device)
        for batch in args.batches:
            images = torch.randn(batch, 3, 1024, 1024, device=device)
            torch.cuda.reset_peak_memory_stats(device)
            times = []
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                for repeat in range(args.warmup + args.repeats):
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    encoder(images)
                    torch.cuda.synchronize()
                    if repeat >= args.warmup:
                        times.append(batch / (time.perf_counter() - started))
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            rate = f"{statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f})"
            print(f"| {attention} | {batch} | {rate} | {peak:.2f} |")
        del encoder
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--eager-batches",
        type=int,
        nargs="*",
        default=[1, 2, 4],
        help="eager at batch 8 needs about 21 GB: leave it out on a small machine",
    )
    parser.add_argument("--gpu", action="store_true", help="the CUDA encoder-alone table instead of the CPU one")
    parser.add_argument("--jobs", type=int, default=1, help="CPU table: extractions run side by side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("ATTENTION", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.images)))
    elif args.gpu:
        gpu_table(args)
    else:
        cpu_table(args)


if __name__ == "__main__":
    main()
