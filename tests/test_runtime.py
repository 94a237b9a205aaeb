"""Runtime helpers: atomic writes, cleanup after killed writers, record differences."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from regionspot_cache.runtime.files import atomic_path, atomic_write_bytes, remove_abandoned_temps
from regionspot_cache.runtime.records import differences


def test_atomic_path_replaces_a_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "table.parquet"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_atomic_path_commits_a_directory(tmp_path):
    with atomic_path(tmp_path / "step-00000010") as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000010"]
    assert (tmp_path / "step-00000010" / "state.json").read_text() == "{}"


def test_only_temps_of_dead_writers_of_matching_finals_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    names = {
        f".tmp-000001-{dead}-abcd1234": False,  # a dead writer of shard 1: removed
        f".tmp-000001-{os.getpid()}-abcd1234": True,  # a live writer's: kept
        f".tmp-000002-{dead}-abcd1234": True,  # another shard's: not asked about
        "000001": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
    remove_abandoned_temps(tmp_path, "000001")
    assert {name: (tmp_path / name).exists() for name in names} == names


@dataclass
class _Spec:
    width: int
    name: str


def test_differences_name_the_differing_keys_of_nested_records():
    old = {"sam": {"variant": "vit_b", "input_size": 1024}, "lr": 0.1}
    new = {"sam": {"variant": "vit_h", "input_size": 1024}, "lr": 0.1, "seed": 3}
    assert differences(old, new) == ["sam.variant", "seed"]
    assert differences(old, new, "{key}: {old!r} -> {new!r}") == ["sam.variant: 'vit_b' -> 'vit_h'", "seed: None -> 3"]
    assert differences(_Spec(8, "a"), _Spec(16, "a"), "{key} is {old}, here {new}") == ["width is 8, here 16"]
    assert differences(_Spec(8, "a"), _Spec(8, "a")) == []
