"""Small helpers shared by the tests (importable, unlike conftest fixtures)."""

from __future__ import annotations

from regionspot_cache.config import ModelsConfig


def model_args(models: ModelsConfig) -> list[str]:
    """The command-line flags that name ``models`` (SAM variant and checkpoint, CLIP model and weights)."""
    return [
        "--sam-variant",
        models.sam.variant,
        "--sam-checkpoint",
        str(models.sam.checkpoint),
        "--clip-model",
        models.clip.model,
        "--clip-pretrained",
        str(models.clip.pretrained),
    ]


def extract_args(manifest, data_root, cache: str, models: ModelsConfig, *settings: str) -> list[str]:
    """``rs-cache extract`` of ``manifest`` into ``cache`` with ``models``, in-process loaders
    (``extract.num_workers=0``) and each of ``settings`` as a ``--set``."""
    sets = [arg for setting in ("extract.num_workers=0", *settings) for arg in ("--set", setting)]
    return ["extract", "-m", str(manifest), "--data-root", str(data_root), "-c", cache, *model_args(models), *sets]
