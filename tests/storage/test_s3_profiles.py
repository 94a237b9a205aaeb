"""Credentials and endpoint from an AWS profile alone (``AWS_PROFILE`` naming a section of the
shared config and credentials files, no ``AWS_ACCESS_KEY_ID`` in the environment): the way many
users reach an S3-compatible server. Read back through the reader and ``rs-cache inspect``."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from tests.helpers import extract_args
from tests.storage.conftest import ACCESS_KEY, SECRET_KEY

runner = CliRunner()


def _profile_only(monkeypatch, tmp_path, endpoint: str, secret: str = SECRET_KEY) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "credentials").write_text(f"[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {secret}\n")
    (tmp_path / "config").write_text(f"[profile lab]\nregion = us-east-1\nendpoint_url = {endpoint}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "lab")


def test_a_profile_is_enough_to_write_and_read_a_cache(s3_server, tiny_models, tmp_path, monkeypatch):
    from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split

    annotations = generate_split(tmp_path, "val", SyntheticSpec(images=2, seed=5, min_size=64, max_size=80))
    manifest = tmp_path / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    (tmp_path / "aws").mkdir()
    _profile_only(monkeypatch, tmp_path / "aws", s3_server.endpoint)
    cache = f"s3://{s3_server.new_prefix()}/c"
    result = runner.invoke(app, extract_args(manifest, tmp_path, cache, tiny_models))
    assert result.exit_code == 0, result.output
    assert sorted(CacheReader(cache).image_ids()) == sorted(i["id"] for i in json.loads(annotations.read_text())["images"])
    inspected = runner.invoke(app, ["inspect", cache, "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["images"] == 2


def test_a_profile_with_a_wrong_secret_is_refused_in_one_line(s3_server, tmp_path, monkeypatch):
    from regionspot_cache.errors import CacheStorageError

    (tmp_path / "aws").mkdir()
    _profile_only(monkeypatch, tmp_path / "aws", s3_server.endpoint, secret="not-the-secret")
    result = runner.invoke(app, ["inspect", f"s3://{s3_server.bucket}/nothing-here"])
    assert isinstance(result.exception, CacheStorageError), result.output
    assert "access denied" in str(result.exception) and "AWS_PROFILE" in str(result.exception)
