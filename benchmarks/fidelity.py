"""How far ``released`` and ``direct`` preprocessing put the CLIP feature maps apart.

Real-size CLIP ViT-B/16 architecture (open_clip, seeded random weights: no downloads) on the demo's
synthetic images and on the photographs matplotlib ships. Per image: relative error
||released - direct|| / ||direct|| of the feature map (float32), and of the CLIP input pixels.
Deterministic (no timings): one run is the figure.

    PYTHONPATH=. python benchmarks/fidelity.py [--demo-images 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import open_clip
import torch
from PIL import Image

from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.encoders.clip import ClipEncoder

PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def images(demo_count: int, workdir: Path) -> list[tuple[str, Image.Image]]:
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    found = [
        (f"photo {name}", Image.open(sample_data / name).convert("RGB")) for name in PHOTOS if (sample_data / name).is_file()
    ]
    generate_split(workdir, "val", SyntheticSpec(images=demo_count, seed=0))
    demo = sorted((workdir / "images").rglob("*.jpg")) + sorted((workdir / "images").rglob("*.png"))
    return found + [(f"demo {path.name}", Image.open(path).convert("RGB")) for path in demo[:demo_count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-images", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval().requires_grad_(False)
    direct = ClipEncoder(model, None, torch.device("cpu"))
    released = ClipEncoder(model, None, torch.device("cpu"), preprocessing="released")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, image in images(args.demo_images, Path(workdir)):
            pixels_d, pixels_r = direct.preprocess(image), released.preprocess(image)
            maps_d, maps_r = direct.feature_maps(pixels_d[None])[0], released.feature_maps(pixels_r[None])[0]
            per_token = (maps_r - maps_d).norm(dim=-1) / maps_d.norm(dim=-1)
            rows.append(
                (
                    name,
                    f"{image.width}x{image.height}",
                    relative_error(pixels_r, pixels_d),
                    relative_error(maps_r, maps_d),
                    float(per_token.max()),
                )
            )
    print("| image | size | pixels rel. error | feature map rel. error | worst token |")
    print("|---|---|---|---|---|")
    for name, size, pixels, maps, worst in rows:
        print(f"| {name} | {size} | {pixels:.4f} | {maps:.4f} | {worst:.4f} |")
    for kind in ("photo", "demo"):
        values = [r[3] for r in rows if r[0].startswith(kind)]
        if values:
            print(
                f"\n{kind}: feature map rel. error median {np.median(values):.4f}, "
                f"min {min(values):.4f}, max {max(values):.4f} over {len(values)} images"
            )


if __name__ == "__main__":
    main()
