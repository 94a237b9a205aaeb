"""Outputs people look at: AP by frequency group as a bar chart, and a results page (markdown)
with the metrics of one or several methods (or heads), AP per category, what made them (the
provenance and protocol) and a few images with their predictions drawn beside the ground truth."""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend, PNG goes through Agg
from PIL import Image, ImageDraw, ImageFont

from regionspot_cache.data.datasets import DatasetError, image_path_under
from regionspot_cache.data.images import ImageDecodeError, load_rgb
from regionspot_cache.drawing import PALETTE, draw_labelled_box
from regionspot_cache.evaluate.ground_truth import GroundTruthBoxes
from regionspot_cache.evaluate.lvis import FREQUENCY_METRICS, METRICS, CategoryAP, Metrics
from regionspot_cache.evaluate.provenance import EvalProvenance
from regionspot_cache.evaluate.scoring import Detections
from regionspot_cache.progress import percent

CHART_FILE = "ap_by_frequency.png"
PAGE_FILE = "results.md"
EXAMPLES_DIR = "examples"


@dataclass
class ReportData:
    rows: dict[str, Metrics]  # one row per method (or head: untrained, trained), in table order
    settings: dict[str, Any]  # ScoringProtocol.settings(), plus anything worth recording
    title: str = "LVIS box AP"
    detections: Detections | None = None  # those drawn in the examples (of one row)
    category_names: dict[int, str] = field(default_factory=dict)
    file_names: dict[int, str] = field(default_factory=dict)  # image id -> file_name in the cache
    image_root: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # e.g. {"results": ..., "metrics": ...}
    per_category: dict[str, list[CategoryAP]] = field(default_factory=dict)  # by row name
    ground_truth: GroundTruthBoxes | None = None  # the annotated boxes, labelled beside the predictions
    provenance: EvalProvenance | None = None


def ap_chart(runs: Mapping[str, Mapping[str, float]], path: Path | str, title: str = "LVIS box AP") -> Path:
    """Grouped bars of AP, APr, APc, APf (percent), one bar per named run, values written on top."""
    path = Path(path)
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(FREQUENCY_METRICS))
    for i, (name, metrics) in enumerate(runs.items()):
        values = [metrics.get(m) for m in FREQUENCY_METRICS]
        heights = [100 * v if v is not None and v >= 0 else 0.0 for v in values]
        bars = axes.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, label=name)
        axes.bar_label(bars, labels=[percent(v) for v in values], fontsize=8, padding=2)
    axes.set_xticks(x, [f"{name} ({group})" for name, group in FREQUENCY_METRICS.items()])
    axes.set_ylabel("AP (%)")
    scored = [100 * v for m in runs.values() for v in m.values() if v is not None and v > 0]
    axes.set_ylim(0, max(10.0, 1.15 * max(scored, default=0)))
    axes.set_title(textwrap.fill(title, 60))  # a long title wraps instead of running off the figure
    if len(runs) > 1:
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def best_per_box(detections: Detections, image_id: int, limit: int) -> Detections:
    """An image's best ``limit`` boxes, each with its best class (pairs repeat boxes per class)."""
    own = detections.take(np.flatnonzero(detections.image_ids == image_id))
    own = own.take(np.argsort(-own.scores, kind="stable"))
    _, first = np.unique(own.boxes, axis=0, return_index=True)
    return own.take(np.sort(first)[:limit])


def draw_predictions(
    image: Image.Image,
    detections: Detections,
    names: Mapping[int, str],
    min_side: int = 512,
    truth: Sequence[str | None] | None = None,
) -> Image.Image:
    """Boxes (x, y, w, h) with "class score" labels on a copy of ``image``, enlarged to ``min_side``
    pixels on its long side if smaller (labels would cover a small image). With ``truth`` (per
    detection, the class annotated on its box, or None for none) the label is "class score | gt NAME"."""
    scale = max(1.0, min_side / max(image.size))
    image = image.resize((round(image.width * scale), round(image.height * scale))) if scale > 1 else image.copy()
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    shown = detections.boxes.tolist(), detections.category_ids.tolist(), detections.scores.tolist()
    for index, (box, category_id, score) in enumerate(zip(*shown)):
        x, y, w, h = (scale * v for v in box)
        label = f"{names.get(category_id, category_id)} {score:.2f}"
        if truth is not None:
            label += f" | gt {truth[index] or 'none'}"
        # Colour by category id, so a class looks the same in every example.
        draw_labelled_box(draw, (x, y, x + w, y + h), label, PALETTE[category_id % len(PALETTE)], font, width=2)
    return image


def true_names(data: ReportData, image_id: int, shown: Detections) -> list[str | None] | None:
    """The class annotated on each shown box (the best-overlapping annotation, IoU >= 0.5), or
    None without ground truth to compare with."""
    if data.ground_truth is None:
        return None
    matches = [data.ground_truth.best_match(image_id, box) for box in shown.boxes]
    return [None if m is None else str(data.category_names.get(m, m)) for m in matches]


def _example(directory: Path, data: ReportData, image_id: int, limit: int) -> list[str]:
    file_name = data.file_names.get(image_id, "?")
    shown = best_per_box(data.detections, image_id, limit)
    truth = true_names(data, image_id, shown)
    lines = [f"### Image {image_id} (`{file_name}`)", ""]
    if data.image_root is not None:
        try:
            path = image_path_under(data.image_root, file_name, image_id)
            drawn = draw_predictions(load_rgb(path), shown, data.category_names, truth=truth)
            target = directory / EXAMPLES_DIR / f"{image_id}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            drawn.save(target, quality=90)
            lines += [f"![predictions on image {image_id}]({EXAMPLES_DIR}/{target.name})", ""]
        except (DatasetError, ImageDecodeError) as err:
            lines += [f"Not drawn: {err}.", ""]
    lines += ["| class | score | ground truth | box (x, y, w, h) |", "|---|---:|---|---|"]
    rows = zip(shown.boxes.tolist(), shown.category_ids.tolist(), shown.scores.tolist(), truth or [None] * len(shown))
    for (x, y, w, h), category_id, score, true_name in rows:
        name = data.category_names.get(category_id, category_id)
        annotated = "-" if truth is None else (true_name or "none")
        lines.append(f"| {name} | {score:.3f} | {annotated} | {x:.0f}, {y:.0f}, {w:.0f}, {h:.0f} |")
    return lines + [""]


def _examples(directory: Path, data: ReportData, count: int, limit: int) -> list[str]:
    lines = ["## Examples", ""]
    if data.detections is None or len(data.detections) == 0:
        return lines + ["No predictions to show.", ""]
    if data.image_root is None:
        lines += ["No image root was given (`--image-root` or a manifest), so predictions are listed, not drawn.", ""]
    if data.ground_truth is not None:
        lines += [
            "Each box: the predicted class and score, then the class annotated on it "
            "(gt; none: no annotation overlaps it with IoU >= 0.5).",
            "",
        ]
    image_ids = np.unique(data.detections.image_ids)
    picks = image_ids[np.unique(np.linspace(0, len(image_ids) - 1, min(count, len(image_ids))).astype(int))]
    for image_id in picks.tolist():
        lines += _example(directory, data, image_id, limit)
    return lines


def _link(path: Path, directory: Path) -> str:
    """A markdown link relative to the page (it keeps working when both move together)."""
    return f"[{path.name}]({Path(os.path.relpath(path.resolve(), directory.resolve())).as_posix()})"


def _metrics_table(rows: Mapping[str, Metrics]) -> list[str]:
    columns = [m for m in METRICS if any(m in metrics for metrics in rows.values())]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(percent(metrics.get(m)) for m in columns) + " |")
    return lines


def per_category_table(per_category: Mapping[str, list[CategoryAP]], shown: int = 15) -> list[str]:
    """Categories with ground truth, by the last row's AP (best first: the trained head, or the
    last method named), one AP column per row; with more than 2 x ``shown`` of them, the best and
    the worst ``shown`` (the metrics file has all)."""
    if not per_category:
        return []
    names = list(per_category)
    by_id = {name: {c.category_id: c for c in categories} for name, categories in per_category.items()}
    scored = [c for c in per_category[names[-1]] if c.gt_instances > 0]
    scored.sort(key=lambda c: (-(c.ap if c.ap is not None else -1.0), c.name))
    lines = ["## AP per category (%)", ""]
    left_out = len(per_category[names[-1]]) - len(scored)
    note = f"{len(scored)} categories with ground truth, by AP of {names[-1]}"
    note += f"; {left_out} without ground truth in these images (AP n/a) left out" if left_out else ""
    lines += [note + ".", "", "| category | frequency | GT instances | " + " | ".join(f"AP {n}" for n in names) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(names))

    def row(c: CategoryAP) -> str:
        aps = [percent(getattr(by_id[n].get(c.category_id), "ap", None)) for n in names]
        return f"| {c.name} | {c.frequency} | {c.gt_instances} | " + " | ".join(aps) + " |"

    if len(scored) > 2 * shown:
        middle = f"| ... {len(scored) - 2 * shown} more (all in the metrics file) | | |" + " |" * len(names)
        return lines + [row(c) for c in scored[:shown]] + [middle] + [row(c) for c in scored[-shown:]] + [""]
    return lines + [row(c) for c in scored] + [""]


def _provenance_table(provenance: EvalProvenance | None) -> list[str]:
    if provenance is None:
        return []
    rows = [(key, value) for key, value in provenance.rows() if not key.startswith("settings.")]
    return ["## Provenance", "", "| what | value |", "|---|---|"] + [f"| {key} | `{value}` |" for key, value in rows] + [""]


def write_report(directory: Path | str, data: ReportData, examples: int = 4, boxes_per_image: int = 10) -> Path:
    """``DIRECTORY/results.md`` with the metrics table (one row per method), the chart, AP per
    category, provenance, settings and example images."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ap_chart(data.rows, directory / CHART_FILE, data.title)
    lines = [
        f"# {data.title}",
        "",
        f"Protocol: **{data.settings.get('description', 'unknown')}**",
        "",
        "## Metrics (%)",
        "",
        *_metrics_table(data.rows),
        "",
        "n/a: no ground truth to score in that group.",
        "",
        f"![AP by frequency group]({CHART_FILE})",
        "",
        *per_category_table(data.per_category),
        *_provenance_table(data.provenance),
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {'-' if value is None else value} |" for key, value in data.settings.items()]
    lines += [f"| {name} file | {_link(path, directory)} |" for name, path in data.files.items() if path and Path(path).exists()]
    lines += [""] + _examples(directory, data, examples, boxes_per_image)
    page = directory / PAGE_FILE
    page.write_text("\n".join(lines), encoding="utf-8")
    return page


def cache_labels(cache_dir: Path | str, vocabulary: str | None = None) -> tuple[dict[int, str], dict[int, str]]:
    """(category id -> name, image id -> file_name) of a cache, for ``ReportData``."""
    from regionspot_cache.cache import CacheReader

    reader = CacheReader(cache_dir)
    vocab = reader.vocabulary(vocabulary or reader.provenance.dataset)
    names = dict(zip(vocab.category_ids.tolist(), vocab.names))
    rows = reader.images.select(["image_id", "file_name"]).to_pydict()
    return names, dict(zip(rows["image_id"], rows["file_name"]))
