"""What evaluation needs besides the cache for the training-free baselines and mask AP: the
cache's models, its original images, and SAM masks on the detections.

The models are those recorded in the cache's ``cache.json`` unless others are given; either way
they must be the models the cache was extracted with (its vocabulary's text embeddings and box
tokens come from them), which is checked against the provenance before anything runs.
"""

from __future__ import annotations

from pathlib import Path

from regionspot_cache.cache import CacheFormatError, CacheReader, Provenance
from regionspot_cache.config import ModelsConfig, Preprocessing
from regionspot_cache.data.datasets import ImageEntry
from regionspot_cache.data.images import ImageSource
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders
from regionspot_cache.encoders.sam import SamBoxEncoder
from regionspot_cache.errors import MissingFileError
from regionspot_cache.evaluate.masks import add_segmentations
from regionspot_cache.evaluate.scoring import Detections, cap_per_image
from regionspot_cache.identity import models_recorded_in
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.runtime.files import write_json
from regionspot_cache.runtime.records import differences


def load_cache_encoders(reader: CacheReader, models: ModelsConfig | None, device: str) -> FrozenEncoders:
    """Load ``models`` (default: the cache's) and check they are the cache's models."""
    models = models or models_recorded_in(reader.provenance)
    try:
        # The images are prepared as at extraction (extract.preprocess), so masks fit the cached tokens.
        encoders = load_frozen_encoders(models, resolve_device(device), Preprocessing.recorded_in(reader.provenance))
    except FileNotFoundError as err:
        raise MissingFileError(
            f"{err} (models recorded in {reader.root / 'cache.json'}; give their files with --sam-checkpoint / --clip-pretrained)"
        ) from None
    differences = model_differences(encoders, reader.provenance)
    if differences:
        found = "; ".join(differences)
        raise CacheFormatError(f"{reader.location}: these are not the models the cache was extracted with: {found}")
    return encoders


def model_differences(encoders: FrozenEncoders, provenance: Provenance) -> list[str]:
    given = {"sam": encoders.sam_provenance(), "clip": encoders.clip_provenance()}
    recorded = {"sam": provenance.sam, "clip": provenance.clip}
    return differences(recorded, given, "{key}: cache has {old!r}, given {new!r}")


def cache_images(reader: CacheReader, image_root: Path | str) -> ImageSource:
    """The original images of the cache's entries, under ``image_root``."""
    rows = reader.images.select(["image_id", "file_name", "width", "height"]).to_pylist()
    entries = {row["image_id"]: ImageEntry(row["image_id"], row["file_name"], row["width"], row["height"]) for row in rows}
    return ImageSource(Path(image_root), entries)


def records_with_masks(detections: Detections, max_dets: int, images: ImageSource, sam: SamBoxEncoder) -> list[dict]:
    """LVIS records of the detections LVIS will count (its per-image cap ``max_dets`` first, so
    no mask is computed for nothing), each with SAM's mask for its box as ``segmentation``."""
    records = cap_per_image(detections, max_dets).records()
    add_segmentations(records, images, sam)
    return records


def write_records_json(records: list[dict], path: Path | str) -> Path:
    return write_json(path, records)
