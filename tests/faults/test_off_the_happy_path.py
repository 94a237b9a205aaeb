"""The mechanisms behind the refusals of test_commands_x_bad_values.py, each on small inputs: exact
ids, devices, counts, checkpoints that are not checkpoints, options that contradict the recipe,
file modes, which images an annotation file covers, and a cache's completeness and content digest."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from regionspot_cache.cache.completeness import Completeness
from regionspot_cache.cli import file_error_message
from regionspot_cache.cli.options import option_over_recipe
from regionspot_cache.data.datasets import DatasetError, exact_int, load_coco_format
from regionspot_cache.errors import ConfigError, InputError, ModelLoadError, UnsafeCheckpointError, UserError
from regionspot_cache.evaluate.ground_truth import check_same_images
from regionspot_cache.extract.distribute import Dask
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.runtime.files import atomic_path, check_writable
from regionspot_cache.runtime.weights import load_torch_weights
from regionspot_cache.view_specs import MAX_CROPS, parse_views


@pytest.mark.parametrize("value", [1.7, "3", True, None, [1], 2**63, -1, float("nan"), float("inf")])
def test_ids_are_never_coerced(value):
    with pytest.raises(ValueError):
        exact_int(value, "category_id")


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), (0, 0), (2**63 - 1, 2**63 - 1)])
def test_ids_that_lose_nothing_are_kept(value, expected):
    assert exact_int(value, "id") == expected and isinstance(exact_int(value, "id"), int)


@pytest.mark.parametrize("field, value", [("category_id", 1.7), ("image_id", 2**63), ("category_id", "1")])
def test_annotation_files_with_inexact_ids_are_refused_naming_the_entry(tmp_path, field, value):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], field: value}],
        "categories": [{"id": 1, "name": "a"}],
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"annotations\[0\]: malformed entry: .*{field}"):
        load_coco_format(path, tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [("gpu0", "not a torch device"), ("cuda:x", "not a torch device"), ("meta", "not supported"), ("cuda:99", "cuda:99")],
)
def test_devices_are_checked_before_any_model_loads(name, message):
    if name == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    with pytest.raises(InputError, match=message):
        resolve_device(name)


def test_cuda_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        return
    with pytest.raises(InputError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("workers, retries", [(-1, 2), (0, 2), (2, -1)])
def test_counts_that_would_hang_are_refused(workers, retries):
    with pytest.raises(InputError, match="--workers|--retries"):
        Dask(None, workers, retries)


def test_view_counts_are_bounded_before_the_views_are_listed():
    with pytest.raises(ConfigError, match=f"at most {MAX_CROPS}"):
        parse_views(["crop:0.5-1x99999999999999999999"])
    assert len(parse_views([f"crop:0.5-1x{MAX_CROPS}"])) == MAX_CROPS


def test_a_text_file_is_not_called_a_checkpoint_that_could_run_code(tmp_path):
    for text in ("x = 1\n", "hello world\n", "{}"):
        path = tmp_path / "weights.pth"
        path.write_text(text)
        with pytest.raises(ModelLoadError) as info:
            load_torch_weights(path)
        assert not isinstance(info.value, UnsafeCheckpointError) and "could run code" not in str(info.value)


def test_a_pickle_that_would_run_code_is_still_called_so(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"a": _RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        load_torch_weights(path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize(
    "overrides, recipe_value, outcome",
    [
        ([], "standard", "fixed"),  # the option alone
        (["eval.protocol=fixed"], "fixed", "fixed"),  # both, agreeing
        (["eval.protocol=tap"], "tap", None),  # both, contradicting
        (["eval.protocol=standard"], "standard", None),  # contradicting, even with the default value
        ([], "tap", None),  # a recipe's value
    ],
)
def test_an_option_never_silently_overrides_the_recipe(overrides, recipe_value, outcome):
    if outcome is None:
        with pytest.raises(UserError, match="--fixed-ap sets eval.protocol=fixed"):
            option_over_recipe("--fixed-ap", True, "eval.protocol", recipe_value, "standard", overrides, meaning="fixed")
    else:
        assert (
            option_over_recipe("--fixed-ap", True, "eval.protocol", recipe_value, "standard", overrides, meaning="fixed")
            == outcome
        )
    assert option_over_recipe("--fixed-ap", False, "eval.protocol", recipe_value, "standard", overrides) == recipe_value


def test_files_written_aside_get_the_usual_mode(tmp_path):
    from safetensors.numpy import save_file

    with atomic_path(tmp_path / "head.safetensors") as tmp:
        save_file({"w": np.zeros(2, np.float32)}, str(tmp))  # safetensors writes 0600
    mode = stat.S_IMODE(os.stat(tmp_path / "head.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_outputs_are_checked_writable_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        check_writable(tmp_path / "dir", "--out")
    with pytest.raises(InputError, match="is a file"):
        check_writable(tmp_path / "file", "--out", directory=True)
    with pytest.raises(InputError, match="not a directory"):
        check_writable(tmp_path / "file" / "new" / "x.png", "--out")
    check_writable(tmp_path / "new" / "deeper" / "x.png", "--out")  # created later


def test_an_os_error_names_the_file_the_user_asked_for():
    err = OSError(28, "No space left on device", "/data/.tmp-head.safetensors-1", None, "/data/head.safetensors")
    assert file_error_message(err) == "/data/head.safetensors: No space left on device"
    assert file_error_message(IsADirectoryError(21, "Is a directory", "/data/out")) == "/data/out: Is a directory"


IMAGES = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}]


def _ground_truth():
    return {
        "images": [dict(i) for i in IMAGES],
        "categories": [],
        "annotations": [{"id": k, "image_id": k, "category_id": 1} for k in (1, 2, 3)],
    }


def test_an_annotation_file_of_other_images_is_refused(tmp_path):
    cached = {1: "a.jpg", 2: "other/b.jpg", 3: "c.jpg"}
    with pytest.raises(DatasetError, match="image 2 is 'b.jpg' in the file, 'other/b.jpg' in the cache"):
        check_same_images(tmp_path / "gt.json", _ground_truth(), cached, partial=False)
    with pytest.raises(DatasetError, match="lacks 1 of the cache's 4 images"):
        check_same_images(tmp_path / "gt.json", _ground_truth(), {1: "a.jpg", 2: "b.jpg", 3: "c.jpg", 9: "z.jpg"}, False)


def test_images_missing_from_a_cache_are_refused_or_left_out_when_partial(tmp_path):
    cached = {1: "a.jpg", 3: "c.jpg"}
    with pytest.raises(DatasetError, match="1 of its 3 images are not in the cache"):
        check_same_images(tmp_path / "gt.json", _ground_truth(), cached, partial=False)
    kept = check_same_images(tmp_path / "gt.json", _ground_truth(), cached, partial=True)
    assert [i["id"] for i in kept["images"]] == [1, 3] and [a["image_id"] for a in kept["annotations"]] == [1, 3]


def test_completeness_fraction_and_record(tmp_path):
    found = Completeness(tmp_path, 4, (1,))
    assert not found.complete and found.fraction == 0.75
    assert found.to_dict()["shards_missing"] == [1] and Completeness(tmp_path, 0, ()).fraction == 1.0


def test_inspect_sizes_are_those_of_the_stored_dtype():
    from regionspot_cache.cache.verify import stored_row_bytes
    from regionspot_cache.choices import FeatureDtype

    assert stored_row_bytes(256, FeatureDtype.FLOAT16) == 512 and stored_row_bytes(256, FeatureDtype.INT8) == 256 + 4


def test_max_softmax_over_one_name_says_it_never_rejects(caplog):
    from regionspot_cache.config import OpenSetConfig, OpenSetRule
    from regionspot_cache.regions.open_set import warn_if_never_rejects

    assert warn_if_never_rejects(OpenSetConfig(rule=OpenSetRule.MAX_SOFTMAX), 1) and "never rejects" in caplog.text
    assert not warn_if_never_rejects(OpenSetConfig(rule=OpenSetRule.MAX_SOFTMAX), 2)
    assert not warn_if_never_rejects(OpenSetConfig(rule=OpenSetRule.MAX_SIGMOID), 1)


@pytest.mark.parametrize("box", [[10, 10, 10.2, 10.3], [49.9, 39.9, 50, 40], [60, 60, 70, 70], [-20, -20, -10, -10]])
def test_contact_sheet_crops_of_sub_pixel_or_outside_boxes(box):
    from PIL import Image

    from regionspot_cache.search.sheet import THUMB, crop_of

    assert max(crop_of(Image.new("RGB", (50, 40)), box).size) == THUMB
