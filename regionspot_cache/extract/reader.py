"""Phase 1 reader: decode and resize images in data-loading workers; never raises for a bad file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import BoxSet, DatasetError, DetectionDataset, ImageEntry
from regionspot_cache.data.images import ImageDecodeError
from regionspot_cache.data.views import View, apply_view
from regionspot_cache.encoders import FrozenEncoders
from regionspot_cache.encoders.clip import ClipPreprocess
from regionspot_cache.encoders.sam import SamResize
from regionspot_cache.extract.decode import default_loader_workers, plain_jpeg, read_rgb, resolve_decode
from regionspot_cache.runtime.devices import check_worker_sockets
from regionspot_cache.runtime.files import content_digest, file_content_digest


@dataclass
class LoadedImage:
    entry: ImageEntry
    boxes: BoxSet
    sam_pixels: torch.Tensor | None = None  # (3, h, w) uint8, long side 1024
    clip_pixels: torch.Tensor | None = None  # (3, H, W) float, normalised
    jpeg: torch.Tensor | None = None  # with extract.decode = "device": the file's bytes, decoded later (extract/decode.py)
    error: str = ""
    dropped: BoxSet = field(default_factory=BoxSet.empty)  # boxes a view's crop left out, as given
    dropped_reasons: list[str] = field(default_factory=list)
    content: str | None = None  # the file's content digest (runtime/files.py), recorded with its shard


class ImageReader(Dataset):
    """Decodes and resizes the images of one shard; never raises for a bad file."""

    def __init__(
        self,
        dataset: DetectionDataset,
        entries: Sequence[ImageEntry],
        sam_resize: SamResize | None,
        clip_preprocess: Callable | None,  # ClipPreprocess, or any image -> tensor
        max_pixels: int | None = None,
        view: tuple[View, int] | None = None,
        load: Callable = read_rgb,
        device_decode: bool = False,
    ):
        self.dataset = dataset
        self.load = load  # path, max_pixels -> PIL RGB image (extract/decode.py)
        self.device_decode = device_decode  # plain JPEGs are only read here, decoded by DevicePixels
        self.view = view  # (view, seed): images and boxes are seen through it (data/views.py)
        self.max_pixels = max_pixels
        self.entries = list(entries)
        self.sam_resize = sam_resize
        self.clip_preprocess = clip_preprocess

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> LoadedImage:
        entry = self.entries[index]
        boxes = self.dataset.boxes_of(entry.id)
        try:
            path = self.dataset.image_path(entry)
        except DatasetError as err:
            return LoadedImage(entry, boxes, error=str(err))
        try:
            jpeg = plain_jpeg(path, self.max_pixels) if self.device_decode and self.view is None else None
            image = self.load(path, self.max_pixels) if jpeg is None else None
        except ImageDecodeError as err:  # its bytes are recorded too: a file mended later is noticed
            return LoadedImage(entry, boxes, error=str(err), content=file_content_digest(path))
        # The bytes were just read: digesting them again from the page cache costs little next to decoding.
        content = content_digest(jpeg.data) if jpeg is not None else file_content_digest(path)
        size = image.size if jpeg is None else jpeg.size
        if size != (entry.width, entry.height):
            return LoadedImage(
                entry,
                boxes,
                error=f"{path}: decoded size {size[0]}x{size[1]} differs from the annotation's {entry.width}x{entry.height}",
                content=content,
            )
        if jpeg is not None:
            return LoadedImage(entry, boxes, jpeg=jpeg.tensor(), content=content)
        dropped, dropped_reasons = BoxSet.empty(), []
        if self.view is not None:
            viewed = apply_view(*self.view, image, entry, boxes)
            image, entry, boxes, dropped, dropped_reasons = (
                viewed.image,
                viewed.entry,
                viewed.boxes,
                viewed.dropped,
                viewed.dropped_reasons,
            )
        sam_pixels, clip_pixels = self.encoder_inputs(image)
        return LoadedImage(
            entry, boxes, sam_pixels, clip_pixels, dropped=dropped, dropped_reasons=dropped_reasons, content=content
        )

    def encoder_inputs(self, image: Image.Image) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """SAM's and CLIP's inputs of a decoded RGB image; a test resize they share (``released``)
        runs once for both."""
        sam, clip = self.sam_resize, self.clip_preprocess
        shared = isinstance(sam, SamResize) and isinstance(clip, ClipPreprocess)  # SAM 2's resize has no test resize
        if shared and sam.test_resize is not None and sam.test_resize == clip.test_resize:
            resized = sam.test_resize.image(image)
            return sam.of_test_resized(resized), clip.of_test_resized(resized)
        return (sam(image) if sam else None), (clip(image) if clip else None)


def image_loader(
    dataset: DetectionDataset,
    shards: Sequence[tuple[int, list[ImageEntry]]],
    encoders: FrozenEncoders,
    config: ExtractConfig,
    with_clip: bool = True,
    with_sam: bool = True,
    view: tuple[View, int] | None = None,
) -> DataLoader:
    """Batches of ``config.batch_size`` images that never cross a shard boundary, seen through
    ``view`` (a view and its seed) when given."""
    entries = [entry for _, shard in shards for entry in shard]
    batches, start = [], 0
    for _, shard in shards:
        batches += [
            list(range(i, min(i + config.batch_size, start + len(shard))))
            for i in range(start, start + len(shard), config.batch_size)
        ]
        start += len(shard)
    device_decode = resolve_decode(config.decode, encoders.sam.device, view is not None, config.preprocess).on_device
    reader = ImageReader(
        dataset,
        entries,
        encoders.sam.resizer() if with_sam else None,
        encoders.clip.preprocessor() if with_clip else None,
        config.max_image_pixels,
        view,
        device_decode=device_decode,
    )
    workers = default_loader_workers() if config.num_workers is None else config.num_workers
    if workers:
        check_worker_sockets("extract.num_workers")
    return DataLoader(
        reader,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=list,
        pin_memory=encoders.sam.device.type == "cuda",
    )
