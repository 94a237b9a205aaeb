"""Phase 3: scored detections on cached boxes and their LVIS AP; ``evaluate`` is the entry point."""

from regionspot_cache.evaluate.api import METHODS, evaluate, evaluate_head

__all__ = ["METHODS", "evaluate", "evaluate_head"]
