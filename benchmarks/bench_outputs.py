"""Benchmark: what reading the logits out of a structured return value costs.

The same MLP (784-512-512-512-10, the zoo's default fcn shape) twice: returning its logits tensor,
and returning an object with ``logits`` and a hidden state (as a Hugging Face model returns a
``ModelOutput``), which the Subject's copy reads with :func:`genprobe.logits.logits_of`. Times the
robustness probe (re-initialization of every module to epoch 0, one re-randomization draw) and
``gp.evaluate`` on the same state and data, alternating the two models, and checks that the
results are identical.

    python benchmarks/bench_outputs.py --threads 1 --n 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import genprobe as gp


class Returned:
    def __init__(self, logits, hidden):
        self.logits, self.hidden = logits, hidden


class MLP(nn.Module):
    def __init__(self, structured: bool):
        super().__init__()
        self.structured = structured
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                                    nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        h = self.layers(x)
        out = self.head(h)
        return Returned(out, h) if self.structured else out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    plain = MLP(False)
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01 * torch.randn_like(p))
    structured = MLP(True)
    structured.load_state_dict(plain.state_dict())
    x, y = torch.randn(a.n, 1, 28, 28), torch.randint(0, 10, (a.n,))
    subjects = {name: gp.Subject(m, init=init, train=(x, y), test=(x, y), num_classes=10)
                for name, m in (("tensor", plain), ("object", structured))}
    times: dict[str, dict[str, list[float]]] = {k: {"robustness": [], "evaluate": []} for k in subjects}
    results = {}
    for _ in range(a.repeats):
        for name, s in subjects.items():
            t = time.perf_counter()
            results[name] = gp.robustness(s, checkpoints=[0], draws=1)
            times[name]["robustness"].append(time.perf_counter() - t)
            t = time.perf_counter()
            gp.evaluate(s.model, s.final, s.test)
            times[name]["evaluate"].append(time.perf_counter() - t)
    same = results["tensor"].table[["error", "loss"]].equals(results["object"].table[["error", "loss"]])
    print(f"N = {a.n}, {a.threads} thread(s), median of {a.repeats}; identical results: {same}\n")
    print("| what | logits tensor (s) | object with logits (s) | ratio |\n|---|---:|---:|---:|")
    for what in ("robustness", "evaluate"):
        t0 = statistics.median(times["tensor"][what])
        t1 = statistics.median(times["object"][what])
        print(f"| {what} | {t0:.3f} | {t1:.3f} | {t1 / t0:.3f} |")


if __name__ == "__main__":
    main()
