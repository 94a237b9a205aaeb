"""Regions of any image against any vocabulary, in memory: ``Predictor``, whose answers are ``Region``s."""

from regionspot_cache.predict.predictor import Predictor, Region

__all__ = ["Predictor", "Region"]
