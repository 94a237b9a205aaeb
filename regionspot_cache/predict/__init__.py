"""Regions of any image against any vocabulary, in memory: ``Predictor``, whose answers are ``Region``s."""

from regionspot_cache.predict.predictor import Predictor
from regionspot_cache.predict.region import ClassScore, Region

__all__ = ["ClassScore", "Predictor", "Region"]
