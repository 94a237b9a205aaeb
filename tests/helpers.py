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
