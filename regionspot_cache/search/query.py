"""Queries against a region index: text (the cache's CLIP text tower, prompt-ensembled as class
names are) or an indexed region (``--like IMAGE:BOX``). Brute force: one matrix product and a
top-k, in chunks; ``benchmarks/search.py`` measures it up to 1M regions."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from regionspot_cache.cache import CacheFormatError, CacheReader
from regionspot_cache.encoders.clip import ClipEncoder, load_clip
from regionspot_cache.encoders.frozen import FrozenEncoders
from regionspot_cache.errors import InputError, MissingFileError
from regionspot_cache.identity import models_recorded_in
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.runtime.records import differences
from regionspot_cache.search.index import RegionIndex

CHUNK_ROWS = 1 << 17  # regions per matrix product: bounds the (queries x chunk) score memory


@dataclass
class Hit:
    image_id: int
    box_index: int  # among the image's cached boxes
    box: list[float]  # x1, y1, x2, y2 in original pixels
    score: float  # cosine similarity to the query
    file_name: str | None = None  # the image's file, relative to the image root (``labelled_hits``)
    category: str | None = None  # the cached box's class name (None for proposals)

    def to_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "box_index": self.box_index,
            "box": self.box,
            "category": self.category,
            "score": self.score,
        }


def nearest_regions(
    index: RegionIndex, queries: np.ndarray | torch.Tensor, top: int, exclude_rows: Sequence[int | None] = ()
) -> list[list[Hit]]:
    """The ``top`` regions of highest cosine similarity to each (Q, D) L2-normalised query,
    best first (ties: index order). ``exclude_rows``: per query, an index row to leave out (the
    example region of a ``--like`` query, which would otherwise always come first)."""
    excluded = list(exclude_rows) + [None] * (len(queries) - len(exclude_rows))
    extra = int(any(row is not None for row in excluded))
    best_scores, best_rows = top_k_cosine(torch.as_tensor(index.embeddings), torch.as_tensor(queries).float(), top + extra)
    return [
        [_hit(index, row, score) for row, score in zip(rows, scores) if row != skip][:top]
        for rows, scores, skip in zip(best_rows.tolist(), best_scores.tolist(), excluded)
    ]


def labelled_hits(hits: list[Hit], reader: CacheReader) -> list[Hit]:
    """``hits`` with the file name of their image and the class name of their cached box."""
    files = dict(zip(*reader.images.select(["image_id", "file_name"]).to_pydict().values()))
    vocabulary = reader.vocabulary(reader.provenance.dataset)
    names = dict(zip(vocabulary.category_ids.tolist(), vocabulary.names))
    labelled = []
    for hit in hits:
        category_id = int(reader.box_category_ids[reader.box_rows(hit.image_id).start + hit.box_index])
        labelled.append(replace(hit, file_name=files.get(hit.image_id), category=names.get(category_id)))
    return labelled


def top_k_cosine(embeddings: torch.Tensor, queries: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) scores and rows of the best ``top`` of (R, D) ``embeddings`` for (Q, D) ``queries``:
    chunked products, each chunk's top-k merged with the best so far."""
    top = min(top, len(embeddings))
    scores = torch.full((len(queries), 0), -torch.inf)
    rows = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, len(embeddings), CHUNK_ROWS):
        chunk = queries @ embeddings[start : start + CHUNK_ROWS].T
        values, where = chunk.topk(min(top, chunk.shape[1]), dim=1)
        scores, order = torch.cat([scores, values], 1).sort(dim=1, descending=True, stable=True)
        rows = torch.cat([rows, where + start], 1).gather(1, order)
        scores, rows = scores[:, :top], rows[:, :top]
    return scores, rows


def _hit(index: RegionIndex, row: int, score: float) -> Hit:
    return Hit(int(index.image_ids[row]), int(index.box_index[row]), index.boxes[row].tolist(), float(score))


LIKE_SYNTAX = "IMAGE:BOX, where BOX is the box's index among the image's cached boxes (e.g. 42:0) or x1,y1,x2,y2"


def parse_like(text: str) -> tuple[int, int | list[float]]:
    """``IMAGE:BOX`` -> (image id, box index) or (image id, [x1, y1, x2, y2])."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*([\d.,\s-]+)", text)
    numbers = match.group(2).replace(" ", "").split(",") if match else []
    try:
        if match and len(numbers) == 1:
            return int(match.group(1)), int(numbers[0])
        if match and len(numbers) == 4:
            return int(match.group(1)), [float(v) for v in numbers]
    except ValueError:
        pass
    raise InputError(f"--like {text!r}: expected {LIKE_SYNTAX}")


def like_region(index: RegionIndex, image_id: int, box: int | list[float]) -> np.ndarray:
    """The indexed embedding of a region (see ``like_row``)."""
    return index.embeddings[like_row(index, image_id, box)]


def like_row(index: RegionIndex, image_id: int, box: int | list[float]) -> int:
    """The index row of a region: by box index, or the cached box overlapping the given
    coordinates most (IoU at least 0.5)."""
    if isinstance(box, int):
        try:
            return index.row(image_id, box)
        except KeyError as err:
            raise InputError(f"--like: {err.args[0]}") from None
    rows = np.flatnonzero(index.image_ids == image_id)
    if not len(rows):
        raise InputError(f"--like: image {image_id} has no cached boxes")
    from torchvision.ops import box_iou

    ious = box_iou(torch.tensor([box]), torch.from_numpy(index.boxes[rows]))[0]
    best = int(ious.argmax())
    if float(ious[best]) < 0.5:
        raise InputError(f"--like: no cached box of image {image_id} overlaps {box} (best IoU {float(ious[best]):.2f} < 0.5)")
    return int(rows[best])


def cache_clip(reader: CacheReader, pretrained: str | None = None, device: str = "auto") -> ClipEncoder:
    """The cache's CLIP alone (text queries need no SAM), checked against its provenance."""
    models = models_recorded_in(reader.provenance).with_overrides(clip_pretrained=pretrained)
    try:
        clip = load_clip(models.clip.model, models.clip.pretrained, resolve_device(device))
    except FileNotFoundError as err:
        raise MissingFileError(
            f"{err} (recorded in {reader.location.path('cache.json')}; give the file with --clip-pretrained)"
        ) from None
    given = FrozenEncoders(None, clip, models).clip_provenance()
    found = differences(reader.provenance.clip, given, "{key}: cache has {old!r}, given {new!r}")
    if found:
        raise CacheFormatError(f"{reader.location}: not the CLIP the cache was extracted with: " + "; ".join(found))
    return clip


def text_queries(clip: ClipEncoder, texts: Sequence[str]) -> np.ndarray:
    """(Q, text_dim) L2-normalised text embeddings, made as the cache makes class embeddings."""
    return clip.text_embeddings(list(texts)).float().cpu().numpy()
