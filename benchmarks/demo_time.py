"""What `rs-cache demo` costs from a fresh work directory: CPU-seconds (user + system, of the demo
process and its children) and wall time, the median of a few runs.

CPU-seconds are the figure to compare on a shared machine: wall time grows with the other load,
CPU time much less. Extra arguments go to the demo (e.g. ``--train-images 96``).

    python benchmarks/demo_time.py --repeats 3
    python benchmarks/demo_time.py --repeats 1 -- --iterations 400
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def one_run(demo_args: list[str]) -> tuple[float, float]:
    """(CPU-seconds, wall seconds) of one demo in a new temporary work directory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="rs-cache-demo-") as workdir:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "regionspot_cache", "demo", "--workdir", workdir, *demo_args],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "RS_CACHE_PROGRESS_INTERVAL": "600"},
        )
        wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args, demo_args = parser.parse_known_args()
    demo_args = [a for a in demo_args if a != "--"]
    runs = []
    for index in range(args.repeats):
        runs.append(one_run(demo_args))
        print(f"run {index + 1}: {runs[-1][0]:.0f} CPU-s, {runs[-1][1]:.0f} s wall", flush=True)
    cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    settings = " ".join(demo_args) or "defaults"
    print(f"median of {len(runs)}: {cpu:.0f} CPU-s, {wall:.0f} s wall on {os.cpu_count()} CPUs ({settings})")


if __name__ == "__main__":
    main()
