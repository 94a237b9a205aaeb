"""Object storage that refuses: a wrong endpoint, a missing bucket, denied credentials. Each is one
``error:`` line (a ``CacheStorageError``) and nothing is half-committed.

Denied credentials: the session's server has one identity (``-s3.config``); other keys are refused."""

from __future__ import annotations

import os
import socket
import sys

import pytest
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.errors import CacheStorageError
from tests.helpers import extract_args, run_to_end

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("s3_errors")
    annotations = generate_split(root, "val", SyntheticSpec(images=2, seed=3, min_size=64, max_size=80))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, tiny_models


def _extract(dataset, cache: str):
    root, manifest, models = dataset
    return runner.invoke(app, extract_args(manifest, root, cache, models))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _refused(result, *words: str) -> str:
    assert isinstance(result.exception, CacheStorageError), result.output
    message = str(result.exception)
    assert "\n" not in message and all(word in message for word in words), message
    return message


def _setenv(monkeypatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_a_wrong_endpoint(s3_server, dataset, monkeypatch):
    _setenv(monkeypatch, s3_server.env(endpoint=f"http://127.0.0.1:{_closed_port()}"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries, not needed to see the refusal
    _refused(_extract(dataset, f"s3://{s3_server.new_prefix()}/c"), "AWS_ENDPOINT_URL")


def test_a_missing_bucket(s3_env, dataset):
    _refused(_extract(dataset, "s3://no-such-bucket-rs/c"), "no-such-bucket-rs", "does not exist")
    assert not s3_env.filesystem().exists("no-such-bucket-rs")


def test_no_cache_under_a_prefix_of_a_bucket_named_bucket_is_not_a_missing_bucket(s3_env):
    """A missing object's message from s3fs is its path: a bucket called "bucket" (as in the
    README) made a missing prefix read as a missing bucket."""
    s3_env.filesystem().mkdir("bucket")
    result = runner.invoke(app, ["verify", "s3://bucket/no-cache-here"])
    assert result.exit_code != 0 and "does not exist" not in str(result.exception), result.output
    assert "s3://bucket/no-cache-here" in str(result.exception), result.output


def test_denied_credentials_write_nothing(s3_server, dataset, monkeypatch):
    prefix = s3_server.new_prefix()
    _setenv(monkeypatch, s3_server.env(secret_key="not-the-secret"))
    _refused(_extract(dataset, f"s3://{prefix}/c"), "denied")
    assert s3_server.filesystem().find(prefix) == []
    _setenv(monkeypatch, s3_server.env(access_key="nobody", secret_key="nothing"))
    with pytest.raises(CacheStorageError, match="denied"):
        CacheReader(f"s3://{prefix}/c")


def test_the_command_line_shows_one_error_line(s3_server, tmp_path):
    env = {**os.environ, **s3_server.env(endpoint=f"http://127.0.0.1:{_closed_port()}"), "AWS_MAX_ATTEMPTS": "1"}
    command = [sys.executable, "-m", "regionspot_cache", "inspect", f"s3://{s3_server.bucket}/c"]
    result = run_to_end(command, tmp_path / "inspect.log", env=env)  # no deadline; a stuck run fails
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "AWS_ENDPOINT_URL" in result.stderr, result.stderr
