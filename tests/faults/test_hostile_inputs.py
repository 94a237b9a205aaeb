"""A corpus of hostile and broken inputs, plus hypothesis fuzzing of the JSON/TOML readers: each
case ends in a recorded per-image status or a clear error naming the file (and the entry) -
never a traceback, a hang or silently wrong output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from regionspot_cache.cache import CacheReader
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import DatasetError, load_coco_format, load_manifest
from regionspot_cache.data.images import ImageDecodeError, load_rgb
from regionspot_cache.data.proposals import load_proposals
from regionspot_cache.extract.runner import CacheTarget, run_extraction

RNG = np.random.default_rng(7)
PIXEL_LIMIT = 1_000_000


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _corpus() -> dict[str, tuple[bytes, tuple[int, int], str]]:
    """file name -> (bytes, (width, height) as annotated, expected status)."""
    rgb = Image.fromarray(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg, png = _encoded(rgb, "JPEG"), _encoded(rgb, "PNG")
    corpus = {
        "ok.jpg": (jpeg, (64, 48), "ok"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], (64, 48), "failed"),
        "truncated.png": (png[: len(png) // 2], (64, 48), "failed"),
        "zero.jpg": (b"", (64, 48), "failed"),
        "random.jpg": (RNG.bytes(4000), (64, 48), "failed"),
        "random.png": (b"\x89PNG\r\n\x1a\n" + RNG.bytes(4000), (64, 48), "failed"),
        "text.png": ("not an image at all".encode(), (64, 48), "failed"),
        "bomb.png": (_encoded(Image.new("1", (2000, 2000)), "PNG"), (2000, 2000), "failed"),
        "one_pixel.png": (_encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (1, 1), "ok"),
        "sixteen.png": (_encoded(Image.fromarray(RNG.integers(0, 65535, (48, 64), dtype=np.uint16)), "PNG"), (64, 48), "ok"),
        "palette.png": (_encoded(rgb.convert("P"), "PNG"), (64, 48), "ok"),
        "cmyk.jpg": (_encoded(rgb.convert("CMYK"), "JPEG"), (64, 48), "ok"),
        "wrong_size.jpg": (jpeg, (100, 100), "failed"),
        "is_a_directory.jpg": (b"", (64, 48), "failed"),
    }
    for orientation in range(1, 9):  # all EXIF orientations; 5-8 swap width and height
        exif = Image.Exif()
        exif[0x0112] = orientation
        size = (48, 64) if orientation >= 5 else (64, 48)
        corpus[f"exif{orientation}.jpg"] = (_encoded(rgb, "JPEG", exif=exif), size, "ok")
    return corpus


def test_hostile_image_corpus_is_recorded_image_by_image(tmp_path, tiny_models, encoders, capsys):
    corpus = _corpus()
    images = tmp_path / "images"
    images.mkdir()
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for image_id, (name, (content, (width, height), _)) in enumerate(corpus.items(), start=1):
        (images / name).mkdir() if name == "is_a_directory.jpg" else (images / name).write_bytes(content)
        data["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        data["annotations"].append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [0, 0, 1, 1]})
    (tmp_path / "ann.json").write_text(json.dumps(data))
    dataset = load_coco_format(tmp_path / "ann.json", images, name="hostile")
    config = ExtractConfig(shard_size=8, batch_size=4, num_workers=0, device="cpu", max_image_pixels=PIXEL_LIMIT)
    summary = run_extraction(dataset, CacheTarget(tmp_path / "cache"), encoders, config)
    reader = CacheReader(tmp_path / "cache")
    for entry in dataset.images:
        status, reason = reader.status(entry.id)
        assert status == corpus[entry.file_name][2], (entry.file_name, reason)
        if status == "failed":
            assert entry.file_name in reason and "Traceback" not in reason, reason
        else:
            assert np.isfinite(reader.image(entry.id).feature_map).all()
    assert "more than the limit of 1000000" in reader.status(8)[1]
    failed = sum(expected == "failed" for *_, expected in corpus.values())
    assert summary.failed == failed
    with capsys.disabled():
        print(f"\nhostile images: {len(corpus)} tried, {failed} recorded as failed with a reason, 0 crashes")


def _coco(**changes) -> dict:
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    data.update(changes)
    return data


BAD_ANNOTATIONS = {  # content -> the part of the message that names the problem
    "images-not-a-list": (_coco(images={"id": 1}), "images: expected a list"),
    "id-not-a-number": (_coco(images=[{"id": "one", "file_name": "a.jpg", "width": 1, "height": 1}]), "images[0]: malformed"),
    "missing-width": (
        _coco(images=[{"id": 1, "file_name": "a.jpg", "height": 1}]),
        "images[0]: malformed entry: KeyError('width')",
    ),
    "missing-bbox": (
        _coco(annotations=[{"id": 1, "image_id": 1, "category_id": 1}]),
        "annotations[0]: malformed entry: KeyError('bbox')",
    ),
    "bbox-three-numbers": (
        _coco(annotations=[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]),
        "annotations[0]: malformed",
    ),
    "bbox-a-string": (_coco(annotations=[{"image_id": 1, "category_id": 1, "bbox": "0 0 5 5"}]), "annotations[0]: malformed"),
    "huge-id": (_coco(images=[{"id": 1e400, "file_name": "a.jpg", "width": 1, "height": 1}]), "images[0]: malformed"),
    "duplicate-image-id": (
        _coco(images=[{"id": 1, "file_name": "a.jpg", "width": 1, "height": 1}] * 2),
        "images: duplicate id 1",
    ),
    "duplicate-category-id": (_coco(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "categories: duplicate id 1"),
    "unknown-image-id": (
        _coco(annotations=[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]),
        "annotations[0]: image_id 9 is not in images",
    ),
    "unknown-category-id": (
        _coco(annotations=[{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}]),
        "annotations[0]: category_id 7 is not in categories",
    ),
    "top-level-list": ([1, 2, 3], "expected a JSON object"),
}
BAD_BYTES = {
    "non-utf8": (b'{"images": [], "categories": [{"id": 1, "name": "\xff\xfe"}]}', "not valid JSON"),
    "empty": (b"", "not valid JSON: Expecting value: line 1 column 1"),
    "cut-short": (b'{"images": [{"id": 1,', "line 1 column 22"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS) + sorted(BAD_BYTES))
def test_bad_annotation_files_name_file_and_entry(tmp_path, case):
    path = tmp_path / f"{case}.json"
    if case in BAD_BYTES:
        content, message = BAD_BYTES[case]
        path.write_bytes(content)
    else:
        data, message = BAD_ANNOTATIONS[case]
        path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        load_coco_format(path, tmp_path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a huge box is rejected with a reason, not a NumPy warning
def test_nan_negative_and_huge_boxes_are_rejected_with_reasons(tmp_path, tiny_models, encoders):
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.jpg")
    boxes = {
        "nan": [float("nan"), 0, 5, 5],
        "negative": [10, 10, -5, 4],
        "huge": [0, 0, 1e39, 5],
        "far": [0, 0, 1e6, 5],
        "fine": [1, 1, 20, 20],
    }
    annotations = [{"image_id": 1, "category_id": 1, "bbox": bbox} for bbox in boxes.values()]
    # json.dumps writes NaN, as many real annotation writers do; the reader must cope with it.
    (tmp_path / "ann.json").write_text(
        json.dumps(_coco(annotations=annotations, images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]))
    )
    dataset = load_coco_format(tmp_path / "ann.json", tmp_path, name="boxes")
    config = ExtractConfig(num_workers=0, device="cpu")
    summary = run_extraction(dataset, CacheTarget(tmp_path / "cache"), encoders, config)
    reader = CacheReader(tmp_path / "cache")
    assert summary.dropped_boxes == 4 and len(reader.image(1).boxes) == 1
    reasons = reader.rejected_boxes.column("reason").to_pylist()
    assert reasons == [
        "coordinates not finite",
        "zero or negative size",
        "coordinates not finite",
        "coordinates far outside the image",
    ]


BAD_PROPOSALS = {
    "glip-scores-short": ('{"1": {"boxes": [[0, 0, 1, 1]], "scores": []}}', "image '1': 1 boxes but 0 scores"),
    "glip-box-of-two": ('{"1": {"boxes": [[0, 0]], "scores": [1]}}', "image '1'"),
    "glip-key-not-an-id": ('{"abc": {"boxes": [], "scores": []}}', "image 'abc'"),
    "coco-missing-bbox": ('[{"image_id": 1, "score": 1}]', "result #0"),
    "coco-score-a-list": ('[{"image_id": 1, "bbox": [0, 0, 1, 1], "score": [1]}]', "result #0"),
    "number": ("3", "expected a GLIP object"),
    "broken": ('{"1": {"boxes": [[0, 0, 1, 1]', "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROPOSALS))
def test_bad_proposal_files_name_file_and_entry(tmp_path, case):
    content, message = BAD_PROPOSALS[case]
    path = tmp_path / f"{case}.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as error:
        load_proposals(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
ENTRY_VALUES = st.one_of(
    st.integers(-5, 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.none(),
    st.lists(st.floats(allow_nan=True) | st.integers(), max_size=5),
)
NEAR_VALID = st.fixed_dictionaries(
    {
        "images": st.lists(
            st.dictionaries(st.sampled_from(["id", "file_name", "width", "height", "coco_url"]), ENTRY_VALUES), max_size=3
        ),
        "annotations": st.lists(
            st.dictionaries(st.sampled_from(["id", "image_id", "category_id", "bbox"]), ENTRY_VALUES), max_size=3
        ),
        "categories": st.lists(st.dictionaries(st.sampled_from(["id", "name", "frequency"]), ENTRY_VALUES), max_size=3),
    }
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_clear_errors(read, path: Path) -> None:
    try:
        read(path)
    except DatasetError as err:
        assert str(err).startswith(f"{path}"), err


@FUZZ
@given(data=JSON | NEAR_VALID)
def test_fuzzed_annotation_files_load_or_fail_clearly(tmp_path, data):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data))
    _only_clear_errors(lambda p: load_coco_format(p, tmp_path), path)


@FUZZ
@pytest.mark.filterwarnings("error::RuntimeWarning")
@given(data=JSON | st.dictionaries(st.text(max_size=3), st.fixed_dictionaries({"boxes": JSON, "scores": JSON}), max_size=3))
def test_fuzzed_proposal_files_load_or_fail_clearly(tmp_path, data):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data))
    _only_clear_errors(load_proposals, path)


@FUZZ
@given(content=st.binary(max_size=200))
def test_fuzzed_bytes_as_json_toml_or_image_fail_clearly(tmp_path, content):
    path = tmp_path / "fuzz.json"
    path.write_bytes(content)
    _only_clear_errors(lambda p: load_coco_format(p, tmp_path), path)
    _only_clear_errors(load_proposals, path)
    toml = tmp_path / "fuzz.toml"
    toml.write_bytes(content)
    _only_clear_errors(load_manifest, toml)
    image = tmp_path / "fuzz.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + content)
    try:
        load_rgb(image)
    except ImageDecodeError as err:
        assert str(err).startswith(str(image))
