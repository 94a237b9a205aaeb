"""What the demo and the commands print about a finished phase (the commands sit above the demo,
so they import it from here)."""

from __future__ import annotations

from regionspot_cache.extract.runner import ExtractSummary
from regionspot_cache.progress import say


def print_extract_summary(summary: ExtractSummary) -> None:
    """One line of counts, sizes and time, then one line per shard that failed."""
    say(
        f"extracted {summary.images} images ({summary.failed} failed, {summary.without_boxes} without boxes), "
        f"{summary.boxes} boxes "
        f"({summary.dropped_boxes} degenerate boxes rejected); shards written {summary.shards_written}, "
        f"skipped {summary.shards_skipped}; {summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s"
    )
    if summary.batches:
        say(f"loader wait: {summary.loader_wait_seconds:.1f} s over {summary.batches} batches "
            f"({summary.loader_wait_per_batch * 1e3:.0f} ms per batch; much more than none means the encoders "
            "wait for images: see extract.num_workers and extract.decode)")
    for shard_id, error in summary.failed_shards.items():
        say((f"shard {shard_id} failed", "red"), f": {error}")
