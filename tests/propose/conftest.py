"""Tiny random-weight detectors saved as transformers directories, and a small generated dataset."""

from __future__ import annotations

import pytest

from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_detectors import write_tiny_grounding_dino, write_tiny_owlv2, write_tiny_sam3

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_grounding_dino(tmp_path_factory):
    return write_tiny_grounding_dino(tmp_path_factory.mktemp("gdino"), seed=0)


@pytest.fixture(scope="session")
def tiny_owlv2(tmp_path_factory):
    return write_tiny_owlv2(tmp_path_factory.mktemp("owlv2"), seed=0)


@pytest.fixture(scope="session")
def tiny_sam3(tmp_path_factory):
    return write_tiny_sam3(tmp_path_factory.mktemp("sam3"), seed=0)


@pytest.fixture(scope="session")
def toy_split(tmp_path_factory):
    """Five LVIS-format images of 48-80 pixels, and the manifest naming them."""
    root = tmp_path_factory.mktemp("propose-data")
    annotations = generate_split(root, "val", SyntheticSpec(images=5, seed=3, min_size=48, max_size=80))
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, annotations


@pytest.fixture()
def toy_dataset(toy_split):
    root, _, annotations = toy_split
    return load_coco_format(annotations, root / "images", name="toy")
