"""What the demo and the commands print about a finished phase (the commands sit above the demo,
so they import it from here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionspot_cache.progress import say

if TYPE_CHECKING:  # the runner imports torch; the commands that print a summary have loaded it already
    from regionspot_cache.extract.runner import ExtractSummary
    from regionspot_cache.train.loop import TrainSummary


def print_extract_summary(summary: ExtractSummary) -> None:
    """One line of counts, sizes and time, then one line per shard that failed."""
    say(
        f"extracted {summary.images} images ({summary.failed} failed, {summary.without_boxes} without boxes), "
        f"{summary.boxes} boxes "
        f"({summary.dropped_boxes} degenerate boxes rejected); shards written {summary.shards_written}, "
        f"skipped {summary.shards_skipped}; {summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    if summary.batches:
        say(
            f"loader wait: {summary.loader_wait_seconds:.1f} s over {summary.batches} batches "
            f"({summary.loader_wait_per_batch * 1e3:.0f} ms per batch; much more than none means the encoders "
            "wait for images: see extract.num_workers and extract.decode)"
        )
    for shard_id, error in summary.failed_shards.items():
        say((f"shard {shard_id} failed", "red"), f": {error}")


def print_train_summary(summary: TrainSummary) -> None:
    """One line: the steps trained now (and where a resumed run began), or that the saved state
    had them all, with the loss and rate recorded when they were trained."""
    for found in summary.partial:
        say(
            (f"PARTIAL cache: trained on {found.fraction:.0%} of {found.cache}'s shards", "yellow"),
            f" ({len(found.missing)} of {found.planned} missing; recorded in {summary.checkpoint.with_suffix('.json')})",
        )
    if summary.already_trained:
        say(
            f"already trained: {summary.steps} steps in the saved state; wrote {summary.checkpoint} "
            f"(recorded final loss {summary.final_loss:.4f}, {summary.samples_per_second:.1f} images/s)"
        )
        return
    resumed = f", resumed from step {summary.resumed_from}" if summary.resumed_from else ""
    say(
        f"wrote {summary.checkpoint} after {summary.steps} steps{resumed} in {summary.seconds:.1f} s "
        f"({summary.samples_per_second:.1f} images/s); final loss {summary.final_loss:.4f}"
    )
