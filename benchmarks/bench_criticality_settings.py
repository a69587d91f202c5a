"""Benchmark: cheaper criticality settings against the exact one, on every run of a sweep.

For each run directory under ``SWEEP/runs``, module criticality with the sweep's own settings
(the reference: ``valley="full"``) and with cheaper ones, all on the same sample and draws.
Reports the network evaluations each needed (a machine-independent cost: every evaluation is one
network on the sample) and the wall time, and the relative error of each module's μ_i and of the
network's μ against the reference. The reference run again with other noise draws (``seed=1``;
the sample is drawn with the seed too) shows how far the reference itself moves: an error of a
cheaper setting below that is within the estimate's own uncertainty.

    python benchmarks/bench_criticality_settings.py /work/studies/generalization --threads 1 \\
        --n 500 --samples 8
"""

from __future__ import annotations

import argparse
import glob
import math
import statistics
import time

import numpy as np
import torch

import genprobe as gp

SETTINGS = {
    "reference (valley=full)": {"valley": "full"},
    "reference with other draws (seed=1)": {"valley": "full", "seed": 1},
    "valley=search": {"valley": "search"},
    "valley=search, rtol=0.1": {"valley": "search", "rtol": 0.1},
    "valley=search, samples=4": {"valley": "search", "samples": 4},
}


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.inf
    return abs(a - b) / abs(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="at most this many runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    runs = sorted(glob.glob(f"{a.sweep}/runs/*/"))[:a.limit]
    cost = {k: [] for k in SETTINGS}
    seconds = {k: [] for k in SETTINGS}
    module_err = {k: [] for k in SETTINGS}
    network_err = {k: [] for k in SETTINGS}
    for path in runs:
        s = gp.Subject.load(path)
        ref = None
        for name, options in SETTINGS.items():
            t = time.perf_counter()
            r = gp.criticality(s, n=a.n, **({"samples": a.samples} | options))
            seconds[name].append(time.perf_counter() - t)
            cost[name].append(int(r.summary["evaluations"]))
            mu = r.tables["modules"].set_index("module")["criticality"]
            if ref is None:
                ref = mu, r.summary["network_criticality"]
            module_err[name] += [rel(float(mu[m]), float(ref[0][m])) for m in ref[0].index]
            network_err[name].append(rel(r.summary["network_criticality"], ref[1]))
        print(f"{path}: " + ", ".join(f"{c[-1]}" for c in cost.values()), flush=True)
    print(f"\n{len(runs)} runs, n = {a.n}, {a.threads} thread(s)\n")
    print("| setting | evaluations (total) | vs reference | seconds (total) | module μ_i rel. error: "
          "median / 90th pct / max | network μ rel. error: median / max |")
    print("|---|---:|---:|---:|---|---|")
    base = sum(cost["reference (valley=full)"])
    for name in SETTINGS:
        m, nw = np.array(module_err[name]), np.array(network_err[name])
        print(f"| {name} | {sum(cost[name]):,} | {sum(cost[name]) / base:.2f} | {sum(seconds[name]):.0f} | "
              f"{np.median(m):.3g} / {np.quantile(m, 0.9):.3g} / {m.max():.3g} | "
              f"{statistics.median(nw):.3g} / {max(nw):.3g} |")


if __name__ == "__main__":
    main()
