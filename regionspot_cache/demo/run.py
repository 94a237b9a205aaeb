"""``rs-cache demo``: generate data and tiny models, then extract -> train -> eval for real."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from regionspot_cache.cache import CacheReader
from regionspot_cache.data.datasets import load_manifest
from regionspot_cache.demo.config import DemoConfig
from regionspot_cache.demo.manifests import write_demo_manifest, write_jittered_proposals
from regionspot_cache.demo.report import print_extract_summary, print_train_summary
from regionspot_cache.demo.synthetic import SyntheticSpec, generate_split
from regionspot_cache.demo.tiny_models import write_tiny_checkpoints
from regionspot_cache.encoders import load_frozen_encoders
from regionspot_cache.evaluate import evaluate_head
from regionspot_cache.evaluate.lvis import METRICS, EvalResult
from regionspot_cache.evaluate.provenance import EvalProvenance, record_provenance
from regionspot_cache.evaluate.report import ReportData, cache_labels, write_report
from regionspot_cache.extract.runner import CacheTarget, run_extraction
from regionspot_cache.head.model import RegionSpotHead, load_head
from regionspot_cache.progress import console, log_to_console, metrics_table, say
from regionspot_cache.runtime.devices import resolve_device
from regionspot_cache.runtime.files import write_json
from regionspot_cache.train.loop import head_config_for, train_head


@dataclass
class DemoResult:
    untrained: dict[str, float]
    trained: dict[str, float]
    workdir: Path
    report: Path | None = None  # the results page (AP chart, drawn predictions)


def run_demo(workdir: Path | str, config: DemoConfig) -> DemoResult:
    log_to_console()
    workdir = Path(workdir)
    data_dir = workdir / "data"
    console.rule("[bold]1/4 generate data")
    train_json = generate_split(data_dir, "train", SyntheticSpec(config.train_images, config.seed))
    val_json = generate_split(data_dir, "val", SyntheticSpec(config.val_images, config.seed + 1, balanced=True))
    manifests = {
        split: write_demo_manifest(
            data_dir,
            split,
            annotations,
            write_jittered_proposals(annotations, data_dir / f"{split}_proposals.json", config.seed + offset),
        )
        for offset, (split, annotations) in enumerate((("train", train_json), ("val", val_json)))
    }
    models = config.models or write_tiny_checkpoints(workdir / "models", config.seed, config.tiny_sam, config.tiny_clip)
    say(
        f"data in {data_dir}; manifests {', '.join(str(path) for path in manifests.values())}; "
        f"SAM {models.sam.variant} from {models.sam.checkpoint}; CLIP {models.clip.model} from {models.clip.pretrained}"
    )

    console.rule("[bold]2/4 extract (frozen SAM + CLIP, once per image)")
    encoders = load_frozen_encoders(models, resolve_device(config.extract.device), config.extract.preprocess)
    caches = {}
    for split, manifest in manifests.items():
        dataset = load_manifest(manifest).load()
        caches[split] = workdir / "cache" / split
        print_extract_summary(run_extraction(dataset, CacheTarget(caches[split]), encoders, config.extract))
    del encoders

    console.rule("[bold]3/4 train the head from the cache")
    head_path = workdir / "head" / "head.safetensors"
    print_train_summary(train_head(caches["train"], head_path, config.train))

    console.rule("[bold]4/4 evaluate on the validation split (LVIS AP, ground-truth boxes)")
    torch.manual_seed(config.train.seed)
    untrained = RegionSpotHead(head_config_for(CacheReader(caches["train"]), config.train))
    trained, _ = load_head(head_path)
    results, evaluated = {}, {}
    for name, head in (("untrained", untrained), ("trained", trained)):
        evaluated[name] = evaluate_head(caches["val"], head, val_json, config.eval, workdir / "results" / f"{name}.json")
        results[name] = evaluated[name].metrics
    console.print(metrics_table("demo: LVIS box AP on demo_val (ground-truth boxes)", results, METRICS))
    provenance = record_provenance(caches["val"], val_json, evaluated["trained"].settings, ["regionspot"], head_path)
    recorded = {"config": _jsonable(config), "provenance": provenance.to_json()}
    write_json(workdir / "demo_metrics.json", {**results, **recorded}, indent=2)
    page = write_demo_report(workdir, caches["val"], evaluated, data_dir / "images", provenance)
    say(("report with the AP chart and drawn predictions: ", "bold"), str(page))
    return DemoResult(results["untrained"], results["trained"], workdir, page)


def write_demo_report(
    workdir: Path, cache: Path, evaluated: dict[str, EvalResult], image_root: Path, provenance: EvalProvenance
) -> Path:
    """The page ``eval --report`` writes, with a row per head (untrained, trained) and the trained
    head's predictions drawn beside the ground truth: a first-time user sees what training gave."""
    names, file_names = cache_labels(cache)
    trained = evaluated["trained"]
    files = {f"results ({name})": result.results_file for name, result in evaluated.items()}
    files["metrics"] = workdir / "demo_metrics.json"
    data = ReportData(
        {name: result.metrics for name, result in evaluated.items()},
        trained.settings,
        "demo: LVIS box AP of the untrained and the trained head (ground-truth boxes)",
        trained.detections,
        names,
        file_names,
        image_root,
        files,
        {name: result.per_category for name, result in evaluated.items()},
        trained.ground_truth,
        provenance,
    )
    return write_report(workdir / "report", data)


def _jsonable(config: DemoConfig) -> dict:
    return json.loads(json.dumps(asdict(config), default=str))
