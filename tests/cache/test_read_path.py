"""The fast read path: memory-mapped arrays, batched gathers, the zarr fallback and int8 caches."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from regionspot_cache.cache import CacheFormatError, CacheReader, CacheWriter, ImageFeatures, Provenance
from regionspot_cache.cache.arrays import dequantize_rows, quantize_rows
from regionspot_cache.data.datasets import BoxSet
from regionspot_cache.identity import ClipIdentity, SamIdentity

SAM = SamIdentity("tiny", "ab", 1024, 256, "sam preprocess", "mask token 0")


def clip_identity(width: int) -> ClipIdentity:
    return ClipIdentity("RS-Tiny-ViT", None, "cd", [128, 128], width, 5, 4, 14.3, "clip preprocess", "before ln_post")


RNG = np.random.default_rng(1)


def _provenance(**changes) -> Provenance:
    fields = dict(dataset="toy", box_source="gt", shard_size=4, planned_shards=3, sam=SAM, clip=clip_identity(8))
    return Provenance(**{**fields, **changes})


def _images(count: int) -> list[ImageFeatures]:
    images = []
    for image_id in range(count):
        boxes = int(RNG.integers(0, 4))
        xyxy = np.tile(np.asarray([[1, 2, 30, 40]], np.float32), (boxes, 1))
        images.append(
            ImageFeatures(
                image_id * 10,
                f"{image_id}.jpg",
                64,
                48,
                BoxSet(xyxy, np.arange(boxes) + 1, np.ones(boxes, np.float32)),
                feature_map=RNG.normal(size=(5, 8)).astype(np.float32) * (image_id + 1),
                box_tokens=RNG.normal(size=(boxes, 256)).astype(np.float32),
            )
        )
    return images


def _write(root, images, **provenance) -> CacheReader:
    writer = CacheWriter(root, _provenance(**provenance))
    for shard, start in enumerate(range(0, len(images), 4)):
        writer.write_shard(shard, images[start : start + 4])
    return CacheReader(root)


def test_arrays_are_memory_mapped_and_batched_gathers_cross_shards(tmp_path):
    images = _images(10)
    reader = _write(tmp_path, images)
    assert reader._arrays(0).clip_maps.mapped is not None and reader._arrays(0).box_tokens.mapped is not None
    ids = [90, 0, 50, 10, 50]  # shards 2, 0, 1, 0, 1; a repeat
    maps = reader.feature_maps(ids)
    assert maps.dtype == np.float16
    for got, image_id in zip(maps, ids):
        np.testing.assert_array_equal(got, images[image_id // 10].feature_map.astype(np.float16))
    for image in images:
        np.testing.assert_array_equal(reader.box_tokens(image.image_id), image.box_tokens.astype(np.float16))
        if len(image.boxes) > 1:
            np.testing.assert_array_equal(
                reader.box_tokens(image.image_id, np.array([1, 0])), image.box_tokens[[1, 0]].astype(np.float16)
            )


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_maps_read_into_a_given_buffer_land_at_their_places_checked_or_not(tmp_path, feature_dtype):
    """A training batch's maps are written straight into its buffer (``out[at[k]]``), from several
    shards at once, on the first read (crc32c checked) and later ones, as the plain gather reads them."""
    images = _images(10)
    reader = _write(tmp_path, images, feature_dtype=feature_dtype)
    ids, at = [90, 0, 50, 10, 30], np.array([3, 0, 6, 1, 4])  # shards 2, 0, 1, 0, 0; places out of order
    for _ in range(2):  # the second read finds the chunks checked
        out = np.full((7, 5, 8), -1, np.float16)
        assert reader.feature_maps(ids, out, at) is out
        np.testing.assert_array_equal(out[at], reader.feature_maps(ids))
        np.testing.assert_array_equal(out[[2, 5]], -1)  # places not named are left as they were
        want = np.stack([images[i // 10].feature_map for i in ids]).astype(np.float16)
        if feature_dtype == "float16":
            np.testing.assert_array_equal(out[at], want)
    assert reader._arrays(0).clip_maps.mapped.checked.tolist() == [1, 1, 0, 1]  # images 0, 10, 30 read; 20 not


def test_compressed_arrays_of_older_caches_are_read_through_zarr(tmp_path):
    """Caches written before stored zstd-compressed chunks: no memory map, same values."""
    images = _images(4)
    _write(tmp_path, images)
    group = zarr.open_group(tmp_path / "shards/000000/features.zarr", mode="a")
    for name, chunk_rows in (("clip_maps", 1), ("box_tokens", 1024)):
        data = group[name][:]
        del group[name]
        rows = max(1, min(chunk_rows, len(data)))
        chunks = (rows, *data.shape[1:])
        group.create_array(name, shape=data.shape, chunks=chunks, shards=data.shape, dtype="float16")[:] = data
    reader = CacheReader(tmp_path)
    assert reader._arrays(0).clip_maps.mapped is None
    for image in images:
        item = reader.image(image.image_id)
        np.testing.assert_array_equal(item.feature_map, image.feature_map.astype(np.float16))
        np.testing.assert_array_equal(item.tokens, image.box_tokens.astype(np.float16))
    np.testing.assert_array_equal(reader.feature_maps([30, 0])[0], images[3].feature_map.astype(np.float16))


@pytest.mark.parametrize("damage", ["missing", "not json", "a group", "another type", "the group's truncated"])
def test_damaged_array_metadata_is_one_error_naming_the_shard(tmp_path, damage):
    """The arrays' metadata is read without zarr on the fast path: what zarr would refuse is refused."""
    _write(tmp_path, _images(4))
    metadata = tmp_path / "shards/000000/features.zarr/clip_maps/zarr.json"
    if damage == "missing":
        metadata.unlink()
    elif damage == "not json":
        metadata.write_bytes(b"\x00{")
    elif damage == "a group":
        metadata.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    elif damage == "another type":
        metadata.write_text(metadata.read_text().replace('"float16"', '"complex128"'))
    else:
        group = metadata.parents[1] / "zarr.json"
        group.write_bytes(group.read_bytes()[:7])
    with pytest.raises(CacheFormatError, match="shards/000000/features.zarr"):
        CacheReader(tmp_path).feature_map(0)


def _features_in_memory(root, shard: int = 0) -> dict[str, bytes]:
    features = root / f"shards/{shard:06d}/features.zarr"
    return {p.relative_to(features).as_posix(): p.read_bytes() for p in features.rglob("*") if p.is_file()}


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_a_shards_arrays_held_in_memory_read_as_the_mapped_files_do(tmp_path, feature_dtype):
    """What a shard cache in memory reads (no file): the same rows, checked by the same crc32c."""
    from regionspot_cache.cache.reader import ShardFeatures

    reader = _write(tmp_path, _images(4), feature_dtype=feature_dtype)
    dtype, expected = reader.provenance.feature_dtype, reader.expected_shapes(0)
    files = _features_in_memory(tmp_path)
    in_memory = ShardFeatures.open(tmp_path / "in-memory", expected, dtype, files)
    mapped = reader._arrays(0)
    rows = np.asarray([2, 0, 3])
    np.testing.assert_array_equal(in_memory.maps(rows), mapped.maps(rows))
    all_boxes = slice(0, mapped.box_tokens.shape[0])
    np.testing.assert_array_equal(in_memory.tokens(all_boxes), mapped.tokens(all_boxes))
    assert in_memory.clip_maps.mapped.checked.tolist() == [1, 0, 1, 1]  # this process's own flags: rows 2, 0, 3 read
    # A flipped byte in a map's data fails that chunk's crc32c; a layout it cannot read is refused.
    data = bytearray(files["clip_maps/c/0/0/0"])
    data[10] ^= 0xFF
    damaged = ShardFeatures.open(tmp_path / "in-memory", expected, dtype, {**files, "clip_maps/c/0/0/0": bytes(data)})
    with pytest.raises(CacheFormatError, match="in-memory/clip_maps/c: rows 0-0 fail their crc32c"):
        damaged.maps(np.asarray([0]), np.empty((1, *damaged.clip_maps.shape[1:]), np.float16))
    with pytest.raises(CacheFormatError, match="in-memory: unreadable feature arrays: .*not one file of uncompressed chunks"):
        ShardFeatures.open(tmp_path / "in-memory", expected, dtype, {**files, "clip_maps/c/0/0/0": b"short"})


def test_all_zero_rows_keep_the_file_mappable(tmp_path):
    images = _images(3)
    images[1].feature_map = np.zeros((5, 8), np.float32)
    reader = _write(tmp_path, images)
    assert reader._arrays(0).clip_maps.mapped is not None
    np.testing.assert_array_equal(reader.feature_map(10), np.zeros((5, 8), np.float16))


def test_quantisation_error_is_bounded_by_half_a_step_per_row():
    data = RNG.normal(size=(6, 257, 64)).astype(np.float32) * RNG.uniform(0.01, 100, size=(6, 257, 1))
    data[0, 0] = 0  # an all-zero row has scale 0 and comes back as zeros
    values, scale = quantize_rows(data)
    assert values.dtype == np.int8 and scale.shape == (6, 257)
    back = dequantize_rows(values, scale).astype(np.float32)
    np.testing.assert_array_equal(back[0, 0], 0)
    # half a quantisation step, plus float16 rounding of the result
    bound = scale[..., None] / 2 + np.abs(data) * 2**-10
    assert (np.abs(back - data) <= bound * 1.0001).all()


def test_int8_cache_round_trip_records_its_dtype_and_halves_the_bytes(tmp_path):
    images = _images(8)
    for image in images:
        image.feature_map = RNG.normal(size=(5, 256)).astype(np.float32)
    clip = clip_identity(256)
    int8 = _write(tmp_path / "int8", images, feature_dtype="int8", clip=clip)
    half = _write(tmp_path / "half", images, clip=clip)
    assert int8.provenance.feature_dtype == "int8" and half.provenance.feature_dtype == "float16"
    assert '"feature_dtype": "int8"' in (tmp_path / "int8/cache.json").read_text()
    for image in images:
        item = int8.image(image.image_id)
        assert item.feature_map.dtype == np.float16 and item.tokens.dtype == np.float16
        for got, want in ((item.feature_map, image.feature_map), (item.tokens, image.box_tokens)):
            if len(want):
                error = np.linalg.norm(got.astype(np.float32) - want) / np.linalg.norm(want)
                assert error < 0.02
    assert int8._arrays(0).clip_maps.mapped is not None and int8._arrays(0).clip_maps_scale.mapped is not None

    def feature_bytes(root):
        return sum(p.stat().st_size for p in root.glob("shards/*/features.zarr/*/c/**/*") if p.is_file())

    assert feature_bytes(tmp_path / "int8") <= 0.55 * feature_bytes(tmp_path / "half")


def test_unknown_feature_dtype_is_refused_by_writer_and_reader(tmp_path):
    with pytest.raises(CacheFormatError, match="feature_dtype 'int4' is not one of float16, int8"):
        CacheWriter(tmp_path / "a", _provenance(feature_dtype="int4"))
    _write(tmp_path / "b", _images(2))
    path = tmp_path / "b/cache.json"
    path.write_text(path.read_text().replace('"feature_dtype": "float16"', '"feature_dtype": "int4"'))
    with pytest.raises(CacheFormatError, match="feature_dtype 'int4'"):
        CacheReader(tmp_path / "b").image(0)


def test_reader_pickles_without_its_memory_maps(tmp_path):
    import pickle

    reader = _write(tmp_path, _images(4))
    reader.feature_map(0)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._opened == {}
    np.testing.assert_array_equal(clone.feature_map(0), reader.feature_map(0))


def _everything(reader: CacheReader) -> list[np.ndarray]:
    reader._opened.clear()  # reopen the arrays: their files changed
    ids = reader.image_ids()
    return [reader.feature_maps(ids), *(reader.box_tokens(i) for i in ids)]


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_a_flipped_bit_anywhere_in_a_feature_file_is_an_error_or_changes_nothing(tmp_path, feature_dtype):
    """The read path never returns a wrong value: each chunk's crc32c is checked before its first
    read, so a flipped bit in the data or its checksum is an error naming the file; one in the shard
    index either breaks the layout (then zarr's own checks refuse it) or leaves the values right."""
    reader = _write(tmp_path, _images(4), feature_dtype=feature_dtype, planned_shards=1)
    expected = _everything(reader)
    features = tmp_path / "shards" / "000000" / "features.zarr"
    files = sorted(p for p in features.rglob("*") if p.is_file() and "c" in p.relative_to(features).parts)
    assert len(files) == (4 if feature_dtype == "int8" else 2)
    errors = 0
    for path in files:
        pristine = path.read_bytes()
        step = max(1, len(pristine) // 150)  # about 150 positions per file, the last bytes all
        for where in sorted({*range(0, len(pristine), step), *range(max(0, len(pristine) - 80), len(pristine))}):
            damaged = bytearray(pristine)
            damaged[where] ^= 0x10
            path.write_bytes(bytes(damaged))
            try:
                got = _everything(reader)
            except CacheFormatError as err:
                assert str(path).split("/c/")[0] in str(err), err  # names the array's files
                errors += 1
            else:
                for want, value in zip(expected, got):
                    np.testing.assert_array_equal(value, want, err_msg=f"{path} byte {where}: a wrong value read")
        path.write_bytes(pristine)
    assert errors > 0


def test_each_chunk_is_checked_once_per_process_and_before_its_first_read(tmp_path):
    reader = _write(tmp_path, _images(4), planned_shards=1)
    maps = reader._arrays(0).clip_maps.mapped
    assert maps.crc is not None and not maps.checked.any()
    reader.feature_maps([10])
    assert maps.checked.tolist() == [False, True, False, False]
    reader.feature_maps([10, 30])
    assert maps.checked.tolist() == [False, True, False, True]


def test_the_read_paths_crc_is_the_one_zarr_writes():
    """fastcrc's iscsi (the read path's) and the crc32c package (zarr's codec) are one CRC."""
    import crc32c
    from fastcrc import crc32

    data = np.random.default_rng(5).integers(0, 256, 70_000, dtype=np.uint8)
    for start, stop in [(0, 0), (0, 1), (3, 64), (1, 4097), (7, 70_000)]:  # empty, tiny, unaligned, large
        assert crc32.iscsi(data[start:stop]) == crc32c.crc32c(data[start:stop])
