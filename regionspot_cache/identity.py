"""What a cache is, as its ``cache.json`` records it: the models that made it, the weight files
they were read from, and the cache's kind (plain, proposals, view).

A leaf module (it imports only ``config``): ``encoders/`` stamps these values on what it makes,
``cache/`` stores and checks them, ``extract/`` hands them to the runner. The JSON keys are
those caches have always had, so caches written before these types existed read and write back
the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from regionspot_cache.config import ClipSpec, ConfigError, ModelsConfig, SamSpec, ViewMode
from regionspot_cache.validated import from_dict

IdentityT = TypeVar("IdentityT", bound="ModelIdentity")


class ModelIdentity:
    """A model as ``cache.json`` records it: a dataclass read strictly from, and written as, a JSON object."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[IdentityT], data: Any, where: str) -> IdentityT:
        """Unknown, missing or mistyped fields are a ConfigError naming them (the cache's reader
        turns it into a CacheFormatError naming the file)."""
        try:
            return from_dict(cls, data, where)
        except TypeError as err:  # a required field is missing
            raise ConfigError(f"{where}: {err}") from None


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
    mode: ViewMode


@dataclass(frozen=True)
class WeightFiles:
    """Where the weights were read from, recorded under ``paths`` in ``cache.json``: local files
    absolute (so commands run from another directory find them again), open_clip tags as given.
    Not identity: the hashes in ``SamIdentity`` / ``ClipIdentity`` are."""

    sam_checkpoint: str | None = None
    clip_pretrained: str | None = None

    def to_paths(self) -> dict[str, str | None]:
        return {"sam_checkpoint": self.sam_checkpoint, "clip_pretrained": self.clip_pretrained}

    @staticmethod
    def from_paths(paths: dict[str, Any]) -> WeightFiles:
        return WeightFiles(paths.get("sam_checkpoint"), paths.get("clip_pretrained"))


FEATURE_MAPS_OWN, FEATURE_MAPS_BORROWED = "own", "borrowed"  # values of ``feature_maps`` in cache.json
FEATURE_MAPS_CACHE = "feature_maps_cache"  # key in cache.json's paths: where a proposals cache's maps are
VIEW_BASE_CACHE = "view_base_cache"  # key in cache.json's paths: the cache a view was made from
VIEW_BASE = "../.."  # a view cache lives at <base>/views/<view id>/


@dataclass(frozen=True)
class CacheKind:
    """Which of three a cache is, and the cache it builds on (``base``, relative to it):

    - plain, ``CacheKind()``: owns its boxes, SAM tokens and CLIP feature maps; no base;
    - proposals, ``CacheKind.proposals(base)``: SAM tokens of other boxes, CLIP feature maps
      borrowed from the base (recorded as ``feature_maps: borrowed`` and ``paths.feature_maps_cache``);
    - view, ``CacheKind.of_view(view)``: the base's images seen through ``view``, with feature maps
      of its own (recorded as ``view`` and ``paths.view_base_cache``).
    """

    base: str | None = None
    view: ViewIdentity | None = None

    @staticmethod
    def proposals(maps_from: str) -> CacheKind:
        return CacheKind(base=maps_from)

    @staticmethod
    def of_view(view: ViewIdentity, base: str = VIEW_BASE) -> CacheKind:
        return CacheKind(base=base, view=view)

    @property
    def is_plain(self) -> bool:
        return self.base is None

    @property
    def is_proposals(self) -> bool:
        return self.base is not None and self.view is None

    @property
    def owns_feature_maps(self) -> bool:
        """False for a proposals cache: it reads its base's feature maps, only SAM runs for it."""
        return not self.is_proposals

    def recorded(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(top-level keys, keys under ``paths``) of ``cache.json``; ``view`` only in a view cache,
        so other caches read and write as before."""
        top: dict[str, Any] = {"feature_maps": FEATURE_MAPS_BORROWED if self.is_proposals else FEATURE_MAPS_OWN}
        if self.view is not None:
            top["view"] = self.view.to_dict()
        paths = {} if self.base is None else {VIEW_BASE_CACHE if self.view else FEATURE_MAPS_CACHE: self.base}
        return top, paths

    @staticmethod
    def read(data: dict[str, Any], where: str) -> CacheKind:
        """The kind a ``cache.json`` (``data``) records; ConfigError names what does not fit."""
        paths = data.get("paths") or {}
        feature_maps = data.get("feature_maps", FEATURE_MAPS_OWN)
        if data.get("view") is not None:
            return CacheKind.of_view(
                ViewIdentity.from_dict(data["view"], f"{where}: view"), paths.get(VIEW_BASE_CACHE, VIEW_BASE)
            )
        if feature_maps == FEATURE_MAPS_OWN:
            return CacheKind()
        if feature_maps != FEATURE_MAPS_BORROWED:
            raise ConfigError(f"{where}: feature_maps {feature_maps!r} is not one of {FEATURE_MAPS_OWN}, {FEATURE_MAPS_BORROWED}")
        if not isinstance(paths.get(FEATURE_MAPS_CACHE), str):
            raise ConfigError(
                f"{where}: feature_maps is {FEATURE_MAPS_BORROWED!r} but paths.{FEATURE_MAPS_CACHE} does not say from where"
            )
        return CacheKind.proposals(paths[FEATURE_MAPS_CACHE])


class RecordsModels(Protocol):
    """What names the models of a cache: its provenance (``cache/format.py``)."""

    sam: SamIdentity
    clip: ClipIdentity
    weights: WeightFiles


def models_recorded_in(provenance: RecordsModels) -> ModelsConfig:
    """The models a cache was extracted with, from the variants and paths its provenance
    recorded (checkpoint hashes are checked again when the cache is reopened for writing)."""
    weights = provenance.weights
    return ModelsConfig(
        SamSpec(provenance.sam.variant, weights.sam_checkpoint),
        ClipSpec(provenance.clip.model, weights.clip_pretrained or provenance.clip.pretrained),
    )


@dataclass
class TrainedWith:
    """The SAM and CLIP a head was trained with, as its training cache recorded them (identities
    with their hashes, and the weight files they were read from), and the text recipe of its
    vocabulary: what ``predict --head`` needs to load them again without model flags.
    Recorded under ``encoders`` in the head's JSON file; heads written before it have none."""

    sam: SamIdentity
    clip: ClipIdentity
    weights: WeightFiles
    text_recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        recipe = {} if self.text_recipe is None else {"text_recipe": self.text_recipe}
        return {"sam": self.sam.to_dict(), "clip": self.clip.to_dict(), "paths": self.weights.to_paths(), **recipe}

    @staticmethod
    def from_dict(data: Any, where: str) -> TrainedWith:
        """What does not fit is a ConfigError naming it (the head loader names the file)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected an object with sam, clip and paths")
        unknown = sorted(set(data) - {"sam", "clip", "paths", "text_recipe"})
        if unknown:
            raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
        paths = data.get("paths")
        if not isinstance(paths, dict):
            raise ConfigError(f"{where}: paths: expected an object with sam_checkpoint and clip_pretrained")
        return TrainedWith(
            SamIdentity.from_dict(data.get("sam"), f"{where}: sam"),
            ClipIdentity.from_dict(data.get("clip"), f"{where}: clip"),
            WeightFiles.from_paths(paths),
            data.get("text_recipe"),
        )

    def models(self) -> ModelsConfig:
        """The models as the cache named them: variants, with the weight files (or CLIP tag)."""
        return models_recorded_in(self)
