"""``rs-cache demo``: generated data and tiny models through the three phases."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from regionspot_cache.cli.options import (
    ClipModelOption,
    ClipPretrainedOption,
    SamCheckpointOption,
    SamVariantOption,
)
from regionspot_cache.demo.config import ITERATIONS, DemoConfig, demo_train_config


def demo(
    workdir: Path = typer.Option(Path("rs-cache-demo"), help="Directory for the generated data, models, caches and results."),
    train_images: int = typer.Option(DemoConfig.train_images, help="Generated training images."),
    val_images: int = typer.Option(DemoConfig.val_images, help="Generated validation images."),
    iterations: int = typer.Option(ITERATIONS, help="Training iterations of the head."),
    seed: int = typer.Option(DemoConfig.seed, help="Seed for data, model weights and training."),
    sam_variant: Optional[str] = SamVariantOption,
    sam_checkpoint: Optional[str] = SamCheckpointOption,
    clip_model: Optional[str] = ClipModelOption,
    clip_pretrained: Optional[str] = ClipPretrainedOption,
) -> None:
    """Generate a small LVIS-format dataset and tiny random-weight SAM/CLIP checkpoints, then run
    extract -> train -> eval and print the AP of the untrained and the trained head.

    Pass --sam-checkpoint/--clip-model/--clip-pretrained to use real models instead of tiny ones.
    """
    from regionspot_cache.config import ClipSpec, ModelsConfig, SamSpec
    from regionspot_cache.demo.run import run_demo
    from regionspot_cache.demo.tiny_models import TINY_CLIP, TINY_CLIPS, TINY_SAM, TINY_SAMS

    config = DemoConfig(train_images=train_images, val_images=val_images, seed=seed, train=demo_train_config(iterations))
    config.train.seed = seed
    only_tiny = sam_variant in (None, *TINY_SAMS) and clip_model in (None, *TINY_CLIPS)
    if sam_checkpoint is None and clip_pretrained is None and only_tiny:
        # Only tiny kinds named: their random weights are written to files and loaded back, as real ones are.
        config.tiny_sam, config.tiny_clip = sam_variant or TINY_SAM, clip_model or TINY_CLIP
    elif any(v is not None for v in (sam_variant, sam_checkpoint, clip_model, clip_pretrained)):
        # Tiny models for the parts not given; a real checkpoint alone implies the default architecture.
        defaults = ModelsConfig(
            SamSpec("vit_b" if sam_checkpoint else TINY_SAM, None), ClipSpec("ViT-L-14" if clip_pretrained else TINY_CLIP, None)
        )
        config.models = defaults.with_overrides(sam_variant, sam_checkpoint, clip_model, clip_pretrained)
    config.validate()  # the options above were assigned after construction
    run_demo(workdir, config)
