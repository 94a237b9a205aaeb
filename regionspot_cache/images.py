"""Decoding image files into RGB arrays the way the encoders expect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as an image; the message names the file."""


def load_rgb(path: Path) -> Image.Image:
    """Decode ``path`` to 8-bit RGB with its EXIF orientation applied."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grayscale: keep the top 8 bits rather than clipping at 255.
                array = np.asarray(image, dtype=np.uint32) >> 8
                image = Image.fromarray(array.clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{path}: cannot decode image: {err}") from None
