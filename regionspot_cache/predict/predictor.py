"""Recognise the regions of any image against any vocabulary, in memory: SAM + CLIP + the head.

>>> predictor = Predictor.from_files("heads/bl.safetensors", models)  # models: ModelsConfig
>>> predictor.predict("dog.jpg", [[10, 20, 200, 180]], ["dog", "cat"], masks=True)
[Region(box=[10.0, 20.0, 200.0, 180.0], label='dog', score=0.93, mask={'size': [..], 'counts': '..'})]

Class text embeddings are built as the cache builds them (``ClipEncoder.text_embeddings``: the
80-template ensemble) and kept by (CLIP identity, vocabulary): in memory, and on disk as small
safetensors files named by a SHA-256 of both, so a vocabulary is encoded once per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from regionspot_cache.config import AutoBoxesConfig, ModelsConfig, OpenSetConfig, Preprocessing, TextRecipe
from regionspot_cache.data.boxes import split_boxes
from regionspot_cache.data.datasets import BoxSet, xyxy_array
from regionspot_cache.data.images import load_rgb
from regionspot_cache.encoders import ClipEncoder, FrozenEncoders, load_frozen_encoders
from regionspot_cache.errors import InputError, ModelLoadError
from regionspot_cache.head.model import RegionSpotHead, load_head, region_logits
from regionspot_cache.head.recorded import inputs_of_head, models_of_head
from regionspot_cache.identity import ClipIdentity
from regionspot_cache.predict.proposals import automatic_boxes
from regionspot_cache.predict.region import ClassScore, Region, ranked_classes
from regionspot_cache.regions.masks import box_mask_rles
from regionspot_cache.regions.open_set import kept_regions
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.runtime.files import atomic_path

ImageInput = Union[np.ndarray, Image.Image, str, Path]

TEXT_CACHE_VERSION = 1  # bump when the text embedding code changes what it computes

logger = logging.getLogger(__name__)


def default_text_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "regionspot-cache" / "text-embeddings"


def to_rgb_image(image: ImageInput) -> Image.Image:
    """A file (decoded as extraction decodes it), a PIL image or an (H, W[, 3|4]) uint8 array."""
    if isinstance(image, (str, Path)):
        return load_rgb(Path(image))
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"image array: expected (H, W, 3) uint8 RGB, got shape {array.shape} dtype {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def checked_vocabulary(vocabulary: Sequence[str]) -> list[str]:
    names = [str(name).strip() for name in vocabulary]
    if not names:
        raise InputError("vocabulary is empty: give at least one class name")
    for index, name in enumerate(names):
        if not name:
            raise InputError(f"vocabulary: class name {index + 1} is empty")
        if name in names[:index]:
            raise InputError(f"vocabulary: {name!r} appears twice")
    return names


def checked_boxes(boxes: Any, width: int, height: int) -> np.ndarray:
    """(N, 4) x1 y1 x2 y2 in original pixels, clipped to the image (as extraction clips them);
    a box without area inside the image is an error naming it."""
    try:
        xyxy = xyxy_array(boxes)
    except ValueError:
        raise InputError(f"boxes: expected an (N, 4) array of x1, y1, x2, y2, got {np.shape(boxes)}") from None
    kept, _, reasons = split_boxes(_box_set(xyxy), width, height)
    if reasons:  # find the first bad box, to name it
        for index, box in enumerate(xyxy):
            _, _, box_reasons = split_boxes(_box_set(box[None]), width, height)
            if box_reasons:
                raise InputError(f"box {index} {box.tolist()}: {box_reasons[0]}; the image is {width}x{height}")
    return kept.xyxy


def _box_set(xyxy: np.ndarray) -> BoxSet:
    return BoxSet(xyxy, np.full(len(xyxy), -1, np.int64), np.ones(len(xyxy), np.float32))


def _regions(xyxy: np.ndarray, given: np.ndarray, probabilities: np.ndarray, names: list[str], top_k: int) -> list[Region]:
    """One region per box from its (C,) class probabilities; a clipped box keeps the box given."""
    results = []
    for box, given_box, row in zip(xyxy, given, probabilities):
        classes = ranked_classes(row, names, top_k)
        changed = bool((box != given_box).any())
        results.append(
            Region(
                box.tolist(),
                classes[0].label,
                classes[0].score,
                given_box=given_box.tolist() if changed else None,
                classes=None if top_k == 1 else classes,
            )
        )
    return results


@dataclass
class TextEmbeddingCache:
    """Class text embeddings by (CLIP identity, vocabulary), in memory and under ``directory``."""

    clip: ClipEncoder
    identity: ClipIdentity  # the CLIP provenance a cache records: model, weights, sizes
    directory: Path | None  # None: memory only
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    recipe: TextRecipe = TextRecipe.OPENCLIP  # extract.text_recipe: part of the key

    def key(self, names: list[str]) -> str:
        templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
        data = {
            "version": TEXT_CACHE_VERSION,
            "clip": self.identity.to_dict(),
            "templates": templates,
            # openclip keys carry no recipe, as before there was a choice, so their files are found again
            "vocabulary": names,
            **({} if self.recipe is TextRecipe.OPENCLIP else {"recipe": self.recipe.value}),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def get(self, names: list[str]) -> torch.Tensor:
        """(C, text_dim) float32, L2-normalised, on the CLIP model's device."""
        key = self.key(names)
        if key not in self.memory:
            embeddings = self._read(key, names)
            if embeddings is None:
                embeddings = self.clip.text_embeddings(names, self.recipe).float().cpu()
                self._write(key, names, embeddings)
            self.memory[key] = embeddings.to(self.clip.device)
        return self.memory[key]

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    def _read(self, key: str, names: list[str]) -> torch.Tensor | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored_names = json.loads(handle.metadata()["vocabulary"])
                embeddings = handle.get_tensor("embeddings")
        except Exception as err:  # a damaged cache file is recomputed, never trusted
            logger.warning("ignoring unreadable text embedding cache %s: %s", path, err)
            return None
        if stored_names != names or embeddings.shape != (len(names), self.clip.text_dim):
            return None
        return embeddings

    def _write(self, key: str, names: list[str], embeddings: torch.Tensor) -> None:
        path = self.path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            metadata = {"vocabulary": json.dumps(names), "clip_model": self.identity.model}
            with atomic_path(path) as tmp:  # readers see the whole file or none
                save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata=metadata)
        except OSError as err:  # the disk cache only saves time
            logger.warning("cannot write the text embedding cache %s: %s", path, err)


class Predictor:
    """The head with its frozen SAM and CLIP, for images and vocabularies given at call time.

    Arguments:
      head (RegionSpotHead): the head; its CLIP width and text dim must be those of the encoders'
        CLIP. It is moved to their device.
      encoders (FrozenEncoders): the SAM and CLIP the head was trained with, loaded, with the
        image preprocessing of its training cache (``FrozenEncoders.with_preprocess``).
      text (TextEmbeddingCache or None): the class text embeddings, by vocabulary; None: in
        memory only, with the ``openclip`` text recipe.

    ``from_files`` loads all of them from a head checkpoint and model specs; ``from_head_file``
    loads the head for encoders already loaded (several heads, one SAM and CLIP).
    """

    def __init__(self, head: RegionSpotHead, encoders: FrozenEncoders, text: TextEmbeddingCache | None = None):
        check_head_fits(head, encoders.clip, "head")
        self.encoders = encoders
        self.device = encoders.sam.device
        self.head = head.to(self.device).eval()
        self.text = text or TextEmbeddingCache(encoders.clip, encoders.clip_provenance(), None)

    @classmethod
    def from_files(
        cls,
        head_file: Path | str,
        models: ModelsConfig | None = None,
        device: str | torch.device = "auto",
        text_cache_dir: Path | str | None = None,
        disk_cache: bool = True,
        preprocess: Preprocessing | str | None = None,
        text_recipe: TextRecipe | str | None = None,
    ) -> Predictor:
        """Load the head checkpoint and the SAM and CLIP that ``models`` name onto ``device``
        (``auto``: CUDA when present; ``cpu``, ``cuda:1``, ...); the other arguments as ``from_head_file``.
        ``models`` None: those the head records it was trained with (``models_of_head``)."""
        models = models or models_of_head(head_file)
        encoders = load_frozen_encoders(models, resolve_device(device) if isinstance(device, str) else device)
        return cls.from_head_file(head_file, encoders, text_cache_dir, disk_cache, preprocess, text_recipe)

    @classmethod
    def from_head_file(
        cls,
        head_file: Path | str,
        encoders: FrozenEncoders,
        text_cache_dir: Path | str | None = None,
        disk_cache: bool = True,
        preprocess: Preprocessing | str | None = None,
        text_recipe: TextRecipe | str | None = None,
    ) -> Predictor:
        """A head checkpoint (.safetensors) with encoders already loaded.

        Arguments:
          text_cache_dir (Path, str or None): where class text embeddings are kept between runs
            (default ``~/.cache/regionspot-cache/text-embeddings``).
          disk_cache (bool): False keeps text embeddings in memory only.
          preprocess, text_recipe (choice or its word, or None): as ``extract.preprocess`` /
            ``extract.text_recipe``; None: those of the head's training cache where the head
            records them, ``released`` for a head imported from a released checkpoint, else
            ``direct`` / ``openclip`` (the config defaults).
        """
        head, metadata = load_head(head_file)
        default_preprocess, default_recipe = inputs_of_head(metadata)
        encoders = encoders.with_preprocess(preprocess or default_preprocess)
        check_head_fits(head, encoders.clip, str(head_file))
        directory = Path(text_cache_dir) if text_cache_dir else default_text_cache_dir()
        recipe = TextRecipe.parse(text_recipe or default_recipe, "text recipe")
        text = TextEmbeddingCache(encoders.clip, encoders.clip_provenance(), directory if disk_cache else None, recipe=recipe)
        return cls(head, encoders, text)

    @torch.no_grad()
    def predict(
        self,
        image: ImageInput,
        boxes: Any,
        vocabulary: Sequence[str],
        masks: bool = False,
        attention: bool = False,
        open_set: OpenSetConfig | None = None,
        top_k: int = 1,
    ) -> list[Region]:
        """Label each box of one image with the most probable class of ``vocabulary``.

        Arguments:
          image (np.ndarray, PIL.Image, Path or str): an (H, W, 3) uint8 RGB array (or
            (H, W) / (H, W, 4), converted to RGB), a PIL image, or an image file.
          boxes (array-like or BoxSet): (N, 4) x1, y1, x2, y2 in original pixels; clipped to the
            image, a box without area inside it is an error naming it. A ``BoxSet`` (from
            ``auto_boxes`` or a proposal file) also gives each region its ``proposal_score``.
          vocabulary (sequence of str): C distinct, non-empty class names.
          masks (bool): also return SAM's single mask for each box prompt.
          attention (bool): also return where the head looks: the last decoder layer's
            cross-attention over the CLIP grid, averaged over heads.
          open_set (OpenSetConfig or None): a rule that may reject a box as none of the
            vocabulary (``regions/open_set.py``); None or rule ``off``: never.
          top_k (int): with other than 1, each region's ``classes``: its ``top_k`` most probable
            classes, best first (0: the whole vocabulary).

        Returns:
          (list of Region): N regions, in box order: ``box`` (4 floats, clipped; ``given_box``
            when clipping changed it), ``label`` (str; None when the open-set rule rejects the
            box, which then has ``best_guess``), ``score`` (float, softmax probability over the
            vocabulary, of the best class); with ``masks`` ``mask``, with an open-set rule
            ``known``, with ``attention`` ``attention`` and ``attention_class_token``.
        """
        names = checked_vocabulary(vocabulary)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise InputError(f"top_k: {top_k!r} is not a count of classes (1, 2, ...; 0: all)")
        open_set = open_set or OpenSetConfig()
        open_set.validate()
        picture = to_rgb_image(image)
        proposal_scores = boxes.scores.tolist() if isinstance(boxes, BoxSet) else None
        given = boxes.xyxy if isinstance(boxes, BoxSet) else boxes
        xyxy = checked_boxes(given, picture.width, picture.height)
        if not len(xyxy):
            return []
        sam = self.encoders.sam
        pixels = np.asarray(picture)
        embedding = sam.embed_images([sam.resizer()(pixels)])[0]
        text = self.text.get(names)
        rule = open_set.rule
        background = self.text.get(checked_vocabulary(open_set.background_prompts)) if rule.needs_background else text[:0]
        logits, weights = self.region_logits(picture, embedding, xyxy, torch.cat([text, background]), attention)
        logits, background_logits = logits[:, : len(names)], logits[:, len(names) :]
        results = _regions(xyxy, xyxy_array(given), logits.softmax(dim=-1).float().cpu().numpy(), names, top_k)
        if proposal_scores is not None:
            for result, score in zip(results, proposal_scores):
                result.proposal_score = score
        if open_set.rule.rejects:
            known = open_set.rule.known_scores(logits, background_logits)
            for result, score, kept in zip(results, known.tolist(), kept_regions(known, open_set).tolist()):
                result.known = score
                if not kept:  # the best guess stays beside the rejection
                    result.best_guess = ClassScore(result.label, names.index(result.label), result.score)
                    result.label = None
        if attention:
            self._add_attention(results, weights)
        if masks:
            for result, rle in zip(results, box_mask_rles(sam, embedding, xyxy, pixels.shape[:2])):
                result.mask = rle
        return results

    def auto_boxes(self, image: ImageInput, config: AutoBoxesConfig | None = None) -> BoxSet:
        """Boxes for ``predict`` without giving any: SAM's automatic mask generator on the image
        (``predict/proposals.py``); scores are SAM's predicted IoUs, best first. May be empty."""
        return automatic_boxes(self.encoders, np.asarray(to_rgb_image(image)), config or AutoBoxesConfig())

    def _add_attention(self, results: list[Region], weights: torch.Tensor) -> None:
        # The tower says where the patch grid starts: towers without a class token (SigLIP) have no
        # prefix share to report, and timm towers keep their grid elsewhere than open_clip's.
        tower = self.encoders.clip.tower
        for result, row in zip(results, weights.float().cpu().numpy()):
            result.attention_class_token = float(row[: tower.prefix_tokens].sum()) if tower.prefix_tokens else None
            result.attention = row[tower.prefix_tokens :].reshape(tower.grid)

    def region_logits(
        self,
        picture: Image.Image,
        sam_embedding: torch.Tensor,
        xyxy: np.ndarray,
        text: torch.Tensor,
        attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C) logits of the boxes against ``text``, and with ``attention`` the head's
        (N, 1 + grid^2) last-layer cross-attention (else None)."""
        clip = self.encoders.clip
        tokens = self.encoders.sam.box_tokens(sam_embedding, xyxy, (picture.height, picture.width))
        feature_map = clip.feature_maps(clip.preprocess(picture)[None])
        if attention:
            regions, weights = self.head.forward_with_attention(tokens[None].float(), feature_map.float())
            weights = weights[0]
        else:
            regions, weights = self.head(tokens[None].float(), feature_map.float()), None
        return region_logits(regions[0], text, clip.logit_scale, clip.logit_bias), weights


def check_head_fits(head: RegionSpotHead, clip: ClipEncoder, name: str) -> None:
    if (head.config.clip_width, head.config.text_dim) != (clip.width, clip.text_dim):
        raise ModelLoadError(
            f"{name}: the head expects CLIP width {head.config.clip_width} and text dim {head.config.text_dim}, "
            f"the CLIP model has {clip.width} and {clip.text_dim}: give the CLIP the head was trained with"
        )
