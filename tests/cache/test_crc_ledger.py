"""crc32c checks shared between processes (cache/ledger.py) and run ahead of training's reads
(cache/checks_ahead.py, train/checks_ahead.py): shared only while a file is unchanged, never
vouching for a damaged chunk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import wait_until
from test_read_path import _images, _write

from regionspot_cache.cache import CacheFormatError, CacheReader, Vocabulary
from regionspot_cache.cache.checks_ahead import ChecksAhead, check_directory
from regionspot_cache.cache.ledger import LEDGER_ENV, SETTLED_S, checked_flags, ledger_directory
from regionspot_cache.train.checks_ahead import CheckedAheadSampler
from regionspot_cache.train.data import BatchPlan, CachedRegions, MultiSourceRegions, RankBatchSampler


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
    flags = checked_flags(path, 4)
    flags[:] = 1
    assert checked_flags(path, 4).all()
    assert not checked_flags(path, 5).any()  # a stale or foreign flag file: checks stay private


def test_the_checker_flags_passing_chunks_and_leaves_a_damaged_one_to_the_read(settled_cache):
    root, images = settled_cache
    path = _maps_file(root, 1)
    chunk_bytes = 5 * 8 * 2 + 4  # a 5 x 8 float16 map and its crc32c
    _flip_byte(path, 2 * chunk_bytes + 3)  # shard 1's third map (image 60)
    _settled(root)
    assert check_directory(root / "shards/000000/features.zarr") == 4 + 1  # 4 maps, 1 box-token chunk
    assert check_directory(root / "shards/000001/features.zarr") == 3 + 1
    reader = CacheReader(root)
    assert _maps(reader, 1).checked.tolist() == [1, 1, 0, 1]
    np.testing.assert_array_equal(reader.feature_maps([70])[0], images[7].feature_map.astype(np.float16))
    with pytest.raises(CacheFormatError, match="clip_maps.*crc32c"):
        reader.feature_maps([60])


def test_the_checker_process_checks_what_it_is_asked_and_ends_with_its_parent(settled_cache):
    root, _ = settled_cache
    checks = ChecksAhead()
    checks.request(root / "shards/000001/features.zarr")
    process = checks.process
    flags = _maps(CacheReader(root), 1).checked
    wait_until(lambda: flags.all(), "the checker's flags", must_live=[process])
    assert not _maps(CacheReader(root), 0).checked.any()  # only what was asked
    checks.close()
    assert process.poll() is not None


class RecordingChecks(ChecksAhead):
    """The real checker, also noting what it was asked."""

    made: list["RecordingChecks"] = []

    def __init__(self):
        super().__init__()
        self.asked: list[Path] = []
        RecordingChecks.made.append(self)

    def request(self, directory: Path) -> None:
        self.asked.append(directory)
        super().request(directory)


def test_the_sampler_hands_on_the_same_batches_and_the_shards_they_read(settled_cache):
    root, _ = settled_cache
    reader = CacheReader(root)
    vocabulary = Vocabulary("toy", np.arange(1, 4), ["a", "b", "c"], [None] * 3, np.eye(3, dtype=np.float32))
    regions = MultiSourceRegions([CachedRegions(reader, vocabulary, 100, 0)])
    plan = BatchPlan(regions.sizes(), [1.0], 2, seed=3)
    plain = iter(RankBatchSampler(plan, 5))
    ahead = iter(CheckedAheadSampler(RankBatchSampler(plan, 5), regions, lead=3, checks=RecordingChecks))
    batches = [next(ahead) for _ in range(12)]
    assert batches == [next(plain) for _ in range(12)]
    checker = RecordingChecks.made[-1]
    read = batches + [next(plain) for _ in range(3)]  # the lead: requested before they are handed on
    shards = sorted({int(regions.sources[0].shards()[index]) for batch in read for _, _, index in batch})
    assert sorted(checker.asked) == [reader.features_dir(shard) for shard in shards]
    flags = [_maps(CacheReader(root), shard).checked for shard in shards]
    wait_until(lambda: all(f.all() for f in flags), "the shards read checked ahead", must_live=[checker.process])
    process = checker.process
    ahead.close()  # the iteration's end stops its checker
    assert process.poll() is not None


def test_the_checker_runs_only_where_it_has_a_core_of_its_own(monkeypatch):
    import regionspot_cache.train.checks_ahead as ahead

    monkeypatch.setattr(ahead, "usable_cpus", lambda: 2)
    assert ahead.checks_ahead_have_a_core(0) and not ahead.checks_ahead_have_a_core(1)
    monkeypatch.setattr(ahead, "usable_cpus", lambda: 16)
    assert ahead.checks_ahead_have_a_core(14) and not ahead.checks_ahead_have_a_core(15)
    assert not ahead.checks_ahead_have_a_core(64)  # more workers asked than cores: capped, still no core
