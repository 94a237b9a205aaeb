"""Frozen encoders: SAM box tokens and CLIP feature maps / text embeddings."""

from regionspot_cache.encoders.clip import ClipEncoder, load_clip
from regionspot_cache.encoders.frozen import FrozenEncoders, load_frozen_encoders
from regionspot_cache.encoders.sam import SAM_ARCHITECTURES, SamBoxEncoder, build_sam

__all__ = [
    "ClipEncoder",
    "FrozenEncoders",
    "SAM_ARCHITECTURES",
    "SamBoxEncoder",
    "build_sam",
    "load_clip",
    "load_frozen_encoders",
]
