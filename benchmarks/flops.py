"""FLOPs and cache bytes per image of each recipe's frozen encoders (the numbers in pipelines/*.toml).

Models are built at real size with random weights on the CPU (weights do not change the count);
``torch.utils.flop_counter.FlopCounterMode`` counts one image through SAM's image encoder, one box
through the token path of SAM's mask decoder, and one image through the CLIP tower up to the
cached feature map. Bytes are what a float16 cache stores: the feature map per image, 512 per box.

    python benchmarks/flops.py                  # every recipe below
    python benchmarks/flops.py --only BB SO400M
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from regionspot_cache.encoders.clip import ClipEncoder
from regionspot_cache.encoders.frozen import load_box_encoder

CPU = torch.device("cpu")
FLOAT16_BYTES = 2


@dataclass(frozen=True)
class Recipe:
    name: str
    sam_variant: str
    clip_model: str


RECIPES = [
    Recipe("BB", "vit_b", "ViT-B-16"),
    Recipe("BL", "vit_b", "ViT-L-14"),
    Recipe("BL336", "vit_b", "ViT-L-14-336"),
    Recipe("SAM2.1-B+/PE-Core-L", "sam2.1_hiera_base_plus", "PE-Core-L-14-336"),
    Recipe("SO400M", "vit_b", "ViT-SO400M-16-SigLIP2-384"),
]


def counted(run) -> int:
    # nn.MultiheadAttention's inference fast path is one fused op the counter does not know: off while counting.
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def sam_flops(variant: str) -> tuple[int, int]:
    """(image encoder FLOPs per image, mask-decoder token FLOPs per box)."""
    sam = load_box_encoder(variant, None, CPU)
    image = np.zeros((480, 640, 3), np.uint8)  # COCO's typical size; SAM pads/resizes to its input size anyway
    resized = sam.resizer()(image)
    embeddings = []
    image_flops = counted(lambda: embeddings.extend(sam.embed_images([resized])))
    embedding = embeddings[0]
    box = np.array([[100, 100, 300, 250]], np.float32)
    return image_flops, counted(lambda: sam.box_tokens(embedding, box, image.shape[:2]))


def clip_flops_and_bytes(model: str) -> tuple[int, int]:
    """(feature-map FLOPs per image, float16 bytes of the cached map)."""
    # The vision tower only: no tokenizer (SigLIP's comes from Hugging Face).
    clip = ClipEncoder(open_clip.create_model(model, pretrained=None).eval(), None, CPU)
    pixels = torch.zeros(1, 3, *clip.image_size)
    return counted(lambda: clip.feature_maps(pixels)), FLOAT16_BYTES * clip.num_tokens * clip.width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="recipe names to count (default: all)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # open_clip warns that random weights are random
    torch.manual_seed(0)
    print(
        "| recipe | SAM | CLIP | SAM image GFLOPs | SAM GFLOPs/box | CLIP GFLOPs | total GFLOPs/image (+100 boxes) "
        "| cache bytes/image (map) | bytes/box |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe in RECIPES:
        if args.only and recipe.name not in args.only:
            continue
        sam_image, sam_box = sam_flops(recipe.sam_variant)
        clip, map_bytes = clip_flops_and_bytes(recipe.clip_model)
        total = sam_image + clip + 100 * sam_box
        print(
            f"| {recipe.name} | {recipe.sam_variant} | {recipe.clip_model} | {sam_image / 1e9:.1f} | {sam_box / 1e9:.3f} "
            f"| {clip / 1e9:.1f} | {total / 1e9:.1f} | {map_bytes:,} | {FLOAT16_BYTES * 256} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
