"""What an int8 cache costs: bytes, the error of tokens and maps, and the demo's AP.

Runs the demo (generated data, tiny random-weight SAM + CLIP, extract -> train -> eval) with a
float16 cache, writes int8 copies of its train and val caches through the real writer (quantised
from the float16 values; the int8 step is 64x coarser than float16 rounding, so this is what an
int8 extraction stores up to rounding), trains the same head with the same seed on the int8 train
cache and evaluates it on the int8 val cache.

For each seed (the demo's data, tiny models and training seed) the two dtypes are paired; each
head is also scored on the other dtype's validation cache (what int8 costs at inference alone, with
no training noise), and a third run trains float16 again with another training seed, so the int8
difference can be read against what training noise alone does.

    python benchmarks/int8_demo.py                  # the demo's full settings, seeds 0 1 2
    python benchmarks/int8_demo.py --iterations 200 --train-images 64 --val-images 32 --seeds 0
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
                images.append(
                    ImageFeatures(image_id, row["file_name"], row["width"], row["height"], status=status, reason=reason)
                )
                continue
            item = reader.image(image_id)
            images.append(
                ImageFeatures(
                    image_id,
                    item.file_name,
                    item.width,
                    item.height,
                    BoxSet(item.boxes, item.category_ids, item.scores),
                    feature_map=item.feature_map,
                    box_tokens=item.tokens,
                )
            )
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


def shortened(config: DemoConfig, iterations: int | None) -> DemoConfig:
    if iterations:
        config.train.iterations = iterations
        config.train.lr_steps = [int(iterations * 0.8), int(iterations * 0.95)]
        config.train.warmup_iters = min(config.train.warmup_iters, iterations // 10)
    return config


def score(head_path: Path, val_cache: Path, val_json: Path, config: DemoConfig) -> float:
    head, _ = load_head(head_path)
    return evaluate_head(val_cache, head, val_json, config.eval).metrics["AP"]


def one_seed(work: Path, seed: int, args: argparse.Namespace) -> dict:
    """The demo at ``seed`` (data, tiny models, training) on float16, then the same on int8 copies;
    each head scored on both dtypes' val caches (the inference-only cost of int8, free of training
    noise); and float16 once more with another training seed: how far training noise alone moves AP."""
    config = shortened(DemoConfig(train_images=args.train_images, val_images=args.val_images, seed=seed), args.iterations)
    config.train.seed = seed
    half = run_demo(work / "float16", config)
    caches = {split: work / "float16" / "cache" / split for split in ("train", "val")}
    int8 = work / "int8"
    for split, cache in caches.items():
        int8_copy(cache, int8 / split)
    val_json = work / "float16" / "data" / "val.json"  # written by the demo's generate_split
    heads = {
        "float16": work / "float16" / "head" / "head.safetensors",
        "int8": int8 / "head.safetensors",
        "reseeded": work / "float16-reseeded.safetensors",
    }
    train_head(int8 / "train", heads["int8"], config.train)
    config.train.seed = seed + 1000
    train_head(caches["train"], heads["reseeded"], config.train)
    ap = {
        "float16": half.trained["AP"],
        "int8": score(heads["int8"], int8 / "val", val_json, config),
        "float16_head_on_int8_val": score(heads["float16"], int8 / "val", val_json, config),
        "int8_head_on_float16_val": score(heads["int8"], caches["val"], val_json, config),
        "float16_other_training_seed": score(heads["reseeded"], caches["val"], val_json, config),
    }
    return {
        "seed": seed,
        "AP": ap,
        "int8_minus_float16_points": 100 * (ap["int8"] - ap["float16"]),
        "inference_only_points": 100 * (ap["float16_head_on_int8_val"] - ap["float16"]),
        "training_seed_effect_points": 100 * (ap["float16_other_training_seed"] - ap["float16"]),
        "feature_bytes_per_image": {"float16": feature_bytes(caches["train"]), "int8": feature_bytes(int8 / "train")},
        "relative_error_int8_vs_float16": relative_errors(caches["val"], int8 / "val"),
    }


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=DemoConfig.train_images)
    parser.add_argument("--val-images", type=int, default=DemoConfig.val_images)
    parser.add_argument("--iterations", type=int, help="training steps (default: the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="demo seeds (data, models, training)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for seed in args.seeds:
            runs.append(one_seed((args.workdir or Path(tmp)) / f"seed{seed}", seed, args))
            print(json.dumps(runs[-1]), flush=True)  # a long run shows each seed as it ends
    bytes_ratio = [r["feature_bytes_per_image"]["int8"] / r["feature_bytes_per_image"]["float16"] for r in runs]
    figures = {
        "train_images": args.train_images,
        "val_images": args.val_images,
        "runs": runs,
        "int8_vs_float16_bytes": spread(bytes_ratio),
        "int8_minus_float16_points": spread([r["int8_minus_float16_points"] for r in runs]),
        "inference_only_points": spread([r["inference_only_points"] for r in runs]),
        "training_seed_effect_points": spread([r["training_seed_effect_points"] for r in runs]),
        "AP": {name: spread([r["AP"][name] for r in runs]) for name in runs[0]["AP"]},
    }
    print(json.dumps(figures, indent=1))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
