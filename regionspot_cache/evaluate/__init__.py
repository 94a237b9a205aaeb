"""Phase 3: scored detections on cached boxes and their LVIS AP; ``evaluate`` is the entry point."""

from regionspot_cache.config import EvalMethod
from regionspot_cache.evaluate.api import evaluate, evaluate_head

__all__ = ["EvalMethod", "evaluate", "evaluate_head"]
