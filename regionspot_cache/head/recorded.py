"""What a head file records about its training that loading it again needs: the SAM and CLIP
of its training cache (``HeadMetadata.encoders``), and the inputs they were given (image
preprocessing, text recipe). ``rs-cache predict --head`` alone finds its models from these."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from regionspot_cache.config import ModelsConfig, Preprocessing, TextRecipe
from regionspot_cache.errors import MissingFileError
from regionspot_cache.head.model import CONFIG_SUFFIX, HeadMetadata, read_head_metadata

ModelOverrides = tuple[Optional[str], Optional[str], Optional[str], Optional[str]]


def inputs_of_head(metadata: HeadMetadata) -> tuple[Preprocessing, TextRecipe]:
    """The preprocessing and text recipe a head was trained on: as its training cache made them
    where the head records them; ``released`` for an imported released checkpoint; else the defaults."""
    if metadata.encoders is not None:
        recipe = metadata.encoders.text_recipe or TextRecipe.OPENCLIP
        return Preprocessing.of_sam_steps(metadata.encoders.sam.preprocess), TextRecipe.parse(recipe, "text recipe")
    if metadata.imported:  # released checkpoints want the released inputs
        return Preprocessing.RELEASED, TextRecipe.RELEASED
    return Preprocessing.DIRECT, TextRecipe.OPENCLIP


def models_of_head(head_file: Path | str, overrides: ModelOverrides = (None, None, None, None)) -> ModelsConfig:
    """The SAM and CLIP the head records it was trained with (from its training cache), with
    ``overrides`` (SAM variant, SAM checkpoint, CLIP model, CLIP pretrained; None: recorded) over
    them. A recorded weight file that is not there, or a head that records none, is an error
    naming the option to give."""
    metadata = read_head_metadata(head_file)
    where = Path(head_file).with_suffix(CONFIG_SUFFIX)
    if metadata.encoders is None:
        raise MissingFileError(
            f"{where}: the head records no SAM and CLIP (imported, or trained before heads recorded them): "
            "give --sam-variant, --sam-checkpoint, --clip-model and --clip-pretrained"
        )
    _, sam_checkpoint, _, clip_pretrained = overrides
    recorded = metadata.encoders.models()
    if sam_checkpoint is None:
        _check_recorded(recorded.sam.checkpoint, "SAM checkpoint", where, "--sam-checkpoint")
    if clip_pretrained is None and metadata.encoders.clip.weights_sha256 is not None:  # a file, not an open_clip tag
        _check_recorded(recorded.clip.pretrained, "CLIP weights file", where, "--clip-pretrained")
    return recorded.with_overrides(*overrides)


def _check_recorded(path: str | None, what: str, where: Path, option: str) -> None:
    if path is None or not Path(path).is_file():
        raise MissingFileError(f"{path}: the {what} that {where} records (from its training cache) is not there; pass {option}")
