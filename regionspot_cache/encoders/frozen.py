"""The pair of frozen encoders used by extraction, and the provenance they stamp on a cache."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from regionspot_cache.config import ModelsConfig, Preprocessing
from regionspot_cache.encoders.clip import ClipEncoder, load_clip
from regionspot_cache.encoders.preprocess import test_resize_for
from regionspot_cache.encoders.sam import SAM_ARCHITECTURES, TOKEN_DIM, SamBoxEncoder, build_sam
from regionspot_cache.encoders.sam2 import SAM2_ARCHITECTURES, Sam2BoxEncoder, build_sam2_model
from regionspot_cache.errors import ConfigError, ModelLoadError
from regionspot_cache.identity import ClipIdentity, SamIdentity, WeightFiles
from regionspot_cache.runtime.files import sha256_file


@dataclass
class FrozenEncoders:
    sam: SamBoxEncoder | Sam2BoxEncoder
    clip: ClipEncoder
    spec: ModelsConfig

    @property
    def is_sam2(self) -> bool:
        return isinstance(self.sam, Sam2BoxEncoder)

    @property
    def preprocess(self) -> Preprocessing:
        """``extract.preprocess``: ``direct`` or ``released`` (``encoders/preprocess.py``)."""
        return self.clip.preprocessing

    def with_preprocess(self, preprocess: Preprocessing | str) -> "FrozenEncoders":
        """The same loaded models with another image/box preprocessing (nothing is reloaded)."""
        preprocess = Preprocessing.parse(preprocess, "preprocess")
        if preprocess is self.preprocess:
            return self
        if self.is_sam2:
            raise ConfigError(
                f"extract.preprocess {preprocess!r} repeats the released RegionSpot code, which runs SAM 1; "
                f"SAM 2.1 ({self.spec.sam.variant}) takes the direct preprocessing"
            )
        sam = copy.copy(self.sam)
        sam.preprocessing, sam.test_resize = preprocess, test_resize_for(preprocess)
        return FrozenEncoders(sam, replace(self.clip, preprocessing=preprocess), self.spec)

    def sam_provenance(self) -> SamIdentity:
        checkpoint = self.spec.sam.checkpoint
        return SamIdentity(
            variant=self.spec.sam.variant,
            checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None,
            input_size=self.sam.input_size,
            token_dim=TOKEN_DIM,
            preprocess=_SAM2_STEPS if self.is_sam2 else self.preprocess.sam_steps,
            token=_SAM2_TOKEN if self.is_sam2 else _SAM_TOKEN,
        )

    def clip_provenance(self) -> ClipIdentity:
        pretrained = self.spec.clip.pretrained
        is_file = bool(pretrained) and Path(pretrained).is_file()
        cfg = self.clip.model.visual.preprocess_cfg
        return ClipIdentity(
            model=self.spec.clip.model,
            pretrained=None if is_file else pretrained,
            weights_sha256=sha256_file(pretrained) if is_file else None,
            image_size=list(self.clip.image_size),
            width=self.clip.width,
            num_tokens=self.clip.num_tokens,
            text_dim=self.clip.text_dim,
            logit_scale=self.clip.logit_scale,
            preprocess=self.preprocess.clip_steps(cfg.get("interpolation", "bicubic")),
            feature_map=self.clip.tower.description(),
            logit_bias=self.clip.logit_bias,
        )

    def weight_files(self) -> WeightFiles:
        """Where the weights were read from, absolute, so that commands run from another
        directory (eval --masks, clip-*, repair) find them again."""
        return WeightFiles(_absolute_if_file(self.spec.sam.checkpoint), _absolute_if_file(self.spec.clip.pretrained))


def _absolute_if_file(path: str | None) -> str | None:
    """A local file's absolute path; anything else (None, an open_clip tag) unchanged."""
    return str(Path(path).resolve()) if path and Path(path).is_file() else path


_SAM_TOKEN = "mask_decoder.transformer output, mask token 0"
_SAM2_STEPS = "square resize+mean_std, no_mem_embed (SAM2ImagePredictor.set_image)"
_SAM2_TOKEN = "sam_mask_decoder.transformer output, mask token 0 (index 2, after the object-score token)"


def load_box_encoder(variant: str, checkpoint: str | None, device: torch.device) -> SamBoxEncoder | Sam2BoxEncoder:
    """SAM 1 (segment-anything) or SAM 2.1 (sam2) by variant name; both give the same interface."""
    if variant in SAM2_ARCHITECTURES:
        return Sam2BoxEncoder(build_sam2_model(variant, checkpoint), device)
    if variant not in SAM_ARCHITECTURES:
        raise ModelLoadError(f"unknown SAM variant {variant!r}; known: {sorted(SAM_ARCHITECTURES) + sorted(SAM2_ARCHITECTURES)}")
    return SamBoxEncoder(build_sam(variant, checkpoint), device)


def load_frozen_encoders(
    spec: ModelsConfig, device: torch.device, preprocess: Preprocessing | str = Preprocessing.DIRECT
) -> FrozenEncoders:
    sam = load_box_encoder(spec.sam.variant, spec.sam.checkpoint, device)
    clip = load_clip(spec.clip.model, spec.clip.pretrained, device)
    return FrozenEncoders(sam, clip, spec).with_preprocess(preprocess)
