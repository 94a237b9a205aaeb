"""Every command x every class of bad value, off the happy path: each answers with exit code 2 and one
``error:`` line naming what is wrong, never a traceback and never a wrong number with exit code 0.

The classes: devices (unknown, absent), CLIP models and weights (unknown name, a text file, another
model's weights, a directory), head files (a text file, a directory), outputs (a directory where a
file goes, a file where a directory goes), JSON files of the wrong shape, counts and sizes, a
boolean setting given as a number, options that contradict the recipe or that the method would
ignore, options that need another (``verify --images`` without ``--manifest``), artifacts that do
not belong together (another dataset's annotations, a view cache, a cache with shards missing),
stale inputs (other preprocessing on resume, an image file replaced since extraction with
``--check-images``), and a damaged feature file (a flipped bit, found on the read path by the
chunk's crc32c).
Run in-process through ``regionspot_cache.cli.main``, as a user runs ``rs-cache``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_cache import cli
from regionspot_cache.config import ExtractConfig
from regionspot_cache.data.datasets import load_coco_format
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_models, encoders):
    """Three generated images, their cache (two shards), a head, and the bad files of every class."""
    root = tmp_path_factory.mktemp("bad_values")
    annotations = generate_split(root, "val", SyntheticSpec(images=3, seed=2, min_size=48, max_size=64))
    (root / "toy.toml").write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    dataset = load_coco_format(annotations, root / "images", name="toy")
    run_extraction(dataset, CacheTarget(root / "cache"), encoders, ExtractConfig(shard_size=2, num_workers=0, device="cpu"))
    torch.manual_seed(0)
    head = RegionSpotHead(HeadConfig(clip_width=encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=32))
    save_head(head, root / "head.safetensors")
    wide = RegionSpotHead(
        HeadConfig(clip_width=2 * encoders.clip.width, text_dim=encoders.clip.text_dim, num_layers=1, ffn_dim=32)
    )
    save_head(wide, root / "wide.safetensors")  # a head of another CLIP's width
    (root / "text.txt").write_text("hello, not weights\n")
    (root / "object.json").write_text('{"boxes": 1}')
    (root / "a-dir").mkdir()
    data = json.loads(annotations.read_text())  # the same categories, other images: another dataset
    for image in data["images"]:
        image["file_name"] = "other/" + image["file_name"]
    (root / "other.json").write_text(json.dumps(data))
    partial = root / "partial"
    shutil.copytree(root / "cache", partial)
    shutil.rmtree(partial / "shards" / "000001")  # as after a kill -9 or a failed shard
    view = root / "view"  # a view cache: the base's provenance recorded as an hflip view
    shutil.copytree(root / "cache", view)
    provenance = json.loads((view / "cache.json").read_text())
    provenance["view"] = {"id": "hflip", "seed": 0, "mode": "consistent"}
    provenance.setdefault("paths", {})["view_base_cache"] = ".."
    (view / "cache.json").write_text(json.dumps(provenance))
    damaged = root / "damaged"  # a flipped bit in every feature map: what verify finds, and reads must too
    shutil.copytree(root / "cache", damaged)
    for shard, maps in (("000000", 2), ("000001", 1)):
        chunk_file = damaged / "shards" / shard / "features.zarr" / "clip_maps" / "c" / "0" / "0" / "0"
        data = bytearray(chunk_file.read_bytes())
        stride = (len(data) - 4) // maps - 16  # each map and its crc32c, then the shard index and its crc32c
        for map_row in range(maps):
            data[map_row * stride + 10] ^= 0x04
        chunk_file.write_bytes(bytes(data))
    edited = root / "edited"  # the same dataset and cache, one image's pixels replaced since extraction
    shutil.copytree(root / "images", edited / "images")
    shutil.copy(annotations, edited)
    shutil.copy(root / "toy.toml", edited)
    shutil.copytree(root / "cache", edited / "cache")
    victim = edited / "images" / dataset.images[-1].file_name
    Image.fromarray(255 - np.asarray(Image.open(victim).convert("RGB"))).save(victim, quality=92)
    return root, tiny_models


def _commands(root, models) -> dict[str, list[str]]:
    """Each command as a new user would run it on the work directory, with good values."""
    sam = ["--sam-variant", "tiny", "--sam-checkpoint", models.sam.checkpoint]
    clip = ["--clip-model", models.clip.model, "--clip-pretrained", models.clip.pretrained]
    image = str(root / "images" / "val" / "000001.jpg")
    return {
        "predict": [
            "predict",
            image,
            "--head",
            str(root / "head.safetensors"),
            "--boxes",
            "2,2,30,30",
            "--vocab",
            "a,b",
            "--out",
            str(root / "out" / "p.png"),
            "--device",
            "cpu",
            *sam,
            *clip,
        ],
        "search": [
            "search",
            "red",
            "-c",
            str(root / "cache"),
            "--head",
            str(root / "head.safetensors"),
            "-o",
            str(root / "out" / "search"),
            "--device",
            "cpu",
            "--clip-pretrained",
            models.clip.pretrained,
        ],
        "train": [
            "train",
            "-c",
            str(root / "cache"),
            "-o",
            str(root / "out" / "h.safetensors"),
            "--set",
            "train.iterations=1",
            "--set",
            "train.batch_size=1",
            "--set",
            "train.device=cpu",
            "--set",
            "train.tensorboard=false",
        ],
        "eval": [
            "eval",
            "-c",
            str(root / "cache"),
            "--head",
            str(root / "head.safetensors"),
            "-a",
            str(root / "val.json"),
            "--set",
            "eval.device=cpu",
            "-o",
            str(root / "out" / "e.json"),
        ],
        "verify": ["verify", str(root / "cache"), "--images", "-m", str(root / "toy.toml"), "--data-root", str(root)],
        "extract": [
            "extract",
            "-m",
            str(root / "toy.toml"),
            "--data-root",
            str(root),
            "-c",
            str(root / "out" / "c"),
            "--in-process",
            "--set",
            "extract.num_workers=0",
            *sam,
            *clip,
        ],
    }


def _with(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option`` set to ``value`` (replaced if there, else added)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
        return args
    return [*args, option, value]


def _bad(root, models) -> dict[str, tuple[str, object, str]]:
    """case -> (command, how its arguments change, a piece of the expected one-line message)."""
    text, a_dir, sam_weights = str(root / "text.txt"), str(root / "a-dir"), models.sam.checkpoint
    cases = {}
    for command in ("predict", "search"):
        cases[f"{command}-device-bogus"] = (command, ("--device", "gpu0"), "not a torch device")
        cases[f"{command}-device-absent"] = (command, ("--device", "cuda:7"), "cuda:7")
        cases[f"{command}-clip-text-file"] = (command, ("--clip-pretrained", text), "text.txt")
        cases[f"{command}-clip-sam-weights"] = (command, ("--clip-pretrained", sam_weights), "not CLIP weights")
        cases[f"{command}-clip-dir"] = (command, ("--clip-pretrained", a_dir), "a-dir")
        cases[f"{command}-head-text"] = (command, ("--head", text), "text.txt")
        cases[f"{command}-head-dir"] = (command, ("--head", a_dir), "a-dir")
    for command in ("predict", "search", "eval"):
        cases[f"{command}-head-other-width"] = (command, ("--head", str(root / "wide.safetensors")), "CLIP width")
    cases["predict-clip-unknown"] = ("predict", ("--clip-model", "ViT-Q-99"), "not an open_clip model name")
    cases["predict-out-dir"] = ("predict", ("--out", a_dir), "a-dir")
    cases["predict-out-under-file"] = ("predict", ("--out", f"{text}/p.png"), "text.txt")
    cases["predict-boxes-file-object"] = ("predict", ["--boxes", "--boxes-file", str(root / "object.json")], "object.json")
    cases["predict-reject-vs-set"] = (
        "predict",
        [("--reject", "max-sigmoid"), ("--set", "eval.open_set.rule=max-softmax")],
        "--reject",
    )
    cases["search-top-zero"] = ("search", ("--top", "0"), "--top 0")
    cases["search-out-under-file"] = ("search", ("-o", f"{text}/s"), "text.txt")
    cases["search-partial"] = ("search", ("-c", str(root / "partial")), "not committed")
    for command in ("search", "train", "eval"):
        cases[f"{command}-damaged-features"] = (command, ("-c", str(root / "damaged")), "crc32c")
    # Raised in a loader worker: torch wraps it in the worker's traceback; still one line.
    cases["train-damaged-features-workers"] = (
        "train",
        [("-c", str(root / "damaged")), ("--set", "train.num_workers=2")],
        "clip_maps/c/0/0/0: rows",
    )
    for name, value, message in (("device-bogus", "gpu0", "not a device"), ("device-absent", "cuda:7", "cuda:7")):
        cases[f"train-{name}"] = ("train", ("--set", f"train.device={value}"), message)
        cases[f"eval-{name}"] = ("eval", ("--set", f"eval.device={value}"), message)
    cases["train-out-dir"] = ("train", ("-o", a_dir), "a-dir")
    cases["train-init-text"] = ("train", ("--init-from", text), "text.txt")
    cases["train-init-twice"] = ("train", [("--init-from", text), ("--set", f'train.init_from="{text}"')], "--init-from")
    cases["train-partial"] = ("train", ("-c", str(root / "partial")), "not committed")
    cases["train-cache-file"] = ("train", ("-c", text), "text.txt")
    cases["eval-head-text"] = ("eval", ("--head", text), "text.txt")
    cases["eval-annotations-object"] = ("eval", ("-a", str(root / "object.json")), "object.json")
    cases["eval-other-dataset"] = ("eval", ("-a", str(root / "other.json")), "not the annotation file of this cache")
    cases["eval-view-cache"] = ("eval", ("-c", str(root / "view")), "a view cache")
    cases["eval-partial"] = ("eval", ("-c", str(root / "partial")), "--allow-partial")
    cases["eval-fixed-vs-tap"] = ("eval", [("--fixed-ap", None), ("--set", "eval.protocol=tap")], "--fixed-ap")
    cases["eval-scoring-vs-set"] = ("eval", [("--scoring", "sigmoid"), ("--set", "eval.scoring=softmax")], "--scoring")
    cases["eval-clip-box-open-set"] = (
        "eval",
        [("--method", "clip-box"), ("--image-root", str(root / "images")), ("--set", "eval.open_set.rule=max-softmax")],
        "eval.open_set",
    )
    cases["eval-out-dir"] = ("eval", ("-o", f"{a_dir}/"), "a-dir")
    # Counts whose work or memory grows with the value are bounded before any work starts.
    cases["train-batch-unbounded"] = ("train", ("--set", "train.batch_size=100000000000"), "at most 65536")
    cases["predict-auto-grid-unbounded"] = (
        "predict",
        [("--boxes", "auto"), ("--set", "predict.auto_boxes.points_per_side=100000")],
        "at most 128",
    )
    cases["extract-workers-negative"] = ("extract", [("--workers", "-1"), ("--in-process", None)], "--workers -1")
    cases["extract-views-unbounded"] = ("extract", ("--set", 'extract.views=["crop:0.5-1x99999999999999999999"]'), "at most")
    cases["extract-clip-unknown"] = ("extract", ("--clip-model", "ViT-Q-99"), "not an open_clip model name")
    cases["extract-clip-text-file"] = ("extract", ("--clip-pretrained", text), "text.txt")
    cases["extract-proposals-object"] = ("extract", ("--boxes", str(root / "object.json")), "object.json")
    cases["extract-flag-as-number"] = ("extract", ("--set", "extract.check_images=1"), "not a bool")
    edited = root / "edited"
    cases["extract-image-replaced"] = (  # stale inputs: an image file's bytes changed since extraction
        "extract",
        [("-m", str(edited / "toy.toml")), ("--data-root", str(edited)), ("-c", str(edited / "cache")), ("--check-images", None)]
        + [("--set", "extract.shard_size=2")],
        "replaced since their shards were extracted",
    )
    cases["extract-other-preprocessing"] = (
        "extract",
        [("-c", str(root / "cache")), ("--set", "extract.shard_size=2"), ("--set", "extract.preprocess=released")],
        "preprocess: cache has",
    )
    cases["verify-images-without-manifest"] = ("verify", ["-m", "--data-root", str(root)], "--images needs --manifest")
    cases["verify-manifest-object"] = ("verify", ("-m", str(root / "object.json")), "object.json")
    return cases


def _apply(args: list[str], change) -> list[str]:
    if isinstance(change, tuple):
        change = [change]
    if change and isinstance(change[0], str):  # options to drop, then one to add
        *dropped, option, value = change
        for name in dropped:
            at = args.index(name)
            args = args[:at] + args[at + 2 :]
        return [*args, option, value]
    for option, value in change:
        if value is None:
            args = [a for a in args if a != option] if option == "--in-process" else [*args, option]
        elif option == "--set":
            args = [*args, option, value]
        else:
            args = _with(args, option, value)
    return args


def _bad_listing() -> dict[str, tuple[str, object, str]]:
    """The cases without a work directory, for parametrising."""
    fake = SimpleNamespace(sam=SimpleNamespace(checkpoint="s.pth"), clip=SimpleNamespace(model="m", pretrained="c.pt"))
    return _bad(Path("/x"), fake)


@pytest.mark.parametrize("case", sorted(_bad_listing()))
def test_every_command_refuses_each_class_of_bad_value_in_one_line(work, monkeypatch, capsys, case):
    root, models = work
    if case.endswith("device-absent") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    command, change, named = _bad(root, models)[case]
    args = _apply(_commands(root, models)[command], change)
    monkeypatch.setattr(sys, "argv", ["rs-cache", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    message = err[err.index("error:") :]  # progress bars of work done before may precede it
    assert named.replace(" ", "") in "".join(message.split()), err  # rich wraps long lines anywhere


def test_every_command_that_combines_artifacts_is_driven():
    """A command added later without cases here would escape the enumeration."""
    commands = {command for command, _, _ in _bad_listing().values()}
    assert commands == {"predict", "search", "train", "eval", "extract", "verify"}


def test_allow_partial_scores_the_committed_shards_and_records_the_fraction(work, monkeypatch, capsys):
    root, models = work
    out = root / "out" / "partial.json"
    args = _with(_with(_commands(root, models)["eval"], "-c", str(root / "partial")), "-o", str(out))
    monkeypatch.setattr(sys, "argv", ["rs-cache", *args, "--allow-partial", "--set", "eval.open_set.rule=max-sigmoid"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    printed = " ".join((captured.out + captured.err).split())
    settings = json.loads(out.with_suffix(".metrics.json").read_text())["eval"]
    assert settings["partial_cache"]["shards_missing"] == [1] and settings["partial_cache"]["fraction_of_shards"] == 0.5
    assert settings["open_set"] == {"rule": "max-sigmoid", "threshold": 0.5}
    assert "PARTIAL cache: 50% of its shards" in printed and "open-set max-sigmoid" in printed


def test_a_category_renamed_in_the_annotation_file_renames_the_cached_vocabulary(work, encoders, tmp_path):
    from regionspot_cache.cache import CacheReader

    root, _ = work
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    data = json.loads((root / "val.json").read_text())
    data["categories"][0]["name"] = "renamed thing"
    renamed = tmp_path / "val.json"
    renamed.write_text(json.dumps(data))
    dataset = load_coco_format(renamed, root / "images", name="toy")
    run_extraction(dataset, CacheTarget(cache), encoders, ExtractConfig(shard_size=2, num_workers=0, device="cpu"))
    vocabulary = CacheReader(cache).vocabulary("toy")
    assert vocabulary.names[0] == "renamed thing" and vocabulary.names[1:] == [c["name"] for c in data["categories"][1:]]


def test_train_allow_partial_records_the_fraction_with_the_head_and_in_its_summary(work, monkeypatch, capsys):
    root, models = work
    out = root / "out" / "partial-head.safetensors"
    args = _with(_with(_commands(root, models)["train"], "-c", str(root / "partial")), "-o", str(out))
    monkeypatch.setattr(sys, "argv", ["rs-cache", *args, "--allow-partial"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    printed = " ".join((captured.out + captured.err).split())
    [recorded] = json.loads(out.with_suffix(".json").read_text())["partial_caches"]
    assert recorded["cache"] == str(root / "partial") and recorded["shards_missing"] == [1]
    assert recorded["fraction_of_shards"] == 0.5
    assert "PARTIAL cache: trained on 50% of" in printed
    complete = root / "out" / "complete-head.safetensors"
    monkeypatch.setattr(sys, "argv", ["rs-cache", *_with(_commands(root, models)["train"], "-o", str(complete))])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0 and "partial_caches" not in json.loads(complete.with_suffix(".json").read_text())
