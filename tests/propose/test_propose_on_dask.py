"""``propose`` on a local dask cluster writes the same proposal file as in this process."""

from __future__ import annotations

import json

import pytest

from regionspot_cache.data.proposals import check_provenance, provenance_path
from regionspot_cache.propose.distribute import Dask
from regionspot_cache.propose.runner import run_proposals
from regionspot_cache.propose.select import Selection

pytest.importorskip("distributed")

SELECTION = Selection(top_k=10, chunk_size=4)


def test_dask_run_writes_the_in_process_bytes_and_provenance(toy_dataset, tiny_owlv2, tmp_path):
    here, there = tmp_path / "here.json", tmp_path / "dask.json"
    run_proposals(toy_dataset, here, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu")
    summary = run_proposals(
        toy_dataset, there, str(tiny_owlv2), SELECTION, shard_size=2, device="cpu", distributor=Dask(workers=1, retries=0)
    )
    assert summary.shards_written == 3 and not summary.failed_shards and summary.images == 5
    assert there.read_bytes() == here.read_bytes()
    recorded, expected = check_provenance(there, toy_dataset.categories), check_provenance(here, toy_dataset.categories)
    assert recorded.proposals_sha256 == expected.proposals_sha256 and recorded.identity() == expected.identity()
    # The whole record beside the file (it does not name the output) is the same.
    assert json.loads(provenance_path(there).read_text()) == json.loads(provenance_path(here).read_text())
