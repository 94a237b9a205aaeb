"""``rs-cache search``: the cached regions closest to text queries or to an example region."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.cli.options import AllowPartialOption
from regionspot_cache.errors import UserError
from regionspot_cache.progress import say
from regionspot_cache.runtime.files import check_writable, write_json


def search(
    queries: List[str] = typer.Argument(None, help='Text queries, e.g. "red umbrella" "dog on a sofa".'),
    cache: Path = typer.Option(..., "--cache", "-c", help="Feature cache whose regions are searched (a path or s3://...)."),
    head: Path = typer.Option(..., "--head", help="Head checkpoint (.safetensors) that embeds the regions."),
    like: List[str] = typer.Option(
        [],
        "--like",
        help="Find regions like a cached one: IMAGE:BOX, BOX being its index among the image's cached "
        "boxes (42:0) or its x1,y1,x2,y2 (the cached box with IoU >= 0.5). Repeatable.",
    ),
    top: int = typer.Option(20, "--top", help="Regions to return per query."),
    out: Path = typer.Option(Path("search"), "--out", "-o", help="Directory for hits.json and contact_sheet.png."),
    image_root: Optional[Path] = typer.Option(
        None, help="Directory of the cache's images, for the contact sheet (none: JSON only)."
    ),
    clip_pretrained: Optional[str] = typer.Option(None, help="CLIP weights file, if not where the cache recorded it."),
    device: str = typer.Option("auto", help="Torch device: auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    index: Optional[Path] = typer.Option(
        None,
        "--index",
        help="Where to keep the region index (INDEX/<head sha256>/), a directory or URL; default: "
        "CACHE/regions/, beside the cache (on the object store for an s3:// cache).",
    ),
    allow_partial: bool = AllowPartialOption,
) -> None:
    """Embed every cached region with the head once (kept in CACHE/regions/<head sha256>/, or under
    --index), then print and write the best regions for each query: image id, box and cosine similarity."""
    import numpy as np

    from regionspot_cache.cache import CacheReader
    from regionspot_cache.cache.completeness import check_complete
    from regionspot_cache.head.model import load_head
    from regionspot_cache.search import labelled_hits, like_row, nearest_regions, open_region_index, parse_like, text_queries
    from regionspot_cache.search.query import cache_clip
    from regionspot_cache.search.sheet import contact_sheet

    queries = [q for q in (queries or []) if q.strip()]
    if not queries and not like:
        raise UserError("search needs text queries or --like IMAGE:BOX")
    if top < 1:
        raise UserError(f"--top {top}: must be at least 1")
    check_writable(out, "--out", directory=True)
    examples = [parse_like(text) for text in like]  # bad syntax fails before anything loads
    reader = CacheReader(cache)
    check_complete(reader, allow_partial)
    regions = open_region_index(reader, load_head(head)[0], device, index_root=index)
    example_rows: dict[str, int] = {}  # an unknown example region fails before CLIP loads
    for text, (image_id, box) in zip(like, examples):
        example_rows[f"like {text}"] = like_row(regions, image_id, box)
    # Text queries first, then the --like examples, each in the order given (the JSON keeps it).
    named: dict[str, np.ndarray] = {}
    if queries:
        named.update(zip(queries, text_queries(cache_clip(reader, clip_pretrained, device), queries)))
    named.update((name, regions.embeddings[row]) for name, row in example_rows.items())
    # An example region is its own nearest neighbour: it is left out of its hits.
    found = nearest_regions(regions, np.stack(list(named.values())), top, [example_rows.get(name) for name in named])
    hits = {name: labelled_hits(found_hits, reader) for name, found_hits in zip(named, found)}
    payload = {query: [hit.to_dict() for hit in found] for query, found in hits.items()}
    write_json(out / "hits.json", payload, indent=1)  # creates ``out``
    print(json.dumps(payload))
    written = [out / "hits.json"]
    if image_root is not None:
        file_names = {hit.image_id: hit.file_name for found in hits.values() for hit in found}
        written.append(contact_sheet(hits, file_names, image_root, out / "contact_sheet.png"))
    say(f"{len(regions)} regions searched; wrote {', '.join(map(str, written))}")
