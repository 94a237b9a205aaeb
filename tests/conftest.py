"""Shared fixtures: tiny SAM and CLIP written to checkpoint files and loaded back."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import FrozenEncoders, load_frozen_encoders


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def encoders(tiny_models) -> FrozenEncoders:
    return load_frozen_encoders(tiny_models, torch.device("cpu"))


@pytest.fixture(scope="session")
def rgb_image() -> np.ndarray:
    """A non-square image with structure (gradient plus a block), so resizing matters."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(90, 140, 3), dtype=np.uint8)
    image[20:60, 30:90] = [200, 30, 30]
    return image


@pytest.fixture(scope="session")
def lvis_annotation():
    """Builds an LVIS annotation whose segmentation is its box as a polygon."""

    def make(id_: int, image_id: int, category_id: int, bbox: list[float]) -> dict:
        x, y, w, h = bbox
        return {
            "id": id_,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": w * h,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            "iscrowd": 0,
        }

    return make


@pytest.fixture(scope="session", autouse=True)
def private_crc32c_ledger(tmp_path_factory):
    """The tests' crc32c flags (cache/ledger.py) in a directory of their own, not the user's
    /dev/shm one; set in the environment so the processes the tests start use it too."""
    from regionspot_cache.cache.ledger import LEDGER_ENV

    before = os.environ.get(LEDGER_ENV)
    directory = tmp_path_factory.mktemp("crc32c_ledger")
    directory.chmod(0o700)
    os.environ[LEDGER_ENV] = str(directory)
    yield directory
    if before is None:
        os.environ.pop(LEDGER_ENV, None)
    else:
        os.environ[LEDGER_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def fork_server(private_crc32c_ledger):
    """The server ``helpers.python`` and local dask clusters fork their processes from, started
    before any test runs: what its imports read from the environment is then the session's, never
    a test's monkeypatched value, whichever test needs the server first."""
    from multiprocessing import forkserver

    from tests.helpers import fork_server as context

    context()
    forkserver.ensure_running()


@pytest.fixture
def too_long_tmpdir(tmp_path, monkeypatch):
    """A TMPDIR too long a path for a Unix socket under it (Python < 3.13), multiprocessing's
    temporary directory made afresh under it (it is made once per process)."""
    import multiprocessing
    import tempfile

    long_dir = tmp_path / ("t" * 90)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    monkeypatch.setitem(multiprocessing.current_process()._config, "tempdir", None)
    return long_dir
