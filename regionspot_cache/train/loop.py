"""Phase 2: train the head from feature caches alone (no encoder in the loop).

One process, or several under ``torchrun`` (see ``train_distributed``); one training dataset or
several, each with its own vocabulary (see ``train_data``).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import sigmoid_focal_loss

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.completeness import Completeness
from regionspot_cache.config import TextRecipe, TrainConfig
from regionspot_cache.errors import ModelLoadError
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, load_head, region_logits, save_head
from regionspot_cache.identity import TrainedWith
from regionspot_cache.progress import progress_bar
from regionspot_cache.runtime.files import sha256_file
from regionspot_cache.runtime.records import differences
from regionspot_cache.train.data import RegionBatch, TrainSource, open_sources
from regionspot_cache.train.distributed import (
    Processes,
    barrier,
    gather_objects,
    global_sum,
    join_process_group,
    leave_process_group,
)
from regionspot_cache.train.loader import training_loader
from regionspot_cache.train.metrics import MetricsLog, recorded_last_step
from regionspot_cache.train.shard_cache import ShardCacheStats
from regionspot_cache.train.state import latest_train_state, load_train_state, rng_state, save_train_state

logger = logging.getLogger(__name__)


def focal_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, box_mask: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Sigmoid focal loss summed over classes and real boxes."""
    logits = logits[box_mask]
    targets = torch.nn.functional.one_hot(labels[box_mask], logits.shape[-1]).to(logits.dtype)
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, box_mask: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss summed over classes and real boxes, divided by the number of real boxes."""
    return focal_loss_sum(logits, labels, box_mask, alpha, gamma) / max(int(box_mask.sum()), 1)


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
    resumed_from: int = 0  # the step the run continued from (0: a fresh start)
    local_cache: ShardCacheStats | None = None  # with train.local_cache_dir: bytes fetched, peak on disk
    partial: list[Completeness] = field(default_factory=list)  # --allow-partial: caches trained on in part

    @property
    def already_trained(self) -> bool:
        """The saved state had every step: nothing was trained, loss and rate are the recorded ones."""
        return self.resumed_from >= self.steps > 0


def head_config_for(reader: CacheReader, config: TrainConfig) -> HeadConfig:
    clip = reader.provenance.clip
    return HeadConfig(
        clip_width=clip.width,
        text_dim=clip.text_dim,
        dropout=config.dropout,
        normalize_feature_map=config.normalize_feature_map,
    )


def initial_head(reader: CacheReader, config: TrainConfig) -> RegionSpotHead:
    """A fresh head, or the weights of ``config.init_from`` (e.g. stage 2 from stage 1)."""
    head = RegionSpotHead(head_config_for(reader, config))
    if config.init_from:
        start, _ = load_head(config.init_from)
        mismatched = differences(start.config, head.config, "{key} is {old!r}, here {new!r}")
        if mismatched:
            raise ModelLoadError(f"{config.init_from}: head does not fit this training run: " + ", ".join(mismatched))
        head.load_state_dict(start.state_dict())
    return head


def trained_with(source: TrainSource) -> TrainedWith:
    """The SAM and CLIP of the training caches (all the same: ``open_sources`` checks) and their
    text recipe, recorded in the head so that ``predict --head`` can load them alone."""
    provenance = source.reader.provenance
    recipe = TextRecipe.parse(source.vocabulary.text_recipe, "text recipe")
    return TrainedWith(provenance.sam, provenance.clip, provenance.weights, recipe.value)


def run_dir_for(output: Path) -> Path:
    """Where a training run keeps its state checkpoints and metrics: ``<output stem>.run/``."""
    return output.with_name(f"{output.stem}.run")


def resume_identity(config: TrainConfig, sources: Sequence[TrainSource]) -> dict:
    """What a resumed run must share with the saved one: all but length and machinery."""
    # "views" as resolved to the views read (below, only when there are any besides the identity).
    machinery = (
        "iterations",
        "num_workers",
        "prefetch_batches",
        "device",
        "checkpoint_every",
        "tensorboard",
        "caches",
        "views",
        "local_cache_dir",
        "local_cache_gb",
        "read_ahead_shards",
    )
    if not config.order.by_shards:  # the order of earlier versions: their saved states resume
        machinery += ("order", "resident_shards")
    settings = {k: v for k, v in asdict(config).items() if k not in machinery}
    settings["init_from"] = sha256_file(config.init_from) if config.init_from else None
    views = {"views": [[v.name for v in s.views] for s in sources]} if any(len(s.views or ()) > 1 for s in sources) else {}
    return {
        **settings,
        "caches": [str(s.cache.resolve()) for s in sources],
        "vocabularies": [s.vocabulary.name for s in sources],
        **views,
    }


def train_head(
    caches: Sequence[Path | str] | Path | str | None,
    output: Path | str,
    config: TrainConfig,
    resume: bool = True,
) -> TrainSummary:
    """Train a head on every labelled box of ``caches`` from the cached features alone.

    Every ``config.checkpoint_every`` steps the full training state is saved under
    ``<output stem>.run/state``; with ``resume`` a run continues from the newest one, step for
    step as if it had not stopped. A NaN or infinite loss stops the run, keeping that state.
    Under ``torchrun`` each process trains on its share of every batch (DDP).

    Arguments:
      caches (Path, str, a sequence of them, or None): feature caches from ``rs-cache extract``;
        None or empty: ``config.caches``. Each batch comes from one cache, drawn with
        ``config.dataset_weights``; its boxes are labelled in ``config.vocabularies`` (default:
        each cache's dataset).
      output (Path or str): the head checkpoint to write (safetensors, with a .json beside it).
      config (TrainConfig): schedule, loss, batch of ``batch_size`` images with up to
        ``max_boxes_per_image`` boxes each (the global batch under torchrun), device.
      resume (bool): continue from the newest saved training state instead of starting afresh.

    Returns:
      (TrainSummary): ``steps`` (int), ``final_loss`` (float, the focal loss of the last global
        batch per real box), ``seconds`` and ``samples_per_second`` (float, images per second,
        excluding the steps resumed from), ``checkpoint`` (Path: ``output``).
    """
    config.validate()  # the caller may have assigned fields since construction
    if caches is None or caches == []:
        caches = config.caches
    elif isinstance(caches, (str, Path)):
        caches = [caches]
    processes, device = join_process_group(config.device)
    try:
        sources = open_sources(caches, config.vocabularies, config.views, config.allow_partial)
        return _train(sources, Path(output), config, resume, processes, device)
    finally:
        leave_process_group(processes)


def _train(
    sources: list[TrainSource], output: Path, config: TrainConfig, resume: bool, processes: Processes, device: torch.device
) -> TrainSummary:
    torch.manual_seed(config.seed)
    head = initial_head(sources[0].reader, config).to(device).train()
    if processes.rank:
        torch.manual_seed(config.seed + 7919 * processes.rank)  # dropout masks of its own
    texts = [torch.from_numpy(source.vocabulary.embeddings).to(device) for source in sources]
    logit_scale, logit_bias = sources[0].reader.provenance.clip.logit_scale, sources[0].reader.provenance.clip.logit_bias
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    state_dir = run_dir_for(output) / "state"
    identity = resume_identity(config, sources)
    if not resume and processes.is_main:
        shutil.rmtree(state_dir, ignore_errors=True)  # a fresh run: the old states would not fit it
    barrier(processes)
    latest = latest_train_state(state_dir) if resume else None
    start = load_train_state(latest, head, optimizer, scheduler, identity, processes.rank) if latest else 0
    if start and processes.is_main:
        logger.info("resumed from step %d of %d (%s)", start, config.iterations, latest)
    model = DistributedDataParallel(head) if processes.distributed else head
    feed = training_loader(sources, config, start, processes, device.type == "cuda")
    metrics = MetricsLog(run_dir_for(output), start, config.tensorboard) if processes.is_main else None
    started, loss_value, samples = time.perf_counter(), math.nan, 0
    try:
        with progress_bar(
            "train head",
            config.iterations,
            "loss {task.fields[loss]} {task.fields[rate]}",
            disable=not processes.is_main,
            completed=start,
        ) as (bar, task):
            for step, batch in zip(range(start, config.iterations), feed.batches):
                if feed.shard_cache is not None:
                    feed.shard_cache.delivered(step)  # its reads are done: the shards it alone needed may go
                lr = optimizer.param_groups[0]["lr"]
                loss_value = train_step(
                    model, optimizer, batch.to(device), texts[batch.source], logit_scale, config, processes, logit_bias
                )
                if not math.isfinite(loss_value):
                    kept = latest_train_state(state_dir)
                    raise FloatingPointError(
                        f"loss became {loss_value} at step {step}; stopped. Last good state: {kept or 'none saved yet'}"
                    )
                scheduler.step()
                samples += config.batch_size
                rate = samples / (time.perf_counter() - started)
                if metrics is not None:
                    metrics.write(step, loss_value, lr, rate, sources[batch.source].vocabulary.name)
                bar.update(task, advance=1, loss=f"{loss_value:.4f}", rate=f"{rate:.1f} img/s")
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.iterations:
                    rng_states = gather_objects(rng_state(), processes)
                    if metrics is not None:
                        metrics.flush()
                        save_train_state(state_dir, step + 1, head, optimizer, scheduler, identity, rng_states)
    finally:
        if metrics is not None:
            metrics.close()
        feed.close()
    seconds = time.perf_counter() - started
    rate = samples / max(seconds, 1e-9)
    recorded = recorded_last_step(run_dir_for(output)) if start >= config.iterations else None
    if recorded is not None:  # nothing trained now: report the finished run's last loss and rate
        loss_value, rate = recorded
    partial = [found for source in sources for found in source.partial]
    if processes.is_main:
        # A head trained on part of a cache says so where it is kept (eval's metrics file does too).
        recorded = {"partial_caches": [found.to_dict() for found in partial]} if partial else {}
        save_head(
            head,
            output,
            {
                "train": asdict(config),
                "vocabularies": [s.vocabulary.name for s in sources],
                "caches": [str(s.cache) for s in sources],
                "encoders": trained_with(sources[0]).to_dict(),
                **recorded,
            },
        )
    barrier(processes)
    local = feed.shard_cache.stats if feed.shard_cache is not None else None
    if local is not None:
        logger.info(
            "local shard cache: %d shards fetched (%.3g GB), peak %.3g GB on disk",
            local.fetches,
            local.fetched_bytes / 1e9,
            local.peak_disk_bytes / 1e9,
        )
    return TrainSummary(config.iterations, loss_value, seconds, rate, output, start, local, partial)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RegionBatch,
    text: torch.Tensor,
    logit_scale: float,
    config: TrainConfig,
    processes: Processes = Processes(),
    logit_bias: float | None = None,
) -> float:
    """One optimiser step; returns the loss of the global batch. A non-finite loss leaves the
    weights untouched.

    The loss is normalised by the real boxes of the whole global batch, times the number of
    processes because DDP averages their gradients: N processes step exactly as one would.
    """
    embeddings = model(batch.tokens, batch.feature_maps, batch.box_mask)
    logits = region_logits(embeddings, text, logit_scale, logit_bias)  # SigLIP's bias shifts the focal loss's sigmoid
    boxes = global_sum(batch.box_mask.sum(), processes).clamp(min=1)
    loss_sum = focal_loss_sum(logits, batch.labels, batch.box_mask, config.focal_alpha, config.focal_gamma)
    global_loss = float((global_sum(loss_sum.detach(), processes) / boxes).item())
    if not math.isfinite(global_loss):
        return global_loss
    optimizer.zero_grad(set_to_none=True)
    (loss_sum / boxes * processes.world_size).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return global_loss
