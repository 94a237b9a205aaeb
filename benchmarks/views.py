"""What cached views buy: LVIS AP on the demo's validation split after training without views,
with ``released`` views and with ``consistent`` views, same iterations, several seeds.

Few training images, so that the head overfits and augmentation has something to fix. The
encoders are the demo's tiny random-weight models (no weights can be downloaded here), so the
numbers say how views behave in this pipeline, not what they buy with real SAM and CLIP.

    python benchmarks/views.py                          # 40 training images, 3 seeds, 300 iterations
    python benchmarks/views.py --train-images 96 --seeds 5 --iterations 600
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from regionspot_cache.config import EvalConfig, ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.config import demo_train_config
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import load_frozen_encoders
from regionspot_cache.evaluate import evaluate_head
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.extract.views import extract_views
from regionspot_cache.head.model import load_head
from regionspot_cache.train.loop import train_head

CONDITIONS = ("no views", "released", "consistent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--views", nargs="+", default=["hflip", "crop:0.6-1.0x2"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rs-views-"))
    caches, val_json = prepare_caches(workdir, args)
    results = {condition: [] for condition in CONDITIONS}
    for seed in range(args.seeds):
        for condition in CONDITIONS:
            results[condition].append(train_and_evaluate(workdir, caches, val_json, condition, seed, args.iterations))
            print(f"seed {seed} {condition:>10}: AP {results[condition][-1]:.4f}", flush=True)
    print_table(results, args)
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "AP": results}, indent=2))


def prepare_caches(workdir: Path, args: argparse.Namespace) -> tuple[dict[str, Path], Path]:
    """One base cache of the training split, copied per mode before its views are extracted."""
    data = workdir / "data"
    train_json = generate_split(data, "train", SyntheticSpec(args.train_images, seed=0))
    val_json = generate_split(data, "val", SyntheticSpec(args.val_images, seed=1, balanced=True))
    models = write_tiny_checkpoints(workdir / "models", seed=0)
    encoders = load_frozen_encoders(models, torch.device("cpu"))
    config = ExtractConfig(shard_size=16, batch_size=8, num_workers=0)
    train = load_coco_format(train_json, data / "images", name="demo_train")
    val = load_coco_format(val_json, data / "images", name="demo_val")
    caches = {"val": workdir / "cache" / "val", CONDITIONS[0]: workdir / "cache" / "train"}
    run_extraction(val, CacheTarget(caches["val"]), encoders, config)
    run_extraction(train, CacheTarget(caches[CONDITIONS[0]]), encoders, config)
    for mode in CONDITIONS[1:]:
        caches[mode] = workdir / "cache" / f"train-{mode}"
        if not caches[mode].exists():
            shutil.copytree(caches[CONDITIONS[0]], caches[mode], ignore=shutil.ignore_patterns("views", ".extract.lock"))
        extract_views(train, caches[mode], replace(config, views=args.views, views_mode=mode), encoders=encoders)
    return caches, val_json


def train_and_evaluate(
    workdir: Path, caches: dict[str, Path], val_json: Path, condition: str, seed: int, iterations: int
) -> float:
    """AP on the validation split of a head trained ``iterations`` steps on ``condition``'s cache."""
    scale = iterations / 2000  # the demo's schedule, shortened
    config = replace(
        demo_train_config(),
        iterations=iterations,
        warmup_iters=max(1, round(100 * scale)),
        lr_steps=[round(1600 * scale), round(1900 * scale)],
        seed=seed,
        tensorboard=False,
        checkpoint_every=iterations,
        views=["identity"] if condition == CONDITIONS[0] else [],
        device="cpu",
    )
    output = workdir / "heads" / f"{condition.replace(' ', '-')}-{seed}.safetensors"
    train_head(caches[condition], output, config, resume=False)
    head, _ = load_head(output)
    return evaluate_head(caches["val"], head, val_json, EvalConfig(device="cpu")).metrics["AP"]


def print_table(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.train_images} training images, views {args.views}, {args.iterations} iterations, "
        f"{args.seeds} seeds (AP on {args.val_images} validation images)"
    )
    print("| training data | AP mean | AP std | min | max |")
    print("|---|---|---|---|---|")
    for condition, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {condition} | {statistics.mean(values):.4f} | {spread:.4f} | {min(values):.4f} | {max(values):.4f} |")


if __name__ == "__main__":
    main()
