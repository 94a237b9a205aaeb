"""CLIP as a frozen encoder: whole-image feature maps and prompt-ensembled class text embeddings.

Models come from open_clip by config name plus a pretrained tag (``openai``) or a local weights
file. The configs shipped in ``regionspot_cache/model_configs`` (tiny models for the demo and
tests) are registered with open_clip, so they load through exactly the same path.

Any ViT-like vision tower works: open_clip's own ``VisionTransformer`` (OpenAI, LAION, DFN,
MetaCLIP) and timm-based towers (SigLIP/SigLIP2, PE-Core, EVA02). The feature map is taken with
open_clip's ``forward_intermediates`` for both kinds (``tower.py``); towers without a token grid
(ConvNeXt, ResNet) are refused when the model is loaded.
"""

from __future__ import annotations

import difflib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from regionspot_cache.choices import Preprocessing, TextRecipe
from regionspot_cache.encoders.preprocess import TestResize, clip_pixels, released_clip_of_test_resized, test_resize_for
from regionspot_cache.encoders.tower import TokenTower, register_tiny_timm_tower, token_tower
from regionspot_cache.errors import MissingFileError, ModelLoadError
from regionspot_cache.progress import progress_bar

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
register_tiny_timm_tower()  # the tower of RS-Tiny-Timm-ViT


def clean_class_name(name: str) -> str:
    """Strip the ``-other``, ``-merged`` and ``-stuff`` suffixes of COCO-style category names."""
    return name.replace("-other", "").replace("-merged", "").replace("-stuff", "")


# The released code's 81 prompts: OpenAI's 80 ImageNet templates and a bare "{}.".
RELEASED_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES) + ("{}.",)


def templates_of(recipe: TextRecipe) -> Sequence[str | Callable[[str], str]]:
    """The prompt templates: open_clip's template functions (``openclip``) or the released format strings."""
    return OPENAI_IMAGENET_TEMPLATES if recipe.uses_openai_templates else RELEASED_TEMPLATES


def load_clip(model_name: str, pretrained: str | None, device: torch.device) -> "ClipEncoder":
    """Create open_clip ``model_name`` with weights from a pretrained tag or a local file."""
    if pretrained and (Path(pretrained).suffix or "/" in pretrained) and not Path(pretrained).is_file():
        raise MissingFileError(f"{pretrained}: CLIP weights file not found")
    _check_model_name(model_name)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    except (RuntimeError, KeyError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        # A text file ends in KeyError, another model's weights in a state_dict RuntimeError.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(
            f"{pretrained}: not CLIP weights of {model_name} (expected the file or tag of that "
            f"model): {err.__class__.__name__}: {first_line[:200]}"
        ) from None
    tower = token_tower(model.visual, model_name)  # refuses towers without a token grid before the tokenizer loads
    tokenizer = open_clip.get_tokenizer(model_name)  # each model's own (BPE, SentencePiece, ...)
    return ClipEncoder(model.eval().requires_grad_(False), tokenizer, device, tower=tower)


def _check_model_name(model_name: str) -> None:
    """An unknown open_clip model name is refused with the closest known names, not open_clip's
    traceback listing all of them."""
    if model_name.startswith(("hf-hub:", "local-dir:")) or model_name in open_clip.list_models():
        return
    close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else " (`open_clip.list_models()` lists them)"
    raise ModelLoadError(f"CLIP model {model_name!r}: not an open_clip model name{hint}")


TEXT_CHUNK = 64  # class names per progress step


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize the whole image to the model's input size (no crop) and normalise. Holds no model,
    so data-loading workers can run it. ``preprocess``: ``direct`` (PIL resize of the image) or
    ``released`` (``encoders/preprocess.py``)."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    preprocess: Preprocessing = Preprocessing.DIRECT

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return clip_pixels(self.preprocess, image, self.size, *self._mean_std(), self.interpolation)

    @property
    def test_resize(self) -> TestResize | None:
        return test_resize_for(self.preprocess)

    def of_test_resized(self, image: Image.Image) -> torch.Tensor:
        """``released``: the input from the image ``test_resize`` already made (RGB)."""
        return released_clip_of_test_resized(image, self.size, *self._mean_std())

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    preprocessing: Preprocessing = Preprocessing.DIRECT  # extract.preprocess: how images become CLIP input
    tower: TokenTower | None = None

    def __post_init__(self) -> None:
        self.preprocessing = Preprocessing.parse(self.preprocessing, "preprocess")
        if self.tower is None:
            self.tower = token_tower(self.model.visual, type(self.model.visual).__name__)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def num_tokens(self) -> int:
        """Rows of the feature map: the tower's prefix tokens, then the patch grid."""
        return self.tower.prefix_tokens + self.tower.grid[0] * self.tower.grid[1]

    @property
    def text_dim(self) -> int:
        projection = getattr(self.model, "text_projection", None)
        if projection is not None:  # CLIP with open_clip's own text tower
            return int(projection.shape[-1])
        return int(self.model.text.output_dim)  # CustomTextCLIP (SigLIP, PE-Core, ...)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def logit_bias(self) -> float | None:
        """SigLIP-style models add a learnt bias to every logit; CLIP has none."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())

    def preprocessor(self) -> "ClipPreprocess":
        cfg = self.model.visual.preprocess_cfg
        return ClipPreprocess(
            self.image_size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"), self.preprocessing
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.preprocessor()(image)

    @torch.no_grad()
    def feature_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix + grid^2, width): the last block's output tokens before the
        final norm, prefix tokens (class token, registers; none for SigLIP) first."""
        return self.tower.last_block_tokens(batch.to(self.device))

    @torch.no_grad()
    def text_embeddings(self, class_names: Sequence[str], recipe: TextRecipe | str = TextRecipe.OPENCLIP) -> torch.Tensor:
        """(C, text_dim) L2-normalised class embeddings of the cleaned class names.

        ``openclip``: mean over OpenAI's 80 ImageNet templates of the *normalised* text features,
        normalised again (open_clip's zero-shot classifier). ``released``: the released RegionSpot
        code's: mean over ``RELEASED_TEMPLATES`` (81) of the *raw* text features, normalised once.
        """
        names = [clean_class_name(name) for name in class_names]
        recipe = TextRecipe.parse(recipe, "text recipe")
        # Classes are independent, so encoding them in chunks changes nothing but shows progress:
        # a first-time vocabulary of thousands of names takes minutes on a CPU.
        chunks = [names[start : start + TEXT_CHUNK] for start in range(0, len(names), TEXT_CHUNK)]
        parts = []
        with progress_bar("encode class names", len(names), disable=len(chunks) < 2) as (bar, task):
            for chunk in chunks:
                parts.append(self._class_embeddings(chunk, recipe))
                bar.update(task, advance=len(chunk))
        return torch.cat(parts) if parts else torch.empty(0, self.text_dim, device=self.device)

    def _class_embeddings(self, names: list[str], recipe: TextRecipe) -> torch.Tensor:
        if not recipe.normalises_each_template:
            return self._raw_template_mean(names, templates_of(recipe))
        weights = open_clip.build_zero_shot_classifier(
            self.model,
            tokenizer=self.tokenizer,
            classnames=names,
            templates=templates_of(recipe),
            num_classes_per_batch=8,
            device=self.device,
        )
        return weights.T.contiguous()

    def _raw_template_mean(self, names: list[str], templates: Sequence[str], per_batch: int = 8) -> torch.Tensor:
        rows = []
        for start in range(0, len(names), per_batch):
            batch = names[start : start + per_batch]
            tokens = self.tokenizer([template.format(name) for name in batch for template in templates])
            features = self.model.encode_text(tokens.to(self.device)).float()
            rows.append(features.view(len(batch), len(templates), -1).mean(dim=1))
        if not rows:
            return torch.empty(0, self.text_dim, device=self.device)
        return torch.nn.functional.normalize(torch.cat(rows), dim=-1)
