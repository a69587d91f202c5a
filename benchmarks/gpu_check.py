"""One prepared device check (issue #24): the CUDA tests, then each benchmark's GPU case.

    python benchmarks/gpu_check.py OUT_DIR              # on a CUDA machine: under 8 min on an H100/H200
    python benchmarks/gpu_check.py OUT_DIR --dry-run    # the same code on the CPU, tiny sizes (< 1 min)

1. Prints the device as torch names it, the torch, CUDA and cuDNN versions and the TF32 settings.
2. Runs ``pytest -m cuda tests/test_cuda.py`` with ``GENPROBE_TEST_DEVICE`` set to the device
   (``cpu`` in the dry run); the transfer tests' counts land in OUT_DIR/transfers/.
3. Runs each case, each in its own process under a time limit, reusing the benchmark scripts'
   plain implementations and set-ups (bench_stiffness.py, bench_ntk.py, bench_ablation.py,
   bench_robustness.py, bench_criticality.py), every method on the device, one after the other,
   after an untimed warm-up of each on a few examples (CUDA and cuDNN initialization):

   =========== ==================================================== =================================
   case        genprobe                                             plain (the ratio's denominator)
   =========== ==================================================== =================================
   stiffness   ``gram`` (auto) of ResNet-18 CIFAR, N = 256           the per-example loop; also
                                                                    ``vmap(grad)``
   ntk         ``gram(of="outputs")``, CIFAR ResNet-8, N = 64, K=10  the per-output loop; also
                                                                    ``vmap(jacrev)``
   ablation    ``gp.ablation``: 3 stages × 21 levels × 5 orders,     the forward-hook loop (batch
               2,000 CIFAR-sized images                             1,000)
   robustness  ``gp.robustness``: the map of a CIFAR ResNet-8,       deepcopy + load + full forward
               19 modules × 7 columns, 2,000 images                 per cell (batch 1,000)
   criticality ``gp.criticality`` of all 19 modules of a ResNet-8,   the grid protocol, timed on 110
               2,000 CIFAR-sized images                             literal evaluations and
                                                                    extrapolated × 1,210 × 19
   =========== ==================================================== =================================

   Each result is checked against the plain one (a disagreement is a failure) and timed; the
   ratio is plain time / genprobe time, against the issue's goals (Gram ≥ 50×, eNTK ≥ 30×,
   ablation ≥ 15×, robustness ≥ 5×, criticality ≥ 10×).
4. Writes OUT_DIR/gpu_check.md (one section to paste into benchmarks/RESULTS.md) and
   OUT_DIR/gpu_check.json (the raw numbers), logs in OUT_DIR/logs/. Exit code 0 when the tests
   passed and every case ran and agreed; 1 when anything failed (a test, an error, a time-out, a
   disagreement; a goal not met is a result, not a failure); 2 when the device is missing. A
   failing case does not stop the others.

FLOPs and the fraction of peak. Grams (stiffness, eNTK): the work any method forming
per-example gradients does at least — one forward and the backward pass(es) over the N
examples (K backward passes for the eNTK), counted with ``torch.utils.flop_counter.
FlopCounterMode`` on a CPU copy at 2 examples and scaled to N (exactly linear), plus the Gram
product 2·(N·K')²·P by formula — the same numerator for every method. Variants cases: what each
method executes — the plain loops by formula (forward passes × examples × the forward FLOPs per
example, counted the same way); genprobe counted with FlopCounterMode over a second, untimed run
of the same call on the device (skipped, and said so, when the timed run took over 20 s). Only
matmuls and convolutions are counted: the dominant products. The peak comes from NVIDIA's
datasheets (:data:`PEAKS`), looked up by torch's device name ("unknown" otherwise): FP32 (CUDA
cores) and TF32 tensor cores (dense: the datasheet's sparse figure halved). Both fractions are
given; torch's TF32 settings are recorded (by default cuDNN convolutions may use TF32, matmuls
not), and left as torch sets them, for every method alike.

Sizing (under 8 minutes on an H100/H200). Every step runs under a time limit (:data:`LIMITS`)
and the whole run under a budget of 450 s: a case that would start with less than 20 s left is
not started (reported as failed). The sizes are the issue's (stiffness N = 256 on ResNet-18,
eNTK N = 64, K = 10) and the CPU benchmarks' (2,000 images); the limits leave 3–10× headroom over
these estimates, from the work counted as above and per-call costs (a GPU's forward or backward
of a small network at batch 1 is launch-bound: ~5–10 µs per kernel, ~1–4 ms per pass):
stiffness — the per-example loop's 256 forward+backward passes of ResNet-18 at batch 1
(~2–4 ms each) plus an 11.5 GB matrix of rows and its 1.5 TFLOP product: ~1–3 s; genprobe:
~2.3 TFLOP, seconds; vmap(grad) recomputes the per-example gradients across blocks (~7× at the
default 8 GiB budget): ~5–15 s; eNTK — 64 forwards and 640 backward passes of
ResNet-8 (~1 ms each): ~1 s; ablation — the hook loop's 315 forwards of 2,000 images of a
width-32 ResNet-8 (~0.2 TFLOP each, 63 TFLOP): ~10 s at 10% of the FP32 peak; robustness — 133
cells × (deepcopy + a 0.05 TFLOP forward): ~2–5 s; criticality — 110 literal evaluations of
0.05 TFLOP (~1 s) and genprobe's ~4,400 evaluations (measured on the CPU for this network on 8×8
inputs), in rounds of stacked variants: the least certain estimate, hence the longest limit
(120 s). The tests: ~140 tiny cases on both devices, 25 s single-threaded on a 2-core CPU here;
150 s limit. Each case's process also starts torch and CUDA (~5–10 s).

The dry run (``--dry-run``) runs all of it on the CPU with tiny sizes (:data:`SIZES`) and the
same code, the tests beside the cases (:data:`SIDE_BY_SIDE`): tests/test_gpu_check.py runs it
and checks the output's format, so the script cannot rot where no GPU is lent. It installs
nothing and downloads nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

CASES = ("stiffness", "ntk", "ablation", "robustness", "criticality")
TITLES = {
    "stiffness": "stiffness Gram",
    "ntk": "empirical NTK",
    "ablation": "cumulative ablation",
    "robustness": "robustness map",
    "criticality": "criticality",
}
GOALS = {"stiffness": 50.0, "ntk": 30.0, "ablation": 15.0, "robustness": 5.0, "criticality": 10.0}
"""The issue's goals: genprobe's speed-up over the plain implementation on a GPU."""

SIZES = {
    "gpu": {
        "stiffness": dict(arch="resnet18", n=256),
        "ntk": dict(arch="resnet", n=64),
        "ablation": dict(input="cifar", n=2000, depth=8, width=32, orders=5, steps=20, batch=1000),
        "robustness": dict(
            arch="resnet", input="cifar", n=2000, epochs=5, depth=8, width=16, batch=1000
        ),
        "criticality": dict(
            n=2000,
            epochs=4,
            input="cifar",
            samples=10,
            valley="search",
            refine=0,
            rtol=0.1,
            plain_evals=110,
            modules=None,
        ),
    },
    "dry": {
        "stiffness": dict(arch="small", n=4),
        "ntk": dict(arch="resnet", n=2),
        "ablation": dict(input="digits", n=16, depth=8, width=8, orders=1, steps=2, batch=8),
        "robustness": dict(arch="fcn", input="digits", n=16, epochs=1, depth=1, width=8, batch=8),
        "criticality": dict(
            n=16,
            epochs=1,
            input="digits",
            samples=2,
            valley="search",
            refine=0,
            rtol=0.5,
            plain_evals=2,
            modules="head",
        ),
    },
}
"""The cases' sizes: the GPU run's, and the dry run's (tiny: seconds on a 2-core CPU, where
each case's process also uses one thread: the machine is shared, and two threads contending
with other work made the same tiny case take 3-4 times as long)."""

LIMITS = {
    "gpu": {
        "tests": 150,
        "stiffness": 90,
        "ntk": 60,
        "ablation": 75,
        "robustness": 60,
        "criticality": 120,
    },
    "dry": {
        "tests": 120,
        "stiffness": 60,
        "ntk": 60,
        "ablation": 60,
        "robustness": 60,
        "criticality": 60,
    },
}
"""Seconds each step may take before it is stopped and recorded as failed."""
BUDGET = {"gpu": 450.0, "dry": 300.0}
"""Seconds for the whole run: a case is not started with less than :data:`MIN_START` left."""
MIN_START = {"gpu": 20.0, "dry": 10.0}
SIDE_BY_SIDE = {"gpu": False, "dry": True}
"""Whether the tests run beside the cases: in the dry run (one thread each: this machine's two
cores), not in the GPU run, where nothing else may run while a case is timed."""
COUNT_LIMIT = 20.0
"""A variants case's FLOPs are counted by an extra untimed run only when the timed one took less."""

PEAKS = [  # (substring of torch's device name, model, FP32 TFLOP/s, TF32 tensor-core TFLOP/s dense)
    ("H100 NVL", "H100 NVL", 60.0, 417.5),  # datasheet: TF32 835 with sparsity
    ("H100 PCIe", "H100 PCIe", 51.0, 378.0),  # datasheet: TF32 756 with sparsity
    ("H100", "H100 SXM", 67.0, 494.5),  # datasheet: TF32 989 with sparsity
    ("H200 NVL", "H200 NVL", 60.0, 417.5),  # datasheet: TF32 835 with sparsity
    ("H200", "H200 SXM", 67.0, 494.5),  # datasheet: TF32 989 with sparsity
]
"""Peak throughput of known devices, from NVIDIA's H100 and H200 datasheets (FP32 on CUDA cores;
TF32 on tensor cores without sparsity, i.e. the datasheet's starred sparse figure halved). The
first entry whose name occurs in torch's device name applies; "H100" alone is the SXM part."""


# ----------------------------------------------------------------------------- helpers


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(fn(), wall seconds), the device synchronized before and after."""
    sync(device)
    began = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - began


def say(message: str) -> None:
    print(message, flush=True)


def counted_flops(fn) -> tuple[object, float]:
    """(fn(), the FLOPs of its matmuls and convolutions by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, float(counter.get_total_flops())


def per_example_flops(model, x, *, backward: str | None = None, y=None) -> float:
    """FLOPs per example of a forward (and, with `backward`, the backward pass of the summed
    loss ("loss") or the K backward passes of the summed outputs ("outputs")), counted on a CPU
    copy of `model` at 2 examples (the count is linear in the batch)."""
    m = copy.deepcopy(model).cpu().eval()
    xs = x[:2].detach().cpu()
    params = [p.requires_grad_(True) for p in m.parameters()]

    def run():
        with torch.set_grad_enabled(backward is not None):
            out = m(xs)
            if backward == "loss":
                torch.autograd.grad(
                    torch.nn.functional.cross_entropy(out, y[:2].cpu(), reduction="sum"), params
                )
            elif backward == "outputs":
                for k in range(out.shape[1]):
                    torch.autograd.grad(out[:, k].sum(), params, retain_graph=k < out.shape[1] - 1)

    return counted_flops(run)[1] / len(xs)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def relative_difference(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


# ----------------------------------------------------------------------------- cases


def case_stiffness(size: dict, device: str) -> dict:
    """The stiffness Gram (loss gradients) of N examples: per-example loop, vmap(grad), genprobe."""
    import bench_stiffness as S

    from genprobe.engine.grams import gram

    model, state, x, y = S._setup(size["arch"], size["n"], device)
    p, n = parameter_count(model), len(x)
    for impl in ("vmap", "auto"):  # warm-up on 4 examples
        gram(model, state, x[:4], y1=y[:4], implementation=impl, device=device)
    S.naive(model, x[:4], y[:4])
    loop, t_loop = timed(lambda: S.naive(model, x, y), device)
    say(f"per-example loop: {t_loop:.2f} s")
    vm, t_vmap = timed(
        lambda: gram(model, state, x, y1=y, implementation="vmap", device=device), device
    )
    say(f"vmap(grad): {t_vmap:.2f} s")
    ours, t_ours = timed(
        lambda: gram(model, state, x, y1=y, implementation="auto", device=device), device
    )
    say(f"genprobe: {t_ours:.2f} s ({ours.implementation})")
    diff = max(relative_difference(ours.matrix, loop), relative_difference(vm.matrix, loop))
    flops = n * per_example_flops(model, x, backward="loss", y=y) + 2.0 * n * n * p
    return dict(
        size=f"ResNet-{18 if size['arch'] == 'resnet18' else 8} CIFAR ({p / 1e6:.2f}M parameters), N = {n}",
        genprobe=dict(label=f"gram (route {ours.implementation})", seconds=t_ours, flops=flops),
        plain=dict(label="per-example loop", seconds=t_loop, flops=flops),
        others=[dict(label="vmap(grad)", seconds=t_vmap, flops=flops)],
        flops_what="one forward + backward over the N examples (counted) + the Gram product 2·N²·P",
        check=dict(
            what="max |ΔG| / max |G| vs the per-example loop (genprobe and vmap)",
            value=diff,
            limit=2e-2,
        ),
    )


def case_ntk(size: dict, device: str) -> dict:
    """The (N, N, K, K) empirical NTK: per-output loop, vmap(jacrev), genprobe (and traced)."""
    import bench_ntk as N

    from genprobe.engine.grams import gram
    from genprobe.params import state_of

    model = N._model(size["arch"]).to(device)
    x = torch.randn(size["n"], 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    state = state_of(model)
    p, n = parameter_count(model), len(x)
    N.loop_ntk(model, x[:1])  # warm-up
    N.vmap_ntk(model, x[:2])
    for traced in (False, True):
        gram(model, state, x[:2], of="outputs", trace_outputs=traced, device=device)
    loop, t_loop = timed(lambda: N.loop_ntk(model, x), device)
    say(f"per-output loop: {t_loop:.2f} s")
    vm, t_vmap = timed(lambda: N.vmap_ntk(model, x), device)
    say(f"vmap(jacrev): {t_vmap:.2f} s")
    ours, t_ours = timed(lambda: gram(model, state, x, of="outputs", device=device), device)
    say(f"genprobe: {t_ours:.2f} s ({ours.implementation})")
    traced, t_traced = timed(
        lambda: gram(model, state, x, of="outputs", trace_outputs=True, device=device), device
    )
    k = loop.shape[-1]
    diff = max(
        relative_difference(ours.matrix, loop),
        relative_difference(vm, loop),
        relative_difference(traced.matrix, loop.diagonal(dim1=-2, dim2=-1).mean(-1)),
    )
    flops = n * per_example_flops(model, x, backward="outputs") + 2.0 * (n * k) ** 2 * p
    return dict(
        size=f"CIFAR ResNet-8 ({p / 1e3:.0f}k parameters), N = {n}, K = {k}",
        genprobe=dict(
            label=f"gram(of='outputs') (route {ours.implementation})", seconds=t_ours, flops=flops
        ),
        plain=dict(label="per-output loop", seconds=t_loop, flops=flops),
        others=[
            dict(label="vmap(jacrev)", seconds=t_vmap, flops=flops),
            dict(label="genprobe traced kernel (N, N)", seconds=t_traced, flops=None),
        ],
        flops_what="one forward + K backward passes over the N examples (counted) + 2·(N·K)²·P",
        check=dict(
            what="max |ΔΘ| / max |Θ| vs the per-output loop (genprobe, traced, vmap)",
            value=diff,
            limit=2e-2,
        ),
    )


def _engine_flops(fn, seconds: float, device: str) -> float | None:
    """FLOPs of a second, untimed run of `fn` (None when the timed run took over COUNT_LIMIT)."""
    if seconds > COUNT_LIMIT:
        say(f"FLOPs not counted: the timed run took {seconds:.1f} s > {COUNT_LIMIT:.0f} s")
        return None
    return counted_flops(fn)[1]


def case_ablation(size: dict, device: str) -> dict:
    """The cumulative ablation sweep (bench_ablation.py): gp.ablation vs the forward-hook loop."""
    import bench_ablation as A
    from bench_robustness import make_subject

    import genprobe as gp

    subject = make_subject(size["input"], size["n"], 2, size["depth"], size["width"])
    sites = A.stage_sites(subject.model)
    options = dict(layers=sites, orders=size["orders"], steps=size["steps"], device=device)
    warm = make_subject(size["input"], 8, 2, size["depth"], size["width"])
    A.hook_sweep(warm, gp.ablation(warm, **(options | dict(orders=1, steps=2))), 8, device)
    result, t_ours = timed(lambda: gp.ablation(subject, **options), device)
    say(f"genprobe: {t_ours:.2f} s ({result.meta['engine']})")
    plain, t_plain = timed(lambda: A.hook_sweep(subject, result, size["batch"], device), device)
    say(f"hook loop: {t_plain:.2f} s")
    worst = max(
        abs(r.accuracy - plain[r.layer, r.order_id, int(r.k)]) for r in result.table.itertuples()
    )
    points = len(result.table)
    forward = per_example_flops(subject.model, subject.test.x)
    return dict(
        size=f"ResNet-8 width {size['width']}, N = {size['n']} {size['input']}-sized, {len(sites)} stages × "
        f"{size['steps'] + 1} levels × {size['orders']} orders = {points} points",
        genprobe=dict(
            label=f"gp.ablation ({result.meta['engine']})",
            seconds=t_ours,
            flops=_engine_flops(lambda: gp.ablation(subject, **options), t_ours, device),
        ),
        plain=dict(
            label=f"forward-hook loop, batch {size['batch']}",
            seconds=t_plain,
            flops=points * size["n"] * forward,
        ),
        others=[],
        flops_what="executed: genprobe counted over a second run; the loop = points × N × forward",
        check=dict(what="max |Δ accuracy| over the points", value=worst, limit=5.0 / size["n"]),
    )


def case_robustness(size: dict, device: str) -> dict:
    """The full robustness map (bench_robustness.py): gp.robustness vs deepcopy + load + forward."""
    import bench_robustness as R

    import genprobe as gp

    subject = R.make_subject(
        size["input"], size["n"], size["epochs"], size["depth"], size["width"], arch=size["arch"]
    )
    warm = R.make_subject(size["input"], 8, 1, size["depth"], size["width"], arch=size["arch"])
    gp.robustness(warm, draws=1, device=device)
    R.naive_map(warm, 8, device)
    result, t_ours = timed(lambda: gp.robustness(subject, draws=1, device=device), device)
    say(f"genprobe: {t_ours:.2f} s ({result.meta['engine']})")
    plain, t_plain = timed(lambda: R.naive_map(subject, size["batch"], device), device)
    say(f"plain loop: {t_plain:.2f} s")
    d_error = max(abs(r.error - plain[r.module, r.target][0]) for r in result.table.itertuples())
    d_loss = max(abs(r.loss - plain[r.module, r.target][1]) for r in result.table.itertuples())
    cells = len(plain)
    forward = per_example_flops(subject.model, subject.test.x)
    return dict(
        size=f"{size['arch']} depth {size['depth']} width {size['width']}, N = {size['n']} {size['input']}-sized, "
        f"{len(subject.units())} modules × "
        f"{len(subject.checkpoints) + 1} columns = {cells} cells",
        genprobe=dict(
            label=f"gp.robustness ({result.meta['engine']})",
            seconds=t_ours,
            flops=_engine_flops(
                lambda: gp.robustness(subject, draws=1, device=device), t_ours, device
            ),
        ),
        plain=dict(
            label=f"deepcopy + load + forward per cell, batch {size['batch']}",
            seconds=t_plain,
            flops=cells * size["n"] * forward,
        ),
        others=[],
        flops_what="executed: genprobe counted over a second run; the loop = cells × N × forward",
        check=dict(
            what="max |Δ error| (limit 5/N) and |Δ loss| (limit 1e-2) over the cells",
            value=max(d_error, d_loss),
            limit=max(5.0 / size["n"], 1e-2),
            passed=d_error <= 5.0 / size["n"] and d_loss <= 1e-2,
        ),
    )


def case_criticality(size: dict, device: str) -> dict:
    """Module criticality (bench_criticality.py) on CIFAR-sized inputs: gp.criticality vs the
    grid protocol, timed on `plain_evals` literal evaluations and extrapolated (× 1,210 × modules)."""
    import bench_criticality as C

    import genprobe as gp

    shape = C.SHAPES[size["input"]]
    subject = C.make_subject(size["epochs"], shape=shape, n=size["n"], device=device)
    units = subject.units(size["modules"])
    trained = gp.evaluate(subject.model, subject.final, subject.train)
    options = dict(
        loss="error",
        samples=size["samples"],
        seed=0,
        valley=size["valley"],
        refine=size["refine"],
        rtol=size["rtol"],
        device=device,
        modules=size["modules"],
    )
    warm = C.make_subject(1, shape=shape, n=16, device=device)
    gp.criticality(warm, **(options | dict(samples=2, modules="head")))
    ours, t_ours = timed(lambda: gp.criticality(subject, **options), device)
    say(f"genprobe: {t_ours:.2f} s, {int(ours.summary['evaluations'])} evaluations")
    data = tuple(t.to(device) for t in subject.train)
    unit = units[0]
    points = [
        (a, s, r)
        for a in range(len(C.ALPHAS))
        for s in range(len(C.SIGMAS))
        for r in range(C.DRAWS)
    ][-size["plain_evals"] :]
    C.plain_evaluation(subject, unit, *points[0], device, data)  # warm-up
    _, t_fraction = timed(
        lambda: [C.plain_evaluation(subject, unit, *p, device, data) for p in points], device
    )
    per_eval = t_fraction / len(points)
    grid = len(C.ALPHAS) * len(C.SIGMAS) * C.DRAWS
    t_plain = per_eval * grid * len(units)
    say(f"plain: {per_eval * 1000:.1f} ms per evaluation, {t_plain:.1f} s extrapolated")
    forward = per_example_flops(subject.model, subject.train.x)
    check = ours.self_check
    epsilon = ours.summary["epsilon"] - (trained.error + 0.01)
    return dict(
        size=f"ResNet-8 width 16, N = {size['n']} {tuple(shape)} inputs, {len(units)} modules, "
        f"samples = {size['samples']}, valley = {size['valley']}, refine = {size['refine']}, "
        f"rtol = {size['rtol']}",
        genprobe=dict(
            label=f"gp.criticality ({int(ours.summary['evaluations'])} evaluations)",
            seconds=t_ours,
            flops=_engine_flops(lambda: gp.criticality(subject, **options), t_ours, device),
        ),
        plain=dict(
            label=f"grid protocol, extrapolated from {len(points)} literal evaluations × "
            f"{grid:,} × {len(units)}",
            seconds=t_plain,
            flops=grid * len(units) * size["n"] * forward,
        ),
        others=[],
        flops_what="executed: genprobe counted over a second run; the grid = evaluations × N × forward",
        check=dict(
            what="genprobe's self-check (valley at α = 1, σ = 0 equals the trained loss) and ε",
            value=abs(epsilon),
            limit=1e-9,
            passed=bool(check.get("passed")) and abs(epsilon) < 1e-9,
        ),
    )


CASE_FUNCTIONS = {
    "stiffness": case_stiffness,
    "ntk": case_ntk,
    "ablation": case_ablation,
    "robustness": case_robustness,
    "criticality": case_criticality,
}


def run_child(case: str, mode: str, device: str, out: Path) -> int:
    """The body of one case's process: run it, write its JSON (with the error, if any)."""
    if mode == "dry":
        torch.set_num_threads(1)
    began = time.perf_counter()
    try:
        result = CASE_FUNCTIONS[case](SIZES[mode][case], device)
        result["error"] = None
    except Exception as exc:  # noqa: BLE001 - recorded, and the parent goes on with the others
        traceback.print_exc()
        result = {
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        }
    result["seconds"] = time.perf_counter() - began
    out.write_text(json.dumps(result, indent=1))
    return 0 if result["error"] is None else 1


# ----------------------------------------------------------------------------- the parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    """What torch says about `device`, the versions, the TF32 settings and the known peak."""
    info = {
        "requested": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "name": None,
        "error": None,
    }
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            info["error"] = (
                f"device {device!r} asked for, but CUDA is not available (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda})"
            )
        else:
            props = torch.cuda.get_device_properties(dev)
            info |= {
                "name": torch.cuda.get_device_name(dev),
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
    else:
        info["name"] = f"{dev.type} ({cpu_name()}, {os.cpu_count()} logical cores)"
    info["peak"] = peak_of(info["name"] or "")
    return info


def peak_of(name: str) -> dict:
    for key, model, fp32, tf32 in PEAKS:
        if key in name:
            return {
                "model": model,
                "fp32_tflops": fp32,
                "tf32_tflops": tf32,
                "source": f"NVIDIA {model.split()[0]} datasheet",
            }
    return {"model": "unknown", "fp32_tflops": None, "tf32_tflops": None, "source": None}


SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)")


def run_tests(device: str, out: Path, limit: float) -> dict:
    """``pytest -m cuda tests/test_cuda.py`` with the device variable set; its summary."""
    transfers = out / "transfers"
    transfers.mkdir(parents=True, exist_ok=True)
    (transfers / "transfers.jsonl").unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_cuda.py",
        "-q",
        "-rfEX",
        "-p",
        "no:cacheprovider",
    ]
    env = os.environ | {"GENPROBE_TEST_DEVICE": device, "GENPROBE_TEST_REPORT_DIR": str(transfers)}
    log = out / "logs" / "tests.log"
    began = time.perf_counter()
    result = {
        "command": " ".join(["GENPROBE_TEST_DEVICE=" + device, "pytest", *command[3:]]),
        "device": device,
        "exit_code": None,
        "error": None,
        "counts": {},
        "failed_tests": [],
    }
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=limit
            )
        result["exit_code"] = proc.returncode
    except subprocess.TimeoutExpired:
        result["error"] = f"timed out after {limit:.0f} s"
    result["seconds"] = round(time.perf_counter() - began, 1)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if SUMMARY.search(line)), "")
    result["summary"] = summary.strip("= ")
    for count, what in SUMMARY.findall(summary):
        result["counts"][what.rstrip("s") if what.startswith("error") else what] = int(count)
    result["failed_tests"] = [
        line.split(" ", 1)[1] for line in lines if line.startswith(("FAILED ", "ERROR ", "XPASS "))
    ][:50]
    result["transfers"] = (
        [
            json.loads(line)
            for line in (transfers / "transfers.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (transfers / "transfers.jsonl").exists()
        else []
    )
    if result["error"] is None and result["exit_code"] != 0:
        result["error"] = (
            f"pytest exited {result['exit_code']}: {result['summary'] or 'see logs/tests.log'}"
        )
    if result["error"] is None and not result["counts"].get("passed"):
        result["error"] = (
            f"no test passed ({result['summary'] or 'no summary'}): skipped on this device?"
        )
    result["ok"] = result["error"] is None
    return result


def run_case(case: str, mode: str, device: str, out: Path, limit: float) -> dict:
    """One case in its own process under `limit` seconds; its JSON, or the error."""
    raw = out / "cases" / f"{case}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.unlink(missing_ok=True)
    log = out / "logs" / f"{case}.log"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        str(out),
        "--case",
        case,
        "--mode",
        mode,
        "--device",
        device,
        "--json",
        str(raw),
    ]
    began = time.perf_counter()
    error = None
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit
            )
        if proc.returncode != 0 and not raw.exists():
            error = f"exited {proc.returncode}: " + _last_line(log)
    except subprocess.TimeoutExpired:
        error = f"timed out after {limit:.0f} s (the case's limit)"
    result = json.loads(raw.read_text()) if raw.exists() and error is None else {}
    result["error"] = error or result.get("error")
    result["wall_s"] = round(time.perf_counter() - began, 1)
    return result


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def finish_case(case: str, result: dict, peak: dict) -> dict:
    """Ratio, goal, fractions of peak, and the agreement check turned into an error."""
    result |= {"name": case, "title": TITLES[case], "goal": GOALS[case], "ratio": None, "met": None}
    if result.get("error") is None:
        ours, plain = result["genprobe"], result["plain"]
        result["ratio"] = plain["seconds"] / ours["seconds"]
        result["met"] = result["ratio"] >= GOALS[case]
        for method in [ours, plain, *result.get("others", [])]:
            method["of_peak"] = {
                p: (
                    method["flops"] / method["seconds"] / (peak[f"{p}_tflops"] * 1e12)
                    if method.get("flops") and peak[f"{p}_tflops"]
                    else None
                )
                for p in ("fp32", "tf32")
            }
        check = result["check"]
        passed = check.get("passed", check["value"] <= check["limit"])
        check["passed"] = bool(passed)
        if not passed:
            result["error"] = (
                f"genprobe disagrees with the plain implementation: {check['what']} = "
                f"{check['value']:.3g} > {check['limit']:.3g}"
            )
    result["ok"] = result.get("error") is None
    return result


# ----------------------------------------------------------------------------- the report


def _seconds(s: float | None) -> str:
    return "—" if s is None else (f"{s:.3g}" if s < 10 else f"{s:.1f}")


def _percent(x: float | None) -> str:
    return "—" if x is None else (f"{100 * x:.2g}%")


def _flops(method: dict) -> str:
    return "—" if not method.get("flops") else f"{method['flops']:.2e}"


def _peaks(method: dict) -> str:
    of = method.get("of_peak") or {}
    if not of or (of.get("fp32") is None and of.get("tf32") is None):
        return "—"
    return f"{_percent(of.get('fp32'))} / {_percent(of.get('tf32'))}"


def markdown(report: dict) -> str:
    dev, tests, dry = report["device"], report["tests"], report["mode"] == "dry"
    peak = dev["peak"]
    title = dev["name"] or dev["requested"]
    lines = [
        f"## GPU check{' (dry run on the CPU: tiny sizes, not GPU numbers)' if dry else ''}: "
        f"{title} ({report['date']})",
        "",
    ]
    lines.append(
        f"`python benchmarks/gpu_check.py OUT_DIR{' --dry-run' if dry else ''}`: device "
        f"**{dev['name'] or 'none'}** (as torch names it)"
        + (
            f", compute capability {dev['capability']}, {dev['memory_gib']} GiB"
            if dev.get("capability")
            else ""
        )
        + f"; torch {dev['torch']}, CUDA {dev['cuda'] or '—'}, cuDNN {dev['cudnn'] or '—'}; TF32: "
        f"matmul {'on' if dev['tf32_matmul'] else 'off'}, cuDNN convolutions "
        f"{'on' if dev['tf32_cudnn'] else 'off'} (left as torch sets them); peak: "
        + (
            f"{peak['model']} ({peak['source']}), FP32 {peak['fp32_tflops']:g} TFLOP/s, TF32 tensor "
            f"cores {peak['tf32_tflops']:g} TFLOP/s dense"
            if peak["fp32_tflops"]
            else "unknown"
        )
        + f". Whole run {report['seconds']:.0f} s."
    )
    if dev.get("error"):
        lines += ["", f"**Device missing**: {dev['error']}."]
    lines.append("")
    if tests:
        counts = ", ".join(f"{v} {k}" for k, v in tests["counts"].items()) or "no summary"
        lines.append(
            f"**CUDA tests** (`{tests['command']}`): {counts}; exit {tests['exit_code']}; "
            f"{tests['seconds']:.0f} s."
            + (f" **Failed**: {tests['error']}." if tests["error"] else "")
        )
        for name in tests["failed_tests"]:
            lines.append(f"- {name}")
        grow = [t for t in tests.get("transfers", []) if not t.get("ok")]
        if tests.get("transfers"):
            lines.append("")
            lines.append(
                f"Host–device traffic (transfer tests): {len(tests['transfers']) - len(grow)} of "
                f"{len(tests['transfers'])} inner loops add nothing but the allowed copies"
                + ("." if not grow else "; growing with the inner loop:")
            )
            for t in grow:
                events = "; ".join(t["events_of_the_larger_run"][:4]) or "syncs only"
                lines.append(
                    f"- `{t['test'].split('::')[-1]}`: added {t['added']} over "
                    f"{t['units_added']} more units; {events}"
                )
        lines.append("")
    lines += [
        "| case | size | genprobe (s) | plain implementation | plain (s) | ratio | goal | met | "
        "also | FLOPs genprobe / plain | genprobe of peak (FP32 / TF32) | plain of peak (FP32 / TF32) |",
        "|---|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    failures = []
    for case in CASES:
        r = report["cases"].get(
            case, {"error": "not run", "title": TITLES[case], "goal": GOALS[case]}
        )
        if r.get("error"):
            failures.append(f"- **{r['title']}**: {r['error']}")
        if r.get("genprobe") is None:
            lines.append(
                f"| {TITLES[case]} | — | — | — | — | — | ≥ {GOALS[case]:g}× | failed | — | — | — | — |"
            )
            continue
        ours, plain = r["genprobe"], r["plain"]
        also = (
            "; ".join(
                f"vs {o['label']}: {o['seconds'] / ours['seconds']:.1f}×"
                if "genprobe" not in o["label"]
                else f"{o['label']}: {_seconds(o['seconds'])} s"
                for o in r.get("others", [])
            )
            or "—"
        )
        met = "failed" if r.get("error") else ("**met**" if r["met"] else "not met")
        lines.append(
            f"| {TITLES[case]} | {r['size']} | {_seconds(ours['seconds'])} | {plain['label']} | "
            f"{_seconds(plain['seconds'])} | {r['ratio']:.1f}× | ≥ {GOALS[case]:g}× | {met} | {also} | "
            f"{_flops(ours)} / {_flops(plain)} | {_peaks(ours)} | {_peaks(plain)} |"
        )
    lines += [
        "",
        "FLOPs: "
        + "; ".join(
            f"{TITLES[c]}: {report['cases'][c]['flops_what']}"
            for c in CASES
            if report["cases"].get(c, {}).get("flops_what")
        )
        + ". Only matmuls and convolutions count.",
    ]
    checks = [
        f"{TITLES[c]}: {r['check']['what']} = {r['check']['value']:.2g}"
        for c in CASES
        if (r := report["cases"].get(c, {})).get("check")
    ]
    if checks:
        lines += ["", "Agreement with the plain implementation: " + "; ".join(checks) + "."]
    lines += ["", "Failures: " + ("none." if not failures else "")] + failures
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_check.md, gpu_check.json and the logs")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny sizes")
    ap.add_argument("--device", default="cuda", help="the device of the GPU run (default cuda)")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=sorted(SIZES), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        return run_child(args.case, args.mode, args.device, args.json)

    mode = "dry" if args.dry_run else "gpu"
    device = "cpu" if args.dry_run else args.device
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    deadline = began + BUDGET[mode]
    info = device_info(device)
    say(
        f"device: {info['name'] or info['error']}; torch {info['torch']}, CUDA {info['cuda']}, "
        f"cuDNN {info['cudnn']}; TF32 matmul {info['tf32_matmul']}, cuDNN {info['tf32_cudnn']}; "
        f"peak {info['peak']['model']}"
    )
    report = {
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "device": info,
        "limits": LIMITS[mode],
        "budget_s": BUDGET[mode],
        "sizes": SIZES[mode],
        "tests": None,
        "cases": {},
    }
    if info["error"]:
        say(f"no device: {info['error']}")
        report["cases"] = {
            c: finish_case(c, {"error": "not run: " + info["error"]}, info["peak"]) for c in CASES
        }
    else:
        say("tests: pytest -m cuda tests/test_cuda.py ...")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        tests = pool.submit(run_tests, device, out, min(LIMITS[mode]["tests"], BUDGET[mode]))
        if not SIDE_BY_SIDE[mode]:
            tests.result()
            say(f"tests: {tests.result()['summary']} ({tests.result()['seconds']} s)")
        for case in CASES:
            left = deadline - time.perf_counter()
            if left < MIN_START[mode]:
                result = {
                    "error": f"not started: {left:.0f} s of the run's {BUDGET[mode]:.0f} s budget left"
                }
            else:
                say(f"{case} ...")
                result = run_case(case, mode, device, out, min(LIMITS[mode][case], left))
            report["cases"][case] = finish_case(case, result, info["peak"])
            r = report["cases"][case]
            say(
                f"{case}: "
                + (
                    f"failed: {r['error']}"
                    if r["error"]
                    else f"{r['ratio']:.1f}x (goal {GOALS[case]:g}x) in {r['wall_s']} s"
                )
            )
        report["tests"] = tests.result()
        pool.shutdown()
        if SIDE_BY_SIDE[mode]:
            say(f"tests: {report['tests']['summary']} ({report['tests']['seconds']} s)")
    report["seconds"] = time.perf_counter() - began
    failed = [c for c, r in report["cases"].items() if not r["ok"]]
    if report["tests"] is not None and not report["tests"]["ok"]:
        failed.insert(0, "tests")
    report["failed"] = failed
    report["exit_code"] = 2 if info["error"] else (1 if failed else 0)
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    say("\n" + text)
    say(
        f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}; "
        + ("all ran." if not failed else f"failed: {', '.join(failed)}")
    )
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
