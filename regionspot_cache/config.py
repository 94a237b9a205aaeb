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
    """A SAM model: architecture name from ``encoders.sam.SAM_ARCHITECTURES`` (SAM 1) or
    ``encoders.sam2.SAM2_ARCHITECTURES`` (SAM 2.1), and its weights."""

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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (``--set`` assigns fields after __init__, so the mapper calls this again)."""
        for name in ("shard_size", "batch_size", "boxes_per_decoder_call"):
            if getattr(self, name) < 1:
                raise ConfigError(f"extract.{name}: {getattr(self, name)} must be at least 1")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError(f"extract.memory_budget_gb: {self.memory_budget_gb} must be above 0 (GB)")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"extract.feature_dtype: {self.feature_dtype!r} is not one of "
                              f"{', '.join(FEATURE_DTYPES)}")


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


@dataclass
class EvalConfig:
    """How region logits become scored detections and how LVIS AP counts them (``scoring.py``).

    ``scoring``: class probability = ``softmax`` over the vocabulary (the released code) or
    ``sigmoid`` of each logit (the focal training loss). ``protocol``: ``standard`` keeps the top
    ``top_k_per_image`` (box, class) pairs per image and LVIS's ``max_dets_per_image`` (-1: no
    limit); ``fixed`` is AP-fixed (Dave et al. 2021): no per-image cap, the top
    ``fixed_dets_per_class`` detections of each class over the whole dataset.
    """

    top_k_per_image: int = 900
    max_dets_per_image: int = 300
    scoring: str = "softmax"
    protocol: str = "standard"
    fixed_dets_per_class: int = 10_000
    device: str = "auto"

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


EVAL_SCORINGS = ("softmax", "sigmoid")
FEATURE_DTYPES = ("float16", "int8")  # how feature maps and box tokens are stored (extract.feature_dtype)
EVAL_PROTOCOLS = ("standard", "fixed")


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
