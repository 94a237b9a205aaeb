"""Dataclass configs for the three phases, and recipe files (TOML) that fill them.

A recipe is data: ``[models.sam]``, ``[models.clip]``, ``[extract]``, ``[train]``, ``[eval]`` and
``[predict.auto_boxes]`` tables whose keys are the fields below. Unknown keys are errors, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tomllib

# The choices a recipe makes, parsed by validated.coerce into these objects (choices.py); imported from here too.
from regionspot_cache.choices import (  # noqa: F401
    Choice,
    Decode,
    EvalMethod,
    FeatureDtype,
    OpenSetRule,
    Preprocessing,
    Scoring,
    TextRecipe,
    TrainOrder,
    ViewMode,
)
from regionspot_cache.errors import ConfigError
from regionspot_cache.runtime.files import read_toml
from regionspot_cache.validated import DEVICE, Validated, above, at_least, between, coerce, from_dict, one_of
from regionspot_cache.view_specs import parse_views

# The keys of encoders.sam.SAM_ARCHITECTURES (SAM 1) and encoders.sam2.SAM2_ARCHITECTURES (SAM 2.1).
SAM_VARIANTS = (
    "vit_b",
    "vit_l",
    "vit_h",
    "tiny",
    "sam2.1_hiera_tiny",
    "sam2.1_hiera_small",
    "sam2.1_hiera_base_plus",
    "sam2.1_hiera_large",
    "sam2_tiny",
)


@dataclass
class SamSpec(Validated):
    """A SAM model: architecture name from ``encoders.sam.SAM_ARCHITECTURES`` (SAM 1) or
    ``encoders.sam2.SAM2_ARCHITECTURES`` (SAM 2.1), and its weights."""

    SECTION: ClassVar[str] = "models.sam"
    variant: str = field(default="vit_b", metadata=one_of(*SAM_VARIANTS))
    checkpoint: str | None = None


@dataclass
class ClipSpec(Validated):
    """An open_clip model: a model config name and a pretrained tag or a local weights file
    (the name is checked against open_clip's list where the model is built)."""

    SECTION: ClassVar[str] = "models.clip"
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"


@dataclass
class ModelsConfig(Validated):
    SECTION: ClassVar[str] = "models"
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


EVAL_PROTOCOLS = ("standard", "fixed", "tap")


@dataclass
class ExtractConfig(Validated):
    SECTION: ClassVar[str] = "extract"
    shard_size: int = field(default=256, metadata=at_least(1))
    batch_size: int = field(default=8, metadata=at_least(1))
    # Loader workers per extracting process (None: automatic, extract/decode.default_loader_workers:
    # the cores this process may use (its CPU affinity) divided among the machine's CUDA devices,
    # less one for the process driving its device; at least 1, at most 16). 0 loads in this process.
    num_workers: int | None = field(default=None, metadata=at_least(0))
    # Where JPEGs are decoded and resized (extract/decode.py): "cpu" (loader workers: libjpeg-turbo,
    # bit-identical to PIL, then PIL's resizes), "device" (workers only read the bytes; decode, resizes
    # and normalisation run batched on the extraction device, within a level or two of PIL's pixels),
    # or "auto": "device" when extracting on CUDA, else "cpu". Not part of the cache's identity.
    decode: Decode = field(default=Decode.AUTO, metadata=one_of(*Decode))
    boxes_per_decoder_call: int = field(default=64, metadata=at_least(1))
    device: str = field(default="auto", metadata=DEVICE)
    # torch threads of the encoders, the same in every process (None: this process's torch default,
    # fixed by the runner before any shard runs): CPU results depend on the thread count, and dask
    # workers otherwise run single-threaded, so both distributors write bit-identical caches.
    threads: int | None = field(default=None, metadata=between(1, 1024))
    strict: bool = False  # bad images and degenerate boxes stop the run instead of being recorded
    # On resume, read the images of the committed shards again and refuse if any file's bytes differ
    # from those recorded at extraction (cache/contents.py); off by default: it reads every image.
    check_images: bool = False
    # larger images (decompression bombs) are recorded as failed
    max_image_pixels: int = field(default=100_000_000, metadata=at_least(1))
    # How feature maps and box tokens are stored: "float16", or "int8" with one scale per token
    # (about half the bytes; the reader returns float16 either way). Part of the cache's identity.
    feature_dtype: FeatureDtype = field(default=FeatureDtype.FLOAT16, metadata=one_of(*FeatureDtype))
    # Peak memory the SAM image batch may take (GB; None: 70% of the device's free memory at start).
    # Batches of batch_size images are run in smaller parts when they would not fit.
    memory_budget_gb: float | None = field(default=None, metadata=above(0))
    # How images and boxes become SAM and CLIP input (encoders/preprocess.py): "released" repeats the
    # released RegionSpot evaluation (detectron2 test resize first, torchvision tensor resize for
    # CLIP); "direct" feeds the original image. Part of the cache's identity. The default stays
    # "direct" so that caches made before the choice existed resume; the paper recipes set "released".
    preprocess: Preprocessing = field(default=Preprocessing.DIRECT, metadata=one_of(*Preprocessing))
    # Class text embeddings: "released" (81 templates, mean of raw features, one normalisation) or
    # "openclip" (80 templates, mean of normalised features); recorded with each vocabulary.
    text_recipe: TextRecipe = field(default=TextRecipe.OPENCLIP, metadata=one_of(*TextRecipe))
    # Augmented views cached besides each image (data/views.py: hflip, crop:LO-HI[xN], ...), each
    # a cache of its own under <cache>/views/<view id>/. ``views_mode``: "released" (CLIP maps of
    # the view, tokens and labels of the image, as the released training sees them) or
    # "consistent" (boxes and SAM tokens of the view too). Crops are seeded by ``views_seed``.
    views: list[str] = field(default_factory=list)
    views_mode: ViewMode = field(default=ViewMode.RELEASED, metadata=one_of(*ViewMode))
    views_seed: int = field(default=0, metadata=between(0, 2**63 - 1))

    def check_relations(self) -> None:
        parse_views(self.views)


@dataclass
class TrainConfig(Validated):
    """Defaults are the paper's schedule (AdamW, warm-up, two x0.1 steps, clipping at 1.0)."""

    SECTION: ClassVar[str] = "train"
    # Training datasets: one cache each (``rs-cache train -c`` replaces this list), the vocabulary
    # its boxes are labelled in (default: the cache's dataset) and its share of the batches.
    caches: list[str] = field(default_factory=list)
    vocabularies: list[str] = field(default_factory=list)
    dataset_weights: list[float] = field(default_factory=list, metadata=above(0))  # empty: equal weights
    init_from: str | None = None  # head checkpoint to start from (stage 2 starts from stage 1)
    iterations: int = field(default=450_000, metadata=at_least(0))  # 0 only with init_from (see check_relations)
    # Bounded: a global batch is materialised as keys before any read (1e11 would run until memory ends).
    batch_size: int = field(default=16, metadata=between(1, 65_536))
    lr: float = field(default=2.5e-5, metadata=above(0))
    weight_decay: float = field(default=1e-4, metadata=at_least(0))
    warmup_iters: int = field(default=1000, metadata=at_least(0))
    warmup_factor: float = field(default=0.01, metadata=between(0, 1))
    lr_steps: list[int] = field(default_factory=lambda: [350_000, 420_000], metadata=at_least(1))
    lr_gamma: float = field(default=0.1, metadata=above(0))
    grad_clip: float = field(default=1.0, metadata=above(0))
    max_boxes_per_image: int = field(default=100, metadata=at_least(1))
    focal_alpha: float = field(default=0.25, metadata=between(0, 1))
    focal_gamma: float = field(default=2.0, metadata=at_least(0))
    normalize_feature_map: bool = True
    dropout: float = field(default=0.1, metadata=between(0, 0.99))
    num_workers: int = field(default=0, metadata=at_least(0))
    prefetch_batches: int = field(default=4, metadata=between(1, 64))  # per loader worker, held in memory
    # steps between training-state checkpoints (exact resume)
    checkpoint_every: int = field(default=5000, metadata=at_least(1))
    tensorboard: bool = True
    seed: int = field(default=0, metadata=between(0, 2**63 - 1))
    device: str = field(default="auto", metadata=DEVICE)
    # Cached views (``rs-cache extract`` with extract.views) each (image, epoch) draws one of:
    # empty = the identity and every view the cache has; else view ids, "identity" for the image itself.
    views: list[str] = field(default_factory=list)
    # Train on a cache with shards missing (killed or failed extraction); refused by default.
    allow_partial: bool = False
    # The order images are read in (choices.TrainOrder): "shards" walks a seeded permutation of
    # the shards per epoch, ``resident_shards`` at a time with their images shuffled together, so
    # a cache larger than memory is read shard by shard instead of a seek per image; "uniform"
    # draws every image of the cache at random (the order of earlier versions). Both read every
    # image exactly once per epoch.
    order: TrainOrder = field(default=TrainOrder.SHARDS, metadata=one_of(*TrainOrder))
    resident_shards: int = field(default=8, metadata=at_least(1))
    # Order "shards": a thread of the training process reads the shards the coming batches need into
    # the page cache, at most this many beyond those of the batches handed out, so the disk reads
    # while batches are assembled (benchmarks/cold_read.py). None: resident_shards (the next window
    # is read while this one is); 0: off. Ignored in order "uniform", and for a cache on object
    # storage read without local_cache_dir (its shards are fetched moments before they are read).
    read_ahead_shards: int | None = field(default=None, metadata=at_least(0))
    # A local copy of the shards being read (order "shards" only): whole shards are fetched ahead
    # into ``local_cache_dir`` and evicted when read, keeping at most ``local_cache_gb`` there
    # (per node: the training processes of a node share one copy). None: read the cache where it is.
    local_cache_dir: str | None = None
    local_cache_gb: float = field(default=50.0, metadata=above(0))

    def check_relations(self) -> None:
        if self.local_cache_dir is not None and not self.order.by_shards:
            raise ConfigError(
                f"train.local_cache_dir needs train.order = {TrainOrder.SHARDS!r}: the {self.order!r} "
                "order reads every shard all the time, so a partial local copy would be refetched endlessly"
            )
        if self.iterations == 0 and self.init_from is None:  # would write an untrained head
            raise ConfigError("train.iterations: 0 must be at least 1 (0 only with train.init_from, to re-save that head)")
        if self.lr_steps != sorted(set(self.lr_steps)):
            raise ConfigError(f"train.lr_steps: {self.lr_steps} must be increasing")
        for name in ("vocabularies", "dataset_weights"):
            given = getattr(self, name)
            if given and self.caches and len(given) != len(self.caches):
                raise ConfigError(f"train.{name}: {len(given)} given for {len(self.caches)} caches; give one per cache")


@dataclass
class OpenSetConfig(Validated):
    """Open-set rejection (``regions/open_set.py``): ``rule`` gives each region a known score in
    [0, 1], regions below ``threshold`` are "none of the vocabulary". ``off`` keeps every region."""

    SECTION: ClassVar[str] = "eval.open_set"
    rule: OpenSetRule = field(default=OpenSetRule.OFF, metadata=one_of(*OpenSetRule))
    threshold: float = field(default=0.5, metadata=between(0, 1))
    background_prompts: list[str] = field(default_factory=lambda: ["background"])

    def check_relations(self) -> None:
        if self.rule.needs_background and not [p for p in self.background_prompts if p.strip()]:
            raise ConfigError("eval.open_set.background_prompts: background-prompt needs at least one non-empty prompt")


@dataclass
class EvalConfig(Validated):
    """How region logits become scored detections and how LVIS AP counts them (``scoring.py``).

    ``scoring``: class probability = ``softmax`` over the vocabulary (the released code) or
    ``sigmoid`` of each logit (the focal training loss). ``protocol``: ``standard`` keeps the top
    ``top_k_per_image`` (box, class) pairs per image and LVIS's ``max_dets_per_image`` (-1: no
    limit); ``fixed`` is AP-fixed (Dave et al. 2021): no per-image cap, the top
    ``fixed_dets_per_class`` detections of each class over the whole dataset; ``tap`` is Tokenize
    Anything's rule (every class above probability 0.001, per-class NMS, 300 per image).
    """

    SECTION: ClassVar[str] = "eval"
    top_k_per_image: int = field(default=900, metadata=at_least(1))
    max_dets_per_image: int = field(default=300, metadata=at_least(-1))
    scoring: Scoring = field(default=Scoring.SOFTMAX, metadata=one_of(*Scoring))
    protocol: str = field(default="standard", metadata=one_of(*EVAL_PROTOCOLS))
    fixed_dets_per_class: int = field(default=10_000, metadata=at_least(1))
    device: str = field(default="auto", metadata=DEVICE)
    open_set: OpenSetConfig = field(default_factory=OpenSetConfig)  # regions rejected as none of the vocabulary
    # Score a cache with shards missing (its AP is of those images only); refused by default.
    allow_partial: bool = False

    def check_relations(self) -> None:
        if self.max_dets_per_image == 0:
            raise ConfigError(f"eval.max_dets_per_image: {self.max_dets_per_image} must be at least 1, or -1 for no limit")


@dataclass
class AutoBoxesConfig(Validated):
    """``predict --boxes auto``: SAM's automatic mask generator (a grid of point prompts, masks
    filtered by predicted IoU and stability, then box NMS) gives the boxes. SAM's own defaults
    except an 8x8 grid (SAM: 32x32; each point runs SAM's mask decoder, slow on a CPU) and 16
    points per batch (SAM: 64: each point's 3 masks are upsampled to the image as floats, 64 of
    them take gigabytes for a photo). At most ``max_boxes`` boxes, best first."""

    SECTION: ClassVar[str] = "predict.auto_boxes"
    # Bounded: the work grows with the square of the grid, the memory with the batch (SAM: 32, 64).
    points_per_side: int = field(default=8, metadata=between(1, 128))
    points_per_batch: int = field(default=16, metadata=between(1, 256))
    pred_iou_thresh: float = field(default=0.88, metadata=between(0, 1))
    stability_score_thresh: float = field(default=0.95, metadata=between(0, 1))
    box_nms_thresh: float = field(default=0.7, metadata=between(0, 1))
    max_boxes: int = field(default=100, metadata=at_least(1))


@dataclass
class PredictConfig(Validated):
    SECTION: ClassVar[str] = "predict"
    auto_boxes: AutoBoxesConfig = field(default_factory=AutoBoxesConfig)


@dataclass
class Recipe(Validated):
    SECTION: ClassVar[str] = "recipe"
    models: ModelsConfig = field(default_factory=ModelsConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


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
        if leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"override {item!r}: {type(target).__name__} has no field {leaf!r}")
        setattr(target, leaf, coerce(value, hints[leaf], f"override {dotted}"))
    recipe.validate()  # ranges and relations of the values just set
    return recipe
