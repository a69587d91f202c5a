"""Benchmark: what passing a structured input (a tuple or a mapping) costs against one tensor.

The same MLP (784-512-512-512-10, the zoo's default fcn shape) with the same weights, called three
ways on the same data: ``model(x)`` (a tensor), ``model(*(x,))`` (a one-element tuple) and
``model(**{"x": x})`` (a mapping, as a tokenizer's output is passed). Every engine slices, moves
and calls the inputs through :mod:`genprobe.inputs`; the tensor takes each function's first
branch. Times, alternating the three, the robustness probe (the variants engine: re-init of every
module to epoch 0 and one re-randomization draw), the NTK of 256 examples (the grams engine) and
``gp.evaluate``; checks that the results are identical.

    python benchmarks/bench_inputs.py --threads 1 --n 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import genprobe as gp


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                                    nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.layers(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--ntk-n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = MLP()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = torch.randn(a.n, 1, 28, 28), torch.randint(0, 10, (a.n,))
    ways = {"tensor": x, "tuple": (x,), "mapping": {"x": x}}
    subjects = {name: gp.Subject(model, init=init, train=(xs, y), test=(xs, y), num_classes=10)
                for name, xs in ways.items()}
    whats = ("robustness", "ntk", "evaluate")
    times: dict[str, dict[str, list[float]]] = {k: {w: [] for w in whats} for k in subjects}
    results: dict[str, dict] = {k: {} for k in subjects}
    for _ in range(a.repeats):
        for name, s in subjects.items():
            t = time.perf_counter()
            results[name]["robustness"] = gp.robustness(s, checkpoints=[0], draws=1).table[["error", "loss"]]
            times[name]["robustness"].append(time.perf_counter() - t)
            t = time.perf_counter()
            results[name]["ntk"] = gp.ntk(s, n=a.ntk_n, n_test=0, checkpoints=[]).kernel
            times[name]["ntk"].append(time.perf_counter() - t)
            t = time.perf_counter()
            results[name]["evaluate"] = gp.evaluate(s.model, s.final, s.test)
            times[name]["evaluate"].append(time.perf_counter() - t)
    ref = results["tensor"]
    same = all(r["robustness"].equals(ref["robustness"]) and torch.equal(r["ntk"], ref["ntk"])
               and r["evaluate"] == ref["evaluate"] for r in results.values())
    print(f"N = {a.n} (NTK: {a.ntk_n}), {a.threads} thread(s), median of {a.repeats}; "
          f"identical results: {same}\n")
    print("| what | tensor (s) | tuple (s) | ratio | mapping (s) | ratio |\n|---|---:|---:|---:|---:|---:|")
    for what in whats:
        t0, t1, t2 = (statistics.median(times[k][what]) for k in ("tensor", "tuple", "mapping"))
        print(f"| {what} | {t0:.3f} | {t1:.3f} | {t1 / t0:.3f} | {t2:.3f} | {t2 / t0:.3f} |")


if __name__ == "__main__":
    main()
