"""Open-vocabulary detectors from ``transformers``, one adapter per family behind one interface.

Every adapter turns one image and one chunk of class names into ``Detected``: boxes in the
image's original pixels (x1, y1, x2, y2), each with its best class in the chunk and its score.
``prepare`` runs what depends on the image alone once (OWLv2's and SAM 3's vision towers,
Grounding DINO's backbone), so that a vocabulary of many chunks pays for it once per image.

Families (by the model's ``config.model_type``):
- ``grounding-dino`` / ``mm-grounding-dino`` (MM-Grounding-DINO, LLMDet's weights): the names of
  a chunk are one prompt ``"a . b . c ."`` of at most ``max_text_len`` tokens; a name's score for
  a query is the highest sigmoid over its own tokens. Queries depend on the prompt: the image
  backbone runs once per image, the text-fused encoder and the decoder once per chunk.
- ``owlv2`` / ``owlvit``: each name is its own query against every patch's box; boxes do not
  depend on the names (``boxes_shared``), so chunking changes nothing.
- ``sam3``: each name is its own prompt; each (name, query) pair is a candidate box scored
  sigmoid(logit) x sigmoid(presence), as ``Sam3Processor`` scores them.

``transformers`` and ``torch`` are imported inside functions: ``rs-cache --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

from regionspot_cache.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class DetectorError(ModelLoadError):
    """A detector that cannot be loaded or used; the message names the model."""


@dataclass
class Detected:
    """Candidate boxes of one image: original pixels, index of the class in the names given."""

    xyxy: np.ndarray  # (N, 4) float32
    classes: np.ndarray  # (N,) int64, index into the chunk's (or the vocabulary's) names
    scores: np.ndarray  # (N,) float32

    @staticmethod
    def empty() -> Detected:
        return Detected(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray) -> Detected:
        return Detected(self.xyxy[index], self.classes[index], self.scores[index])


class Detector(Protocol):
    family: str
    boxes_shared: bool  # the same boxes for every chunk (only the scores depend on the names)

    def chunks(self, names: Sequence[str], chunk_size: int) -> list[range]:
        """Contiguous ranges of ``names`` that one forward pass can take."""

    def prepare(self, image: Image.Image) -> Any:
        """What of ``image`` every chunk reuses."""

    def detect(self, prepared: Any, names: Sequence[str]) -> Detected:
        """Boxes of the prepared image for the class ``names`` (classes index ``names``)."""


def to_original_pixels(cxcywh: torch.Tensor, scale_x: float, scale_y: float, size: tuple[int, int]) -> np.ndarray:
    """Normalised (cx, cy, w, h) -> (x1, y1, x2, y2) in the original image's pixels, clipped to it.
    ``scale_x``/``scale_y``: the original pixels that span 1.0 of the model's normalised axes."""
    cx, cy, w, h = cxcywh.float().unbind(-1)
    xyxy = np.stack([t.cpu().numpy() for t in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)], axis=-1)
    xyxy = xyxy * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
    width, height = size
    return np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)


def fixed_chunks(count: int, chunk_size: int) -> list[range]:
    return [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]


class GroundingDinoDetector:
    """Grounding DINO and MM-Grounding-DINO: one prompt per chunk, scores per name's tokens."""

    boxes_shared = False

    def __init__(self, family: str, model: Any, processor: Any, device: torch.device):
        self.family, self.model, self.processor, self.device = family, model, processor, device
        tokenizer = processor.tokenizer
        self._tokenizer = tokenizer
        self._period = tokenizer.convert_tokens_to_ids(".")
        self._max_tokens = int(model.config.max_text_len)
        self._token_cache: dict[str, list[int]] = {}

    def _tokens(self, name: str) -> list[int]:
        if name not in self._token_cache:
            ids = self._tokenizer(name.lower(), add_special_tokens=False)["input_ids"]
            self._token_cache[name] = list(ids[: self._max_tokens - 3]) or [self._tokenizer.unk_token_id]
        return self._token_cache[name]

    def chunks(self, names: Sequence[str], chunk_size: int) -> list[range]:
        """At most ``chunk_size`` names, and no more than fit ``max_text_len`` tokens with their
        periods and [CLS]/[SEP]: the model has no positions beyond it."""
        ranges, start, used = [], 0, 2
        for index, name in enumerate(names):
            cost = len(self._tokens(name)) + 1
            if index > start and (index - start >= chunk_size or used + cost > self._max_tokens):
                ranges.append(range(start, index))
                start, used = index, 2
            used += cost
        if start < len(names):
            ranges.append(range(start, len(names)))
        return ranges

    def prepare(self, image: Image.Image) -> tuple[Image.Image, dict, tuple]:
        """The image's pixels and its backbone's output (feature maps, position embeddings),
        which depend on the image alone: every chunk's forward reuses them (``_reusing``)."""
        import torch

        inputs = self.processor.image_processor(images=image, return_tensors="pt")
        pixels = {key: value.to(self.device) for key, value in inputs.items()}
        values = pixels["pixel_values"]
        # As the model's forward does when given no mask.
        mask = pixels.get("pixel_mask", torch.ones((len(values), *values.shape[-2:]), dtype=torch.long, device=self.device))
        with torch.inference_mode():
            return image, pixels, self.model.model.backbone(values, mask)

    def detect(self, prepared: tuple[Image.Image, dict, tuple], names: Sequence[str]) -> Detected:
        import torch

        image, pixels, backbone_output = prepared
        ids, spans = [self._tokenizer.cls_token_id], []
        for name in names:
            tokens = self._tokens(name)
            spans.append((len(ids), len(ids) + len(tokens)))
            ids += tokens + [self._period]
        ids.append(self._tokenizer.sep_token_id)
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode(), _reusing(self.model.model.backbone, pixels["pixel_values"], backbone_output):
            out = self.model(
                **pixels,
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                token_type_ids=torch.zeros_like(input_ids),
            )
        token_scores = out.logits[0].float().sigmoid()  # (Q, max_text_len)
        per_name = torch.stack([token_scores[:, a:b].max(dim=1).values for a, b in spans], dim=1)  # (Q, names)
        scores, classes = per_name.max(dim=1)
        # DETR-style boxes are normalised to the resized image, which keeps the aspect ratio.
        xyxy = to_original_pixels(out.pred_boxes[0], image.width, image.height, image.size)
        return Detected(xyxy, classes.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32))


@contextmanager
def _reusing(backbone: Any, pixel_values: torch.Tensor, output: tuple) -> Iterator[None]:
    """Within: ``backbone`` (Grounding DINO's ``model.model.backbone``) called on ``pixel_values``
    returns ``output`` instead of running again. ``transformers`` has no argument to pass the
    backbone's features to ``forward`` (only the text-fused encoder's), so the forward of this
    instance is swapped for the span of one call; the rest of the model runs as it is."""
    maps, positions = output
    run = backbone.forward

    def forward(values: torch.Tensor, mask: torch.Tensor) -> tuple[list, list]:
        if values is not pixel_values:  # another image: compute it
            return run(values, mask)
        return list(maps), list(positions)  # fresh lists: the model appends its extra levels to them

    backbone.forward = forward
    try:
        yield
    finally:
        del backbone.forward  # the class's forward again


class OwlDetector:
    """OWLv2 / OWL-ViT: every patch predicts one box; each name is an independent query."""

    boxes_shared = True

    def __init__(self, family: str, model: Any, processor: Any, device: torch.device):
        self.family, self.model, self.processor, self.device = family, model, processor, device
        self._text_length = int(model.config.text_config.max_position_embeddings)
        self._query_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def chunks(self, names: Sequence[str], chunk_size: int) -> list[range]:
        return fixed_chunks(len(names), chunk_size)

    def prepare(self, image: Image.Image) -> tuple[Image.Image, torch.Tensor, np.ndarray]:
        import torch

        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            feature_map = self.model.image_embedder(pixel_values=pixels)[0]
            batch, rows, cols, dim = feature_map.shape
            features = feature_map.reshape(batch, rows * cols, dim)
            boxes = self.model.box_predictor(features, feature_map)[0]
        # OWLv2 pads the image to a square (bottom / right) before resizing: its normalised axes
        # both span the longer side. OWL-ViT stretches the image to the square instead.
        side = max(image.size)
        scale = (side, side) if self.family == "owlv2" else image.size
        return image, features, to_original_pixels(boxes, scale[0], scale[1], image.size)

    def _queries(self, names: Sequence[str]) -> torch.Tensor:
        import torch

        key = tuple(names)
        if key not in self._query_cache:
            text = self.processor.tokenizer(
                list(names), padding="max_length", truncation=True, max_length=self._text_length, return_tensors="pt"
            )
            base = getattr(self.model, self.model.base_model_prefix)
            with torch.inference_mode():
                out = base.get_text_features(
                    input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
                )
            # Text embeddings depend on the names alone: computed once per chunk, reused for every image.
            self._query_cache[key] = getattr(out, "pooler_output", out)
        return self._query_cache[key]

    def detect(self, prepared: tuple[Image.Image, torch.Tensor, np.ndarray], names: Sequence[str]) -> Detected:
        import torch

        _, features, xyxy = prepared
        with torch.inference_mode():
            logits = self.model.class_predictor(features, self._queries(names)[None])[0][0]  # (patches, names)
        scores, classes = logits.float().sigmoid().max(dim=1)
        return Detected(xyxy, classes.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32))


class Sam3Detector:
    """SAM 3: each name its own prompt against the image's vision features, computed once."""

    boxes_shared = False

    def __init__(self, family: str, model: Any, processor: Any, device: torch.device):
        self.family, self.model, self.processor, self.device = family, model, processor, device
        self._text_length = int(model.config.text_config.max_position_embeddings)

    def chunks(self, names: Sequence[str], chunk_size: int) -> list[range]:
        return fixed_chunks(len(names), chunk_size)

    def prepare(self, image: Image.Image) -> tuple[Image.Image, Any]:
        import torch

        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            return image, self.model.get_vision_features(pixel_values=pixels)

    def detect(self, prepared: tuple[Image.Image, Any], names: Sequence[str]) -> Detected:
        import torch

        image, vision = prepared
        # A long name is cut to the text tower's positions (32), as ``Sam3Processor`` pads prompts to them.
        text = self.processor.tokenizer(
            list(names), padding=True, truncation=True, max_length=self._text_length, return_tensors="pt"
        )
        count = len(names)
        with torch.inference_mode():
            out = self.model(
                vision_embeds=_repeat_batch(vision, count),
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        scores = out.pred_logits.float().sigmoid()  # (names, Q)
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid().reshape(count, 1)
        queries = scores.shape[1]
        # SAM 3 predicts (x1, y1, x2, y2) normalised to the image, which it resizes without padding.
        xyxy = out.pred_boxes.float().reshape(-1, 4).cpu().numpy() * np.array([image.width, image.height] * 2, np.float32)
        xyxy = np.clip(xyxy, 0, [image.width, image.height] * 2).astype(np.float32)
        classes = np.repeat(np.arange(count, dtype=np.int64), queries)
        return Detected(xyxy, classes, scores.reshape(-1).cpu().numpy().astype(np.float32))


def _repeat_batch(output: Any, count: int) -> Any:
    """A copy of a model output whose tensors (also inside tuples) repeat their batch of one ``count`` times."""
    import torch

    def repeat(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.expand(count, *value.shape[1:])
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    return type(output)(**{key: repeat(value) for key, value in output.items()})


FAMILIES = {
    "grounding-dino": ("GroundingDinoForObjectDetection", GroundingDinoDetector),
    "mm-grounding-dino": ("MMGroundingDinoForObjectDetection", GroundingDinoDetector),
    "owlv2": ("Owlv2ForObjectDetection", OwlDetector),
    "owlvit": ("OwlViTForObjectDetection", OwlDetector),
    "sam3": ("Sam3Model", Sam3Detector),
}


def resolve_model_dir(source: str) -> Path:
    """A local directory as is; else a Hugging Face model id, fetched into (or found in) the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "*.bin"]))
    except Exception as err:  # the hub's errors (offline, 404, invalid id) are many; each becomes one line
        raise DetectorError(
            f"{source}: not a local model directory, and not found on the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def weights_digest(model_dir: Path) -> str:
    """sha256 over the directory's weight files (names and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise DetectorError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def detector_family(model_dir: Path) -> str:
    """The family of the model in ``model_dir``, from its config; refused if it has no detection head we use."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        raise DetectorError(f"{model_dir}: no readable transformers config: {str(err).splitlines()[0]}") from None
    family = str(config.model_type).replace("_", "-")
    if family not in FAMILIES:
        raise DetectorError(
            f"{model_dir}: model type {config.model_type!r} has no open-vocabulary detection head; known: {', '.join(FAMILIES)}"
        )
    return family


def load_detector(model_dir: Path, device: torch.device) -> Detector:
    """The adapter for the model in ``model_dir`` (see ``resolve_model_dir``), in eval mode on ``device``."""
    import transformers

    family = detector_family(model_dir)
    class_name, adapter = FAMILIES[family]
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise DetectorError(
            f"{model_dir}: {family} needs transformers.{class_name}, which transformers {transformers.__version__} lacks"
        )
    try:
        model = model_class.from_pretrained(model_dir).to(device).eval()
        processor = transformers.AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DetectorError(f"{model_dir}: cannot load {family}: {str(err).splitlines()[0]}") from None
    logger.info("loaded %s detector from %s on %s", family, model_dir, device)
    return adapter(family, model, processor, device)
