"""Dataclass configs for the three phases, and recipe files (TOML) that fill them.

A recipe is data: ``[models.sam]``, ``[models.clip]``, ``[extract]``, ``[train]`` and ``[eval]``
tables whose keys are the fields below. Unknown keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from regionspot_cache.runtime import read_toml


@dataclass
class SamSpec:
    """A SAM model: architecture name from ``encoders.sam.SAM_ARCHITECTURES`` and its weights."""

    variant: str = "vit_b"
    checkpoint: str | None = None


@dataclass
class ClipSpec:
    """An open_clip model: a model config name and a pretrained tag or a local weights file."""

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"


@dataclass
class ModelsConfig:
    sam: SamSpec = field(default_factory=SamSpec)
    clip: ClipSpec = field(default_factory=ClipSpec)

    def with_overrides(
        self,
        sam_variant: str | None = None,
        sam_checkpoint: str | None = None,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
    ) -> "ModelsConfig":
        """A copy with the fields given (not None) replaced, e.g. by command-line options."""
        return ModelsConfig(
            SamSpec(_given_or(sam_variant, self.sam.variant), _given_or(sam_checkpoint, self.sam.checkpoint)),
            ClipSpec(_given_or(clip_model, self.clip.model), _given_or(clip_pretrained, self.clip.pretrained)),
        )


def _given_or(value: str | None, default: str | None) -> str | None:
    return default if value is None else value


@dataclass
class ExtractConfig:
    shard_size: int = 256
    batch_size: int = 8
    num_workers: int = 2
    boxes_per_decoder_call: int = 64
    device: str = "auto"
    strict: bool = False  # bad images and degenerate boxes stop the run instead of being recorded
    max_image_pixels: int = 100_000_000  # larger images (decompression bombs) are recorded as failed
    # How feature maps and box tokens are stored: "float16", or "int8" with one scale per token
    # (about half the bytes; the reader returns float16 either way). Part of the cache's identity.
    feature_dtype: str = "float16"
    # Peak memory the SAM image batch may take (GB; None: 70% of the device's free memory at start).
    # Batches of batch_size images are run in smaller parts when they would not fit.
    memory_budget_gb: float | None = None
    # How images and boxes become SAM and CLIP input (encoders/preprocess.py): "released" repeats the
    # released RegionSpot evaluation (detectron2 test resize first, torchvision tensor resize for
    # CLIP); "direct" feeds the original image. Part of the cache's identity. The default stays
    # "direct" so that caches made before the choice existed resume; the paper recipes set "released".
    preprocess: str = "direct"
    # Class text embeddings: "released" (81 templates, mean of raw features, one normalisation) or
    # "openclip" (80 templates, mean of normalised features); recorded with each vocabulary.
    text_recipe: str = "openclip"
    # Augmented views cached besides each image (data/views.py: hflip, crop:LO-HI[xN], ...), each
    # a cache of its own under <cache>/views/<view id>/. ``views_mode``: "released" (CLIP maps of
    # the view, tokens and labels of the image, as the released training sees them) or
    # "consistent" (boxes and SAM tokens of the view too). Crops are seeded by ``views_seed``.
    views: list[str] = field(default_factory=list)
    views_mode: str = "released"
    views_seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (``--set`` assigns fields after __init__, so the mapper calls this again)."""
        for name in ("shard_size", "batch_size", "boxes_per_decoder_call"):
            if getattr(self, name) < 1:
                raise ConfigError(f"extract.{name}: {getattr(self, name)} must be at least 1")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError(f"extract.memory_budget_gb: {self.memory_budget_gb} must be above 0 (GB)")
        for name, allowed in (("feature_dtype", FEATURE_DTYPES), ("preprocess", PREPROCESSES), ("text_recipe", TEXT_RECIPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"extract.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        from regionspot_cache.data.views import VIEW_MODES, parse_views  # it imports ConfigError from here

        if self.views_mode not in VIEW_MODES:
            raise ConfigError(f"extract.views_mode: {self.views_mode!r} is not one of {', '.join(VIEW_MODES)}")
        parse_views(self.views)


@dataclass
class TrainConfig:
    """Defaults are the paper's schedule (AdamW, warm-up, two x0.1 steps, clipping at 1.0)."""

    # Training datasets: one cache each (``rs-cache train -c`` replaces this list), the vocabulary
    # its boxes are labelled in (default: the cache's dataset) and its share of the batches.
    caches: list[str] = field(default_factory=list)
    vocabularies: list[str] = field(default_factory=list)
    dataset_weights: list[float] = field(default_factory=list)  # empty: equal weights
    init_from: str | None = None  # head checkpoint to start from (stage 2 starts from stage 1)
    iterations: int = 450_000
    batch_size: int = 16
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    lr_steps: list[int] = field(default_factory=lambda: [350_000, 420_000])
    lr_gamma: float = 0.1
    grad_clip: float = 1.0
    max_boxes_per_image: int = 100
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    normalize_feature_map: bool = True
    dropout: float = 0.1
    num_workers: int = 0
    prefetch_batches: int = 4  # per loader worker
    checkpoint_every: int = 5000  # steps between training-state checkpoints (exact resume)
    tensorboard: bool = True
    seed: int = 0
    device: str = "auto"
    # Cached views (``rs-cache extract`` with extract.views) each (image, epoch) draws one of:
    # empty = the identity and every view the cache has; else view ids, "identity" for the image itself.
    views: list[str] = field(default_factory=list)


@dataclass
class OpenSetConfig:
    """Open-set rejection (``evaluate/open_set.py``): ``rule`` gives each region a known score in
    [0, 1], regions below ``threshold`` are "none of the vocabulary". ``off`` keeps every region."""

    rule: str = "off"
    threshold: float = 0.5
    background_prompts: list[str] = field(default_factory=lambda: ["background"])

    def validate(self) -> None:
        if self.rule not in OPEN_SET_RULES:
            raise ConfigError(f"eval.open_set.rule: {self.rule!r} is not one of {', '.join(OPEN_SET_RULES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"eval.open_set.threshold: {self.threshold} is not in [0, 1]")
        if self.rule == "background-prompt" and not [p for p in self.background_prompts if p.strip()]:
            raise ConfigError("eval.open_set.background_prompts: background-prompt needs at least one non-empty prompt")


@dataclass
class EvalConfig:
    """How region logits become scored detections and how LVIS AP counts them (``scoring.py``).

    ``scoring``: class probability = ``softmax`` over the vocabulary (the released code) or
    ``sigmoid`` of each logit (the focal training loss). ``protocol``: ``standard`` keeps the top
    ``top_k_per_image`` (box, class) pairs per image and LVIS's ``max_dets_per_image`` (-1: no
    limit); ``fixed`` is AP-fixed (Dave et al. 2021): no per-image cap, the top
    ``fixed_dets_per_class`` detections of each class over the whole dataset; ``tap`` is Tokenize
    Anything's rule (probability > 0.001, per-class NMS, best ``max_dets_per_image`` per image).
    """

    top_k_per_image: int = 900
    max_dets_per_image: int = 300
    scoring: str = "softmax"
    protocol: str = "standard"
    fixed_dets_per_class: int = 10_000
    device: str = "auto"
    open_set: OpenSetConfig = field(default_factory=OpenSetConfig)  # regions rejected as none of the vocabulary

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the allowed values (``--set`` assigns fields after __init__)."""
        for name, allowed in (("scoring", EVAL_SCORINGS), ("protocol", EVAL_PROTOCOLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"eval.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("top_k_per_image", "fixed_dets_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}: {getattr(self, name)} must be at least 1")
        if self.max_dets_per_image < 1 and self.max_dets_per_image != -1:
            raise ConfigError(f"eval.max_dets_per_image: {self.max_dets_per_image} must be at least 1, or -1 for no limit")
        self.open_set.validate()


EVAL_SCORINGS = ("softmax", "sigmoid")
FEATURE_DTYPES = ("float16", "int8")  # how feature maps and box tokens are stored (extract.feature_dtype)
EVAL_PROTOCOLS = ("standard", "fixed", "tap")
PREPROCESSES = ("released", "direct")  # extract.preprocess (encoders/preprocess.py)
TEXT_RECIPES = ("released", "openclip")  # extract.text_recipe (encoders/clip.py)
OPEN_SET_RULES = ("off", "max-softmax", "max-sigmoid", "background-prompt")


@dataclass
class Recipe:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A recipe or override that does not fit the config dataclasses."""


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from nested dicts; ``where`` names the source in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {value!r} is not a list")
        return [_coerce(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is type(None):
            continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
    raise ConfigError(f"{where}: {value!r} is not a {hint}")


def load_recipe(path: Path | str) -> Recipe:
    path = Path(path)
    return from_dict(Recipe, read_toml(path, "recipe file", ConfigError), str(path))


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` overrides (values parsed as TOML, bare words as strings)."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        *parents, leaf = dotted.strip().split(".")
        target: Any = recipe
        for name in parents:
            if not hasattr(target, name) or not dataclasses.is_dataclass(getattr(target, name)):
                raise ConfigError(f"override {item!r}: no section {name!r}")
            target = getattr(target, name)
        hints = typing.get_type_hints(type(target))
        if leaf not in hints:
            raise ConfigError(f"override {item!r}: {type(target).__name__} has no field {leaf!r}")
        setattr(target, leaf, _coerce(value, hints[leaf], f"override {dotted}"))
    return recipe
