"""Small helpers shared by the tests (importable, unlike conftest fixtures)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from regionspot_cache.config import ModelsConfig


def model_args(models: ModelsConfig) -> list[str]:
    """The command-line flags that name ``models`` (SAM variant and checkpoint, CLIP model and weights)."""
    return [
        "--sam-variant",
        models.sam.variant,
        "--sam-checkpoint",
        str(models.sam.checkpoint),
        "--clip-model",
        models.clip.model,
        "--clip-pretrained",
        str(models.clip.pretrained),
    ]


def extract_args(manifest, data_root, cache: str, models: ModelsConfig, *settings: str) -> list[str]:
    """``rs-cache extract`` of ``manifest`` into ``cache`` with ``models``, in-process loaders
    (``extract.num_workers=0``) and each of ``settings`` as a ``--set``."""
    sets = [arg for setting in ("extract.num_workers=0", *settings) for arg in ("--set", setting)]
    return ["extract", "-m", str(manifest), "--data-root", str(data_root), "-c", cache, *model_args(models), *sets]


# A process tree that uses no CPU time at all over this many seconds of polling is stuck (blocked
# on a lock or a socket nobody will answer), not slow: a loaded machine still gives it some CPU.
STUCK_AFTER_IDLE_S = 600


def wait_until(
    condition,
    what: str,
    must_live: Sequence[subprocess.Popen] = (),
    watched: Sequence[subprocess.Popen] = (),
    poll_s: float = 0.2,
) -> None:
    """Poll ``condition()`` until it is true, with no deadline: a slow machine only makes this take
    longer. Fails at once, naming the process, when one of ``must_live`` exits first, and when
    ``must_live`` and ``watched`` (and their children) together use no CPU time over
    ``STUCK_AFTER_IDLE_S`` of polling, so a hang fails instead of waiting forever."""
    import psutil

    processes = [*must_live, *watched]
    last, idle_polls = None, 0
    while not condition():
        for process in must_live:
            if process.poll() is not None:
                raise AssertionError(f"waiting for {what}: {process.args!r} exited with {process.returncode} first")
        used = _cpu_seconds(psutil, processes)
        idle_polls = idle_polls + 1 if used == last else 0
        last = used
        if idle_polls * poll_s >= STUCK_AFTER_IDLE_S:
            raise AssertionError(f"waiting for {what}: the processes used no CPU over {idle_polls} polls: stuck")
        time.sleep(poll_s)


def _cpu_seconds(psutil, processes: Sequence[subprocess.Popen]) -> float:
    """User and system CPU seconds of ``processes`` and their live descendants."""
    total = 0.0
    for process in processes:
        try:
            root = psutil.Process(process.pid)
            for each in [root, *root.children(recursive=True)]:
                times = each.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:  # exited meanwhile: its time no longer counts
            continue
    return total


def run_to_end(command: Sequence[str], log: Path, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run`` without a timeout: ``wait_until`` it exits (no deadline, a stuck run
    fails), its output (stdout and stderr together) through ``log`` so no pipe can fill up."""
    with open(log, "wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, **popen)
    wait_until(lambda: process.poll() is not None, f"{command[:4]} to exit", watched=[process])
    output = log.read_text(errors="replace")
    return subprocess.CompletedProcess(process.args, process.returncode, output, output)


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes, edges and sensor-like noise: what a JPEG of a photograph holds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([128 + 100 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    image[height // 4 : height // 2, width // 3 : 2 * width // 3] = (220, 60, 40)
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)
