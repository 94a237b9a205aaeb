"""CLIP as a frozen encoder: whole-image feature maps and prompt-ensembled class text embeddings.

Models come from open_clip by config name plus a pretrained tag (``openai``) or a local weights
file. The configs shipped in ``regionspot_cache/model_configs`` (tiny models for the demo and
tests) are registered with open_clip, so they load through exactly the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def clean_class_name(name: str) -> str:
    """Strip the ``-other``, ``-merged`` and ``-stuff`` suffixes of COCO-style category names."""
    return name.replace("-other", "").replace("-merged", "").replace("-stuff", "")


def load_clip(model_name: str, pretrained: str | None, device: torch.device) -> "ClipEncoder":
    """Create open_clip ``model_name`` with weights from a pretrained tag or a local file."""
    if pretrained and (Path(pretrained).suffix or "/" in pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"{pretrained}: CLIP weights file not found")
    model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipEncoder(model.eval().requires_grad_(False), tokenizer, device)


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize the whole image to the model's input size (no crop) and normalise. Holds no model,
    so data-loading workers can run it."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        height, width = self.size
        resized = image.convert("RGB").resize((width, height), resample=_INTERPOLATION[self.interpolation])
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def width(self) -> int:
        return int(self.model.visual.class_embedding.shape[-1])

    @property
    def num_tokens(self) -> int:
        grid = self.model.visual.grid_size
        return 1 + grid[0] * grid[1]

    @property
    def text_dim(self) -> int:
        return int(self.model.text_projection.shape[-1])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def preprocessor(self) -> "ClipPreprocess":
        cfg = self.model.visual.preprocess_cfg
        return ClipPreprocess(
            self.image_size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic")
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessor()(image)

    @torch.no_grad()
    def feature_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + grid^2, width): the vision transformer's output tokens, class
        token first, before ``ln_post``. Captured with a hook so open_clip's own forward runs."""
        captured: list[torch.Tensor] = []
        handle = self.model.visual.transformer.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output)
        )
        try:
            self.model.visual(batch.to(self.device))
        finally:
            handle.remove()
        return captured[0]

    @torch.no_grad()
    def text_embeddings(self, class_names: Sequence[str]) -> torch.Tensor:
        """(C, text_dim) L2-normalised mean over the 80 ImageNet prompt templates of the
        normalised text features of each cleaned class name."""
        names = [clean_class_name(name) for name in class_names]
        weights = open_clip.build_zero_shot_classifier(
            self.model,
            tokenizer=self.tokenizer,
            classnames=names,
            templates=OPENAI_IMAGENET_TEMPLATES,
            num_classes_per_batch=8,
            device=self.device,
        )
        return weights.T.contiguous()
