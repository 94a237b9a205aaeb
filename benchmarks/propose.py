"""The cost of ``rs-cache propose`` per image: one image through a detector prompted with a whole
vocabulary in chunks, merged by class-agnostic NMS to the top K (``propose.select.detect_image``,
what each shard does per image after decoding).

By default the tiny random-weight Grounding DINO and OWLv2 of the tests (``demo/tiny_detectors``)
on the CPU, prompted with ``--classes`` made-up names (1,203 as LVIS). With ``--real`` model ids or
directories (e.g. ``IDEA-Research/grounding-dino-tiny``, ``google/owlv2-base-patch16-ensemble``,
``facebook/sam3``) and ``--device cuda``, the same measurement with real weights; ``--lvis FILE``
prompts with LVIS's own names.

Per detector: ``--warmup`` images not timed, then ``--repeats`` rounds over ``--images`` random
images; the table shows the median seconds per image over the rounds, with min-max in brackets.

    python benchmarks/propose.py
    python benchmarks/propose.py --real google/owlv2-base-patch16-ensemble --device cuda --size 800
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionspot_cache.demo.tiny_detectors import write_tiny_grounding_dino, write_tiny_owlv2
from regionspot_cache.propose.detectors import load_detector, resolve_model_dir
from regionspot_cache.propose.select import Selection, detect_image
from regionspot_cache.propose.worker import prompt_name
from regionspot_cache.runtime.devices import resolve_device


def vocabulary(count: int, lvis: Path | None) -> list[str]:
    if lvis is not None:
        categories = sorted(json.loads(lvis.read_text())["categories"], key=lambda c: c["id"])
        return [prompt_name(c["name"]) for c in categories]
    words = ["cat", "dog", "car", "person", "trash can", "bird", "cup", "tree", "boat", "horse"]
    return [f"{words[i % len(words)]} {chr(97 + (i // len(words)) % 26)}" for i in range(count)]


def images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size * 3 // 4, size, 3), dtype=np.uint8)) for _ in range(count)]


def measure(model_dir: Path, names: list[str], args: argparse.Namespace) -> dict:
    detector = load_detector(model_dir, resolve_device(args.device))
    selection = Selection(top_k=args.top_k, chunk_size=args.chunk_size)
    pictures = images(args.images, args.size)
    for picture in images(args.warmup, args.size, seed=1):
        detect_image(detector, picture, names, selection)
    rounds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for picture in pictures:
            detect_image(detector, picture, names, selection)
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - started) / len(pictures))
    return {
        "detector": detector.family,
        "model": str(model_dir.name),
        "classes": len(names),
        "chunks": len(detector.chunks(names, args.chunk_size)),
        "size": f"{args.size}x{args.size * 3 // 4}",
        "median": statistics.median(rounds),
        "min": min(rounds),
        "max": max(rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", nargs="*", default=[], help="Model ids or directories to measure instead of the tiny models.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--lvis", type=Path, help="LVIS annotation file whose category names prompt the detector.")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--size", type=int, default=128, help="Image width in pixels (height 3/4 of it).")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = vocabulary(args.classes, args.lvis)
    with tempfile.TemporaryDirectory() as scratch:
        models = [resolve_model_dir(m) for m in args.real] or [
            write_tiny_grounding_dino(Path(scratch) / "tiny-grounding-dino"),
            write_tiny_owlv2(Path(scratch) / "tiny-owlv2"),
        ]
        rows = [measure(model, names, args) for model in models]
    print(f"| detector | model | classes | chunks | image | s / image, median [min-max] over {args.repeats} rounds |")
    print("|---|---|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['detector']} | {r['model']} | {r['classes']} | {r['chunks']} | {r['size']} | "
            f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] |"
        )
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}, top K {args.top_k}, chunk size {args.chunk_size}")


if __name__ == "__main__":
    main()
