"""The project's choices as small typed objects, each owning what it decides.

A word that picks a behaviour (in a recipe, a ``--set``, a command-line option or a cache file) is
parsed once into a member of one of these enums (``validated.coerce`` for recipes), and code asks the
member what to do instead of comparing words. Members are ``str`` subclasses whose value is the
word, so TOML, ``--set`` and the CLI take the same words as before, members compare equal to their
words, and ``cache.json``, vocabulary metadata and head JSON get byte for byte the same strings.

This module imports neither torch nor PIL (the CLI starts without them) and nothing of the package
but ``errors``: a member says what it decides (``Preprocessing.runs_test_resize``), and the module
that holds the implementation (``encoders/preprocess.py``, ``encoders/clip.py``) asks it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, TypeVar

from regionspot_cache.errors import ConfigError

if TYPE_CHECKING:
    import torch


ChoiceT = TypeVar("ChoiceT", bound="Choice")


class Choice(str, enum.Enum):
    """A choice among fixed words; the member *is* its word wherever a string is expected."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)  # error messages keep showing the word, as when choices were strings

    @classmethod
    def words(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def find(cls: type[ChoiceT], word: Any) -> ChoiceT | None:
        """The member named ``word`` (a word or a member), or None."""
        return cls._value2member_map_.get(word) if isinstance(word, str) else None  # type: ignore[return-value]

    @classmethod
    def parse(cls: type[ChoiceT], word: Any, what: str) -> ChoiceT:
        """The member named ``word``; a ConfigError naming ``what`` and the known words otherwise."""
        found = cls.find(word)
        if found is None:
            raise ConfigError(f"{what} {word!r} is not one of {', '.join(cls.words())}")
        return found


class Preprocessing(Choice):
    """How images and boxes become SAM and CLIP input (``extract.preprocess``; the steps are in
    ``encoders/preprocess.py``). ``released`` repeats the released RegionSpot evaluation
    (detectron2's test resize first, a torchvision tensor resize for CLIP); ``direct`` feeds the
    original image. ``cache.json`` records the steps in words (``sam_steps``, ``clip_steps``)."""

    RELEASED = "released"
    DIRECT = "direct"

    @property
    def sam_steps(self) -> str:
        """What ``cache.json`` records as SAM's ``preprocess``."""
        return _SAM_STEPS[self]

    def clip_steps(self, interpolation: str) -> str:
        """What ``cache.json`` records as CLIP's ``preprocess`` (``interpolation``: the model's, for ``direct``)."""
        return _RELEASED_CLIP_STEPS if self is Preprocessing.RELEASED else f"resize (no crop) {interpolation}, mean/std"

    @property
    def runs_test_resize(self) -> bool:
        """Whether detectron2's test resize runs first, and CLIP's resize is then the released
        tensor resize (``released``; the steps are ``encoders/preprocess.py``'s)."""
        return self is Preprocessing.RELEASED

    @classmethod
    def of_sam_steps(cls, sam_steps: str) -> Preprocessing:
        """Which choice made a cache, from the SAM steps its ``cache.json`` records (SAM 2's are ``direct``)."""
        return cls.RELEASED if sam_steps == _SAM_STEPS[cls.RELEASED] else cls.DIRECT

    @classmethod
    def recorded_in(cls, provenance: Any) -> Preprocessing:
        """The preprocessing a cache was extracted with (``provenance``: a ``cache.format.Provenance``)."""
        return cls.of_sam_steps(provenance.sam.preprocess)


# The steps in words, as cache.json records them. The ``direct`` texts are those caches made
# before the choice existed carry, so they still resume: never edit them.
_SAM_STEPS = {
    Preprocessing.DIRECT: "ResizeLongestSide+pixel_mean_std+pad (SamPredictor.set_image)",
    Preprocessing.RELEASED: "detectron2 test resize (short 800, max 1333, PIL bilinear uint8), boxes scaled to it; "
    "then ResizeLongestSide+pixel_mean_std+pad (SamPredictor.set_image)",
}
_RELEASED_CLIP_STEPS = (
    "detectron2 test resize (short 800, max 1333, PIL bilinear uint8); float [0, 1]; "
    "torchvision tensor resize bilinear antialias=False (no crop), mean/std"
)


class TextRecipe(Choice):
    """How class names become text embeddings (``extract.text_recipe``, recorded in each
    vocabulary file's metadata). ``released``: the released code's 81 templates, mean of the raw
    text features, normalised once. ``openclip``: OpenAI's 80 ImageNet templates, mean of the
    normalised features, normalised again (open_clip's zero-shot classifier)."""

    RELEASED = "released"
    OPENCLIP = "openclip"

    @property
    def normalises_each_template(self) -> bool:
        """Whether each template's features are normalised before the mean (``openclip``)."""
        return self is TextRecipe.OPENCLIP

    @property
    def uses_openai_templates(self) -> bool:
        """OpenAI's 80 ImageNet templates (``openclip``), or the released code's 81 (``encoders/clip.py``)."""
        return self is TextRecipe.OPENCLIP


class ViewMode(Choice):
    """What a view cache holds (``extract.views_mode``; data/views.py). ``released``: CLIP maps of
    the view only, as the released training sees them (boxes, labels and SAM tokens are the
    image's); ``consistent``: the view's own boxes, SAM tokens and maps."""

    RELEASED = "released"
    CONSISTENT = "consistent"

    @property
    def runs_sam(self) -> bool:
        """Whether SAM runs on the view (and its transformed boxes) at extraction."""
        return self is ViewMode.CONSISTENT

    @property
    def has_own_boxes(self) -> bool:
        """Whether training reads the boxes, tokens and labels of the view (else the base image's)."""
        return self is ViewMode.CONSISTENT


class OpenSetRule(Choice):
    """Open-set rejection (``eval.open_set.rule``; evaluate/open_set.py): the known score in
    [0, 1] a region gets; regions below the threshold are "none of the vocabulary". ``off``
    rejects nothing."""

    OFF = "off"
    MAX_SOFTMAX = "max-softmax"
    MAX_SIGMOID = "max-sigmoid"
    BACKGROUND_PROMPT = "background-prompt"

    @property
    def rejects(self) -> bool:
        """Whether the rule may reject a region (every rule but ``off``)."""
        return self is not OpenSetRule.OFF

    @property
    def needs_background(self) -> bool:
        """Whether the rule needs the logits of the background prompts."""
        return self is OpenSetRule.BACKGROUND_PROMPT

    def known_scores(self, logits: torch.Tensor, background_logits: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) float64 known score of each region from its (N, C) logits over the vocabulary
        (``background_logits``: (N, P) logits of the background prompts); 1 for all under ``off``."""
        logits = logits.double()
        if self is OpenSetRule.MAX_SOFTMAX:
            return logits.softmax(dim=-1).max(dim=-1).values
        if self is OpenSetRule.MAX_SIGMOID:
            return logits.max(dim=-1).values.sigmoid()
        if self is OpenSetRule.BACKGROUND_PROMPT:
            if background_logits is None:
                raise ValueError("open-set rule background-prompt needs the background prompts' logits")
            import torch

            both = torch.cat([logits, background_logits.double()], dim=-1).softmax(dim=-1)
            return 1.0 - both[:, logits.shape[1] :].sum(dim=-1)
        return logits.new_ones(logits.shape[0])


class FeatureDtype(Choice):
    """How feature maps and box tokens are stored (``extract.feature_dtype``, cache/arrays.py):
    ``float16``, or ``int8`` with one float32 scale per row (about half the bytes). The reader
    returns float16 either way."""

    FLOAT16 = "float16"
    INT8 = "int8"

    @property
    def scaled(self) -> bool:
        """Whether each array has a ``<name>_scale`` array beside it (one float32 per row)."""
        return self is FeatureDtype.INT8

    def row_bytes(self, width: int) -> int:
        """Bytes of one stored row of ``width`` features: 2 per feature, or 1 and a float32 scale."""
        return width + 4 if self.scaled else 2 * width


class Scoring(Choice):
    """Class probability of a region (``eval.scoring``; evaluate/scoring.py): ``softmax`` over the
    vocabulary (the released code) or ``sigmoid`` of each logit (the focal training loss)."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) probabilities in float64: float32 sigmoid is exactly 1.0 from logit ~17 on,
        which would tie many pairs; float64 keeps them apart up to ~37."""
        logits = logits.double()
        return logits.softmax(dim=-1) if self is Scoring.SOFTMAX else logits.sigmoid()


class EvalMethod(Choice):
    """What scores a cache's boxes in ``evaluate`` (``rs-cache eval --method``): ``regionspot``
    (the head, on the cache alone), one of the paper's training-free baselines on the original
    images (evaluate/baselines.py): ``clip-box`` (CLIP on each box crop) or ``clip-mask`` (CLIP on
    the crop with SAM's mask, background in CLIP's mean colour), or ``detector``: the classes and
    scores a detector gave the proposals (evaluate/detector.py), the baseline RegionSpot must beat."""

    REGIONSPOT = "regionspot"
    CLIP_BOX = "clip-box"
    CLIP_MASK = "clip-mask"
    DETECTOR = "detector"  # a proposal file's own classes and scores (rs-cache propose): the detector alone

    @property
    def needs_head(self) -> bool:
        return self is EvalMethod.REGIONSPOT

    @property
    def reads_images(self) -> bool:
        """Whether the method reads the original images (the baselines)."""
        return self in (EvalMethod.CLIP_BOX, EvalMethod.CLIP_MASK)

    @property
    def scores_proposal_classes(self) -> bool:
        """Whether the detections are a proposal file's own (``detector``): it needs that file."""
        return self is EvalMethod.DETECTOR

    @property
    def masks_crops(self) -> bool:
        """Whether the pixels outside SAM's mask of the box are painted over (``clip-mask``)."""
        return self is EvalMethod.CLIP_MASK


class Decode(Choice):
    """Where JPEGs are decoded and resized at extraction (``extract.decode``; extract/decode.py):
    ``cpu`` in the loader workers, ``device`` on the extracting device (workers read bytes only),
    ``auto``: ``device`` on CUDA, else ``cpu``."""

    AUTO = "auto"
    CPU = "cpu"
    DEVICE = "device"

    def resolved(self, device_type: str, with_view: bool = False, preprocessing: Preprocessing | None = None) -> Decode:
        """``cpu`` or ``device`` for an extraction on a device of ``device_type`` ("cuda", "cpu", ...).
        A view cache always decodes on the CPU (its flips and crops work on PIL images); ``auto``
        keeps the CPU for ``released`` preprocessing, whose PIL resizes the device path only
        approximates (a user comparing with the released code gets its pixels)."""
        if with_view:
            return Decode.CPU
        if self is Decode.AUTO:
            exact = preprocessing is not None and preprocessing.runs_test_resize
            return Decode.DEVICE if device_type == "cuda" and not exact else Decode.CPU
        return self

    @property
    def on_device(self) -> bool:
        return self is Decode.DEVICE


class TrainOrder(Choice):
    """The order training reads a cache's images in (``train.order``; train/order.py).
    ``uniform``: each epoch a seeded permutation of all images (every read is a random one: with
    the pages not in memory, a seek or a round trip per image). ``shards``: each epoch a seeded
    permutation of the shards, read ``train.resident_shards`` at a time with their images
    shuffled together (as WebDataset, Mosaic streaming and LitData do): reads stay within a few
    shards, which can be fetched whole (``train.local_cache_dir``)."""

    UNIFORM = "uniform"
    SHARDS = "shards"

    @property
    def by_shards(self) -> bool:
        return self is TrainOrder.SHARDS


class ProposalPrompt(Choice):
    """What ``rs-cache propose`` prompts its detector with (``--prompt``; propose/worker.py):
    ``vocabulary``: the dataset's class names in chunks, each box keeping its best class (what
    ``eval --method detector`` scores); ``agnostic``: one generic prompt (``--agnostic-prompt``,
    "object" by default), each box without a class (category id -1): boxes for RegionSpot to
    recognise, which do not depend on the vocabulary."""

    VOCABULARY = "vocabulary"
    AGNOSTIC = "agnostic"

    @property
    def keeps_classes(self) -> bool:
        """Whether each box records the detector's class (a vocabulary's id) rather than none."""
        return self is ProposalPrompt.VOCABULARY
