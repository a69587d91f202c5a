"""Benchmark: the stiffness Gram of N examples on a CIFAR-sized ResNet, three ways.

- ``naive``: the per-example loop a user would write (``zero_grad``, ``backward``, flatten
  ``p.grad`` into a row; then G = F Fᵀ and the cosine),
- ``vmap``: plain ``torch.func.vmap(grad(...))`` in blocks (``implementation="vmap"``),
- ``genprobe``: the default engine (``implementation="auto"``, the layerwise route),

each in its own subprocess (so that peak RSS is that method's), on the same model, state,
inputs (random, 3×32×32 for the ResNets) and labels, and checks that they agree. Prints a
markdown table. Times include the engine's setup (choosing the route, checking its rules).

    python benchmarks/bench_stiffness.py                     # ResNet-18 (11.2M), N = 32, CPU
    python benchmarks/bench_stiffness.py --n 256 --device cuda
    python benchmarks/bench_stiffness.py --arch small --n 256  # CIFAR ResNet-8 (78k)
    python benchmarks/bench_stiffness.py --arch fcn --n 256    # MNIST MLP (932k)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {  # name: (zoo arch, input shape, options)
    "resnet18": ("resnet", (3, 32, 32), dict(width=64, blocks="2,2,2,2")),  # CIFAR ResNet-18: 11.2M
    "small": ("resnet", (3, 32, 32), dict(width=16, depth=8)),  # CIFAR ResNet-8: 78k parameters
    "fcn": ("fcn", (1, 28, 28), dict(width=512, depth=3)),  # MNIST MLP 784-512-512-512-10: 932k
}


def _setup(arch: str, n: int, device: str):
    from genprobe.params import state_of
    from genprobe.zoo import create_model

    name, shape, opts = ARCHS[arch]
    torch.manual_seed(0)
    model = create_model(name, shape, 10, **opts).eval()
    x = torch.randn(n, *shape)
    y = torch.randint(0, 10, (n,))
    return model.to(device), state_of(model), x.to(device), y.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive(model, x, y) -> torch.Tensor:
    """What a user writes first: one backward per example, gradients flattened into rows."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    feats = torch.stack(rows)
    return (feats @ feats.T).double()


def run_one(method: str, arch: str, n: int, device: str, out: Path) -> None:
    from genprobe.engine.grams import gram

    model, state, x, y = _setup(arch, n, device)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "naive":
        g = naive(model, x, y)
        impl = "loop"
    else:
        r = gram(model, state, x, y1=y, implementation="vmap" if method == "vmap" else "auto",
                 device=device)
        g, impl = r.matrix, r.implementation
    _sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.save(g.cpu(), out.with_suffix(".pt"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    out.write_text(json.dumps({"method": method, "impl": impl, "wall_s": wall, "cpu_s": cpu,
                               "peak_rss_mib": peak, "gpu_peak_mib": gpu_peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet18")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--methods", default="naive,vmap,genprobe")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the best is reported")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_one(args.child, args.arch, args.n, args.device, Path(args.out))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            best = None
            for k in range(args.repeat):
                out = Path(tmp) / f"{method}-{k}.json"
                subprocess.run([sys.executable, __file__, "--child", method, "--out", str(out),
                                "--arch", args.arch, "--n", str(args.n), "--device", args.device,
                                "--threads", str(args.threads)], check=True)
                res = json.loads(out.read_text())
                res["gram"] = torch.load(out.with_suffix(".pt"), weights_only=True)
                if best is None or res["wall_s"] < best["wall_s"]:
                    best = res
            results[method] = best
    ref = results.get("naive", next(iter(results.values())))
    scale = float(ref["gram"].abs().max())
    from genprobe.zoo import create_model

    name, shape, opts = ARCHS[args.arch]
    params = sum(p.numel() for p in create_model(name, shape, 10, **opts).parameters())
    print(f"\n{args.arch} ({params / 1e6:.2f}M parameters), N = {args.n}, device {args.device}, "
          f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}\n")
    print("| method | ran | wall (s) | CPU (s) | speed-up vs naive | peak RSS (MiB) | max rel. diff vs naive |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method, res in results.items():
        diff = float((res["gram"] - ref["gram"]).abs().max()) / scale
        speed = ref["wall_s"] / res["wall_s"]
        print(f"| {method} | {res['impl']} | {res['wall_s']:.2f} | {res['cpu_s']:.2f} | {speed:.1f}× "
              f"| {res['peak_rss_mib']:.0f} | {diff:.1e} |")
        if diff > 1e-3:
            print(f"\nWARNING: {method} disagrees with naive (max relative difference {diff:.2e})")


if __name__ == "__main__":
    main()
