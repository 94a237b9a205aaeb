"""Names, schemas and provenance of the cache format, shared by its writer and its reader."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from regionspot_cache.config import FEATURE_DTYPES, from_dict  # noqa: F401

# FEATURE_DTYPES: how maps and tokens are stored (Provenance.feature_dtype), defined with the config that picks it.
from regionspot_cache.errors import CacheFormatError, ConfigError
from regionspot_cache.runtime import differences, sha256_file, write_json

FORMAT_VERSION = 1

PROVENANCE_FILE = "cache.json"
SHARDS_DIR = "shards"
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
DEFAULT_TEXT_RECIPE = "openclip"  # vocabularies written before the key existed


def vocabulary_text_recipe(schema: pa.Schema) -> str:
    """The text recipe a vocabulary file records (``openclip`` for files that predate the record)."""
    metadata = schema.metadata or {}
    return metadata.get(TEXT_RECIPE_KEY, DEFAULT_TEXT_RECIPE.encode()).decode()



def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


def shard_checksums(shard_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a shard but the checksum file, by path relative to the shard."""
    return {
        path.relative_to(shard_dir).as_posix(): sha256_file(path)
        for path in sorted(shard_dir.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS_FILE
    }


FEATURE_MAPS_OWN, FEATURE_MAPS_BORROWED = "own", "borrowed"
FEATURE_MAPS_CACHE = "feature_maps_cache"  # key in Provenance.paths
PROPOSALS_DIR = "proposals"  # proposals caches that borrow a cache's feature maps live under it
VIEWS_DIR = "views"  # caches of augmented views of a cache's images live under it
VIEW_BASE_CACHE = "view_base_cache"  # key in Provenance.paths: the cache a view was made from (relative)
EXTRACTION_COST_FILE = "extraction_cost.json"  # wall seconds and images of the runs that wrote a cache


IdentityT = TypeVar("IdentityT", bound="ModelIdentity")


class ModelIdentity:
    """A model as ``cache.json`` records it: a dataclass read strictly from, and written as, a JSON object."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[IdentityT], data: Any, where: str) -> IdentityT:
        """Unknown, missing or mistyped fields are a CacheFormatError naming them."""
        try:
            return from_dict(cls, data, where)
        except ConfigError as err:
            raise CacheFormatError(str(err)) from None
        except TypeError as err:  # a required field is missing
            raise CacheFormatError(f"{where}: {err}") from None


@dataclass
class SamIdentity(ModelIdentity):
    """The SAM that made a cache's box tokens, as recorded under ``sam`` in ``cache.json``."""

    variant: str
    checkpoint_sha256: str | None
    input_size: int
    token_dim: int
    preprocess: str
    token: str


@dataclass
class ClipIdentity(ModelIdentity):
    """The CLIP that made a cache's feature maps and text embeddings, as recorded under ``clip``
    in ``cache.json``: ``pretrained`` is an open_clip tag, or None with ``weights_sha256`` of a file."""

    model: str
    pretrained: str | None
    weights_sha256: str | None
    image_size: list[int]  # a list, as JSON gives it back, so that recorded and fresh compare equal
    width: int  # channels of the feature map
    num_tokens: int  # rows of the feature map: prefix tokens (class token; none for SigLIP), then the patch grid
    text_dim: int
    logit_scale: float
    preprocess: str
    feature_map: str  # which tokens, from where (encoders/tower.py)
    # Added to every logit by SigLIP-style models; None for CLIP (and for caches written before it existed).
    logit_bias: float | None = None


@dataclass
class ViewIdentity(ModelIdentity):
    """The augmented view a view cache holds (data/views.py), as recorded under ``view`` in
    ``cache.json``. ``mode``: "released" stores only the CLIP maps of the view (boxes, labels and
    tokens are the base cache's); "consistent" stores the view's own boxes, tokens and maps."""

    id: str
    seed: int
    mode: str


@dataclass
class Provenance:
    """What produced a cache. Everything except ``package_version`` and file paths is identity:
    extracting into a cache with a different identity is refused."""

    dataset: str
    box_source: str
    shard_size: int
    planned_shards: int
    sam: SamIdentity
    clip: ClipIdentity
    format_version: int = FORMAT_VERSION
    package_version: str = ""
    paths: dict[str, str | None] = field(default_factory=dict)
    # "own", or "borrowed": a proposals cache holding only boxes and SAM tokens, whose CLIP
    # feature maps are read from the cache at ``paths["feature_maps_cache"]`` (relative to it).
    feature_maps: str = FEATURE_MAPS_OWN
    # "float16", or "int8" with a float32 scale per token (cache/arrays.py); the reader returns float16.
    feature_dtype: str = "float16"
    view: ViewIdentity | None = None  # set in a view cache (<cache>/views/<view id>/)

    def identity(self) -> dict[str, Any]:
        data = self._as_dict()
        data.pop("package_version")
        data.pop("paths")
        return data

    def _as_dict(self) -> dict[str, Any]:
        """As JSON records it; ``view`` only in a view cache, so other caches read and write as before."""
        data = asdict(self)
        if data["view"] is None:
            data.pop("view")
        return data

    def differences(self, other: "Provenance") -> list[str]:
        """What differs between this run (self) and the cache (``other``), one line per field."""
        return differences(other.identity(), self.identity(), "{key}: cache has {old!r}, this run has {new!r}")

    def to_json(self) -> str:
        return json.dumps(self._as_dict(), indent=2, sort_keys=True)

    @staticmethod
    def read(root: Path) -> "Provenance":
        path = root / PROVENANCE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheFormatError(f"{root}: not a feature cache ({PROVENANCE_FILE} missing)") from None
        except json.JSONDecodeError as err:
            raise CacheFormatError(f"{path}: damaged: {err}") from None
        if not isinstance(data, dict):
            raise CacheFormatError(f"{path}: damaged: expected a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{path}: cache format version {data.get('format_version')!r}, "
                f"this regionspot-cache reads version {FORMAT_VERSION}"
            )
        try:
            return Provenance(**{**data, "sam": SamIdentity.from_dict(data.get("sam"), f"{path}: sam"),
                                 "clip": ClipIdentity.from_dict(data.get("clip"), f"{path}: clip"),
                                 "view": None if data.get("view") is None
                                 else ViewIdentity.from_dict(data["view"], f"{path}: view")})
        except TypeError as err:
            raise CacheFormatError(f"{path}: unexpected provenance fields: {err}") from None


def record_extraction_cost(root: Path, seconds: float, images: int) -> None:
    """Add a run's wall seconds and images to the cache's running totals (not part of its identity;
    ``rs-cache inspect`` shows them, e.g. what a view costs next to its base cache)."""
    cost = read_extraction_cost(root)
    cost = {"seconds": round(cost["seconds"] + seconds, 3), "images": cost["images"] + images, "runs": cost["runs"] + 1}
    write_json(root / EXTRACTION_COST_FILE, cost)


def read_extraction_cost(root: Path) -> dict[str, Any]:
    """{"seconds", "images", "runs"} of the extractions into ``root`` so far (zeros if none recorded)."""
    try:
        data = json.loads((root / EXTRACTION_COST_FILE).read_text(encoding="utf-8"))
        return {"seconds": float(data["seconds"]), "images": int(data["images"]), "runs": int(data["runs"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"seconds": 0.0, "images": 0, "runs": 0}
