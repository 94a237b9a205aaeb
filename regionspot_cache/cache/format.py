"""Names, schemas and provenance of the cache format, shared by its writer and its reader."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from regionspot_cache.cache.storage import SHARDS_DIR, CacheLocation, shard_name  # noqa: F401 (the format's names)
from regionspot_cache.config import FeatureDtype, TextRecipe
from regionspot_cache.errors import CacheFormatError, ConfigError

# The identities lived here: re-exported for a while (the package itself imports identity).
from regionspot_cache.identity import CacheKind, ClipIdentity, SamIdentity, ViewIdentity, WeightFiles  # noqa: F401
from regionspot_cache.runtime.files import sha256_file, write_json
from regionspot_cache.runtime.records import differences

FORMAT_VERSION = 1

PROVENANCE_FILE = "cache.json"
VOCAB_DIR = "vocabularies"
IMAGES_FILE = "images.parquet"
BOXES_FILE = "boxes.parquet"
REJECTED_FILE = "rejected_boxes.parquet"  # degenerate boxes, as given, with the reason
FEATURES_DIR = "features.zarr"
CHECKSUMS_FILE = "checksums.json"  # SHA-256 of every other file of the shard, written at commit
# SHA-256 of what the shard was extracted from (its images and their boxes as given), written at
# commit and compared when a re-run would skip the shard, so an edited annotation file is noticed.
INPUT_FILE = "input.json"
CLIP_MAPS = "clip_maps"
BOX_TOKENS = "box_tokens"
SCALE_SUFFIX = "_scale"  # int8 caches: <array>_scale holds one float32 scale per row

STATUS_OK = "ok"
STATUS_FAILED = "failed"  # could not be decoded; the reason names the file and the problem
TOKENS_PER_CHUNK = 1024  # box tokens per zarr chunk (512 KiB of float16)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("map_row", pa.int32()),  # row in clip_maps, -1 when the image failed
        ("box_start", pa.int64()),  # first row in box_tokens
        ("box_count", pa.int32()),
    ]
)

BOXES_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("category_id", pa.int64()),
        ("score", pa.float32()),
    ]
)


REJECTED_SCHEMA = BOXES_SCHEMA.append(pa.field("reason", pa.string()))


def vocabulary_schema(text_dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("category_id", pa.int64()),
            ("name", pa.string()),
            ("frequency", pa.string()),
            ("embedding", pa.list_(pa.float32(), text_dim)),
        ]
    )


TEXT_RECIPE_KEY = b"text_recipe"  # schema metadata of vocabularies/NAME.parquet: how the embeddings were made
DEFAULT_TEXT_RECIPE = TextRecipe.OPENCLIP  # vocabularies written before the key existed


def vocabulary_text_recipe(schema: pa.Schema) -> TextRecipe:
    """The text recipe a vocabulary file records (``openclip`` for files that predate the record)."""
    metadata = schema.metadata or {}
    word = metadata.get(TEXT_RECIPE_KEY, DEFAULT_TEXT_RECIPE.value.encode()).decode()
    recipe = TextRecipe.find(word)
    if recipe is None:
        raise CacheFormatError(f"vocabulary text recipe {word!r} is not one of {', '.join(TextRecipe.words())}")
    return recipe


def shard_checksums(shard_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a shard but the checksum file, by path relative to the shard."""
    return {
        path.relative_to(shard_dir).as_posix(): sha256_file(path)
        for path in sorted(shard_dir.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    }


PROPOSALS_DIR = "proposals"  # proposals caches that borrow a cache's feature maps live under it
VIEWS_DIR = "views"  # caches of augmented views of a cache's images live under it
EXTRACTION_COST_FILE = "extraction_cost.json"  # wall seconds and images of the runs that wrote a cache


@dataclass
class Provenance:
    """What produced a cache. Everything except ``package_version`` and the weight files is
    identity: extracting into a cache with a different identity is refused.

    ``cache.json`` keeps the keys it always had: ``weights`` is written under ``paths``, and
    ``kind`` as ``feature_maps``, ``view`` and its base's path under ``paths`` (identity.py)."""

    dataset: str
    box_source: str
    shard_size: int
    planned_shards: int
    sam: SamIdentity
    clip: ClipIdentity
    format_version: int = FORMAT_VERSION
    package_version: str = ""
    weights: WeightFiles = field(default_factory=WeightFiles)
    kind: CacheKind = field(default_factory=CacheKind)
    # "float16", or "int8" with a float32 scale per token (cache/arrays.py); the reader returns float16.
    feature_dtype: FeatureDtype = FeatureDtype.FLOAT16

    def __post_init__(self) -> None:
        dtype = FeatureDtype.find(self.feature_dtype)
        if dtype is None:
            raise CacheFormatError(f"feature_dtype {self.feature_dtype!r} is not one of {', '.join(FeatureDtype.words())}")
        self.feature_dtype = dtype

    def identity(self) -> dict[str, Any]:
        data = self._as_dict()
        data.pop("package_version")
        data.pop("paths")
        return data

    def _as_dict(self) -> dict[str, Any]:
        """As ``cache.json`` records it."""
        kind, kind_paths = self.kind.recorded()
        return {
            "dataset": self.dataset,
            "box_source": self.box_source,
            "shard_size": self.shard_size,
            "planned_shards": self.planned_shards,
            "sam": self.sam.to_dict(),
            "clip": self.clip.to_dict(),
            "format_version": self.format_version,
            "package_version": self.package_version,
            "paths": {**self.weights.to_paths(), **kind_paths},
            "feature_dtype": self.feature_dtype,
            **kind,
        }

    def differences(self, other: "Provenance") -> list[str]:
        """What differs between this run (self) and the cache (``other``), one line per field."""
        return differences(other.identity(), self.identity(), "{key}: cache has {old!r}, this run has {new!r}")

    def to_json(self) -> str:
        return json.dumps(self._as_dict(), indent=2, sort_keys=True)

    @staticmethod
    def read(root: Path | str | CacheLocation) -> "Provenance":
        location = CacheLocation.parse(root)
        path = location.path(PROVENANCE_FILE)
        try:
            data = json.loads(location.read_bytes(PROVENANCE_FILE).decode("utf-8"))
        except FileNotFoundError:
            raise CacheFormatError(f"{location}: not a feature cache ({PROVENANCE_FILE} missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CacheFormatError(f"{path}: damaged: {err}") from None
        if not isinstance(data, dict):
            raise CacheFormatError(f"{path}: damaged: expected a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{path}: cache format version {data.get('format_version')!r}, "
                f"this regionspot-cache reads version {FORMAT_VERSION}"
            )
        return Provenance.from_recorded(data, str(path))

    @staticmethod
    def from_recorded(data: dict[str, Any], where: str) -> "Provenance":
        """The provenance a ``cache.json`` object records; what does not fit is a CacheFormatError."""
        recorded = {key: value for key, value in data.items() if key not in _KIND_AND_WEIGHTS}
        try:
            return Provenance(
                **{
                    **recorded,
                    "sam": SamIdentity.from_dict(data.get("sam"), f"{where}: sam"),
                    "clip": ClipIdentity.from_dict(data.get("clip"), f"{where}: clip"),
                    "weights": WeightFiles.from_paths(data.get("paths") or {}),
                    "kind": CacheKind.read(data, where),
                }
            )
        except ConfigError as err:
            raise CacheFormatError(str(err)) from None
        except TypeError as err:
            raise CacheFormatError(f"{where}: unexpected provenance fields: {err}") from None
        except CacheFormatError as err:  # a value out of its choices (feature_dtype)
            raise CacheFormatError(f"{where}: {err}") from None


_KIND_AND_WEIGHTS = ("paths", "feature_maps", "view")  # cache.json keys that Provenance holds as typed parts


def record_extraction_cost(root: Path | str | CacheLocation, seconds: float, images: int) -> None:
    """Add a run's wall seconds and images to the cache's running totals (not part of its identity;
    ``rs-cache inspect`` shows them, e.g. what a view costs next to its base cache)."""
    location = CacheLocation.parse(root)
    cost = read_extraction_cost(location)
    cost = {"seconds": round(cost["seconds"] + seconds, 3), "images": cost["images"] + images, "runs": cost["runs"] + 1}
    if location.local is not None:
        write_json(location.local / EXTRACTION_COST_FILE, cost)
    else:
        location.write_bytes(EXTRACTION_COST_FILE, json.dumps(cost).encode())


def read_extraction_cost(root: Path | str | CacheLocation) -> dict[str, Any]:
    """{"seconds", "images", "runs"} of the extractions into ``root`` so far (zeros if none recorded)."""
    try:
        data = json.loads(CacheLocation.parse(root).read_bytes(EXTRACTION_COST_FILE).decode("utf-8"))
        return {"seconds": float(data["seconds"]), "images": int(data["images"]), "runs": int(data["runs"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"seconds": 0.0, "images": 0, "runs": 0}
