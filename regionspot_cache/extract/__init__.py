"""Phase 1: frozen SAM and CLIP once per image, into the feature cache."""

from regionspot_cache.extract.distribute import Dask, Distributor, InProcess
from regionspot_cache.extract.runner import CacheTarget, ExtractSummary, extract_dataset, run_extraction
from regionspot_cache.extract.worker import ExtractionError

__all__ = [
    "CacheTarget",
    "Dask",
    "Distributor",
    "ExtractSummary",
    "ExtractionError",
    "InProcess",
    "extract_dataset",
    "run_extraction",
]
