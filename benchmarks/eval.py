"""Evaluation cost on an LVIS-sized synthetic set: scoring and result writing next to LVISEval.

Generates LVIS v1 val's shape (19,809 images, 1,203 categories: 337 rare, 461 common, 405
frequent; ground-truth boxes per image ~ Poisson(--boxes-per-image) + 1, negative and
not-exhaustive category lists) and random region embeddings standing in for the head's output
(noisy copies of the true class's text embedding, so AP is neither 0 nor 1). Times, per protocol:

  (a) scoring:  logits (CLIP scale x cosine) -> class probabilities -> top-k / per-class cap -> detections
  (b) writing:  the LVIS results JSON (``scoring.write_results_json``)
  (c) LVIS:     lvis.LVISResults + LVISEval.run (with our cap/prune of detections LVIS ignores);
                loading the ground-truth JSON is timed separately

    python benchmarks/eval.py --images 2000            # a reduced run (a few minutes on 2 CPU cores)
    python benchmarks/eval.py                          # the full 19,809 images
    python benchmarks/eval.py --images 2000 --compare  # also the old path: dicts + json.dumps, LVIS on all

Under the fixed protocol the per-class cap is scaled with --images (10,000 x images / 19,809) so a
reduced run keeps full-size detections per image, unless --fixed-dets-per-class is given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from regionspot_cache.config import EvalConfig
from regionspot_cache.evaluate.lvis import FREQUENCY_METRICS, METRICS, numpy_float_alias, run_lvis_eval
from regionspot_cache.evaluate.scoring import detections_from_logits, protocol_for, write_results_json
from regionspot_cache.progress import percent

LVIS_VAL_IMAGES = 19_809
FREQUENCY_SHARES = {"r": 337, "c": 461, "f": 405}  # LVIS v1 categories per frequency group
# Relative chance of a ground-truth box per group: frequent classes dominate the annotations.
FREQUENCY_WEIGHT = {"r": 0.05, "c": 1.0, "f": 12.0}


def synthetic_lvis(images: int, categories: int, boxes_per_image: float, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """LVIS-format ground truth and, per box, (image id, x1, y1, x2, y2, class index)."""
    groups = np.repeat(list(FREQUENCY_SHARES), list(FREQUENCY_SHARES.values()))
    frequency = groups[np.linspace(0, len(groups) - 1, categories).astype(int)]
    weights = np.array([FREQUENCY_WEIGHT[f] for f in frequency])
    counts = rng.poisson(boxes_per_image - 1, images) + 1
    classes = rng.choice(categories, counts.sum(), p=weights / weights.sum())
    image_ids = np.repeat(np.arange(1, images + 1), counts)
    # Sizes log-uniform from 6 to 400 px: small, medium and large areas all occur.
    w, h = np.exp(rng.uniform(np.log(6), np.log(400), (2, len(classes))))
    x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
    annotations = [
        {
            "id": i + 1,
            "image_id": int(img),
            "category_id": int(c) + 1,
            "bbox": [bx, by, bw, bh],
            "area": bw * bh,
            "iscrowd": 0,
            "segmentation": [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]],
        }
        for i, (img, c, bx, by, bw, bh) in enumerate(zip(*(a.tolist() for a in (image_ids, classes, x, y, w, h))))
    ]
    image_entries = []
    starts = np.r_[0, np.cumsum(counts)]
    for image_id in range(1, images + 1):
        present = set(classes[starts[image_id - 1] : starts[image_id]].tolist())
        negatives = [int(c) + 1 for c in rng.choice(categories, 8, replace=False) if c not in present]
        not_exhaustive = [int(next(iter(present))) + 1] if rng.random() < 0.1 else []
        image_entries.append(
            {
                "id": image_id,
                "width": 640,
                "height": 480,
                "neg_category_ids": negatives,
                "not_exhaustive_category_ids": not_exhaustive,
                "file_name": f"{image_id:012d}.jpg",
            }
        )
    gt = {
        "images": image_entries,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": f"class{i + 1}", "frequency": str(f)} for i, f in enumerate(frequency)],
    }
    boxes = np.column_stack([image_ids, x, y, x + w, y + h, classes]).astype(np.float64)
    return gt, boxes


def region_stream(boxes: np.ndarray, embeddings: torch.Tensor, text: torch.Tensor, scale: float) -> Iterator:
    """(image id, boxes, box scores, logits) per image, as ``evaluate.predict`` yields them."""
    image_ids = boxes[:, 0].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(image_ids)]):
        logits = scale * embeddings[start:end] @ text.T
        yield int(image_ids[start]), boxes[start:end, 1:5].astype(np.float32), np.ones(end - start, np.float32), logits


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def run_protocol(config: EvalConfig, gt_lvis, boxes, embeddings, text, directory: Path, compare: bool) -> dict:
    row: dict = {"protocol": config.protocol, "scoring": config.scoring}
    category_ids = np.arange(1, len(text) + 1)
    detections_from_logits(region_stream(boxes[:50], embeddings, text, 100.0), category_ids, config)  # warm-up
    detections, row["scoring_s"] = timed(
        lambda: detections_from_logits(region_stream(boxes, embeddings, text, 100.0), category_ids, config)
    )
    row["detections"] = len(detections)
    _, row["writing_s"] = timed(write_results_json, detections, directory / f"results_{config.protocol}.json")
    with numpy_float_alias():
        evaluator, row["lvis_s"] = timed(run_lvis_eval, gt_lvis, detections, protocol_for(config).lvis_max_dets)
        row.update({k: round(float(v), 4) for k, v in evaluator.get_results().items() if k in METRICS})
        if compare:  # the previous path: a dict per detection, json.dumps, LVIS given everything
            records, row["old_records_s"] = timed(detections.records)
            _, row["old_writing_s"] = timed(lambda: (directory / "old.json").write_text(json.dumps(records)))
            old, row["old_lvis_s"] = timed(run_lvis_eval, gt_lvis, records, protocol_for(config).lvis_max_dets)
            assert old.get_results()["AP"] == evaluator.get_results()["AP"], "pruning changed AP"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=LVIS_VAL_IMAGES)
    parser.add_argument("--categories", type=int, default=1203)
    parser.add_argument("--boxes-per-image", type=float, default=6.0, help="mean ground-truth boxes per image")
    parser.add_argument("--text-dim", type=int, default=768, help="embedding width (CLIP ViT-L/14: 768)")
    parser.add_argument("--protocol", choices=["standard", "fixed", "both"], default="both")
    parser.add_argument("--scoring", choices=["softmax", "sigmoid"], default="softmax")
    parser.add_argument("--fixed-dets-per-class", type=int, default=None)
    parser.add_argument("--compare", action="store_true", help="also time the old path (dicts + json.dumps, no pruning)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: per-image tensors are small, and on a busy machine more threads mostly contend (0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    gt, boxes = synthetic_lvis(args.images, args.categories, args.boxes_per_image, rng)
    generator = torch.Generator().manual_seed(args.seed)
    text = torch.nn.functional.normalize(torch.randn(args.categories, args.text_dim, generator=generator), dim=-1)
    noise = torch.randn(len(boxes), args.text_dim, generator=generator)
    # Noise of 0.7 per text direction against a true-class signal of 1: AP lands inside 0..100.
    true_text = text[torch.from_numpy(boxes[:, 5].astype(np.int64))]
    embeddings = torch.nn.functional.normalize(true_text + 0.7 * noise, dim=-1)
    per_class = args.fixed_dets_per_class or max(1, round(10_000 * args.images / LVIS_VAL_IMAGES))
    configs = [
        EvalConfig(protocol=p, scoring=args.scoring, fixed_dets_per_class=per_class, device="cpu")
        for p in (["standard", "fixed"] if args.protocol == "both" else [args.protocol])
    ]
    print(
        f"{args.images} images, {args.categories} categories, {len(boxes)} boxes ({len(boxes) / args.images:.1f}/image), "
        f"{args.scoring} scoring; fixed protocol: {per_class} detections per class"
    )
    from lvis import LVIS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gt_path = Path(tmp) / "gt.json"
        gt_path.write_text(json.dumps(gt))
        with numpy_float_alias():
            gt_lvis, load_s = timed(LVIS, str(gt_path))
        for config in configs:
            rows.append(run_protocol(config, gt_lvis, boxes, embeddings, text, Path(tmp), args.compare))
            rows[-1]["gt_load_s"] = load_s
            print_row(rows[-1], args.images)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


def print_row(row: dict, images: int) -> None:
    lvis = row["lvis_s"]
    print(
        f"\n{row['protocol']} protocol: {row['detections']} detections ({row['detections'] / images:.0f}/image), "
        + " ".join(f"{name} {percent(row[name])}" for name in FREQUENCY_METRICS)
    )
    print(f"  {'stage':40s} {'seconds':>9s} {'ms/image':>9s} {'x LVIS':>8s}")
    stages = [
        ("(a) scoring: logits -> top-k -> detections", "scoring_s"),
        ("(b) writing the results JSON", "writing_s"),
        ("(c) LVISResults + LVISEval.run", "lvis_s"),
        ("    loading the ground truth (lvis.LVIS)", "gt_load_s"),
        ("old: a dict per detection", "old_records_s"),
        ("old: json.dumps + write", "old_writing_s"),
        ("old: LVIS given every detection", "old_lvis_s"),
    ]
    for name, key in stages:
        if key in row:
            print(f"  {name:40s} {row[key]:9.2f} {1000 * row[key] / images:9.2f} {row[key] / lvis:8.3f}")


if __name__ == "__main__":
    main()
