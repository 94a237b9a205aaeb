"""What every object store's tests share: a toy dataset, and extract -> train -> eval from the
command line with the cache at a URL (``s3://``, ``gs://``, ``az://``), checked through the
store's own client."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from tests import helpers

runner = CliRunner()


def make_toy(root, tiny_models, images: int = 4, seed: int = 5):
    """(root, manifest, annotations, models): ``images`` synthetic images under ``root``."""
    annotations = generate_split(root, "val", SyntheticSpec(images=images, seed=seed, min_size=64, max_size=96))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, annotations, tiny_models


def extract_args(toy, cache: str, *more: str) -> list[str]:
    root, manifest, _, models = toy
    return helpers.extract_args(manifest, root, cache, models, "extract.shard_size=2", *more)


def objects(fs, cache: str) -> dict[str, bytes]:
    """Every object of the cache at ``cache`` by its name under the cache, but the run's wall times."""
    key = cache.partition("://")[2]
    found = {path.removeprefix(key + "/"): fs.cat_file(path) for path in fs.find(key)}
    found.pop("extraction_cost.json", None)
    return found


def extract_train_eval(toy, cache: str, fs) -> None:
    """Extract the 4-image toy into ``cache`` (two shards), read it back, train 3 steps and
    evaluate from it, then extract again: a resume with nothing left to do."""
    root, _, annotations, _ = toy
    result = runner.invoke(app, extract_args(toy, cache))
    assert result.exit_code == 0, result.output
    assert "extracted 4 images" in result.output
    key = cache.partition("://")[2]
    assert fs.exists(f"{key}/cache.json") and not fs.exists(f"{key}/.extract.lock")
    assert sorted(p.rstrip("/").rsplit("/", 1)[1] for p in fs.ls(f"{key}/shards")) == ["000000", "000001"]

    reader = CacheReader(cache)
    assert len(reader) == 4 and reader.vocabulary_names() == ["toy"]
    image = reader.image(reader.image_ids()[0])
    assert image.tokens.shape[0] == image.boxes.shape[0] and image.feature_map.ndim == 2

    head = root / f"head-{key.replace('/', '-')}.safetensors"
    train = ["train", "-c", cache, "-o", str(head)]
    train += ["--set", "train.iterations=3", "--set", "train.batch_size=2", "--set", "train.device=cpu"]
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    output = root / "results" / f"{key.replace('/', '-')}.json"
    result = runner.invoke(app, ["eval", "-c", cache, "--head", str(head), "-a", str(annotations), "-o", str(output)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    assert set(metrics) >= {"AP", "APr", "APc", "APf"}

    again = runner.invoke(app, extract_args(toy, cache))  # resume: nothing left to do
    assert again.exit_code == 0, again.output
