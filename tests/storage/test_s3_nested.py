"""What lives beside or inside a cache on a real S3 server (SeaweedFS on loopback): the region
index of `rs-cache search`, proposals and view caches, and `repair`'s replacement of a shard."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cache.storage import CacheLocation
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.errors import CacheStorageError
from regionspot_cache.extract import repair as repair_module
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head
from regionspot_cache.search import index as index_module
from tests import helpers

runner = CliRunner()


@pytest.fixture(scope="module")
def on_s3(tmp_path_factory, tiny_models, s3_server):
    """Four images extracted once to S3 (two shards) with an hflip view, and a random head; each
    test works on its own server-side copy of the cache (``copy_of``)."""
    root = tmp_path_factory.mktemp("s3_nested")
    annotations = generate_split(root, "val", SyntheticSpec(images=4, seed=5, min_size=64, max_size=96))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    cache = f"s3://{s3_server.new_prefix()}/val"
    views = 'extract.views=["hflip"]'
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        result = runner.invoke(app, helpers.extract_args(manifest, root, cache, tiny_models, "extract.shard_size=2", views))
        assert result.exit_code == 0, result.output
        clip = CacheReader(cache).provenance.clip
    torch.manual_seed(0)
    head = root / "head.safetensors"
    save_head(RegionSpotHead(HeadConfig(clip_width=clip.width, text_dim=clip.text_dim, num_layers=1, ffn_dim=64)), head)
    return root, manifest, annotations, cache, head


def copy_of(server, cache: str) -> str:
    """A copy of ``cache`` under a new prefix, made on the server."""
    fs, copy = server.filesystem(), f"{server.new_prefix()}/val"
    fs.copy(cache.removeprefix("s3://"), copy, recursive=True)
    return f"s3://{copy}"


def objects(server, cache: str, under: str = "") -> dict[str, bytes]:
    fs, key = server.filesystem(), cache.removeprefix("s3://")
    return {path.removeprefix(key + "/"): fs.cat_file(path) for path in fs.find(f"{key}/{under}".rstrip("/"))}


def test_search_keeps_its_index_beside_the_cache_on_the_store(s3_env, on_s3, tmp_path, monkeypatch):
    root, _, _, original, head = on_s3
    cache = copy_of(s3_env, original)
    monkeypatch.chdir(tmp_path)  # nothing may land in a local directory named after the URL

    def search(*more: str):
        args = ["search", "-c", cache, "--head", str(head), "--like", "1:0", "--top", "3", "-o", str(tmp_path / "out")]
        result = runner.invoke(app, [*args, *more])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / "out" / "hits.json").read_text())

    hits = search()
    index = objects(s3_env, cache, "regions")
    assert sorted(name.rsplit("/", 1)[1] for name in index) == ["index.json", "regions.safetensors"]
    assert len(hits["like 1:0"]) == 3 and not (tmp_path / "s3:").exists()

    def no_build(*args, **kwargs):
        raise AssertionError("the index on the store should have been read, not rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "build_index", no_build)
        assert search() == hits
        # A local copy of the cache reads the same index: same cache digest, same files.
        local = tmp_path / "local"
        s3_env.filesystem().get(cache.removeprefix("s3://"), str(local), recursive=True)
        result = runner.invoke(app, ["search", "-c", str(local), "--head", str(head), "--like", "1:0", "--top", "3"])
        assert result.exit_code == 0, result.output

    # A damaged index on the store is rebuilt and uploaded again; --index keeps one elsewhere.
    damaged = next(name for name in index if name.endswith("regions.safetensors"))
    s3_env.filesystem().pipe_file(f"{cache.removeprefix('s3://')}/{damaged}", b"damaged")
    assert search() == hits and objects(s3_env, cache, "regions") == index
    assert search("--index", str(tmp_path / "elsewhere")) == hits
    assert len(list((tmp_path / "elsewhere").glob("*/regions.safetensors"))) == 1
    assert objects(s3_env, cache, "regions") == index


def test_proposals_and_view_caches_nested_in_a_cache_on_the_store(s3_env, on_s3, tmp_path, monkeypatch):
    root, manifest, annotations, original, head = on_s3
    cache = copy_of(s3_env, original)
    monkeypatch.chdir(tmp_path)
    key = cache.removeprefix("s3://")
    assert s3_env.filesystem().exists(f"{key}/views/hflip/cache.json")
    result = runner.invoke(app, ["inspect", cache, "--json"])
    assert result.exit_code == 0 and '"hflip"' in result.output, result.output

    train = ["train", "-c", cache, "-o", str(tmp_path / "h.safetensors")]
    sets = ['train.views=["identity", "hflip"]', "train.iterations=2", "train.batch_size=2", "train.device=cpu"]
    result = runner.invoke(app, [*train, *(arg for s in sets for arg in ("--set", s))])
    assert result.exit_code == 0, result.output

    glip = tmp_path / "glip.json"
    glip.write_text('{"1": {"boxes": [[0, 0, 25, 25], [5, 5, 40, 30]], "scores": [0.5, 0.9], "labels": [1, 1]}}')
    output = tmp_path / "glip_results.json"
    args = ["eval", "-c", cache, "--head", str(head), "-a", str(annotations), "--proposals", str(glip)]
    args += ["-m", str(manifest), "--data-root", str(root), "-o", str(output), "--set", "extract.num_workers=0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {tuple(d["bbox"]) for d in json.loads(output.read_text())} == {(0.0, 0.0, 25.0, 25.0), (5.0, 5.0, 35.0, 25.0)}
    found = s3_env.filesystem().glob(f"{key}/proposals/*/cache.json")
    assert len(found) == 1 and not (tmp_path / "s3:").exists()
    proposals = CacheReader(f"s3://{found[0].rsplit('/', 1)[0]}")
    assert proposals.provenance.kind.is_proposals and proposals.maps_borrowed_from is not None
    assert (proposals.feature_map(1) == CacheReader(cache).feature_map(1)).all()  # borrowed from the base on the store

    result = runner.invoke(app, ["verify", cache])
    assert result.exit_code == 0 and "1 proposals cache(s) and 1 view cache(s)" in result.output, result.output
    assert runner.invoke(app, ["eval", *args[1:]]).exit_code == 0  # the second time, read from the store as it is


def _damage_a_feature_byte(server, cache: str) -> None:
    fs, key = server.filesystem(), cache.removeprefix("s3://")
    chunk = sorted(p for p in fs.find(f"{key}/shards/000000/features.zarr/clip_maps") if "/c/" in p)[0]
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))


def test_repair_on_the_store_never_leaves_a_shard_worse_than_it_found_it(s3_env, on_s3, tmp_path, monkeypatch):
    root, manifest, _, original, _ = on_s3
    cache = copy_of(s3_env, original)
    data = shutil.copytree(root, tmp_path / "data", ignore=shutil.ignore_patterns("*.safetensors"))
    _damage_a_feature_byte(s3_env, cache)
    damaged = objects(s3_env, cache, "shards/000000")
    repair = ["repair", cache, "-m", str(data / "toy.toml"), "--data-root", str(data), "--set", "extract.num_workers=0"]

    def left_as_found() -> None:
        assert objects(s3_env, cache, "shards/000000") == damaged  # committed, bit for bit
        assert not [p for p in s3_env.filesystem().find(cache.removeprefix("s3://")) if "/.removed-" in p]
        assert CacheLocation.parse(cache).committed_shards("shards") == [0, 1]

    # The copy aside fails: refused before the shard is uncommitted.
    def no_copy(self, source, target):
        raise CacheStorageError("copy refused by the store")

    with monkeypatch.context() as patch:
        patch.setattr(CacheLocation, "copy_dir", no_copy)
        result = runner.invoke(app, repair)
    assert result.exit_code != 0 and "copy refused" in str(result.exception)
    left_as_found()

    # The extraction dies midway, having uploaded part of the shard: the damaged one comes back.
    def dies_midway(*args, **kwargs):
        s3_env.filesystem().pipe_file(f"{cache.removeprefix('s3://')}/shards/000000/images.parquet", b"half")
        raise RuntimeError("worker lost")

    with monkeypatch.context() as patch:
        patch.setattr(repair_module, "run_extraction", dies_midway)
        result = runner.invoke(app, repair)
    assert result.exit_code != 0 and "worker lost" in str(result.exception)
    left_as_found()

    # The images cannot be read: a replacement with fewer extracted images is refused.
    shutil.move(data / "images", data / "images-away")
    result = runner.invoke(app, repair)
    assert result.exit_code != 0 and "repair refused for shard(s) 000000" in str(result.exception), result.output
    left_as_found()

    shutil.move(data / "images-away", data / "images")
    result = runner.invoke(app, repair)
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", cache]).exit_code == 0
    assert objects(s3_env, cache, "shards/000000") == objects(s3_env, original, "shards/000000")


def test_errors_about_a_cache_on_the_store_name_it_by_its_url(s3_env, on_s3):
    """Not as a path (``s3:/bucket/...``: a URL through pathlib loses a slash)."""
    from regionspot_cache.cache.completeness import check_complete
    from regionspot_cache.errors import CacheFormatError

    copy = copy_of(s3_env, on_s3[3])
    CacheLocation.parse(copy).uncommit_shard(1)
    with pytest.raises(CacheFormatError, match=f"^{re.escape(copy)}: 1 of its 2 planned shards are not committed"):
        check_complete(CacheReader(copy), allow_partial=False)


def test_the_shards_of_a_temporary_shard_cache_are_not_read_ahead_those_of_a_local_cache_dir_are(s3_env, on_s3, tmp_path):
    """A temporary shard cache's shards were fetched moments before they are read: their pages
    are in memory, so nothing reads them ahead; a user's local_cache_dir may hold far more."""
    from regionspot_cache.choices import TrainOrder
    from regionspot_cache.config import TrainConfig
    from regionspot_cache.train.data import open_sources
    from regionspot_cache.train.distributed import Processes
    from regionspot_cache.train.loader import training_loader

    cache = on_s3[3]
    config = TrainConfig(iterations=4, batch_size=2, max_boxes_per_image=3, order=TrainOrder.SHARDS, resident_shards=1)
    for local_cache_dir, read_ahead in ((None, False), (str(tmp_path / "local"), True)):
        config.local_cache_dir = local_cache_dir
        feed = training_loader(open_sources([cache], [], []), config, 0, Processes(), pin_memory=False)
        try:
            assert len([batch for _, batch in zip(range(4), feed.batches)]) == 4
            assert feed.shard_cache.temporary == (local_cache_dir is None)
            assert (feed.read_ahead is not None) == read_ahead
        finally:
            feed.close()


@pytest.mark.parametrize("workers", [2, 0])
def test_training_from_the_store_fetches_each_shard_ahead_once_for_all_loader_workers(
    s3_env, on_s3, tmp_path, monkeypatch, workers
):
    """Shard order without train.local_cache_dir: the shards are fetched ahead by the training
    process, into a temporary directory which its loader workers read (none fetches on its own),
    or with no workers into its own memory (no file written); the run equals one on a local copy
    of the cache."""
    from regionspot_cache.cache.reader import FetchedShards
    from regionspot_cache.choices import TrainOrder
    from regionspot_cache.config import TrainConfig
    from regionspot_cache.train.loop import train_head

    _, _, _, cache, _ = on_s3
    local = tmp_path / "local"
    s3_env.filesystem().get(cache.removeprefix("s3://"), str(local), recursive=True)
    config = TrainConfig(iterations=6, batch_size=2, max_boxes_per_image=3, device="cpu", num_workers=workers, views=["identity"])
    config.order, config.resident_shards, config.checkpoint_every = TrainOrder.SHARDS, 1, 100
    reference = train_head(local, tmp_path / "direct" / "head.safetensors", config)

    def not_this_way(*args, **kwargs):
        raise AssertionError(f"fetched the wrong way for {workers} loader workers: {args[1:]}")

    monkeypatch.setattr(FetchedShards, "features", not_this_way)  # loader workers are forked: patched too
    monkeypatch.setattr(CacheLocation, "shard_in_memory" if workers else "fetch_dir", not_this_way)
    # Short: the loader workers' sockets go under it too (a path over 107 bytes cannot be one)
    temporary = Path(tempfile.mkdtemp(prefix="rs-t-"))
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    try:
        summary = train_head(cache, tmp_path / "remote" / "head.safetensors", config)
        left = list(temporary.glob("rs-cache-shards-*"))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    assert summary.final_loss == reference.final_loss
    stored = sum(CacheLocation.parse(cache).shard_bytes().values())
    assert (
        summary.local_cache.fetches == 2 and summary.local_cache.fetched_bytes == stored
    )  # the budget holds both shards: once each in 3 epochs
    assert not left  # removed when training ends


def test_two_processes_of_a_node_fetch_each_shard_from_the_store_once(s3_env, on_s3, tmp_path):
    """torchrun with two processes training from the store: the node's first process fetches each
    shard once into the node's one temporary directory, which the last process to finish removes."""
    _, _, _, cache, _ = on_s3
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    settings = ["iterations=4", "batch_size=2", "max_boxes_per_image=3", "device=cpu", "resident_shards=1"]
    settings += ["checkpoint_every=100", "tensorboard=false", 'views=["identity"]']
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "regionspot_cache", "train", "-c", cache, "-o", str(tmp_path / "out" / "head.safetensors")]
    command += [arg for setting in settings for arg in ("--set", f"train.{setting}")]
    env = dict(os.environ, **s3_env.env(), TMPDIR=str(temporary), OMP_NUM_THREADS="1", COLUMNS="400")
    done = helpers.run_to_end(command, tmp_path / "torchrun.log", env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    fetched = sorted(int(n) for n in re.findall(r"local shard cache: (\d+) shards fetched", done.stdout))
    assert fetched == [0, 2]  # the first process fetched the two shards for both; separately: [2, 2]
    assert not list(temporary.glob("rs-cache-shards-*"))
