"""Training state checkpoints for exact resume: weights, optimiser, scheduler, step, RNG.

Each checkpoint is a directory ``step-NNNNNNNN`` written aside and renamed into place, holding
``tensors.safetensors`` (head weights, optimiser tensors, RNG states) and ``state.json`` (step,
optimiser hyper-parameters, scheduler). Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from regionspot_cache.errors import ConfigError, ModelLoadError
from regionspot_cache.runtime.files import atomic_path, json_text, remove_abandoned_temps
from regionspot_cache.runtime.records import differences

STEP_PREFIX = "step-"


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states (dropout draws from them)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def save_train_state(
    directory: Path,
    step: int,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    identity: dict,
    rng_states: list[dict[str, torch.Tensor]],
    keep: int = 2,
) -> Path:
    """``identity``: the settings a resumed run must share (checked by ``load_train_state``);
    ``rng_states``: ``rng_state()`` of every training process, in rank order."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{STEP_PREFIX}{step:08d}"
    remove_abandoned_temps(directory, re.escape(STEP_PREFIX) + r"\d+")  # of killed runs
    optimizer_state = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    for param_id, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{param_id}.{key}"] = torch.as_tensor(value).contiguous()
    for rank, states in enumerate(rng_states):
        tensors.update({f"rng.{rank}.{name}": value for name, value in states.items()})
    state = {
        "step": step,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "identity": identity,
    }
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json_text(state, tmp / "state.json"))
        if final.exists():  # the same step saved by an earlier, abandoned run
            shutil.rmtree(final)
    for old in sorted(directory.glob(f"{STEP_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_train_state(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{STEP_PREFIX}*")) if directory.is_dir() else []
    return found[-1] if found else None


def load_train_state(
    checkpoint: Path,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    identity: dict,
    rank: int = 0,
) -> int:
    """Restore everything saved at ``checkpoint`` (RNG: process ``rank``'s); returns the step to
    continue from. A state saved with other settings is refused, naming them. Resuming with
    more processes than saved is allowed; the new processes keep their fresh RNG."""
    try:
        tensors = load_file(str(checkpoint / "tensors.safetensors"))
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{checkpoint}: unreadable training state: {err}") from None
    changed = differences(state.get("identity", {}), identity, "{key} was {old!r}, now {new!r}")
    if changed:
        raise ConfigError(
            f"{checkpoint}: cannot resume: settings differ from the saved run: "
            + ", ".join(changed)
            + " (use another output, or --no-resume)"
        )
    head.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            optimizer_state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    if f"rng.{rank}.torch" in tensors:
        torch.set_rng_state(tensors[f"rng.{rank}.torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith(f"rng.{rank}.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(state["step"])
