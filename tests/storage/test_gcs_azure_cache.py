"""Caches on Google Cloud Storage (``gs://``, gcsfs) and Azure Blob Storage (``az://``, adlfs),
each against a real emulator started as its own process (``emulators.py``): the round trip, a
half-written shard, a missing bucket or container; for Azure also denied credentials and the
extraction lease's conditional write."""

from __future__ import annotations

import base64
import os
import sys

import pytest

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.lease import extraction_lease
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.cli import app
from regionspot_cache.errors import CacheBusyError, CacheStorageError
from tests.helpers import run_to_end
from tests.storage.emulators import azurite_connection_string
from tests.storage.roundtrip import extract_args, extract_train_eval, make_toy, objects, runner

MISSING = "rs-missing-store"  # a bucket / container that is never created


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_models):
    return make_toy(tmp_path_factory.mktemp("emulated_toy"), tiny_models)


# conftest's ``store``, narrowed to the emulators (S3 has test modules of its own)
emulated = pytest.mark.parametrize("store", ["gs", "az"], indirect=True)


@emulated
def test_extract_train_eval_then_a_half_written_shard_is_never_read_and_is_rewritten(store, toy):
    """The round trip, then on the same cache (one extraction less than two tests): what a
    writer killed mid-upload leaves, a shard's objects, one cut short, and no commit record."""
    cache = store.url("val")
    extract_train_eval(toy, cache, store.filesystem())
    fs, key = store.filesystem(), cache.partition("://")[2]
    whole = objects(fs, cache)
    fs.rm_file(f"{key}/shards/000001/checksums.json")
    fs.pipe_file(f"{key}/shards/000001/boxes.parquet", b"half-written")
    assert CacheLocation.parse(cache).committed_shards("shards") == [0]
    assert len(CacheReader(cache)) == 2  # only the committed shard's images

    result = runner.invoke(app, extract_args(toy, cache))  # same process, same torch threads: same bytes
    assert result.exit_code == 0, result.output
    assert objects(store.filesystem(), cache) == whole


@emulated
def test_a_missing_bucket_is_one_error_line_and_creates_nothing(store, toy):
    result = runner.invoke(app, extract_args(toy, f"{store.scheme}://{MISSING}/c"))
    assert isinstance(result.exception, CacheStorageError), result.output
    message = str(result.exception)
    assert "\n" not in message and MISSING in message and "does not exist" in message, message
    assert not store.filesystem().exists(MISSING)


@emulated
def test_the_command_line_shows_one_error_line(store, tmp_path):
    command = [sys.executable, "-m", "regionspot_cache", "inspect", f"{store.scheme}://{MISSING}/c"]
    result = run_to_end(command, tmp_path / "inspect.log", env={**os.environ, **store.env()})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error:") and f"{MISSING!r} does not exist" in lines[0], result.stderr


def test_a_wrong_azure_account_key_is_denied_and_writes_nothing(azure_server, toy, monkeypatch):
    prefix = azure_server.new_prefix()
    wrong = base64.b64encode(b"not the account key" * 3).decode()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_connection_string(azure_server.endpoint, key=wrong))
    result = runner.invoke(app, extract_args(toy, f"az://{prefix}/c"))
    assert isinstance(result.exception, CacheStorageError) and "denied" in str(result.exception), result.output
    assert "AZURE_STORAGE_CONNECTION_STRING" in str(result.exception)
    assert azure_server.filesystem().find(prefix) == []


def test_the_azure_lease_is_a_conditional_write(azure_server, monkeypatch):
    """A second extraction of the same cache is refused while the first holds the lease: Azure
    (and Azurite) honour ``If-None-Match: *``. The GCS emulator ignores ``ifGenerationMatch=0``,
    which GCS honours, so this is checked on Azure only."""
    for name, value in azure_server.env().items():
        monkeypatch.setenv(name, value)
    location = CacheLocation.parse(azure_server.url("c"))
    with extraction_lease(location):
        with pytest.raises(CacheBusyError, match="another rs-cache extract"):
            with extraction_lease(location):
                pass
    assert not location.exists(".extract.lock")
