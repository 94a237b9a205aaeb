"""A cache on a real S3 server (SeaweedFS on loopback): extract -> train -> eval from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from regionspot_cache.cache import CacheReader, CacheWriter
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.cli import app
from tests.storage.roundtrip import extract_args, extract_train_eval, make_toy, runner


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_models):
    return make_toy(tmp_path_factory.mktemp("s3_toy"), tiny_models)


def test_url_forms_parse_to_one_location(tmp_path):
    assert CacheLocation.parse("s3://bucket/a/b/").url == "s3://bucket/a/b"
    assert CacheLocation.parse(Path("s3://bucket/a")).url == "s3://bucket/a"  # through pathlib (typer options)
    assert CacheLocation.parse(f"file://{tmp_path}/c").local == tmp_path / "c"
    assert CacheLocation.parse(tmp_path).local == tmp_path and not CacheLocation.parse(tmp_path).remote
    assert CacheLocation.parse("s3://bucket/a/b").child("../../c").url == "s3://bucket/c"


def test_extract_train_eval_with_the_cache_on_s3(s3_env, toy):
    extract_train_eval(toy, f"s3://{s3_env.new_prefix()}/val", s3_env.filesystem())


def test_a_local_copy_of_the_same_extraction_reads_the_same(s3_env, toy, tmp_path):
    """The same extraction into a local directory and into S3: every file equal, byte for byte."""
    root, manifest, annotations, models = toy
    cache = f"s3://{s3_env.new_prefix()}/c"
    for target in (cache, str(tmp_path / "local")):
        result = runner.invoke(app, extract_args(toy, target, "extract.threads=1"))
        assert result.exit_code == 0, result.output
    fs, key = s3_env.filesystem(), cache.removeprefix("s3://")
    remote = {p.removeprefix(key + "/"): fs.cat_file(p) for p in fs.find(key)}
    local = {p.relative_to(tmp_path / "local").as_posix(): p.read_bytes() for p in (tmp_path / "local").rglob("*") if p.is_file()}
    for name in ("extraction_cost.json", ".extract.lock", "cache.json"):
        remote.pop(name, None), local.pop(name, None)
    assert sorted(remote) == sorted(local)
    assert all(remote[name] == local[name] for name in remote)
    fetched = CacheLocation.parse(cache).fetch_shard(1, tmp_path / "fetched")
    assert {p.name for p in fetched.rglob("*") if p.is_file()} == {
        p.name for p in (tmp_path / "local" / "shards" / "000001").rglob("*") if p.is_file()
    }
    assert isinstance(CacheWriter, type)


def test_inspect_verify_and_repair_a_cache_on_s3(s3_env, toy):
    root, manifest, annotations, models = toy
    cache = f"s3://{s3_env.new_prefix()}/c"
    result = runner.invoke(app, extract_args(toy, cache))
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", cache])
    assert result.exit_code == 0 and "shards_committed" in result.output, result.output
    assert runner.invoke(app, ["verify", cache]).exit_code == 0

    fs, key = s3_env.filesystem(), cache.removeprefix("s3://")
    fs.pipe_file(f"{key}/shards/000001/boxes.parquet", b"damaged")
    result = runner.invoke(app, ["verify", cache])
    assert result.exit_code == 1 and "boxes.parquet" in result.output, result.output

    result = runner.invoke(
        app, ["repair", cache, "-m", str(manifest), "--data-root", str(root), "--set", "extract.num_workers=0"]
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", cache]).exit_code == 0
    assert len(CacheReader(cache)) == 4
