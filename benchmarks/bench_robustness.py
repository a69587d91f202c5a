"""Benchmark: the full robustness map of a zoo ResNet, genprobe vs the plain loop.

The map is every module (default units: each module owning parameters) × every recorded
checkpoint (epochs 0..E) + one re-randomization column, on N test images. The plain loop is
what a user would write: per cell, deep-copy the model, load the edited state dict, run the
whole test set through the whole network. It is timed at each of `--batch-sizes` (default 1,000,
the usual choice, and 128, its fastest on a 2-core CPU, where big batches fault in fresh memory
for every op). genprobe's `gp.robustness` evaluates the same cells on the variants engine
(prefix reuse, stacked variants, repeated cells once, cache-sized chunks, folded BatchNorms).
All run here, in the same process, one after the other; every cell is checked to agree to 1e-5.

Checkpoints are synthetic (θ^τ = θ⁰ + τ/E · Δ with a random Δ, BatchNorm statistics moved too)
and data random: the compute of the map does not depend on what the numbers are.

    python benchmarks/bench_robustness.py            # CIFAR-sized inputs (3, 32, 32), N = 2000
    python benchmarks/bench_robustness.py --input digits --n 2000
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
import torch.nn.functional as F

import genprobe as gp
import genprobe.params as P
from genprobe.zoo import create_model

SHAPES = {"cifar": (3, 32, 32), "digits": (1, 8, 8), "mnist": (1, 28, 28)}


def make_subject(input_kind: str, n: int, epochs: int, depth: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = SHAPES[input_kind]
    model = create_model("resnet", input_shape=shape, num_classes=10, depth=depth, width=width)
    init = P.state_of(model)
    # Every tensor moves, BatchNorm's constant-initialized weight (ones) and bias (zeros) too:
    # a tensor that never moved would make its cells identical to the trained model, which the
    # engine skips and the plain loop does not — an unfair advantage a real run does not give.
    delta = {k: 0.3 * torch.randn(v.shape, generator=g) * (float(v.std()) if v.numel() > 1 and v.std() > 0 else 0.3)
             for k, v in init.items() if v.is_floating_point()}
    checkpoints = {}
    for tau in range(1, epochs + 1):
        state = dict(init)
        for k, d in delta.items():
            state[k] = init[k] + tau / epochs * d
            if k.endswith("running_var"):
                state[k] = state[k].abs() + 0.1
        checkpoints[tau] = state
    model.load_state_dict(checkpoints[epochs])
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return gp.Subject(model, init=init, checkpoints=checkpoints, test=(x, y), train=(x[:10], y[:10]))


@torch.no_grad()
def naive_map(subject, batch_size: int) -> dict:
    """The plain loop: deepcopy + load_state_dict + full forward, per cell."""
    cells = {}
    x, y = subject.test
    for unit in subject.units():
        targets = [(str(e), s) for e, s in subject.checkpoints.items()]
        targets.append(("rerandomize", P.rerandomize(subject.model, subject.final, unit, 0)))
        for name, source in targets:
            model = copy.deepcopy(subject.model)
            model.load_state_dict(P.replace(subject.final, source, unit.params))
            model.eval()
            logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
            cells[unit.name, name] = (float((logits.argmax(-1) != y).double().mean()),
                                      float(F.cross_entropy(logits.double(), y)))
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", choices=sorted(SHAPES), default="cifar")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5, help="checkpoints 0..E (E+1 columns)")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1000,128",
                    help="the plain loop's forward batch sizes, comma-separated: each is timed "
                         "(1,000: a typical choice; 128: its fastest on a 2-core CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the engine with fast=False (prefix reuse and stacking only)")
    args = ap.parse_args()

    subject = make_subject(args.input, args.n, args.epochs, args.depth, args.width)
    units = subject.units()
    n_cells = len(units) * (len(subject.checkpoints) + 1)

    t0, c0 = time.perf_counter(), time.process_time()
    result = gp.robustness(subject, draws=1, device=args.device)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0

    t_slow = None
    if args.breakdown:
        import functools

        import genprobe.probes.robustness as R
        from genprobe.engine.variants import VariantEvaluator

        R.VariantEvaluator = functools.partial(VariantEvaluator, fast=False)
        t0, c0 = time.perf_counter(), time.process_time()
        gp.robustness(subject, draws=1, device=args.device)
        t_slow, c_slow = time.perf_counter() - t0, time.process_time() - c0
        R.VariantEvaluator = VariantEvaluator

    plains, worst = [], 0.0
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        t0, c0 = time.perf_counter(), time.process_time()
        plain = naive_map(subject, bs)
        plains.append((bs, time.perf_counter() - t0, time.process_time() - c0))
        for row in result.table.itertuples():
            error, loss = plain[row.module, row.target]
            worst = max(worst, abs(row.error - error), abs(row.loss - loss))
    assert worst < 1e-5, f"genprobe and the plain loop disagree by {worst:.3g}"

    print(f"resnet depth={args.depth} width={args.width}, input {SHAPES[args.input]}, "
          f"{args.n} images, {len(units)} modules x {len(subject.checkpoints) + 1} columns "
          f"= {n_cells} cells; engine={result.meta['engine']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    rows = [(f"plain loop, batch {bs} (deepcopy + load_state_dict + full forward)", wall, cpu)
            for bs, wall, cpu in plains]
    if t_slow is not None:
        rows.append(("engine, fast=False (prefix reuse, stacks, repeats once)", t_slow, c_slow))
    rows.append(("gp.robustness (variants engine)", t_ours, c_ours))
    print("| method | wall (s) | CPU (s) | wall per cell (ms) | "
          + " | ".join(f"speed-up vs batch {bs} (wall / CPU)" for bs, _, _ in plains) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(plains))
    for name, wall, cpu in rows:
        ratios = " | ".join(f"{pw / wall:.1f}x / {pc / cpu:.1f}x" for _, pw, pc in plains)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {1000 * wall / n_cells:.1f} | {ratios} |")
    print(f"\nmax |difference| over all cells (error, loss): {worst:.2e}")


if __name__ == "__main__":
    main()
