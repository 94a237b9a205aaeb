"""Regions of any image against any vocabulary, in memory: ``Predictor``."""

from regionspot_cache.predict.predictor import Predictor

__all__ = ["Predictor"]
