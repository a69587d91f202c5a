"""Benchmark: a cumulative-ablation sweep, genprobe vs the plain forward-hook loop.

The sweep is the one Morcos et al. plot: for each conv stage of a ResNet (the output of its last
block, after the ReLU), 21 levels (k = 0, 5%, ..., 100% of the channels zeroed) × 5 random orders,
on N test images. The plain loop is what a user would write: one model with a forward hook on
the stage that zeroes the chosen channels, and per (stage, order, level) one full forward pass of
the whole test set, in batches of `--batch-sizes` (default 1,000 and 128). `gp.ablation` evaluates
the same points on the variants engine (the network before the stage is computed once per data
chunk; the 21 levels of an order are one stack). All run here, in the same process, one after the
other, and every point is checked to agree (accuracy to 1e-5).

The network and data are the synthetic ResNet-8 of bench_robustness.py (random weights moved
from θ⁰, random CIFAR-sized inputs): the cost of the sweep does not depend on the numbers.

    python benchmarks/bench_ablation.py                 # ResNet-8 of width 32, (3, 32, 32), N = 2000
    python benchmarks/bench_ablation.py --device cuda --batch-sizes 1000   # both methods on the GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from bench_robustness import make_subject

import genprobe as gp

STEPS, ORDERS = 20, 5


def stage_sites(model) -> list[str]:
    """The output of each stage's last block, after its ReLU."""
    names = [n for n, _ in model.named_modules() if n.endswith(".act2")]
    stages = sorted({n.split(".")[1] for n in names})
    return [max((n for n in names if n.split(".")[1] == s), key=lambda n: int(n.split(".")[2]))
            for s in stages]


@torch.no_grad()
def hook_sweep(subject, result, batch_size: int, device: str = "cpu") -> dict:
    """The plain loop: a forward hook zeroing k channels, one full forward per point (the model
    and the test set moved to `device` once)."""
    model = copy.deepcopy(subject.model).eval()
    model.load_state_dict(subject.final, strict=False)
    model.to(device)
    modules = dict(model.named_modules())
    x, y = (t.to(device) for t in subject.test)
    out = {}
    for row in result.table.itertuples():
        rank = result.tensors[f"rank/{row.layer}/{row.order_id}"][: int(row.k)]

        def zero(mod, args, h, rank=rank):
            h = h.clone()
            h[:, rank] = 0.0
            return h

        handle = modules[row.layer].register_forward_hook(zero)
        correct = 0
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
        handle.remove()
        out[row.layer, row.order_id, int(row.k)] = correct / len(y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)  # 20 levels need >= 20 channels
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1000, 128])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    subject = make_subject("cifar", args.n, 2, args.depth, args.width)
    sites = stage_sites(subject.model)
    x = subject.test.x[:8]
    with torch.no_grad():
        subject.model(x)  # warm-up: the first operations of a fresh process are slow here
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}; "
          f"ResNet-{args.depth} width {args.width}, N = {args.n}, sites {sites}, "
          f"{STEPS + 1} levels x {ORDERS} orders = {len(sites) * (STEPS + 1) * ORDERS} points")
    began = time.perf_counter()
    result = gp.ablation(subject, layers=sites, orders=ORDERS, steps=STEPS, device=args.device)
    engine = time.perf_counter() - began
    print(f"genprobe: {engine:.2f} s (engine: {result.meta['engine']})")
    for batch_size in args.batch_sizes:
        began = time.perf_counter()
        plain = hook_sweep(subject, result, batch_size, args.device)
        seconds = time.perf_counter() - began
        worst = max(abs(r.accuracy - plain[r.layer, r.order_id, int(r.k)]) for r in result.table.itertuples())
        print(f"hook loop, batch {batch_size}: {seconds:.2f} s; speed-up {seconds / engine:.1f}x; "
              f"worst accuracy difference {worst:.2g}")
        assert worst <= 1e-5 + 1.0 / args.n  # float32: an example on a decision boundary may flip


if __name__ == "__main__":
    main()
