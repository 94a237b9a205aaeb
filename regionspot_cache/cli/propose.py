"""``rs-cache propose``: an open-vocabulary detector over a dataset, into a proposal set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from regionspot_cache.cli.options import DataRootOption, RetriesOption, SchedulerOption, WorkersOption, flag
from regionspot_cache.errors import UserError


def propose(
    detector: str = typer.Option(
        ...,
        "--detector",
        "-d",
        help="Hugging Face model id or local directory of a transformers detector: Grounding DINO, "
        "MM-Grounding-DINO (e.g. LLMDet's weights), OWLv2 / OWL-ViT, or SAM 3.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Proposal file to write (COCO results JSON); shards go beside it."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="Dataset manifest TOML (see manifests/)."),
    data_root: Path = DataRootOption,
    annotations: Optional[Path] = typer.Option(None, "--annotations", "-a", help="COCO/LVIS JSON, instead of --manifest."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root for --annotations."),
    name: Optional[str] = typer.Option(
        None, "--name", help="Proposal set name to suggest for the manifest (default: the file's stem)."
    ),
    prompt: str = typer.Option(
        "vocabulary",
        "--prompt",
        help="`vocabulary`: the dataset's class names, in chunks; each box keeps the detector's class. "
        "`agnostic`: one generic prompt (--agnostic-prompt); boxes without a class (category_id -1), "
        "for RegionSpot to recognise (`eval --method detector` cannot score them).",
    ),
    agnostic_prompt: Optional[str] = typer.Option(
        None, "--agnostic-prompt", help="The generic prompt of `--prompt agnostic` (default: object), for every family."
    ),
    top_k: int = typer.Option(300, help="Boxes kept per image after class-agnostic NMS (LVIS's 300 per image)."),
    nms_iou: float = typer.Option(0.7, help="IoU of the class-agnostic NMS over the pooled chunks."),
    min_score: float = typer.Option(0.0, help="Candidates scoring below this are dropped before NMS."),
    chunk_size: int = typer.Option(64, help="Class names per forward pass (Grounding DINO is also bounded by 256 tokens)."),
    shard_size: int = typer.Option(64, help="Images per shard file."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    scheduler: Optional[str] = SchedulerOption,
    workers: Optional[int] = WorkersOption,
    retries: int = RetriesOption,
    in_process: bool = flag("--in-process", help="Run the shards in this process, without dask."),
) -> None:
    """Run an open-vocabulary detector prompted with the dataset's vocabulary (or one generic
    prompt) and write its top boxes per image, each with the detector's class (or none), as a
    proposal set.

    Then name it in the manifest's proposals table (`NAME = "file"`) and use it with
    `rs-cache extract --boxes NAME` and `rs-cache eval --proposals NAME` (`--method detector` scores
    the detector's own classes). Re-running the same command resumes after an interruption.
    """
    from regionspot_cache.choices import ProposalPrompt
    from regionspot_cache.data.datasets import load_coco_format, load_manifest
    from regionspot_cache.progress import say
    from regionspot_cache.propose.distribute import Dask, InProcess
    from regionspot_cache.propose.runner import run_proposals
    from regionspot_cache.propose.select import Selection
    from regionspot_cache.propose.worker import DEFAULT_AGNOSTIC_PROMPT, Prompting

    mode = ProposalPrompt.find(prompt)
    if mode is None:
        raise UserError(f"--prompt {prompt!r}: expected one of {', '.join(ProposalPrompt.words())}")
    if agnostic_prompt is not None and mode.keeps_classes:
        raise UserError(f"--agnostic-prompt is the prompt of --prompt {ProposalPrompt.AGNOSTIC}, not of --prompt {mode}")
    if (manifest is None) == (annotations is None):
        raise UserError("propose needs either --manifest or --annotations (with --images)")
    if annotations is not None and images is None:
        raise UserError("propose --annotations needs --images (the image root)")
    dataset = load_manifest(manifest, data_root).load() if manifest else load_coco_format(annotations, images)
    selection = Selection(top_k=top_k, nms_iou=nms_iou, min_score=min_score, chunk_size=chunk_size)
    distributor = InProcess() if in_process else Dask(scheduler, workers, retries)
    prompting = Prompting(mode, DEFAULT_AGNOSTIC_PROMPT if agnostic_prompt is None else agnostic_prompt)
    summary = run_proposals(dataset, output, detector, selection, shard_size, device, distributor, prompting=prompting)
    say(
        f"{summary.images} images, {summary.boxes} boxes, {summary.failed_images} unreadable images, "
        f"{summary.shards_written} shards written, {summary.shards_skipped} resumed, {summary.seconds:.1f} s"
    )
    for shard_id, error in sorted(summary.failed_shards.items()):
        say(("failed", "bold red"), f" shard {shard_id:06d}: {error}")
    if summary.provenance is None:
        raise typer.Exit(1)
    say(f"wrote {output} (provenance: {output.name}.provenance.json)")
    relative = os.path.relpath(output.resolve(), data_root.resolve()) if manifest else str(output)
    say(f'name it in the manifest: [proposals] {name or output.stem} = "{relative}"')
