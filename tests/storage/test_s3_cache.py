"""A cache on a real S3 server (SeaweedFS on loopback): extract -> train -> eval from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from regionspot_cache.cache import CacheReader, CacheWriter
from regionspot_cache.cache.storage import COMMIT_RECORD, SHARDS_DIR, CacheLocation, shard_name
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


def test_a_shard_fetched_from_the_listing_costs_its_gets_alone(s3_env, tmp_path, monkeypatch):
    """``shard_objects`` lists every shard's objects at once; ``fetch_shard`` given them makes no
    lookup and no listing, and falls back to the lookup when the listing lacks the commit record."""
    location = CacheLocation.parse(f"s3://{s3_env.new_prefix()}/c")
    staged = {}
    for shard in (0, 1):
        staged[shard] = tmp_path / f"staged-{shard}"
        (staged[shard] / "features.zarr").mkdir(parents=True)
        (staged[shard] / "features.zarr" / "a").write_bytes(os.urandom(100 + shard))
        (staged[shard] / COMMIT_RECORD).write_text("{}")
        location.publish_dir(staged[shard], f"{SHARDS_DIR}/{shard_name(shard)}")
    listed = location.shard_objects()
    assert listed == {shard: {"features.zarr/a": 100 + shard, COMMIT_RECORD: 2} for shard in (0, 1)}
    assert location.shard_bytes() == {0: 102, 1: 103}

    looked_up = []
    for name in ("find", "exists", "info", "ls", "glob"):
        original = getattr(location.fs, name)
        monkeypatch.setattr(location.fs, name, lambda *a, _o=original, _n=name, **k: looked_up.append(_n) or _o(*a, **k))

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    fetched = location.fetch_shard(1, tmp_path / "listed", listed[1])
    assert looked_up == [] and files(fetched) == files(staged[1])
    before_commit = {"features.zarr/a": 100}  # listed while the shard was being uploaded
    assert files(location.fetch_shard(0, tmp_path / "looked-up", before_commit)) == files(staged[0])
    assert "exists" in looked_up

    location.uncommit_shard(0)  # after the listing: its GETs fail, nothing lands
    with pytest.raises(FileNotFoundError):
        location.fetch_shard(0, tmp_path / "gone", listed[0])
    assert not (tmp_path / "gone").exists() or not any((tmp_path / "gone").iterdir())


def test_inspect_verify_and_repair_a_cache_on_s3(s3_env, toy):
    root, manifest, annotations, models = toy
    cache = f"s3://{s3_env.new_prefix()}/c"
    result = runner.invoke(app, extract_args(toy, cache))
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", cache])
    assert result.exit_code == 0 and "shards_committed" in result.output, result.output
    result = runner.invoke(app, ["verify", cache])
    said = "".join(result.output.split())  # rich may wrap the line
    assert result.exit_code == 0 and f"{cache}:everycommittedshardmatches" in said, result.output  # the URL as given
    assert json.loads(runner.invoke(app, ["verify", cache, "--json"]).output)["cache"] == cache

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
