"""The cache format: one writer, one reader, atomic shards, identity."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from regionspot_cache.cache import (
    CacheFormatError,
    CacheReader,
    CacheWriter,
    ImageFeatures,
    Provenance,
    inspect_cache,
    verify_cache,
)
from regionspot_cache.data.datasets import BoxSet, Category
from regionspot_cache.identity import CacheKind, ClipIdentity, SamIdentity, ViewIdentity, WeightFiles

RNG = np.random.default_rng(0)


SAM = SamIdentity("tiny", "ab", 1024, 256, "sam preprocess", "mask token 0")
CLIP = ClipIdentity("RS-Tiny-ViT", None, "cd", [128, 128], 8, 5, 4, 14.3, "clip preprocess", "before ln_post")


def _provenance(**changes) -> Provenance:
    fields = dict(
        dataset="toy",
        box_source="gt",
        shard_size=3,
        planned_shards=2,
        sam=SAM,
        clip=CLIP,
        package_version="0",
        weights=WeightFiles("/x"),
    )
    fields.update(changes)
    return Provenance(**fields)


def _image(image_id: int, boxes: int) -> ImageFeatures:
    xyxy = np.sort(RNG.uniform(0, 50, size=(boxes, 4)).astype(np.float32).reshape(boxes, 2, 2), axis=1).reshape(boxes, 4)
    return ImageFeatures(
        image_id,
        f"{image_id}.jpg",
        64,
        48,
        BoxSet(xyxy, RNG.integers(1, 5, boxes), RNG.uniform(size=boxes).astype(np.float32)),
        feature_map=RNG.normal(size=(5, 8)).astype(np.float32),
        box_tokens=RNG.normal(size=(boxes, 256)).astype(np.float32),
    )


def test_round_trip_over_shards_with_failed_and_empty_images(tmp_path):
    images = [_image(1, 3), _image(2, 0), _image(5, 2), _image(7, 1)]
    failed = ImageFeatures(4, "4.jpg", 10, 10, status="failed", reason="4.jpg: cannot decode image")
    writer = CacheWriter(tmp_path, _provenance())
    writer.write_shard(0, [images[0], failed, images[1]])
    writer.write_shard(1, images[2:])
    reader = CacheReader(tmp_path)
    assert reader.image_ids() == [1, 2, 5, 7]
    assert reader.image_ids(only_ok=False) == [1, 4, 2, 5, 7]
    assert reader.status(4) == ("failed", "4.jpg: cannot decode image")
    with pytest.raises(CacheFormatError, match="cannot decode"):
        reader.image(4)
    for original in images:
        item = reader.image(original.image_id)
        np.testing.assert_array_equal(item.boxes, original.boxes.xyxy)
        np.testing.assert_array_equal(item.category_ids, original.boxes.category_ids)
        np.testing.assert_array_equal(item.scores, original.boxes.scores)
        # float16 storage: equal to the float16 rounding of what was written.
        np.testing.assert_array_equal(item.tokens, original.box_tokens.astype(np.float16))
        np.testing.assert_array_equal(item.feature_map, original.feature_map.astype(np.float16))
        assert item.tokens.shape == (len(original.boxes), 256)


def test_vocabulary_round_trip(tmp_path):
    writer = CacheWriter(tmp_path, _provenance())
    categories = [Category(3, "cat", "f"), Category(9, "dog", "r")]
    embeddings = RNG.normal(size=(2, 6)).astype(np.float32)
    writer.write_vocabulary("toy", categories, embeddings)
    vocab = CacheReader(tmp_path).vocabulary("toy")
    assert vocab.names == ["cat", "dog"] and vocab.frequencies == ["f", "r"]
    np.testing.assert_array_equal(vocab.category_ids, [3, 9])
    np.testing.assert_array_equal(vocab.embeddings, embeddings)
    with pytest.raises(CacheFormatError, match="no vocabulary 'other'"):
        CacheReader(tmp_path).vocabulary("other")


def test_identity_mismatch_is_refused_naming_the_key(tmp_path):
    CacheWriter(tmp_path, _provenance())
    CacheWriter(tmp_path, _provenance(package_version="9", weights=WeightFiles("/elsewhere")))  # not identity
    with pytest.raises(CacheFormatError, match=r"sam\.checkpoint_sha256: cache has 'ab', this run has 'cd'"):
        CacheWriter(tmp_path, _provenance(sam=dataclasses.replace(SAM, checkpoint_sha256="cd")))


def test_committed_shard_is_never_rewritten_and_no_temp_is_left(tmp_path):
    writer = CacheWriter(tmp_path, _provenance())
    writer.write_shard(0, [_image(1, 2)])
    with pytest.raises(CacheFormatError, match="already committed"):
        writer.write_shard(0, [_image(2, 2)])
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["000000"]
    assert CacheReader(tmp_path).image_ids() == [1]


def test_reader_ignores_a_shard_left_half_written(tmp_path):
    writer = CacheWriter(tmp_path, _provenance())
    writer.write_shard(0, [_image(1, 2)])
    (tmp_path / "shards" / ".tmp-000001-123-abcd").mkdir()
    (tmp_path / "shards" / ".tmp-000001-123-abcd" / "images.parquet").write_bytes(b"partial")
    reader = CacheReader(tmp_path)
    assert reader.image_ids() == [1] and writer.committed_shards() == {0}


def test_files_grow_with_shards_not_images(tmp_path):
    def files_of(directory, count):
        CacheWriter(directory, _provenance()).write_shard(0, [_image(i, 3) for i in range(count)])
        return sum(1 for p in (directory / "shards").rglob("*") if p.is_file())

    assert files_of(tmp_path / "small", 2) == files_of(tmp_path / "large", 60)


def test_not_a_cache_and_wrong_format_version(tmp_path):
    with pytest.raises(CacheFormatError, match="not a feature cache"):
        CacheReader(tmp_path)
    (tmp_path / "cache.json").write_text('{"format_version": 999}')
    with pytest.raises(CacheFormatError, match="format version 999"):
        CacheReader(tmp_path)


def test_verify_names_the_damaged_shard_and_file(tmp_path):
    writer = CacheWriter(tmp_path, _provenance())
    writer.write_shard(0, [_image(1, 2)])
    writer.write_shard(1, [_image(2, 1)])
    assert verify_cache(tmp_path) == []
    manifest = tmp_path / "shards" / "000001" / "boxes.parquet"
    data = bytearray(manifest.read_bytes())
    data[10] ^= 0x01
    manifest.write_bytes(bytes(data))
    (tmp_path / "shards" / "000000" / "images.parquet").unlink()
    problems = {(p.shard, p.problem) for p in verify_cache(tmp_path)}
    assert problems == {("000001", "boxes.parquet: checksum differs (damaged)"), ("000000", "images.parquet: missing")}


def test_inspect_counts_and_missing_shards(tmp_path):
    writer = CacheWriter(tmp_path, _provenance())
    writer.write_shard(1, [_image(4, 2), ImageFeatures(5, "5.jpg", 1, 1, status="failed", reason="x")])
    summary = inspect_cache(tmp_path)
    assert (summary["images"], summary["images_failed"], summary["boxes"], summary["boxes_rejected"]) == (2, 1, 2, 0)
    assert summary["shards_committed"] == 1 and summary["shards_missing"] == [0]
    assert summary["bytes_on_disk"] > 0 and summary["bytes_on_disk_per_image"] == round(summary["bytes_on_disk"] / 2)
    assert summary["bytes_per_image_map"] == 2 * 5 * 8 and summary["bytes_per_box_token"] == 2 * 256  # float16
    assert summary["feature_dtype"] == "float16"


def test_inspect_reports_the_sizes_of_an_int8_cache(tmp_path):
    writer = CacheWriter(tmp_path, _provenance(feature_dtype="int8"))
    writer.write_shard(0, [_image(4, 2)])
    summary = inspect_cache(tmp_path)
    # One byte per value plus one float32 scale per row: per token of a map, and per box token.
    assert summary["feature_dtype"] == "int8"
    assert summary["bytes_per_image_map"] == 5 * (8 + 4) and summary["bytes_per_box_token"] == 256 + 4


def test_writer_removes_what_a_killed_writer_left_aside(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writer = CacheWriter(tmp_path, _provenance())
    abandoned = tmp_path / "shards" / f".tmp-000001-{int(dead.stdout)}-abcd1234"
    alive = tmp_path / "shards" / f".tmp-000001-{os.getpid()}-abcd1234"  # a live writer's: kept
    for directory in (abandoned, alive):
        directory.mkdir()
        (directory / "images.parquet").write_bytes(b"half")
    writer.write_shard(1, [_image(3, 1)])
    assert not abandoned.exists() and alive.exists()
    assert CacheReader(tmp_path).image_ids() == [3]


def test_arrays_that_do_not_match_the_manifest_are_refused_naming_them(tmp_path):
    import json

    writer = CacheWriter(tmp_path, _provenance())
    writer.write_shard(0, [_image(1, 2), _image(2, 1)])
    provenance = json.loads((tmp_path / "cache.json").read_text())
    provenance["clip"]["num_tokens"] = 6  # the arrays hold 5 tokens per image
    (tmp_path / "cache.json").write_text(json.dumps(provenance))
    with pytest.raises(
        CacheFormatError,
        match=r"000000/features.zarr/clip_maps: float16 array of shape \(2, 5, 8\), "
        r"but the shard's manifest and cache.json call for float16 \(2, 6, 8\)",
    ):
        CacheReader(tmp_path).image(1)


# cache.json exactly as regionspot-cache 0.1.0 wrote it (tiny models): caches made before the
# identities became dataclasses must read, and be written back byte for byte.
CACHE_JSON_0_1_0 = """{
  "box_source": "gt",
  "clip": {
    "feature_map": "visual.transformer output before ln_post, class token first",
    "image_size": [
      128,
      128
    ],
    "logit_scale": 14.285714149475098,
    "model": "RS-Tiny-ViT",
    "num_tokens": 257,
    "preprocess": "resize (no crop) bicubic, mean/std",
    "pretrained": null,
    "text_dim": 64,
    "weights_sha256": "ad29f99b58c0d0650c84b01a96a0615959c92d73e179a46280e7c3a972736d1b",
    "width": 64
  },
  "dataset": "toy",
  "feature_maps": "own",
  "format_version": 1,
  "package_version": "0.1.0",
  "paths": {
    "clip_pretrained": "/tmp/tmp4pwx2nm2/clip_tiny.pt",
    "sam_checkpoint": "/tmp/tmp4pwx2nm2/sam_tiny.pth"
  },
  "planned_shards": 1,
  "sam": {
    "checkpoint_sha256": "ed1539bfd401e1b11df7aa598d836d4379f603e3fa5ca9e9d014a831b1012b23",
    "input_size": 1024,
    "preprocess": "ResizeLongestSide+pixel_mean_std+pad (SamPredictor.set_image)",
    "token": "mask_decoder.transformer output, mask token 0",
    "token_dim": 256,
    "variant": "tiny"
  },
  "shard_size": 4
}"""


def test_a_cache_json_of_the_released_format_reads_into_typed_identities_and_writes_back_the_same(tmp_path):
    (tmp_path / "cache.json").write_text(CACHE_JSON_0_1_0)
    provenance = Provenance.read(tmp_path)
    assert provenance.sam == SamIdentity(
        "tiny",
        "ed1539bfd401e1b11df7aa598d836d4379f603e3fa5ca9e9d014a831b1012b23",
        1024,
        256,
        "ResizeLongestSide+pixel_mean_std+pad (SamPredictor.set_image)",
        "mask_decoder.transformer output, mask token 0",
    )
    clip = provenance.clip
    assert (clip.model, clip.pretrained, clip.image_size) == ("RS-Tiny-ViT", None, [128, 128])
    assert (clip.width, clip.num_tokens, clip.text_dim, clip.logit_scale) == (64, 257, 64, 14.285714149475098)
    # The same JSON, with what version 0.1.0 left implicit now written out: the storage dtype (float16)
    # and CLIP's logit bias (none).
    released = json.loads(CACHE_JSON_0_1_0)
    assert clip.logit_bias is None
    assert json.loads(provenance.to_json()) == {
        **released,
        "feature_dtype": "float16",
        "clip": {**released["clip"], "logit_bias": None},
    }
    assert provenance.differences(Provenance.read(tmp_path)) == []


@pytest.mark.parametrize(
    "part, change, message",
    [
        ("sam", {"colour": "red"}, r"cache.json: sam: unknown key\(s\) \['colour'\]"),
        ("clip", {"width": "wide"}, r"cache.json: clip.width: 'wide' is not a"),
        ("clip", {"text_dim": None}, r"cache.json: clip.text_dim: None is not a"),
    ],
)
def test_a_cache_json_with_unknown_or_mistyped_identity_fields_is_refused_naming_them(tmp_path, part, change, message):
    data = json.loads(CACHE_JSON_0_1_0)
    data[part].update(change)
    (tmp_path / "cache.json").write_text(json.dumps(data))
    with pytest.raises(CacheFormatError, match=message):
        Provenance.read(tmp_path)


def test_a_cache_json_missing_an_identity_field_is_refused_naming_it(tmp_path):
    data = json.loads(CACHE_JSON_0_1_0)
    del data["clip"]["logit_scale"]
    (tmp_path / "cache.json").write_text(json.dumps(data))
    with pytest.raises(CacheFormatError, match="cache.json: clip: .*logit_scale"):
        Provenance.read(tmp_path)


def _as_last_release_wrote(**changes) -> str:
    """A cache.json as the writer before identity.py wrote it: the 0.1.0 keys plus feature_dtype and logit_bias."""
    data = json.loads(CACHE_JSON_0_1_0)
    data.update(feature_dtype="float16", clip={**data["clip"], "logit_bias": None})
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return json.dumps(data, indent=2, sort_keys=True)


@pytest.mark.parametrize(
    "changes, kind",
    [
        ({}, CacheKind()),
        ({"feature_maps": "borrowed", "paths": {"feature_maps_cache": "../.."}}, CacheKind.proposals("../..")),
        (
            {"view": {"id": "hflip", "seed": 3, "mode": "consistent"}, "paths": {"view_base_cache": "../.."}},
            CacheKind.of_view(ViewIdentity("hflip", 3, "consistent")),
        ),
    ],
    ids=["plain", "proposals", "view"],
)
def test_each_kind_of_cache_json_reads_into_its_kind_and_writes_back_byte_for_byte(tmp_path, changes, kind):
    text = _as_last_release_wrote(**changes)
    (tmp_path / "cache.json").write_text(text)
    provenance = Provenance.read(tmp_path)
    assert provenance.kind == kind and provenance.kind.owns_feature_maps == (not kind.is_proposals)
    assert provenance.weights == WeightFiles("/tmp/tmp4pwx2nm2/sam_tiny.pth", "/tmp/tmp4pwx2nm2/clip_tiny.pt")
    assert provenance.to_json() == text
    CacheWriter(tmp_path, provenance)  # reopened for writing: the same identity
    CacheWriter(tmp_path / "again", provenance)  # and a new cache with it records the same bytes
    assert (tmp_path / "again" / "cache.json").read_text() == text


def test_a_borrowed_cache_json_that_does_not_say_from_where_is_refused(tmp_path):
    (tmp_path / "cache.json").write_text(_as_last_release_wrote(feature_maps="borrowed"))
    with pytest.raises(CacheFormatError, match="feature_maps_cache"):
        Provenance.read(tmp_path)
