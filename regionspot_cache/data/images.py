"""Decoding image files into RGB arrays the way the encoders expect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from regionspot_cache.data.datasets import ImageEntry, image_path_under
from regionspot_cache.errors import ImageDecodeError


def load_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` to 8-bit RGB with its EXIF orientation applied. An image of more than
    ``max_pixels`` pixels (a decompression bomb, or simply too large) is refused before decoding."""
    try:
        with Image.open(path) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageDecodeError(
                    f"{path}: {image.width}x{image.height} pixels, more than the limit of {max_pixels} (extract.max_image_pixels)"
                )
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grayscale: keep the top 8 bits rather than clipping at 255.
                array = np.asarray(image, dtype=np.uint32) >> 8
                image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{path}: cannot decode image: {err}") from None


@dataclass
class ImageSource:
    """The original images of a dataset's entries, by image id, decoded as extraction decodes
    them; a file whose size differs from its entry's is refused (boxes are in its pixels)."""

    root: Path
    entries: dict[int, ImageEntry]

    def load(self, image_id: int) -> Image.Image:
        entry = self.entries[image_id]
        path = image_path_under(self.root, entry.file_name, image_id)
        image = load_rgb(path)
        if image.size != (entry.width, entry.height):
            raise ImageDecodeError(
                f"{path}: decoded size {image.size[0]}x{image.size[1]} differs from the recorded {entry.width}x{entry.height}"
            )
        return image
