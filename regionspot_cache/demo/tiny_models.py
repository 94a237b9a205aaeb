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
from regionspot_cache.encoders.sam import build_sam

TINY_SAM = "tiny"
TINY_CLIP = "RS-Tiny-ViT"


def write_tiny_checkpoints(directory: Path | str, seed: int = 0) -> ModelsConfig:
    """Save a random tiny SAM (``sam_tiny.pth``) and CLIP (``clip_tiny.pt``); returns their spec."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sam_path, clip_path = directory / "sam_tiny.pth", directory / "clip_tiny.pt"
    torch.manual_seed(seed)
    torch.save(build_sam(TINY_SAM, None).state_dict(), sam_path)
    logging.disable(logging.WARNING)  # open_clip warns that a model without pretrained tag is random
    try:
        clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    torch.save(clip.state_dict(), clip_path)
    return ModelsConfig(SamSpec(TINY_SAM, str(sam_path)), ClipSpec(TINY_CLIP, str(clip_path)))
