"""Phase 2: train the head from the feature cache alone (no encoder in the loop)."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.ops import sigmoid_focal_loss

from .cache import CacheReader, Vocabulary
from .config import TrainConfig
from .head import HeadConfig, RegionSpotHead, region_logits, save_head
from .progress import progress_bar
from .runtime import resolve_device
from .train_state import latest_train_state, load_train_state, save_train_state


@dataclass
class RegionBatch:
    tokens: torch.Tensor  # (B, N, 256)
    feature_maps: torch.Tensor  # (B, L, width)
    box_mask: torch.Tensor  # (B, N) True for real boxes; padding is masked out of attention and loss
    labels: torch.Tensor  # (B, N) index into the vocabulary, -1 for padding

    def to(self, device: torch.device) -> "RegionBatch":
        return RegionBatch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


class CachedRegions(Dataset):
    """Images of a cache with their labelled boxes. Keys are ``(epoch, index)`` so that the random
    box subsampling is a function of the key alone, whatever the number of workers."""

    def __init__(self, reader: CacheReader, vocabulary: Vocabulary, max_boxes: int, seed: int):
        self.reader = reader
        self.max_boxes = max_boxes
        self.seed = seed
        self.class_index = {int(cid): i for i, cid in enumerate(vocabulary.category_ids)}
        known = pc.is_in(reader.boxes["category_id"], value_set=pa.array(list(self.class_index), pa.int64()))
        labelled = set(pc.unique(reader.boxes["image_id"].filter(known)).to_pylist())
        self.image_ids = [i for i in reader.image_ids() if i in labelled]
        if not self.image_ids:
            raise ValueError(f"{reader.root}: no image has a box labelled with vocabulary {vocabulary.name!r}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, index = key
        item = self.reader.image(self.image_ids[index])
        labels = np.asarray([self.class_index.get(int(c), -1) for c in item.category_ids])
        keep = np.flatnonzero(labels >= 0)
        if len(keep) > self.max_boxes:
            rng = np.random.default_rng([self.seed, epoch, index])
            keep = np.sort(rng.choice(keep, self.max_boxes, replace=False))
        return item.tokens[keep], item.feature_map, labels[keep]


class EpochSampler(Sampler):
    """Endless seeded shuffles, yielding ``(epoch, index)``; can start at any step."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            for index in order[offset:].tolist():
                yield epoch, index
            position = (epoch + 1) * self.size


def collate_regions(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> RegionBatch:
    count = max(len(labels) for _, _, labels in items)
    batch, token_dim = len(items), items[0][0].shape[1]
    tokens = torch.zeros(batch, count, token_dim)
    labels = torch.full((batch, count), -1, dtype=torch.long)
    for row, (item_tokens, _, item_labels) in enumerate(items):
        tokens[row, : len(item_labels)] = torch.from_numpy(item_tokens.astype(np.float32))
        labels[row, : len(item_labels)] = torch.from_numpy(item_labels)
    maps = torch.from_numpy(np.stack([m for _, m, _ in items]).astype(np.float32))
    return RegionBatch(tokens, maps, labels >= 0, labels)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, box_mask: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss summed over classes and real boxes, divided by the number of real boxes."""
    logits = logits[box_mask]
    targets = torch.nn.functional.one_hot(labels[box_mask], logits.shape[-1]).to(logits.dtype)
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / max(int(box_mask.sum()), 1)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up from ``warmup_factor``, then x``lr_gamma`` at each of ``lr_steps``."""
    warmup = 1.0
    if step < config.warmup_iters:
        alpha = step / config.warmup_iters
        warmup = config.warmup_factor * (1 - alpha) + alpha
    return warmup * config.lr_gamma ** sum(step >= s for s in config.lr_steps)


@dataclass
class TrainSummary:
    steps: int
    final_loss: float
    seconds: float
    samples_per_second: float
    checkpoint: Path


def head_config_for(reader: CacheReader, config: TrainConfig) -> HeadConfig:
    clip = reader.provenance.clip
    return HeadConfig(
        clip_width=int(clip["width"]), text_dim=int(clip["text_dim"]),
        normalize_feature_map=config.normalize_feature_map,
    )


def run_dir_for(output: Path) -> Path:
    """Where a training run keeps its state checkpoints and metrics: ``<output stem>.run/``."""
    return output.with_name(f"{output.stem}.run")


class MetricsLog:
    """Per-step metrics as CSV, flushed every row; on resume, rows past the resumed step go."""

    COLUMNS = ("step", "loss", "lr", "images_per_s")

    def __init__(self, path: Path, resume_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and resume_step > 0:
            kept = [row for row in path.read_text().splitlines()[1:] if int(row.split(",")[0]) < resume_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join([",".join(self.COLUMNS), *kept]) + "\n")
        tmp.replace(path)
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, step: int, loss: float, lr: float, rate: float) -> None:
        self.handle.write(f"{step},{loss!r},{lr!r},{rate:.2f}\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def train_head(
    cache_dir: Path | str, output: Path | str, config: TrainConfig, vocabulary: str | None = None, resume: bool = True,
) -> TrainSummary:
    """Train a head on every labelled box of the cache; writes ``output`` (safetensors) + JSON.

    Every ``config.checkpoint_every`` steps the full training state is saved under
    ``<output stem>.run/state``; with ``resume`` a run continues from the newest one, step for
    step as if it had not stopped. A NaN or infinite loss stops the run, keeping that state.
    """
    output = Path(output)
    reader = CacheReader(cache_dir)
    vocab = reader.vocabulary(vocabulary or reader.provenance.dataset)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    head = RegionSpotHead(head_config_for(reader, config)).to(device).train()
    text = torch.from_numpy(vocab.embeddings).to(device)
    logit_scale = float(reader.provenance.clip["logit_scale"])
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    state_dir = run_dir_for(output) / "state"
    identity = resume_identity(config, cache_dir, vocab.name)
    if not resume:
        shutil.rmtree(state_dir, ignore_errors=True)  # a fresh run: the old states would not fit it
    latest = latest_train_state(state_dir) if resume else None
    start = load_train_state(latest, head, optimizer, scheduler, identity) if latest else 0
    dataset = CachedRegions(reader, vocab, config.max_boxes_per_image, config.seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, sampler=EpochSampler(len(dataset), config.seed, start * config.batch_size),
        num_workers=config.num_workers, collate_fn=collate_regions, pin_memory=device.type == "cuda",
        # Its own generator: creating the iterator must not draw from the global RNG (dropout's),
        # or a resumed run would see other dropout masks.
        generator=torch.Generator().manual_seed(config.seed),
    )
    metrics = MetricsLog(run_dir_for(output) / "metrics.csv", start)
    started, loss_value, samples = time.perf_counter(), math.nan, 0
    try:
        with progress_bar("train head", config.iterations, "loss {task.fields[loss]} {task.fields[rate]}") as (bar, task):
            bar.update(task, advance=start)
            for step, batch in zip(range(start, config.iterations), loader):
                lr = optimizer.param_groups[0]["lr"]
                loss_value = train_step(head, optimizer, batch.to(device), text, logit_scale, config)
                if not math.isfinite(loss_value):
                    kept = latest_train_state(state_dir)
                    raise FloatingPointError(f"loss became {loss_value} at step {step}; stopped. Last good state: "
                                             f"{kept or 'none saved yet'}")
                scheduler.step()
                samples += len(batch.labels)
                rate = samples / (time.perf_counter() - started)
                metrics.write(step, loss_value, lr, rate)
                bar.update(task, advance=1, loss=f"{loss_value:.4f}", rate=f"{rate:.1f} img/s")
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.iterations:
                    save_train_state(state_dir, step + 1, head, optimizer, scheduler, identity)
    finally:
        metrics.close()
    seconds = time.perf_counter() - started
    save_head(head, output, {"train": asdict(config), "vocabulary": vocab.name, "cache": str(cache_dir)})
    return TrainSummary(config.iterations, loss_value, seconds, samples / max(seconds, 1e-9), output)


def resume_identity(config: TrainConfig, cache_dir: Path | str, vocabulary: str) -> dict:
    """What a resumed run must share with the saved one: all but length and machinery."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("iterations", "num_workers", "device", "checkpoint_every")}
    return {**settings, "cache": str(Path(cache_dir).resolve()), "vocabulary": vocabulary}


def train_step(head: RegionSpotHead, optimizer: torch.optim.Optimizer, batch: RegionBatch, text: torch.Tensor,
               logit_scale: float, config: TrainConfig) -> float:
    """One optimiser step; returns the loss. A non-finite loss leaves the weights untouched."""
    embeddings = head(batch.tokens, batch.feature_maps, batch.box_mask)
    logits = region_logits(embeddings, text, logit_scale)
    loss = focal_loss(logits, batch.labels, batch.box_mask, config.focal_alpha, config.focal_gamma)
    if not torch.isfinite(loss):
        return float(loss.item())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
    optimizer.step()
    return float(loss.item())
