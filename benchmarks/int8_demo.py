"""What an int8 cache costs: bytes, the error of tokens and maps, and the demo's AP.

Runs the demo (generated data, tiny random-weight SAM + CLIP, extract -> train -> eval) with a
float16 cache, writes int8 copies of its train and val caches through the real writer (quantised
from the float16 values; the int8 step is 64x coarser than float16 rounding, so this is what an
int8 extraction stores up to rounding), trains the same head with the same seed on the int8 train
cache and evaluates it on the int8 val cache.

    python benchmarks/int8_demo.py                  # the demo's full settings
    python benchmarks/int8_demo.py --iterations 500 --train-images 160
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from regionspot_cache.cache import CacheReader, CacheWriter, ImageFeatures
from regionspot_cache.data.datasets import BoxSet, Category
from regionspot_cache.demo.config import DemoConfig
from regionspot_cache.demo.run import run_demo
from regionspot_cache.evaluate.api import evaluate_head
from regionspot_cache.head.model import load_head
from regionspot_cache.train.loop import train_head


def int8_copy(source: Path, target: Path) -> None:
    reader = CacheReader(source)
    writer = CacheWriter(target, replace(reader.provenance, feature_dtype="int8"))
    for name in reader.vocabulary_names():
        vocab = reader.vocabulary(name)
        categories = [Category(int(i), n, f) for i, n, f in zip(vocab.category_ids, vocab.names, vocab.frequencies)]
        writer.write_vocabulary(name, categories, vocab.embeddings)
    shards = reader.images.column("shard").to_numpy()
    ids = reader.images.column("image_id").to_pylist()
    for shard in sorted(set(shards.tolist())):
        images = []
        for image_id in [i for i, s in zip(ids, shards) if s == shard]:
            status, reason = reader.status(image_id)
            if status != "ok":
                row = reader.images.slice(reader.row_of(image_id), 1).to_pylist()[0]
                images.append(ImageFeatures(image_id, row["file_name"], row["width"], row["height"],
                                            status=status, reason=reason))
                continue
            item = reader.image(image_id)
            images.append(ImageFeatures(image_id, item.file_name, item.width, item.height,
                                        BoxSet(item.boxes, item.category_ids, item.scores),
                                        feature_map=item.feature_map, box_tokens=item.tokens))
        writer.write_shard(int(shard), images)


def relative_errors(half: Path, int8: Path) -> dict:
    """Relative L2 error of each image's tokens and map, int8 against float16: median and max."""
    a, b = CacheReader(half), CacheReader(int8)
    errors: dict[str, list[float]] = {"tokens": [], "maps": []}
    for image_id in a.image_ids():
        x, y = a.image(image_id), b.image(image_id)
        for name, u, v in (("tokens", x.tokens, y.tokens), ("maps", x.feature_map, y.feature_map)):
            if u.size:
                u, v = u.astype(np.float32), v.astype(np.float32)
                errors[name].append(float(np.linalg.norm(u - v) / max(np.linalg.norm(u), 1e-12)))
    return {name: {"median": float(np.median(e)), "max": float(np.max(e))} for name, e in errors.items()}


def feature_bytes(cache: Path) -> float:
    files = [p for p in cache.glob("shards/*/features.zarr/**/*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / len(CacheReader(cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=DemoConfig.train_images)
    parser.add_argument("--val-images", type=int, default=DemoConfig.val_images)
    parser.add_argument("--iterations", type=int, help="training steps (default: the demo's)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    config = DemoConfig(train_images=args.train_images, val_images=args.val_images)
    if args.iterations:
        config.train.iterations = args.iterations
        config.train.lr_steps = [int(args.iterations * 0.8), int(args.iterations * 0.95)]
        config.train.warmup_iters = min(config.train.warmup_iters, args.iterations // 10)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        half = run_demo(work / "float16", config)
        caches = {split: work / "float16" / "cache" / split for split in ("train", "val")}
        for split, cache in caches.items():
            int8_copy(cache, work / "int8" / split)
        head_path = work / "int8" / "head.safetensors"
        train_head(work / "int8" / "train", head_path, config.train)
        head, _ = load_head(head_path)
        val_json = work / "float16" / "data" / "val.json"  # written by the demo's generate_split
        int8_metrics = evaluate_head(work / "int8" / "val", head, val_json, config.eval).metrics
        figures = {
            "train_images": args.train_images, "val_images": args.val_images, "iterations": config.train.iterations,
            "feature_bytes_per_image": {"float16": feature_bytes(caches["train"]),
                                        "int8": feature_bytes(work / "int8" / "train")},
            "relative_error_int8_vs_float16": relative_errors(caches["val"], work / "int8" / "val"),
            "AP_float16": half.trained["AP"], "AP_int8": int8_metrics["AP"],
            "AP_int8_minus_float16_points": 100 * (int8_metrics["AP"] - half.trained["AP"]),
        }
        figures["int8_vs_float16_bytes"] = (figures["feature_bytes_per_image"]["int8"]
                                            / figures["feature_bytes_per_image"]["float16"])
    print(json.dumps(figures, indent=1))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
