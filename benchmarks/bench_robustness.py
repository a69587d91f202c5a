"""Benchmark: the full robustness map of a zoo network, genprobe vs the plain loop.

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

Two cases: a ResNet-8 (the default), and with ``--arch fcn`` a small MLP (the zoo's ``fcn``,
defaults depth 3 × width 256 on MNIST-shaped 784-dim inputs: 4 linear layers), where a whole
map takes a fraction of a second. There every method is run ``--repeat`` times, interleaved,
and the median is reported; before any timing one untimed forward pass warms the process up
(the first operations of a fresh process are slow here, and otherwise counted against whichever
method runs first).

    python benchmarks/bench_robustness.py            # ResNet-8, CIFAR-sized inputs (3, 32, 32), N = 2000
    python benchmarks/bench_robustness.py --input digits --n 2000
    python benchmarks/bench_robustness.py --arch fcn  # 784-256-256-256-10 MLP, N = 2000, 7 repeats
    python benchmarks/bench_robustness.py --device cuda --batch-sizes 1000   # both on the GPU
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import genprobe as gp
import genprobe.params as P
from genprobe.zoo import create_model

SHAPES = {"cifar": (3, 32, 32), "digits": (1, 8, 8), "mnist": (1, 28, 28)}


DEFAULTS = {"resnet": {"input": "cifar", "depth": 8, "width": 16, "repeat": 1},
            "fcn": {"input": "mnist", "depth": 3, "width": 256, "repeat": 7}}
"""Per architecture: input shape, depth (ResNet depth; fcn hidden layers), width, repeats."""


def make_subject(input_kind: str, n: int, epochs: int, depth: int, width: int, seed: int = 0,
                 arch: str = "resnet"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = SHAPES[input_kind]
    model = create_model(arch, input_shape=shape, num_classes=10, depth=depth, width=width)
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
def naive_map(subject, batch_size: int, device: str = "cpu") -> dict:
    """The plain loop: deepcopy + load_state_dict + full forward, per cell (the copy moved to
    `device`, the test set moved there once)."""
    cells = {}
    x, y = (t.to(device) for t in subject.test)
    for unit in subject.units():
        targets = [(str(e), s) for e, s in subject.checkpoints.items()]
        targets.append(("rerandomize", P.rerandomize(subject.model, subject.final, unit, 0)))
        for name, source in targets:
            model = copy.deepcopy(subject.model).to(device)
            model.load_state_dict(P.replace(subject.final, source, unit.params))
            model.eval()
            logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
            cells[unit.name, name] = (float((logits.argmax(-1) != y).double().mean()),
                                      float(F.cross_entropy(logits.double(), y)))
    return cells


def timed(fn) -> tuple[object, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(DEFAULTS), default="resnet")
    ap.add_argument("--input", choices=sorted(SHAPES), default=None,
                    help="input shape [resnet: cifar; fcn: mnist]")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=5, help="checkpoints 0..E (E+1 columns)")
    ap.add_argument("--depth", type=int, default=None, help="[resnet: 8; fcn: 3 hidden layers]")
    ap.add_argument("--width", type=int, default=None, help="[resnet: 16; fcn: 256]")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs of each method, interleaved; the median is reported [resnet: 1; fcn: 7]")
    ap.add_argument("--batch-sizes", default="1000,128",
                    help="the plain loop's forward batch sizes, comma-separated: each is timed "
                         "(1,000: a typical choice; 128: its fastest on a 2-core CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the engine with fast=False (prefix reuse and stacking only)")
    args = ap.parse_args()
    for key, value in DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    subject = make_subject(args.input, args.n, args.epochs, args.depth, args.width, arch=args.arch)
    units = subject.units()
    n_cells = len(units) * (len(subject.checkpoints) + 1)
    with torch.no_grad():  # warm the process up: its first operations are slow
        subject.model.eval()(subject.test.x[:128])

    def ours():
        return gp.robustness(subject, draws=1, device=args.device)

    def slow():
        import functools

        import genprobe.probes.robustness as R
        from genprobe.engine.variants import VariantEvaluator

        R.VariantEvaluator = functools.partial(VariantEvaluator, fast=False)
        try:
            return ours()
        finally:
            R.VariantEvaluator = VariantEvaluator

    methods = {"ours": ours} | ({"slow": slow} if args.breakdown else {})
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for bs in batch_sizes:
        methods[bs] = lambda bs=bs: naive_map(subject, bs, args.device)
    times: dict = {name: [] for name in methods}
    outputs: dict = {}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            outputs[name], wall, cpu = timed(fn)
            times[name].append((wall, cpu))
    result = outputs["ours"]
    worst = 0.0
    for bs in batch_sizes:
        for row in result.table.itertuples():
            error, loss = outputs[bs][row.module, row.target]
            worst = max(worst, abs(row.error - error), abs(row.loss - loss))
    assert worst < 1e-5, f"genprobe and the plain loop disagree by {worst:.3g}"

    def median(name) -> tuple[float, float]:
        return (statistics.median(w for w, _ in times[name]),
                statistics.median(c for _, c in times[name]))

    size = (f"resnet depth={args.depth} width={args.width}" if args.arch == "resnet"
            else f"fcn {args.depth} hidden layers x {args.width}")
    print(f"{size}, input {SHAPES[args.input]}, {args.n} images, {len(units)} modules x "
          f"{len(subject.checkpoints) + 1} columns = {n_cells} cells; engine={result.meta['engine']}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; median of {args.repeat} run(s)")
    print()
    plains = [(bs, *median(bs)) for bs in batch_sizes]
    rows = [(f"plain loop, batch {bs} (deepcopy + load_state_dict + full forward)", wall, cpu)
            for bs, wall, cpu in plains]
    if args.breakdown:
        rows.append(("engine, fast=False (prefix reuse, stacks, repeats once)", *median("slow")))
    rows.append(("gp.robustness (variants engine)", *median("ours")))
    print("| method | wall (s) | CPU (s) | wall per cell (ms) | "
          + " | ".join(f"speed-up vs batch {bs} (wall / CPU)" for bs, _, _ in plains) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(plains))
    for name, wall, cpu in rows:
        ratios = " | ".join(f"{pw / wall:.1f}x / {pc / cpu:.1f}x" for _, pw, pc in plains)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {1000 * wall / n_cells:.2f} | {ratios} |")
    if args.repeat > 1:
        print("\nall runs, wall (s): " + "; ".join(
            f"{name}: " + ", ".join(f"{w:.3f}" for w, _ in times[name]) for name in times))
    print(f"\nmax |difference| over all cells (error, loss): {worst:.2e}")


if __name__ == "__main__":
    main()
