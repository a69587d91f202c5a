"""Benchmark: the infinite-width cnn-gap NNGP + NTK of N digits images (8×8), two ways.

- ``plain``: the recursion as one writes it from the formulas: every (N, N, H, W, H, W) pixel-pair
  covariance at once (no blocks), the SAME convolution as F.pad and a sum of k×k shifted
  slices, the closed forms over the whole tensor;
- ``genprobe``: :func:`genprobe.kernels.infinite` (blocks of pairs sized to the cache and the
  memory budget, separable filter means, in-place activations).

Each run is a fresh subprocess, so its peak resident set (``ru_maxrss``) is its own; the table
also gives the resident set before the computation (imports and data). ``plain`` needs
N² · 4096 · 8 bytes per tensor (1 GiB at N = 180), so it runs at ``--plain-n`` and genprobe is
timed at that N too (the ratio) and at ``--n``. The two must agree to 1e-12.

    python benchmarks/bench_kernels.py                          # N = 500, depth 5, plain at N = 100
    python benchmarks/bench_kernels.py --threads 1 --n 200 --plain-n 60
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SIGMA_W2, SIGMA_B2, ACTIVATION, FILTER = 2.0, 0.1, "erf", 3


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def plain(x: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unblocked recursion over full (N, N, H, W, H, W) tensors (see the module docstring)."""
    n, c, h, w = x.shape
    k = torch.einsum("ichw,jcxy->ijhwxy", x, x) / c  # (N, N, H, W, H, W)
    var = torch.einsum("ichw,ichw->ihw", x, x) / c  # (N, H, W)
    theta = torch.zeros_like(k)
    pad = FILTER // 2
    for _ in range(depth):
        kp = F.pad(k, (pad, pad) * 4)
        tp = F.pad(theta, (pad, pad) * 4)
        vp = F.pad(var, (pad, pad) * 2)
        k_new = sum(kp[:, :, a:a + h, b:b + w, a:a + h, b:b + w] for a in range(FILTER)
                    for b in range(FILTER)) / FILTER**2 * SIGMA_W2 + SIGMA_B2
        theta = sum(tp[:, :, a:a + h, b:b + w, a:a + h, b:b + w] for a in range(FILTER)
                    for b in range(FILTER)) / FILTER**2 * SIGMA_W2 + k_new
        var = sum(vp[:, a:a + h, b:b + w] for a in range(FILTER)
                  for b in range(FILTER)) / FILTER**2 * SIGMA_W2 + SIGMA_B2
        v1 = var[:, None, :, :, None, None]
        v2 = var[None, :, None, None, :, :]
        denom = torch.sqrt((1 + 2 * v1) * (1 + 2 * v2))
        theta = theta * (4 / math.pi) / torch.sqrt(denom**2 - 4 * k_new**2)
        k = 2 / math.pi * torch.asin(2 * k_new / denom)
        var = 2 / math.pi * torch.asin(2 * var / (1 + 2 * var))
    nngp = k.mean(dim=(2, 3, 4, 5)) * SIGMA_W2 + SIGMA_B2
    return nngp, nngp + SIGMA_W2 * theta.mean(dim=(2, 3, 4, 5))


def run_one(method: str, n: int, depth: int, out: Path) -> None:
    from genprobe.data import load_dataset
    from genprobe.kernels import infinite

    x = load_dataset("digits").train.x[:n].double()  # (n, 1, 8, 8)
    before = _rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "plain":
        nngp, ntk = plain(x, depth)
        block = f"{n} × {n} (all)"
    else:
        r = infinite("cnn-gap", x, depth=depth, sigma_w2=SIGMA_W2, sigma_b2=SIGMA_B2,
                     activation=ACTIVATION, filter_size=FILTER, device="cpu")
        nngp, ntk = r.nngp, r.ntk
        block = f"{r.batch_size} × {r.column_batch}"
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    torch.save({"nngp": nngp, "ntk": ntk}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"method": method, "n": n, "wall_s": wall, "cpu_s": cpu,
                               "peak_rss_mib": peak, "rss_before_mib": before, "block": block}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="images for the genprobe run")
    ap.add_argument("--plain-n", type=int, default=100, help="images for the plain comparison")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_one(args.child, args.child_n, args.depth, Path(args.out))
        return
    runs = [("plain", args.plain_n), ("genprobe", args.plain_n), ("genprobe", args.n)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, n) in enumerate(runs):
            out = Path(tmp) / f"{i}.json"
            subprocess.run([sys.executable, __file__, "--child", method, "--child-n", str(n),
                            "--depth", str(args.depth), "--threads", str(args.threads),
                            "--out", str(out)], check=True)
            res = json.loads(out.read_text())
            res["kernels"] = torch.load(out.with_suffix(".pt"), weights_only=True)
            results.append(res)
    ref, same_n = results[0], results[1]
    diff = max(float((same_n["kernels"][q] - ref["kernels"][q]).abs().max()
                     / ref["kernels"][q].abs().max()) for q in ("nngp", "ntk"))
    print(f"\ncnn-gap NNGP + NTK, digits 8×8, depth {args.depth}, {ACTIVATION}, σ_w² = {SIGMA_W2}, "
          f"σ_b² = {SIGMA_B2}, torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}\n")
    print("| method | N | block (rows × columns) | wall (s) | CPU (s) | RSS before (MiB) | "
          "peak RSS (MiB) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for res in results:
        print(f"| {res['method']} | {res['n']} | {res['block']} | {res['wall_s']:.2f} | "
              f"{res['cpu_s']:.2f} | {res['rss_before_mib']:.0f} | {res['peak_rss_mib']:.0f} |")
    print(f"\nat N = {args.plain_n}: genprobe {ref['wall_s'] / same_n['wall_s']:.1f}× faster than "
          f"plain, peak RSS {ref['peak_rss_mib'] - ref['rss_before_mib']:.0f} → "
          f"{same_n['peak_rss_mib'] - same_n['rss_before_mib']:.0f} MiB above the start; "
          f"max relative difference {diff:.1e}")
    if diff > 1e-12:
        print(f"\nWARNING: genprobe disagrees with plain (max relative difference {diff:.2e})")


if __name__ == "__main__":
    main()
