"""The feature cache: one writer (``CacheWriter``) and one reader (``CacheReader``).

Layout of a cache directory::

    cache.json                      provenance and identity (models, checkpoints, sizes, format)
    vocabularies/<name>.parquet     category_id, name, frequency, text embedding
    shards/<NNNNNN>/                one committed shard (made visible by one rename)
        images.parquet              one row per image: id, file, size, status, token range
        boxes.parquet               one row per box: image id, x1 y1 x2 y2, category id, score
        rejected_boxes.parquet      degenerate boxes as given, with the reason
        checksums.json              SHA-256 of the shard's other files, for ``rs-cache verify``
        features.zarr/              zarr v3: clip_maps (images, tokens, width) and
                                    box_tokens (boxes, 256), float16, one zarr shard file each
    shards/.tmp-<NNNNNN>-<pid>/     a shard being written: never read
    .extract.lock                   held (flock) by the one extraction running into the cache
    proposals/<box source>/         proposals caches borrowing this cache's feature maps
    views/<view id>/                caches of augmented views of its images (extract/views.py)
    extraction_cost.json            wall seconds and images of the runs that wrote the cache
"""

from regionspot_cache.cache.format import FORMAT_VERSION, CacheFormatError, Provenance
from regionspot_cache.cache.reader import CachedImage, CacheReader, Vocabulary
from regionspot_cache.cache.verify import (
    RecordedFailures,
    ShardProblem,
    inspect_cache,
    proposals_caches,
    recorded_failures,
    verify_cache,
    verify_cache_tree,
    view_caches,
)
from regionspot_cache.cache.writer import CacheBusyError, CacheWriter, ImageFeatures, exclusive_extraction

__all__ = [
    "FORMAT_VERSION",
    "CacheBusyError",
    "CacheFormatError",
    "CacheReader",
    "CacheWriter",
    "CachedImage",
    "ImageFeatures",
    "ShardProblem",
    "Provenance",
    "Vocabulary",
    "RecordedFailures",
    "inspect_cache",
    "recorded_failures",
    "verify_cache",
    "verify_cache_tree",
    "proposals_caches",
    "view_caches",
    "exclusive_extraction",
]
