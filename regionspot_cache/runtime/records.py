"""Comparing records (mappings or dataclasses) key by key, for messages that name what differs."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def differences(old: Any, new: Any, template: str = "{key}") -> list[str]:
    """The keys whose values differ between two records (mappings or dataclasses; nested ones
    give dotted keys, a key missing on one side counts as None), sorted, each formatted with
    ``template`` from ``key``, ``old`` and ``new``."""
    mine, theirs = _flat_record(old), _flat_record(new)
    return [
        template.format(key=key, old=mine.get(key), new=theirs.get(key))
        for key in sorted(set(mine) | set(theirs))
        if mine.get(key) != theirs.get(key)
    ]


def _flat_record(record: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            flat.update(_flat_record(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
