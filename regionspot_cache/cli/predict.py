"""``rs-cache predict``: label boxes of one image of your own with any vocabulary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.cli.options import (
    ClipModelOption,
    ClipPretrainedOption,
    DataRootOption,
    RecipeOption,
    SamCheckpointOption,
    SamVariantOption,
    SetOption,
    flag,
    option_over_recipe,
    recipe_from,
)
from regionspot_cache.config import OpenSetConfig
from regionspot_cache.errors import UserError
from regionspot_cache.progress import say
from regionspot_cache.runtime.files import check_writable


def predict(
    image: Path = typer.Argument(..., help="Image file to recognise regions in (any format Pillow decodes)."),
    head: Path = typer.Option(
        ...,
        "--head",
        help="Head checkpoint (.safetensors) written by `rs-cache train`; it records the SAM and CLIP it was trained "
        "with, so the model options are needed only to override them (or for heads that record none).",
    ),
    boxes: Optional[str] = typer.Option(
        None,
        help='Boxes in original pixels: "x1,y1,x2,y2;x1,y1,x2,y2;...". Or `auto`: the boxes of the masks SAM\'s '
        "automatic mask generator finds (settings: predict.auto_boxes.*); or a proposal set named in --manifest "
        "(e.g. glip), or a proposal file (GLIP's or COCO results): the boxes it has for this image.",
    ),
    boxes_file: Optional[Path] = typer.Option(
        None, help="JSON file with a list of boxes, each a list x1, y1, x2, y2 (instead of --boxes)."
    ),
    manifest: Optional[Path] = typer.Option(
        None, "--manifest", "-m", help="Dataset manifest: its proposal sets for --boxes NAME, its images to find IMAGE's id."
    ),
    data_root: Path = DataRootOption,
    image_id: Optional[int] = typer.Option(
        None,
        help="IMAGE's id in the proposal file of --boxes (default: found by file name in --manifest, or the file's only image).",
    ),
    top_k: str = typer.Option(
        "1",
        "--top-k",
        help="Classes per box: with K other than 1 each box also gets `classes`, its K most probable "
        "{label, category_id, score}, best first; 0 or `all`: the whole vocabulary.",
    ),
    vocab: Optional[str] = typer.Option(None, help='Class names separated by commas, e.g. "dog,cat,traffic light".'),
    vocab_file: Optional[Path] = typer.Option(None, help="Text file with one class name per line (instead of --vocab)."),
    masks: bool = flag("--masks", help="Add SAM's mask for each box prompt (RLE in the JSON, overlaid in the PNG)."),
    attention: bool = flag(
        "--attention",
        help="Also write where the head looks: per box, the last decoder layer's cross-attention "
        "over the CLIP grid (mean over heads) overlaid on the image, to OUT's stem + .attention.png.",
    ),
    reject: Optional[str] = typer.Option(
        None,
        help="Open-set rule that may label a box none of the vocabulary (label null, rejected, with its best_guess): "
        "max-softmax, max-sigmoid or background-prompt; sets eval.open_set.rule (threshold: --set "
        "eval.open_set.threshold=...).",
    ),
    out: Optional[Path] = typer.Option(
        None, help="PNG to write with the labelled boxes (default: IMAGE's stem + .regions.png here)."
    ),
    text_cache: Optional[Path] = typer.Option(
        None, help="Directory of cached class text embeddings (default: ~/.cache/regionspot-cache/text-embeddings)."
    ),
    recipe: Optional[Path] = RecipeOption,
    overrides: List[str] = SetOption,
    sam_variant: Optional[str] = SamVariantOption,
    sam_checkpoint: Optional[str] = SamCheckpointOption,
    clip_model: Optional[str] = ClipModelOption,
    clip_pretrained: Optional[str] = ClipPretrainedOption,
    device: str = typer.Option("auto", help="Torch device: auto (CUDA when present), cpu, cuda, cuda:1, ..."),
) -> None:
    """Label the boxes of one image with a vocabulary of your own; prints JSON and writes a PNG.

    Runs SAM and CLIP on the image and the head on the boxes (given, from a proposal file, or
    found by SAM's automatic mask generator); each box gets the most probable class name and its
    probability (softmax over the vocabulary), or with --top-k its K best.
    """
    from regionspot_cache.predict.attention import draw_attention_grid
    from regionspot_cache.predict.io import draw_regions, parse_top_k, parse_vocabulary, read_vocabulary_file
    from regionspot_cache.predict.predictor import Predictor, checked_vocabulary, to_rgb_image
    from regionspot_cache.regions.open_set import warn_if_never_rejects

    if (boxes is None) == (boxes_file is None):
        raise UserError("predict needs exactly one of --boxes and --boxes-file")
    if (vocab is None) == (vocab_file is None):
        raise UserError("predict needs exactly one of --vocab and --vocab-file")
    config = recipe_from(recipe, overrides)
    out = out or Path(f"{image.stem}.regions.png")
    check_writable(out, "--out")
    classes = parse_top_k(top_k)
    names = parse_vocabulary(vocab) if vocab is not None else read_vocabulary_file(vocab_file)
    picture = to_rgb_image(image)
    given = _given_boxes(image, picture.size, boxes, boxes_file, manifest, data_root, image_id)
    checked_vocabulary(names)
    config.eval.open_set.rule = option_over_recipe(
        "--reject", reject, "eval.open_set.rule", config.eval.open_set.rule, OpenSetConfig().rule, overrides
    )
    config.eval.validate()
    warn_if_never_rejects(config.eval.open_set, len(names))
    models = _models(head, config.models, (sam_variant, sam_checkpoint, clip_model, clip_pretrained))
    predictor = Predictor.from_files(head, models, device, text_cache)
    given = predictor.auto_boxes(picture, config.predict.auto_boxes) if given is None else given
    if not len(given):
        print("[]")
        say(f"no regions: {_no_boxes_source(boxes)} found no boxes in {image}; nothing drawn")
        return
    regions = predictor.predict(
        picture, given, names, masks=masks, attention=attention, open_set=config.eval.open_set, top_k=classes
    )
    draw_regions(picture, regions, out)
    written = [out]
    if attention:
        written.append(draw_attention_grid(picture, regions, out.with_name(f"{out.stem.removesuffix('.regions')}.attention.png")))
    # The maps are in the PNG; the JSON keeps each box's share on the class token.
    print(json.dumps([region.to_json() for region in regions]))
    clipped = sum(region.clipped for region in regions)
    note = f" ({clipped} clipped to the image {picture.width}x{picture.height}: see given_box)" if clipped else ""
    say(f"{len(regions)} regions{note}; wrote {', '.join(map(str, written))}")


def _given_boxes(image: Path, size, boxes, boxes_file, manifest, data_root, image_id):
    """The boxes --boxes or --boxes-file give, checked before the models load (a BoxSet for a
    proposal file, with its scores); None for `auto`, which needs SAM."""
    from regionspot_cache.data.datasets import load_manifest
    from regionspot_cache.predict.io import AUTO_BOXES, named_proposal_file, parse_boxes, read_boxes_file
    from regionspot_cache.predict.predictor import checked_boxes
    from regionspot_cache.predict.proposals import proposal_boxes

    spec = load_manifest(manifest, data_root) if manifest else None
    automatic = boxes == AUTO_BOXES
    proposal_file = named_proposal_file(boxes, spec) if boxes is not None and not automatic else None
    if image_id is not None and proposal_file is None:
        raise UserError("--image-id picks the image in a proposal file: give one with --boxes FILE or NAME")
    if automatic:
        return None
    if proposal_file is not None:
        found, dropped = proposal_boxes(proposal_file, image, size, image_id, spec)
        if dropped:
            say(f"{proposal_file}: {dropped} of its boxes for {image.name} have no area inside the image; left out")
        return found
    given = parse_boxes(boxes) if boxes is not None else read_boxes_file(boxes_file)
    checked_boxes(given, *size)  # a bad box fails before the models load
    return given


def _no_boxes_source(boxes: Optional[str]) -> str:
    from regionspot_cache.predict.io import AUTO_BOXES

    if boxes == AUTO_BOXES:  # a random-weight SAM seldom passes its thresholds: say which to lower
        return "SAM's automatic mask generator (lower predict.auto_boxes.pred_iou_thresh, stability_score_thresh)"
    return f"the proposal file of --boxes {boxes}"


def _models(head: Path, recipe_models, flags: tuple):
    """The recipe's models if it names any, else those the head records (trained with), with the
    model flags over either; a head that records none needs the SAM weights given."""
    from regionspot_cache.config import ModelsConfig
    from regionspot_cache.head.model import read_head_metadata
    from regionspot_cache.head.recorded import models_of_head

    if recipe_models == ModelsConfig() and read_head_metadata(head).encoders is not None:
        return models_of_head(head, flags)
    models = recipe_models.with_overrides(*flags)
    if models.sam.checkpoint is None:
        raise UserError(
            f"predict needs the SAM weights: --sam-checkpoint (or models.sam.checkpoint in a recipe); "
            f"{head} records no models (imported, or trained before heads recorded them)"
        )
    return models
