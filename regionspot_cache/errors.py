"""Every error the library raises for something its user can fix, under one root.

``rs-cache`` shows a ``RegionSpotCacheError`` as one ``error:`` line (exit code 2) and any other
exception with its traceback: a plain ``ValueError``, ``KeyError`` or ``assert`` is a bug. The
types that name bad values are also ``ValueError``s and ``MissingFileError`` is a
``FileNotFoundError``, so callers that caught the built-in types before keep working.

A leaf module: it imports nothing, so every layer can raise these.
"""

from __future__ import annotations


class RegionSpotCacheError(Exception):
    """Something the user can fix (an input, a file, a recipe, a cache); shown without a traceback."""


class UserError(RegionSpotCacheError):
    """Command-line options that do not go together, or lack one another."""


class MissingFileError(RegionSpotCacheError, FileNotFoundError):
    """A file the user named (or a cache recorded) is not there."""


class InputError(RegionSpotCacheError, ValueError):
    """A value the user gave (a box, a vocabulary, a query, a method) that cannot be used."""


class ConfigError(InputError):
    """A recipe or override that does not fit the config dataclasses."""


class DatasetError(InputError):
    """An annotation file, manifest or proposals file that cannot be used; the message names the file."""


class ImageDecodeError(InputError):
    """A file that cannot be decoded as an image (or is not there); the message names the file."""


class CacheFormatError(InputError):
    """A cache that is missing, damaged, or does not match what the caller asked for."""


class CacheBusyError(CacheFormatError):
    """Another extraction holds the cache."""


class ExtractionError(InputError):
    """Bad input met with ``strict`` on; shards committed before it stay committed."""


class ModelLoadError(InputError):
    """Weights or a model choice that cannot be loaded, or that do not fit the model, head or run."""


class UnsafeCheckpointError(ModelLoadError):
    """A checkpoint that cannot be loaded without running arbitrary code."""


class ReleasedCheckpointError(ModelLoadError):
    """A released checkpoint whose keys or shapes do not make a RegionSpot head."""


class NoTokenGridError(ModelLoadError):
    """A vision tower whose output is not a sequence of patch tokens (ConvNeXt, ResNet)."""


class NonFiniteValueError(RegionSpotCacheError, ValueError):
    """A value to be written as JSON that JSON cannot hold (NaN, +-Infinity)."""


class CacheStorageError(CacheFormatError):
    """Object storage that holds (or should hold) a cache refused a request or could not be reached:
    a wrong endpoint, a missing bucket, credentials without the right to read or write it."""
