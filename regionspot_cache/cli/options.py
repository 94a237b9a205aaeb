"""What the ``rs-cache`` command modules share: options, errors, recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from regionspot_cache.config import SAM_VARIANTS, Recipe, apply_overrides, load_recipe
from regionspot_cache.errors import UserError

RecipeOption = typer.Option(
    None, "--recipe", "-r", help="Recipe TOML (see pipelines/) with tables models.sam, models.clip, extract, train and eval."
)
SetOption = typer.Option(
    [], "--set", "-s", help="Override a recipe field, e.g. --set train.lr=1e-4 --set models.clip.model=ViT-B-16. Repeatable."
)
DataRootOption = typer.Option(Path("."), help="Directory that the manifest's relative paths start from.")
SamCheckpointOption = typer.Option(None, help="SAM checkpoint file (e.g. sam_vit_b_01ec64.pth); sets models.sam.checkpoint.")
SamVariantOption = typer.Option(None, help=f"SAM architecture: {', '.join(SAM_VARIANTS)}; sets models.sam.variant.")
ClipModelOption = typer.Option(None, help="open_clip model name, e.g. ViT-L-14, ViT-B-16, ViT-L-14-336; sets models.clip.model.")
ClipPretrainedOption = typer.Option(
    None, help="open_clip pretrained tag (e.g. openai) or a local weights file; sets models.clip.pretrained."
)

SchedulerOption = typer.Option(None, help="Address of an existing dask scheduler (e.g. tcp://host:8786) to run the shards on.")
WorkersOption = typer.Option(None, help="Workers of the local dask cluster (default: one per GPU, or one on a CPU-only machine).")
RetriesOption = typer.Option(2, help="Times a failed shard is retried on dask before it is reported.")


def flag(*names: str, help: str, default: bool = False):
    """A boolean option shown as a plain switch (``--masks``, ``--resume/--no-resume``) rather than
    with typer's ``<bool>`` type column, which reads as if it took a value."""
    return typer.Option(default, *names, help=help, metavar="")


def recipe_from(path: Optional[Path], overrides: List[str], **models: Optional[str]) -> Recipe:
    recipe = load_recipe(path) if path else Recipe()
    recipe = apply_overrides(recipe, list(overrides))
    recipe.models = recipe.models.with_overrides(**models)
    return recipe


AllowPartialOption = typer.Option(
    False,
    "--allow-partial",
    help="Use a cache with shards missing (a killed or failed extraction): refused by default; "
    "with this, only its committed shards are used and the fraction is recorded.",
)


def option_over_recipe(option: str, given, field: str, recipe_value, default, overrides: List[str], meaning=None):
    """The value an option sets a recipe field to, refused when the recipe or a --set of
    ``overrides`` set that field to something else: one of the two would be dropped without a word."""
    if given is None or given is False:
        return recipe_value
    wanted = given if meaning is None else meaning
    named = any(override.split("=", 1)[0].strip() == field for override in overrides)
    if (named or recipe_value != default) and recipe_value != wanted:
        raise UserError(
            f"{option} sets {field}={wanted}, but the recipe or --set gives {field}={recipe_value}; give one of the two"
        )
    return wanted
