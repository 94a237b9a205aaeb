"""Tiny SAM and CLIP built from the libraries' own classes with fixed-seed random weights.

Real weights cannot be bundled, so the demo writes these to checkpoint files and then loads them
back through the same code path as real checkpoints (``build_sam`` / ``load_clip``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip
import torch

from regionspot_cache.config import ClipSpec, ModelsConfig, SamSpec
from regionspot_cache.encoders.clip import MODEL_CONFIG_DIR  # noqa: F401  registers the tiny open_clip configs
from regionspot_cache.encoders.sam import build_sam
from regionspot_cache.encoders.sam2 import SAM2_ARCHITECTURES, build_sam2_model
from regionspot_cache.errors import InputError

TINY_SAM = "tiny"
TINY_CLIP = "RS-Tiny-ViT"
# One tiny config per family: SAM (segment-anything) and SAM 2.1 (sam2, Hiera); open_clip's own ViT
# and a timm-based SigLIP-shaped tower (no class token, attention pool, logit bias).
TINY_SAMS = (TINY_SAM, "sam2_tiny")
TINY_CLIPS = (TINY_CLIP, "RS-Tiny-Timm-ViT")


def write_tiny_checkpoints(
    directory: Path | str, seed: int = 0, sam_variant: str = TINY_SAM, clip_model: str = TINY_CLIP
) -> ModelsConfig:
    """Save a random tiny SAM (``sam_<variant>.pth``) and CLIP (``clip_tiny.pt`` / ``clip_<model>.pt``)
    as released checkpoints are laid out; returns their spec."""
    if sam_variant not in TINY_SAMS or clip_model not in TINY_CLIPS:
        raise InputError(f"tiny models are {TINY_SAMS} and {TINY_CLIPS}, not {sam_variant!r} and {clip_model!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sam_path = directory / f"sam_{sam_variant}.pth"
    clip_path = directory / ("clip_tiny.pt" if clip_model == TINY_CLIP else f"clip_{clip_model}.pt")
    spec = ModelsConfig(SamSpec(sam_variant, str(sam_path)), ClipSpec(clip_model, str(clip_path)))
    if (directory / _written_marker(seed, sam_variant, clip_model)).is_file():
        # Written by an earlier run: kept, since the caches it extracted record their SHA-256
        # (a resumed demo would be refused if the files were rewritten with other bytes).
        return spec
    torch.manual_seed(seed)
    if sam_variant in SAM2_ARCHITECTURES:  # SAM 2 releases hold {"model": state_dict}
        torch.save({"model": build_sam2_model(sam_variant, None).state_dict()}, sam_path)
    else:
        torch.save(build_sam(sam_variant, None).state_dict(), sam_path)
    logging.disable(logging.WARNING)  # open_clip warns that a model without pretrained tag is random
    try:
        clip = open_clip.create_model(clip_model, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    torch.save(clip.state_dict(), clip_path)
    (directory / _written_marker(seed, sam_variant, clip_model)).touch()  # last: both files are complete
    return spec


def _written_marker(seed: int, sam_variant: str, clip_model: str) -> str:
    return f".written-seed{seed}-{sam_variant}-{clip_model}"
