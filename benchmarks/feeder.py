"""The loader's CPU cost per image (no encoders): today's path vs the new CPU path vs the device path's CPU side.

Images: photographs shipped with scikit-image (astronaut, coffee, chelsea, rocket; a benchmark-only
dependency: ``pip install scikit-image``), tiled 2x2 at their native scale into the sizes typical
of the target datasets (COCO/LVIS 640x480, Objects365 1024x768, OpenImages 1024x683) and saved as
JPEG quality 90; deterministic. Preprocessing of SAM ViT-B (long side 1024) and CLIP ViT-L/14
(224), built without models. Paths, each through ``ImageReader.__getitem__``:
- ``today``: the loader before issue 26: PIL decode (``load_rgb``), then the preprocessing of
  that time, kept verbatim in ``benchmarks/feeder_today.py`` (``released`` ran the test resize
  twice; numpy <-> PIL copies between steps);
- ``pil``: PIL decode, the current preprocessing (the ``cpu`` path for files it hands to PIL);
- ``cpu``: libjpeg-turbo decode (``extract/decode.read_rgb``), the current preprocessing, PIL
  resizes as before (``extract.decode = "cpu"``); ``pil`` and ``cpu`` are checked to give today's
  inputs bit for bit on these photos before they are timed;
- ``device``: the workers' side of ``extract.decode = "device"``: read the bytes, parse the header.
Per image in this process, the paths taking turns image by image (warm-up excluded; median and
p25-p75 over repeats; "vs today": median and p25-p75 of each image's time over today's, timed back
to back), then the throughput of a DataLoader with 1 and 2 workers (core-ms per image = workers x
wall / images). "cores for 400/s": the cores a GPU extracting 400 images/s needs for its loader.
``--steps``: the ``cpu`` path step by step against its floor, decode + resizes (feeder_steps.py).

    python benchmarks/feeder.py                      # the CPU table
    python benchmarks/feeder.py --steps              # also the cpu path's steps against its floor
    python benchmarks/feeder.py --gpu                # also: the device path on CUDA with real-size
                                                     # SAM ViT-B + CLIP ViT-L/14 (random weights)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from feeder_steps import cpu_steps, print_steps
from feeder_today import TodayReader  # benchmarks/feeder_today.py, next to this script
from PIL import Image
from torch.utils.data import DataLoader

from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.data.images import load_rgb
from regionspot_cache.encoders.clip import ClipPreprocess
from regionspot_cache.encoders.preprocess import test_resize_for
from regionspot_cache.encoders.sam import SamResize
from regionspot_cache.extract.decode import DevicePixels, DeviceResize, read_rgb
from regionspot_cache.extract.reader import ImageReader

SIZES = {"coco 640x480": (640, 480), "o365 1024x768": (1024, 768), "oi 1024x683": (1024, 683)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TARGET = 400  # images/s per GPU
PATHS = ("today", "pil", "cpu", "device")


def photographs() -> list[Image.Image]:
    from skimage import data  # benchmark-only dependency

    return [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]


def mosaic(photos: list[Image.Image], size: tuple[int, int], shift: int) -> Image.Image:
    """A 2x2 tiling of the photos at about their native scale: a photograph's detail at ``size``."""
    width, height = size
    canvas = Image.new("RGB", size)
    cells = [(0, 0), (width // 2, 0), (0, height // 2), (width // 2, height // 2)]
    for i, (left, top) in enumerate(cells):
        photo = photos[(i + shift) % len(photos)]
        cell_w, cell_h = width - width // 2 if left else width // 2, height - height // 2 if top else height // 2
        scale = max(cell_w / photo.width, cell_h / photo.height)
        resized = photo.resize((round(photo.width * scale + 0.5), round(photo.height * scale + 0.5)), Image.BICUBIC)
        canvas.paste(resized.crop((0, 0, cell_w, cell_h)), (left, top))
    return canvas


def write_dataset(root: Path, size: tuple[int, int], count: int):
    photos = photographs()
    (root / "images").mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id in range(1, count + 1):
        name = f"{image_id:03d}.jpg"
        mosaic(photos, size, image_id).save(root / "images" / name, "JPEG", quality=90)
        data["images"].append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        data["annotations"].append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [10, 10, 50, 50]})
    (root / "ann.json").write_text(json.dumps(data))
    return load_coco_format(root / "ann.json", root / "images", name="photos")


def preprocessors(preprocess: str) -> tuple[SamResize, ClipPreprocess]:
    return SamResize(1024, test_resize_for(preprocess)), ClipPreprocess(
        (224, 224), OPENAI_MEAN, OPENAI_STD, "bicubic", preprocess
    )


def reader_for(path: str, dataset, preprocess: str) -> ImageReader:
    sam, clip = preprocessors(preprocess)
    return (TodayReader if path == "today" else ImageReader)(
        dataset,
        dataset.images,
        sam,
        clip,
        100_000_000,
        load=load_rgb if path in ("today", "pil") else read_rgb,
        device_decode=path == "device",
    )


def same_inputs(reader: ImageReader, baseline: ImageReader) -> bool:
    """Whether ``reader`` gives ``baseline``'s SAM and CLIP inputs bit for bit on every image."""
    for index in range(len(reader)):
        ours, theirs = reader[index], baseline[index]
        if not (torch.equal(ours.sam_pixels, theirs.sam_pixels) and torch.equal(ours.clip_pixels, theirs.clip_pixels)):
            return False
    return True


def per_image_ms(readers: dict[str, ImageReader], repeats: int) -> dict[str, np.ndarray]:
    """Milliseconds per image of each path, the paths taking turns on each image (a machine's load
    weighs on all of them alike), after a warm-up pass (page cache, lazy imports)."""
    for reader in readers.values():
        for index in range(len(reader)):
            reader[index]
    times = {path: [] for path in readers}
    for _ in range(repeats):
        for index in range(len(next(iter(readers.values())))):
            for path, reader in readers.items():
                started = time.perf_counter()
                reader[index]
                times[path].append((time.perf_counter() - started) * 1e3)
    return {path: np.array(values) for path, values in times.items()}


def loader_core_ms(reader: ImageReader, workers: int, epochs: int) -> float:
    """Core-milliseconds per image with ``workers`` workers, after one warm-up epoch."""
    loader = DataLoader(reader, batch_size=4, num_workers=workers, collate_fn=list, persistent_workers=True)
    for _ in loader:
        pass
    started = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return (time.perf_counter() - started) * 1e3 * workers / (epochs * len(reader))


def cpu_table(images: int, repeats: int, epochs: int) -> None:
    print(f"torch threads {torch.get_num_threads()}; {images} images per size, {repeats} repeats; ms per image per core")
    print(
        f"{'size':<15} {'preprocess':<9} {'path':<7} {'median':>7} {'p25-p75':>13} {'cores@400/s':>11} "
        f"{'1 worker':>9} {'2 workers':>9} {'vs today':>8} {'p25-p75':>9}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in SIZES.items():
            dataset = write_dataset(Path(tmp) / label.split()[0], size, images)
            for preprocess in ("direct", "released"):
                readers = {path: reader_for(path, dataset, preprocess) for path in PATHS}
                for path in ("pil", "cpu"):
                    if not same_inputs(readers[path], readers["today"]):
                        raise SystemExit(f"{label} {preprocess}: the {path} path's inputs differ from today's")
                times = per_image_ms(readers, repeats)
                for path, reader in readers.items():
                    median = float(np.median(times[path]))
                    ratio = times[path] / times["today"]  # image by image, each pair timed back to back
                    workers = [loader_core_ms(reader, n, epochs) for n in (1, 2)]
                    print(
                        f"{label:<15} {preprocess:<9} {path:<7} {median:7.2f} "
                        f"{np.percentile(times[path], 25):6.2f}-{np.percentile(times[path], 75):6.2f} "
                        f"{TARGET * median / 1e3:11.2f} {workers[0]:9.2f} {workers[1]:9.2f} {np.median(ratio):8.2f} "
                        f"{np.percentile(ratio, 25):4.2f}-{np.percentile(ratio, 75):4.2f}"
                    )


def step_profile(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in SIZES.items():
            dataset = write_dataset(Path(tmp) / label.split()[0], size, 1)
            path = dataset.image_path(dataset.images[0])
            for preprocess in ("direct", "released"):
                readers = {name: reader_for(name, dataset, preprocess) for name in ("today", "cpu")}
                print_steps(label, preprocess, cpu_steps(path, preprocess), readers, repeats)


def gpu_throughput(images: int, batch_size: int, batches: int, tiny: bool) -> None:
    """The device path on CUDA: decode + resizes alone, then with SAM ViT-B + CLIP ViT-L/14 (random
    weights, bf16 autocast as extraction runs them). ``tiny``: tiny models, to check the script runs."""
    import open_clip

    from regionspot_cache.encoders import SamBoxEncoder, build_sam
    from regionspot_cache.encoders.clip import ClipEncoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sam = SamBoxEncoder(build_sam("tiny" if tiny else "vit_b", None), device)
    model = open_clip.create_model("RS-Tiny-ViT" if tiny else "ViT-L-14", pretrained=None, device=device)
    clip = ClipEncoder(model.eval().requires_grad_(False), None, device)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_dataset(Path(tmp), SIZES["o365 1024x768"], images)
        reader = reader_for("device", dataset, "direct")
        loaded = [reader[i] for i in range(len(reader))]
    pixels = DevicePixels(DeviceResize.of(sam.resizer(), clip.preprocessor()), device)
    batch = [loaded[i % len(loaded)] for i in range(batch_size)]

    def timed(step, label: str) -> None:
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(batches):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(
            f"{label}: {batches * batch_size / (time.perf_counter() - started):.1f} images/s "
            f"(batches of {batch_size}, 1024x768 JPEG q90, {device})"
        )

    def encode() -> None:
        ready = pixels(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            sam.embed_images([item.sam_pixels for item in ready])
            clip.feature_maps(torch.stack([item.clip_pixels for item in ready]))

    timed(lambda: pixels(batch), "device decode + resizes")
    timed(encode, "device decode + resizes + SAM image encoder + CLIP feature maps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images per size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs timed per worker count")
    parser.add_argument("--gpu", action="store_true", help="also the device path's throughput on CUDA, real-size models")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: tiny models (checks the script on a CPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--steps", action="store_true", help="also the cpu path step by step against its floor")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader process = one core
    if not args.skip_cpu:
        cpu_table(args.images, args.repeats, args.epochs)
    if args.steps:
        step_profile(max(args.repeats * 4, 20))
    if args.gpu:
        torch.set_num_threads(torch.get_num_threads() if torch.cuda.is_available() else 2)
        gpu_throughput(args.images, args.batch_size, args.batches, args.tiny)


if __name__ == "__main__":
    main()
