"""A shard's GETs through obstore, configured from the settings s3fs reads (the environment, a
profile alone), against the real S3 server; a failure other than a missing object leaves the
fetch to s3fs, so its errors are the storage layer's one-line errors."""

from __future__ import annotations

import pytest

from regionspot_cache.cache import s3_get
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.errors import CacheStorageError
from tests.storage.test_s3_profiles import _profile_only

pytest.importorskip("obstore")

PAYLOAD = bytes(range(256)) * 300  # 76,800 bytes: parts of 16 MB would be one GET; the test cuts its own


def _shard(s3_server) -> CacheLocation:
    location = CacheLocation.parse(f"s3://{s3_server.new_prefix()}/c")
    fs = s3_server.filesystem()
    fs.pipe_file(location.path("shards/000003/features.bin"), PAYLOAD)
    fs.pipe_file(location.path("shards/000003/empty.bin"), b"")
    fs.pipe_file(location.path("shards/000003/checksums.json"), b"{}")
    return location


def _parts(location: CacheLocation, name: str, cuts: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    key = location.path(f"shards/000003/{name}").partition("/")[2]
    return [(key, start, end) for start, end in cuts]


def _check_gets(location: CacheLocation) -> None:
    assert s3_get.s3_store(location.bucket) is not None
    got = s3_get.get_parts(location.bucket, _parts(location, "features.bin", [(0, 1000), (1000, len(PAYLOAD))]))
    assert [bytes(g) for g in got] == [PAYLOAD[:1000], PAYLOAD[1000:]]
    empty, gone = s3_get.get_parts(location.bucket, _parts(location, "empty.bin", [(0, 0)]) + _parts(location, "gone", [(0, 5)]))
    assert bytes(empty) == b"" and isinstance(gone, FileNotFoundError)


def test_gets_from_the_environment_fetch_a_shard(s3_env, tmp_path):
    location = _shard(s3_env)
    _check_gets(location)
    fetched = location.fetch_shard(3, tmp_path, location.shard_objects()[3])
    assert (fetched / "features.bin").read_bytes() == PAYLOAD and (fetched / "empty.bin").read_bytes() == b""


def test_gets_from_a_profile_alone(s3_server, tmp_path, monkeypatch):
    location = _shard(s3_server)
    (tmp_path / "aws").mkdir()
    _profile_only(monkeypatch, tmp_path / "aws", s3_server.endpoint)
    _check_gets(location)


def test_the_s3fs_switch_and_a_refusal_fall_back_to_s3fs(s3_env, tmp_path, monkeypatch):
    location = _shard(s3_env)
    objects = location.shard_objects()[3]
    monkeypatch.setenv("RS_CACHE_S3_CLIENT", "s3fs")
    assert s3_get.get_parts(location.bucket, _parts(location, "features.bin", [(0, 10)])) is None
    monkeypatch.delenv("RS_CACHE_S3_CLIENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert s3_get.get_parts(location.bucket, _parts(location, "features.bin", [(0, 10)])) is None
    with pytest.raises(CacheStorageError, match="access denied") as refused:
        location.fetch_shard(3, tmp_path, objects)
    assert "\n" not in str(refused.value) and not (tmp_path / "000003").exists()
