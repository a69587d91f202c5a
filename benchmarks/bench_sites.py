"""Benchmark: what a functional site (``F.relu(self.fc1(x))``) costs against an activation module.

The same MLP (784-512-512-512-10) and weights twice: with ``nn.ReLU`` modules (module sites: the
variants engine's traced prefix reuse, the activation statistics by forward hooks) and with
``F.relu`` in its forward (functional sites: a full forward per network under the
``TorchFunctionMode`` of :mod:`genprobe.engine.sites`). Times the ablation probe (every layer,
units in order of activation norm, 5 steps: an order that does not depend on the layer's name,
so the two give the same networks) and activation noise (3 scales, 2 draws: its draws are
seeded by the layer's name, so only the zero-noise rows are compared) on the same data,
alternating the two models.

    python benchmarks/bench_sites.py --threads 1 --n 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import genprobe as gp


class Modules(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 512), nn.Linear(512, 512), nn.Linear(512, 512)
        self.a1, self.a2, self.a3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(self.a3(self.fc3(self.a2(self.fc2(self.a1(self.fc1(x)))))))


class Functions(Modules):
    def forward(self, x):
        x = x.flatten(1)
        return self.head(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    modules, functions = Modules(), Functions()
    init = {k: v.clone() for k, v in modules.state_dict().items()}
    with torch.no_grad():
        for p in modules.parameters():
            p.add_(0.01 * torch.randn_like(p))
    functions.load_state_dict(modules.state_dict())
    x, y = torch.randn(a.n, 1, 28, 28), torch.randint(0, 10, (a.n,))
    subjects = {name: gp.Subject(m, init=init, train=(x, y), test=(x, y), num_classes=10)
                for name, m in (("modules", modules), ("functions", functions))}
    runs = {"ablation": lambda s: gp.ablation(s, order="norm", steps=5),
            "activation_noise": lambda s: gp.activation_noise(s, scales=[0.0, 0.5, 2.0], draws=2)}
    times = {k: {w: [] for w in runs} for k in subjects}
    results = {k: {} for k in subjects}
    for _ in range(a.repeats):
        for name, s in subjects.items():
            for what, run in runs.items():
                t = time.perf_counter()
                results[name][what] = run(s)
                times[name][what].append(time.perf_counter() - t)
    ablated = [results[k]["ablation"].table["accuracy"].to_numpy() for k in subjects]
    quiet = [results[k]["activation_noise"].table.query("scale == 0")["accuracy"].to_numpy() for k in subjects]
    same = np.allclose(*ablated) and np.allclose(*quiet)
    print(f"N = {a.n}, {a.threads} thread(s), median of {a.repeats}; equal accuracies: {same}\n")
    print("| probe | nn.ReLU modules (s) | F.relu calls (s) | ratio |\n|---|---:|---:|---:|")
    for what in runs:
        t0, t1 = (statistics.median(times[k][what]) for k in ("modules", "functions"))
        print(f"| {what} | {t0:.3f} | {t1:.3f} | {t1 / t0:.2f} |")


if __name__ == "__main__":
    main()
