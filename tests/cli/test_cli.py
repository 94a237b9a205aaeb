"""The rs-cache command line: help texts, a full extract -> train -> eval run, clear errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import click
import pytest
import typer
from rich.logging import RichHandler
from typer.testing import CliRunner

from regionspot_cache.cache import CacheReader
from regionspot_cache.cli import app
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.progress import console, log_to_console
from tests.helpers import model_args

runner = CliRunner()
COMMANDS = [
    "extract",
    "propose",
    "train",
    "eval",
    "predict",
    "search",
    "demo",
    "inspect",
    "verify",
    "repair",
    "import-checkpoint",
]


def test_every_option_of_every_command_is_explained():
    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)
    for name, command in group.commands.items():
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help and len(param.help) > 15, f"{name} --{param.name} has no help"
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("cli")
    annotations = generate_split(root, "val", SyntheticSpec(images=4, seed=5, min_size=64, max_size=96))
    models = tiny_models
    manifest = root / "toy.toml"
    manifest.write_text(f'name = "toy"\nannotations = "{annotations.name}"\nimage_root = "images"\n')
    return root, manifest, annotations, models


@pytest.fixture(scope="module")
def extracted(toy):
    root, manifest, annotations, models = toy
    common = ["--set", "extract.num_workers=0", "--set", "extract.shard_size=2"]
    result = runner.invoke(
        app,
        [
            "extract",
            "-m",
            str(manifest),
            "--data-root",
            str(root),
            "-c",
            str(root / "cache"),
            *model_args(models),
            *common,
        ],
    )
    return root, annotations, result


def test_extract_train_eval_from_the_command_line(extracted):
    root, annotations, result = extracted
    assert result.exit_code == 0, result.output
    assert "extracted 4 images" in result.output
    head = root / "head.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "-c",
            str(root / "cache"),
            "-o",
            str(head),
            "--set",
            "train.iterations=3",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.device=cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert head.is_file() and head.with_suffix(".json").is_file()
    train_again = [
        "train",
        "-c",
        str(root / "cache"),
        "-o",
        str(head),
        "--set",
        "train.batch_size=2",
        "--set",
        "train.device=cpu",
    ]
    finished = runner.invoke(app, [*train_again, "--set", "train.iterations=3"])  # all steps are in the saved state
    said = " ".join(finished.output.split())  # rich wraps long lines
    assert finished.exit_code == 0 and "already trained: 3 steps" in said, said
    assert "nan" not in said and " 0.0 images/s" not in said
    longer = runner.invoke(app, [*train_again, "--set", "train.iterations=4"])
    assert longer.exit_code == 0 and "resumed from step 3" in " ".join(longer.output.split()), longer.output
    output = root / "results" / "val.json"
    result = runner.invoke(
        app, ["eval", "-c", str(root / "cache"), "--head", str(head), "-a", str(annotations), "-o", str(output)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(output.with_suffix(".metrics.json").read_text())
    assert set(metrics) >= {"AP", "APr", "APc", "APf"} and all(
        metrics[k] is None or 0 <= metrics[k] <= 1 for k in ("AP", "APr", "APc", "APf")
    )
    assert metrics["eval"]["protocol"] == "standard" and metrics["eval"]["scoring"] == "softmax"
    detections = json.loads(output.read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])


def test_inspect_and_verify(extracted, tmp_path):
    import shutil

    root, _, _ = extracted
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    result = runner.invoke(app, ["inspect", str(cache)])
    # The summary is the command's result: on stdout, sizes in units, with the storage dtype.
    assert result.exit_code == 0 and "shards_committed" in result.stdout and "RS-Tiny-ViT" in result.stdout
    assert "float16" in result.stdout and " kB" in result.stdout
    summary = json.loads(runner.invoke(app, ["inspect", str(cache), "--json"]).stdout)
    assert summary["images"] == 4 and summary["feature_dtype"] == "float16" and summary["bytes_on_disk"] > 0
    verified = runner.invoke(app, ["verify", str(cache)])
    assert verified.exit_code == 0 and "every committed shard matches" in verified.stdout
    assert json.loads(runner.invoke(app, ["verify", str(cache), "--json"]).stdout)["ok"] is True
    shard_file = next((cache / "shards" / "000001" / "features.zarr" / "clip_maps").rglob("c/*/*/*"))
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a chunk
    shard_file.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(cache)])
    assert result.exit_code == 1 and "shard 000001" in result.stdout and "checksum differs" in result.stdout
    assert "000000" not in result.output
    result = runner.invoke(app, ["verify", str(cache), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["ok"] and [p["shard"] for p in report["problems"]] == ["000001"]


LOADED_MODULES = """
import sys
from regionspot_cache.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
except Exception as err:  # a refusal of ours (main() would print it as one line)
    print("refused:", err)
print("loaded:", *sorted(name for name in ("torch", "open_clip", "segment_anything", "sam2") if name in sys.modules))
"""


def _heavy_modules_loaded(*arguments: str) -> tuple[list[str], str]:
    """The heavy modules a ``rs-cache`` run with ``arguments`` imported, and its output."""
    result = subprocess.run([sys.executable, "-c", LOADED_MODULES, *arguments], capture_output=True, text=True)
    report = [line for line in result.stdout.splitlines() if line.startswith("loaded:")]
    assert report, result.stdout + result.stderr
    return report[-1].split()[1:], result.stdout + result.stderr


@pytest.mark.parametrize(
    "arguments",
    [["--help"], ["eval", "--help"], ["predict", "x.jpg", "--boxes"], ["train", "-c", "/no/such/cache", "-o", "h.safetensors"]],
)
def test_help_and_argument_errors_load_no_torch(arguments):
    loaded, output = _heavy_modules_loaded(*arguments)
    assert loaded == [], output


def test_inspect_reads_metadata_without_torch(extracted):
    root, _, _ = extracted
    loaded, output = _heavy_modules_loaded("inspect", str(root / "cache"))
    assert "RS-Tiny-ViT" in output and loaded == [], output


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regionspot_cache", *args], capture_output=True, text=True)


def test_missing_manifest_is_one_clear_line(tmp_path):
    result = _run_cli("extract", "-m", str(tmp_path / "nope.toml"), "-c", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_bad_override_names_the_field(tmp_path):
    result = _run_cli("train", "-c", str(tmp_path), "-o", str(tmp_path / "h.safetensors"), "--set", "train.lrr=1")
    assert result.returncode == 2 and "lrr" in result.stderr and "Traceback" not in result.stderr


def test_eval_on_proposals_extracts_only_the_missing_sam_tokens(extracted, tmp_path):
    import shutil

    from regionspot_cache.head.model import HeadConfig, RegionSpotHead, save_head

    root, annotations, _ = extracted
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    head = tmp_path / "head.safetensors"
    clip = CacheReader(cache).provenance.clip
    width, text_dim = clip.width, clip.text_dim
    save_head(RegionSpotHead(HeadConfig(clip_width=width, text_dim=text_dim)), head)
    glip = tmp_path / "glip.json"
    glip.write_text('{"1": {"boxes": [[0, 0, 25, 25], [5, 5, 40, 30]], "scores": [0.5, 0.9], "labels": [1, 1]}}')
    base = ["eval", "-c", str(cache), "--head", str(head), "-a", str(annotations), "--proposals", str(glip)]
    result = runner.invoke(app, base)
    assert result.exit_code != 0 and "pass --manifest" in str(result.exception)
    output = tmp_path / "glip_results.json"
    result = runner.invoke(
        app, [*base, "-m", str(root / "toy.toml"), "--data-root", str(root), "-o", str(output), "--set", "extract.num_workers=0"]
    )
    assert result.exit_code == 0, result.output
    derived = next((cache / "proposals").iterdir())
    assert CacheReader(derived).provenance.kind.is_proposals
    boxes = {tuple(d["bbox"]) for d in json.loads(output.read_text())}
    assert boxes == {(0.0, 0.0, 25.0, 25.0), (5.0, 5.0, 35.0, 25.0)}
    result = runner.invoke(
        app,
        [
            "eval",
            "-c",
            str(cache),
            "--head",
            str(head),
            "-m",
            str(root / "toy.toml"),
            "--data-root",
            str(root),
            "--proposals",
            "glip",
        ],
    )
    assert result.exit_code != 0 and "neither 'gt'" in str(result.exception)


def test_library_log_messages_reach_the_console_once_and_other_libraries_stay_quiet(capsys):
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        log_to_console()
        log_to_console()  # main() and the demo may both call it (and earlier tests ran main())
        ours = [h for h in root.handlers if isinstance(h, RichHandler) and h.console is console]
        assert len(ours) == 1
        logging.basicConfig()  # what a library's logging.info() does: must add no second handler
        assert len(root.handlers) == len(set(before) | set(ours))
        logging.getLogger("regionspot_cache.predict.predictor").info("text cache unreadable")
        logging.getLogger("regionspot_cache.evaluate").debug("not shown at INFO")
        logging.getLogger("distributed.scheduler").info("Scheduler at tcp://...")  # dask's chatter
        logging.getLogger("open_clip").warning("no pretrained weights")
        err = capsys.readouterr().err
        assert err.count("text cache unreadable") == 1 and "not shown" not in err and "Scheduler" not in err
        assert "no pretrained weights" in err
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
