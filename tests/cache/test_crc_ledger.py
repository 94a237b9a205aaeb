"""crc32c checks shared between processes (cache/ledger.py): shared only while a file is
unchanged, never vouching for a damaged chunk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_read_path import _images, _write

from regionspot_cache.cache import CacheFormatError, CacheReader
from regionspot_cache.cache.ledger import LEDGER_ENV, SETTLED_S, checked_flags, ledger_directory


def _settled(root: Path) -> None:
    """Wait (on the clock, not a deadline) until every file under ``root`` is older than SETTLED_S."""
    newest = max(os.stat(p).st_ctime_ns for p in root.rglob("*"))
    while time.time_ns() - newest < SETTLED_S * 1e9 + 1e7:
        time.sleep(0.05)


def _maps(reader: CacheReader, shard: int):
    return reader._arrays(shard).clip_maps.mapped


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _maps_file(root: Path, shard: int) -> Path:
    return root / f"shards/{shard:06d}/features.zarr/clip_maps/c/0/0/0"


@pytest.fixture
def settled_cache(tmp_path):
    images = _images(8)
    _write(tmp_path, images, planned_shards=2)
    _settled(tmp_path)
    return tmp_path, images


def test_a_check_made_in_one_reader_is_seen_by_another_of_the_same_file_version(settled_cache):
    root, _ = settled_cache
    first, second = CacheReader(root), CacheReader(root)
    first.feature_maps([10])
    assert _maps(second, 0).checked.tolist() == [0, 1, 0, 0]  # the flags live in the ledger, not the reader


def test_a_file_changed_after_its_check_is_checked_again_and_its_damage_found(settled_cache):
    root, images = settled_cache
    CacheReader(root).feature_maps([0, 10, 20, 30])  # every chunk of shard 0 flagged
    path = _maps_file(root, 0)
    _flip_byte(path, 200)  # in the third chunk's data (5 x 8 float16 maps: 80 bytes and a crc32c each)
    reader = CacheReader(root)
    assert not _maps(reader, 0).checked.any()  # a new version: nothing vouched for
    with pytest.raises(CacheFormatError, match="crc32c"):
        reader.feature_maps([0, 10, 20, 30])


def test_files_written_moments_ago_keep_their_flags_private(tmp_path):
    """A change within the file system's timestamp resolution could keep a file's times."""
    _write(tmp_path, _images(4), planned_shards=1)
    first, second = CacheReader(tmp_path), CacheReader(tmp_path)
    first.feature_maps([10])
    assert _maps(first, 0).checked.tolist() == [0, 1, 0, 0]
    assert not _maps(second, 0).checked.any()


def test_a_ledger_directory_others_can_write_is_not_used(tmp_path, monkeypatch):
    shared = tmp_path / "ledger"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(LEDGER_ENV, str(shared))
    assert ledger_directory() is None
    monkeypatch.setenv(LEDGER_ENV, "off")
    assert ledger_directory() is None
    monkeypatch.delenv(LEDGER_ENV)
    default = ledger_directory()
    assert default is not None and default.name == f"regionspot-cache-checked-{os.getuid()}"
    assert os.stat(default).st_mode & 0o077 == 0


def test_flags_of_a_file_of_another_chunk_count_are_not_trusted(settled_cache):
    root, _ = settled_cache
    path = _maps_file(root, 0)
    flags = checked_flags(path, os.stat(path), 4)
    flags[:] = 1
    assert checked_flags(path, os.stat(path), 4).all()
    assert not checked_flags(path, os.stat(path), 5).any()  # a stale or foreign flag file: checks stay private


def test_a_check_made_in_another_process_is_not_made_again(settled_cache):
    root, _ = settled_cache
    reading = f"from regionspot_cache.cache import CacheReader; CacheReader({str(root)!r}).feature_maps([50, 70])"
    subprocess.run([sys.executable, "-c", reading], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert _maps(CacheReader(root), 1).checked.tolist() == [0, 1, 0, 1]
