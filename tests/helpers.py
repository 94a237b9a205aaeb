"""Small helpers shared by the tests (importable, unlike conftest fixtures)."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from regionspot_cache.config import ModelsConfig
from regionspot_cache.runtime.devices import usable_cpus


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
    return _ended(process, log, f"{command[:4]} to exit")


def _ended(process, log: Path, what: str) -> subprocess.CompletedProcess:
    """``process`` waited for (``wait_until``: no deadline), with its output, written to ``log``."""
    wait_until(lambda: process.poll() is not None, what, watched=[process])
    output = Path(log).read_text(errors="replace")
    return subprocess.CompletedProcess(process.args, process.returncode, output, output)


def fork_server() -> multiprocessing.context.ForkServerContext:
    """multiprocessing's forkserver context, its server importing, when it starts (on first use;
    once it runs, the preload changes nothing), what a local dask cluster's imports and training's:
    the product's local clusters fork their workers from the same server (extract/distribute.py)."""
    from regionspot_cache.extract.distribute import WORKER_PRELOAD

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*WORKER_PRELOAD, "regionspot_cache.train.loop"])
    return context


class ForkedPython:
    """A ``python -c``/``-m`` process forked from the test session's fork server, with the part of
    ``subprocess.Popen``'s interface the tests use (``pid``, ``poll``, ``wait``, ``returncode``)."""

    def __init__(self, process: multiprocessing.Process, args: Sequence[str]):
        self.process, self.args = process, list(args)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()


def python(args: Sequence[str], env: dict | None = None, stdout=None, stderr=None) -> ForkedPython:
    """``python ARGS`` (``-c CODE ...`` or ``-m MODULE ...``) as a process of its own, forked from a
    server that has imported torch, open_clip, segment-anything and the package once
    (multiprocessing's forkserver): a fresh interpreter spends 5-8 s of CPU importing them before
    it runs a line. The server only imports, so each process starts from the same state, as a
    fresh one would: the environment ``env`` (default ours), torch's threads as ``OMP_NUM_THREADS``
    would set them, stdout and stderr to files (a path, an open file or ``subprocess.DEVNULL``).
    Not for a variable a library reads when it is imported (``HF_HUB_OFFLINE``): the server's
    imports read the environment it started with; such a test needs a fresh interpreter."""
    where = [_output_path(stdout), _output_path(stderr)]
    process = fork_server().Process(target=_run_python, args=(list(args), dict(os.environ if env is None else env), where))
    process.start()
    return ForkedPython(process, args)


def run_python(args: Sequence[str], log: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python(args)`` run to its end as ``run_to_end`` runs a command, its output through ``log``."""
    Path(log).write_bytes(b"")
    return _ended(python(args, env, stdout=log, stderr=log), log, f"python {args[:2]} to exit")


def _output_path(output) -> str | None:
    if output is None:
        return None
    if output == subprocess.DEVNULL:
        return os.devnull
    return os.fspath(output) if isinstance(output, (str, os.PathLike)) else output.name  # a path, or an open file


def _run_python(args: list[str], env: dict, outputs: list[str | None]) -> None:
    import torch

    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or 0) or usable_cpus())
    for fd, path in zip((1, 2), outputs):
        if path is not None:
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(target, fd)
            os.close(target)
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    elif args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        raise ValueError(f"python {args[0]}: only -c and -m")


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes, edges and sensor-like noise: what a JPEG of a photograph holds."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([128 + 100 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    image[height // 4 : height // 2, width // 3 : 2 * width // 3] = (220, 60, 40)
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)
