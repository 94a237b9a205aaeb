"""``benchmarks/feeder.py --steps``: the ``cpu`` path's cost step by step on one photograph per
size, against its floor (the decode and the resizes alone: PIL's, and for ``released`` CLIP's
torch resize, all kept because the outputs must stay bit for bit today's). The steps take turns
for ``repeats`` rounds; median and minimum in ms."""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resize

from regionspot_cache.encoders.preprocess import TestResize, chw_uint8
from regionspot_cache.extract.decode import plain_jpeg, read_rgb
from regionspot_cache.runtime.files import file_content_digest

FLOOR = "*"  # marks the steps of the floor


def cpu_steps(path, preprocess: str, clip_size=(224, 224), interpolation=Image.BICUBIC) -> dict[str, callable]:
    """Each step of ``ImageReader.__getitem__`` on the ``cpu`` path, on its own inputs."""
    jpeg = plain_jpeg(path, None)
    decoded = decode_jpeg(jpeg.tensor(), mode=ImageReadMode.RGB)
    image = read_rgb(path)
    steps = {
        "read bytes + header + EXIF": lambda: plain_jpeg(path, None),
        f"{FLOOR}decode (libjpeg-turbo)": lambda: decode_jpeg(jpeg.tensor(), mode=ImageReadMode.RGB),
        "to a PIL image": lambda: Image.fromarray(decoded.permute(1, 2, 0).numpy()),
        "content digest": lambda: file_content_digest(path),
    }
    sam_input = image
    if preprocess == "released":
        test_resize = TestResize()
        sam_input = test_resize.image(image)
        steps[f"{FLOOR}test resize (PIL bilinear, {sam_input.width}x{sam_input.height})"] = lambda: test_resize.image(image)
    height, width = ResizeLongestSide.get_preprocess_shape(sam_input.height, sam_input.width, 1024)
    sam_resized = sam_input.resize((width, height), Image.BILINEAR)
    if (width, height) != sam_input.size:
        steps[f"{FLOOR}SAM resize (PIL bilinear, {width}x{height})"] = lambda: sam_input.resize((width, height), Image.BILINEAR)
    steps["SAM (3,h,w) uint8"] = lambda: chw_uint8(sam_resized)
    mean, std = torch.rand(3, 1, 1), torch.rand(3, 1, 1) + 0.5
    if preprocess == "released":
        pixels = torch.from_numpy(np.asarray(sam_input, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        small = resize(pixels, list(clip_size), interpolation=InterpolationMode.BILINEAR, antialias=False)
        steps["CLIP float / 255 (test-resized image)"] = lambda: (
            torch.from_numpy(np.asarray(sam_input, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        )
        steps[f"{FLOOR}CLIP torch bilinear resize"] = lambda: resize(
            pixels, list(clip_size), interpolation=InterpolationMode.BILINEAR, antialias=False
        )
    else:
        small = image.resize(clip_size[::-1], interpolation)
        steps[f"{FLOOR}CLIP resize (PIL bicubic)"] = lambda: image.resize(clip_size[::-1], interpolation)
        steps["CLIP float / 255"] = lambda: torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        small = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
    steps["CLIP mean/std"] = lambda: (small - mean) / std
    return steps


def print_steps(label: str, preprocess: str, steps: dict, readers: dict, repeats: int) -> None:
    """``readers``: whole items of ``today`` and ``cpu``, timed in the same rounds as the steps."""
    every = {**steps, **{f"whole item, {path}": (lambda r=reader: r[0]) for path, reader in readers.items()}}
    times = {name: [] for name in every}
    for step in every.values():
        step()
    for _ in range(repeats):
        for name, step in every.items():
            started = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - started) * 1e3)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    print(f"{label} {preprocess}  (* = floor: decode + resizes)")
    for name, values in times.items():
        print(f"  {name:<48} {medians[name]:7.2f} (min {np.min(values):6.2f})")
    for statistic, of in (("median", np.median), ("min", np.min)):  # min: the least disturbed by a loaded machine
        value = {name: float(of(values)) for name, values in times.items()}
        floor = sum(v for name, v in value.items() if name.startswith(FLOOR))
        today, cpu = value["whole item, today"], value["whole item, cpu"]
        print(
            f"  by {statistic}: floor {floor:.2f} ms = {floor / today:.2f}x today; steps {sum(value[n] for n in steps):.2f}; "
            f"cpu item {cpu:.2f} = {cpu / today:.2f}x today ({cpu - floor:.2f} ms above the floor)"
        )
