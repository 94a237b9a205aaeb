"""A cache as a searchable index of regions: the head embeds every cached box once, then text
or example regions find the closest ones (``index.py`` builds and reads the embeddings file,
``query.py`` answers queries, ``sheet.py`` draws the hits)."""

from regionspot_cache.search.index import RegionIndex, head_sha256, open_region_index
from regionspot_cache.search.query import (
    Hit,
    labelled_hits,
    like_region,
    like_row,
    nearest_regions,
    parse_like,
    text_queries,
)

__all__ = [
    "Hit",
    "RegionIndex",
    "head_sha256",
    "labelled_hits",
    "like_region",
    "like_row",
    "nearest_regions",
    "open_region_index",
    "parse_like",
    "text_queries",
]
