"""Benchmark: the empirical NTK, two ways to measure it.

``--part resnet`` — the (N, N, K, K) empirical NTK of N = 64 CIFAR-sized inputs (3×32×32,
K = 10) on the zoo's CIFAR ResNet (ResNet-8, 78k parameters; ``--arch resnet18`` for 11.2M),
three ways, each in its own subprocess (peak RSS is that method's), checked against each other:

- ``loop``: the per-output autograd loop a user writes first (one backward per example and
  output, gradients flattened into Jacobian rows, then J Jᵀ),
- ``vmap``: plain ``torch.func.vmap(jacrev(f))`` over all N examples, then the contraction,
- ``genprobe``: ``gram(..., of="outputs")`` (the layerwise engine), and ``genprobe-traced``:
  the traced kernel (mean over outputs, (N, N)), which the NTK probe computes by default,
- ``floor``: not a method but a bound: the K batched backward passes plus the one Gram product
  that any method forming per-example gradients pays at least.

``--part scale`` — the traced empirical NTK of N ``mnist`` training images (default 30,000, the
size in neural-tangents issue #30) for the zoo's default ``fcn`` (784-512-512-512-10, 932k
parameters, at initialization), streamed to disk with ``gp.ntk(out=...)``, with its full
spectrum: wall time of each phase and peak resident memory of the whole process.

    python benchmarks/bench_ntk.py --part resnet --threads 2
    python benchmarks/bench_ntk.py --part resnet --device cuda
    python benchmarks/bench_ntk.py --part scale --n 30000 --n-test 1000 --threads 2 --memory-gib 4
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

ARCHS = {"resnet": dict(width=16, depth=8), "resnet18": dict(width=64, blocks="2,2,2,2")}


def _model(arch: str):
    from genprobe.zoo import create_model

    torch.manual_seed(0)
    return create_model("resnet", (3, 32, 32), 10, **ARCHS[arch]).eval()


def loop_ntk(model, x) -> torch.Tensor:
    """One backward per (example, output): Jacobian rows, then Θ = J Jᵀ as (N, N, K, K)."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1]).reshape(-1)
        for k in range(len(out)):
            grads = torch.autograd.grad(out[k], params, retain_graph=k < len(out) - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    j = torch.stack(rows).reshape(len(x), -1, rows[0].numel())
    return torch.einsum("akp,blp->abkl", j, j).double()


def vmap_ntk(model, x) -> torch.Tensor:
    """Plain torch.func: vmap(jacrev) over all examples, then the contraction per parameter."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # {name: (N, K, *shape)}
    total = 0
    for j in jac.values():
        j = j.reshape(j.shape[0], j.shape[1], -1)
        total = total + torch.einsum("akp,blp->abkl", j, j)
    return total.double()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def floor_ntk(model, x) -> tuple[float, float]:
    """A lower bound on any method that forms per-example gradients: the K backward passes of the
    whole batch (parameter gradients of the batch sum, the same multiply-adds as the per-example
    ones, in fewer and larger products) and one (N·K, P) × (P, N·K) product, timed apart (s)."""
    params = [p.requires_grad_(True) for p in model.parameters()]
    t0 = time.perf_counter()
    out = model(x)
    for k in range(out.shape[1]):
        torch.autograd.grad(out[:, k].sum(), params, retain_graph=k < out.shape[1] - 1)
    _sync(x.device)
    backward = time.perf_counter() - t0
    j = torch.randn(len(x) * out.shape[1], sum(p.numel() for p in params),
                    generator=torch.Generator().manual_seed(0)).to(x.device)
    t0 = time.perf_counter()
    j @ j.T
    _sync(x.device)
    return backward, time.perf_counter() - t0


def run_resnet(method: str, arch: str, n: int, out: Path, device: str = "cpu") -> None:
    from genprobe.engine.grams import gram
    from genprobe.params import state_of

    model = _model(arch).to(device)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    if method == "floor":
        backward, product = floor_ntk(model, x)
        out.write_text(json.dumps({"method": method, "backward_s": backward, "product_s": product}))
        return
    _sync(device)
    t0 = time.perf_counter()
    if method == "loop":
        k = loop_ntk(model, x)
    elif method == "vmap":
        k = vmap_ntk(model, x)
    else:
        k = gram(model, state_of(model), x, of="outputs", trace_outputs=method == "genprobe-traced",
                 device=device).matrix
    _sync(device)
    wall = time.perf_counter() - t0
    torch.save(k.cpu(), out.with_suffix(".pt"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"method": method, "wall_s": wall, "peak_rss_mib": peak}))


def part_resnet(args) -> None:
    results, floor = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = Path(tmp) / f"{method}.json"
            subprocess.run([sys.executable, __file__, "--child", method, "--out", str(out), "--arch",
                            args.arch, "--n", str(args.n), "--threads", str(args.threads),
                            "--device", args.device], check=True)
            res = json.loads(out.read_text())
            if method == "floor":
                floor = res
                continue
            res["kernel"] = torch.load(out.with_suffix(".pt"), weights_only=True)
            results[method] = res
    ref = results["loop"]["kernel"] if "loop" in results else results["vmap"]["kernel"]
    scale = float(ref.abs().max())
    params = sum(p.numel() for p in _model(args.arch).parameters())
    print(f"\nCIFAR {args.arch} ({params / 1e3:.0f}k parameters), N = {args.n}, K = 10, {args.device}, torch "
          f"{torch.__version__}, threads {args.threads or torch.get_num_threads()}\n")
    print("| method | wall (s) | speed-up vs loop | vs vmap(jacrev) | peak RSS (MiB) | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, res in results.items():
        k = res["kernel"]
        expected = ref if k.dim() == 4 else ref.diagonal(dim1=-2, dim2=-1).mean(-1)
        diff = float((k - expected).abs().max()) / scale
        vs_loop = results["loop"]["wall_s"] / res["wall_s"] if "loop" in results else float("nan")
        vs_vmap = results["vmap"]["wall_s"] / res["wall_s"] if "vmap" in results else float("nan")
        print(f"| {method} | {res['wall_s']:.2f} | {vs_loop:.1f}× | {vs_vmap:.1f}× | "
              f"{res['peak_rss_mib']:.0f} | {diff:.1e} |")
    if floor is not None:
        bound = floor["backward_s"] + floor["product_s"]
        print(f"\nfloor for any method forming per-example gradients: K batched backward passes "
              f"{floor['backward_s']:.2f} s + the (N·K)² Gram product {floor['product_s']:.2f} s = "
              f"{bound:.2f} s" + (f", so at most {results['loop']['wall_s'] / bound:.1f}× the loop"
                                  if "loop" in results else ""))


def part_scale(args) -> None:
    import genprobe as gp
    from genprobe.data import load_dataset
    from genprobe.zoo import create_model

    t0 = time.perf_counter()
    data = load_dataset("mnist", seed=0)
    torch.manual_seed(0)
    model = create_model("fcn", (1, 28, 28), 10).eval()
    subject = gp.Subject(model, train=data.train, test=data.test, num_classes=10)
    t_load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        kernels = Path(args.kernel_dir) if args.kernel_dir else Path(tmp) / "kernels"
        t1 = time.perf_counter()
        r = gp.ntk(subject, n=args.n, n_test=args.n_test, out=kernels,
                   memory_budget=int(args.memory_gib * 2**30))
        total = time.perf_counter() - t1
        size = (kernels / "kernel.npy").stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    print(json.dumps({"n": args.n, "threads": torch.get_num_threads(), "load_s": round(t_load, 1),
                      "ntk_s": round(total, 1), "phases_s": r.meta.get("seconds"),
                      "kernel_file_gib": round(size / 2**30, 2), "peak_rss_gib": round(peak, 2),
                      "spectrum": r.table["spectrum"].iloc[-1], "eigenvalues": len(r.eigenvalues),
                      **{k: r.summary[k] for k in ("lambda_max", "lambda_min", "condition_number",
                                                   "max_learning_rate", "mean_prediction_accuracy")}},
                     indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("resnet", "scale"), default="resnet")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet")
    ap.add_argument("--n", type=int, default=None, help="examples (resnet: 64; scale: 30000)")
    ap.add_argument("--n-test", type=int, default=0, help="scale: test examples for the mean prediction")
    ap.add_argument("--memory-gib", type=float, default=4.0, help="scale: memory budget")
    ap.add_argument("--tmp", default=None, help="scale: folder for the kernel files")
    ap.add_argument("--kernel-dir", default=None,
                    help="scale: keep the kernel files here (a second run resumes / reuses them)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="resnet: the device every method runs on")
    ap.add_argument("--methods", default="loop,vmap,genprobe,genprobe-traced,floor")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_resnet(args.child, args.arch, args.n, Path(args.out), args.device)
    elif args.part == "resnet":
        args.n = args.n or 64
        part_resnet(args)
    else:
        args.n = args.n or 30000
        part_scale(args)


if __name__ == "__main__":
    main()
