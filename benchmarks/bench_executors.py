"""Benchmark: the same small sweep through ``--executor local`` and ``--executor ray``.

Each repeat runs ``genprobe -q sweep CONFIG --out TMP --executor E --jobs J --threads T`` as a
user would (a fresh interpreter, a fresh sweep directory), the executors alternating so that a
neighbour's load falls on both; it prints each wall time, the median per executor, the runs' own
seconds (the table's ``seconds``, summed), and the load average around each command (another
process on the machine shows there). ``--ray-start`` also times a bare local Ray instance's
``ray.init`` and ``ray.shutdown`` (the fixed cost a Ray sweep pays on one machine).

``--fake-gpus`` runs the Ray sweep on a local instance that counts one GPU per job which nothing
uses (the runs compute on the CPU): Ray then schedules each run as it would on a GPU cluster,
where a *task* holding a GPU gets a fresh process per call. ``--src DIR`` puts another genprobe
source tree first on the path (a checkout of an older commit: before/after comparisons).

    python benchmarks/bench_executors.py --repeats 3            # examples/sweeps/tiny.yaml, 2 jobs x 1 thread
    python benchmarks/bench_executors.py --executors ray --fake-gpus --repeats 3
    python benchmarks/bench_executors.py --config examples/sweeps/generalization.yaml --repeats 1

The sweep directories are made in a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

RAY_START = """
import logging, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
         configure_logging=False, num_cpus={cpus}, _system_config={{"worker_niceness": 0}})
t2 = time.perf_counter()
ray.shutdown()
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def load() -> float:
    return os.getloadavg()[0]


FAKE_GPUS = """
import logging, sys
import ray
from genprobe.sweep import run_sweep
ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
         configure_logging=False, num_cpus={jobs} * {threads}, num_gpus={jobs},
         _system_config={{"worker_niceness": 0}})
run_sweep(sys.argv[1], sys.argv[2], executor="ray", jobs={jobs}, threads={threads}, device="auto",
          progress=False)
ray.shutdown()
"""


def sweep(config: Path, out: Path, executor: str, jobs: int, threads: int, fake_gpus: bool,
          src: Path | None) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    if executor == "ray" and fake_gpus:
        argv = [sys.executable, "-c", FAKE_GPUS.format(jobs=jobs, threads=threads), str(config),
                str(out)]
    else:
        argv = [sys.executable, "-m", "genprobe", "-q", "sweep", str(config), "--out", str(out),
                "--executor", executor, "--jobs", str(jobs), "--threads", str(threads)]
    before = load()
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{executor} sweep failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    table = pd.read_parquet(out / "table.parquet")
    return {"executor": executor, "wall_s": wall, "runs": len(table),
            "runs_seconds": float(table["seconds"].sum()), "load_before": before, "load_after": load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "sweeps" / "tiny.yaml")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray-start", action="store_true", help="also time ray.init/shutdown alone")
    ap.add_argument("--fake-gpus", action="store_true", help="Ray counts a GPU per job (unused)")
    ap.add_argument("--src", type=Path, help="a genprobe source tree to import instead")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    a = ap.parse_args()
    import torch

    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, python {platform.python_version()}; {a.config.name}, "
          f"{a.jobs} job(s) x {a.threads} thread(s)" + (", Ray with a fake GPU per job" if a.fake_gpus
                                                         else "") + (f", genprobe from {a.src}" if a.src else ""))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as tmp:
        for i in range(a.repeats):
            for executor in a.executors.split(","):
                row = sweep(a.config, Path(tmp) / f"{executor}-{i}", executor, a.jobs, a.threads,
                            a.fake_gpus, a.src)
                rows.append(row | {"repeat": i})
                print(f"  {executor:5s} repeat {i}: {row['wall_s']:6.2f} s wall, runs' own seconds "
                      f"{row['runs_seconds']:6.2f} ({row['runs']} runs), load "
                      f"{row['load_before']:.2f} -> {row['load_after']:.2f}", flush=True)
            for p in Path(tmp).iterdir():
                shutil.rmtree(p)
    for executor in a.executors.split(","):
        walls = [r["wall_s"] for r in rows if r["executor"] == executor]
        own = [r["runs_seconds"] for r in rows if r["executor"] == executor]
        print(f"{executor}: median {statistics.median(walls):.2f} s wall (min {min(walls):.2f}, max "
              f"{max(walls):.2f}); runs' own seconds median {statistics.median(own):.2f}")
    if a.ray_start:
        starts = []
        for _ in range(a.repeats):
            done = subprocess.run([sys.executable, "-c", RAY_START.format(cpus=a.jobs * a.threads)],
                                  capture_output=True, text=True, check=True)
            starts.append([float(v) for v in done.stdout.split()])
        imp, init, stop = (statistics.median(s[k] for s in starts) for k in range(3))
        print(f"ray alone: import {imp:.2f} s, init {init:.2f} s, shutdown {stop:.2f} s (medians)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
