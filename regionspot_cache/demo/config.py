"""The demo's settings: small generated splits and a shortened schedule for a tiny head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from regionspot_cache.config import EvalConfig, ExtractConfig, ModelsConfig, TrainConfig
from regionspot_cache.validated import Validated, at_least, one_of

ITERATIONS = 800


def demo_train_config(iterations: int = ITERATIONS) -> TrainConfig:
    """The paper's schedule shape (x0.1 at 80% and 95% of the steps), shortened and with a larger
    learning rate for a tiny head; the state is saved every 100 steps, so an interrupted demo
    loses little of its training."""
    return TrainConfig(
        iterations=iterations,
        batch_size=8,
        lr=1e-3,
        warmup_iters=min(50, iterations // 10),
        lr_steps=sorted({max(1, int(iterations * share)) for share in (0.8, 0.95)}),
        max_boxes_per_image=16,
        num_workers=0,
        checkpoint_every=100,
    )


@dataclass
class DemoConfig(Validated):
    SECTION: ClassVar[str] = "demo"
    # Sized for about a CPU minute: training is most of the demo's time, then extraction.
    train_images: int = field(default=160, metadata=at_least(1))
    val_images: int = field(default=48, metadata=at_least(1))
    seed: int = field(default=0, metadata=at_least(0))
    models: ModelsConfig | None = None  # None: generate tiny random-weight models
    tiny_sam: str = field(default="tiny", metadata=one_of("tiny", "sam2_tiny"))  # demo/tiny_models.TINY_SAMS
    tiny_clip: str = field(default="RS-Tiny-ViT", metadata=one_of("RS-Tiny-ViT", "RS-Tiny-Timm-ViT"))  # TINY_CLIPS
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(shard_size=32, batch_size=8, num_workers=0))
    train: TrainConfig = field(default_factory=demo_train_config)
    eval: EvalConfig = field(default_factory=EvalConfig)
