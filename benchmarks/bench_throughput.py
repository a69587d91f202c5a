"""Benchmark: models per hour of a sweep, and where each run's time goes.

Runs a sweep config from scratch into a fresh directory (``genprobe sweep CONFIG --out OUT``,
its own jobs and threads), times it, and splits the runs' seconds by phase from the table's cost
columns (``seconds_training``, ``seconds_<probe>``, ``seconds_baselines``): per phase the total,
its share, the median per run and the largest peak memory (``peak_mib_<phase>``); then the
probes' total against training's.

    python benchmarks/bench_throughput.py examples/sweeps/generalization.yaml --out /tmp/gen
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="a directory that does not exist yet")
    a = ap.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"{a.out} exists: give a new directory")
    t = time.perf_counter()
    subprocess.run(["genprobe", "sweep", a.config, "--out", a.out], check=True)
    wall = time.perf_counter() - t
    table = pd.read_parquet(os.path.join(a.out, "table.parquet"))
    phases = [c for c in table.columns if c.startswith("seconds_")]
    runs = len(table)
    print(f"\n{runs} runs in {wall:.0f} s: {runs * 3600 / wall:.0f} models per hour\n")
    print("| phase | total (s) | share | median per run (s) | peak memory, max over runs (MiB) |\n"
          "|---|---:|---:|---:|---:|")
    total = float(table[phases].sum().sum())
    for c in phases:
        col = table[c].astype(float)
        peak = "peak_mib_" + c.removeprefix("seconds_")
        shown = f"{table[peak].max():,.0f}" if peak in table else "-"
        print(f"| {c.removeprefix('seconds_')} | {col.sum():.1f} | {col.sum() / total:.1%} | "
              f"{col.median():.2f} | {shown} |")
    probes = [c for c in phases if c not in ("seconds_training", "seconds_baselines",
                                             "seconds_user_measures")]
    p, tr = float(table[probes].sum().sum()), float(table["seconds_training"].sum())
    print(f"\nprobes together: {p:.1f} s = {p / tr:.2f} × training ({tr:.1f} s)")
    print(f"per run, probes / training: median {float((table[probes].sum(axis=1) / table['seconds_training']).median()):.2f}")


if __name__ == "__main__":
    main()
