"""Benchmark: module criticality of every module of a zoo ResNet, genprobe vs the authors' grid
protocol done plainly, in the same run.

Setup: ``create_model("resnet", input_shape=(1, 8, 8), num_classes=10)`` (depth 8, width 16,
BatchNorm; 19 modules with parameters) trained here for a few epochs on 2,000 *random*
digits-sized inputs (1, 8, 8) whose labels come from a fixed random linear teacher (a learnable
task, no data files). L_S is the 0–1 training error, ε = trained error + 0.01 for both methods.

Plain protocol (google-research/meta-dataset ``criticality.py``, done the way a user would):
α ∈ linspace(0, 1, 11), σ ∈ linspace(1e-16, 1, 11), 10 noise draws per point, each evaluation a
deepcopy of the model, the interpolated + noised state loaded, and a full forward over the 2,000
examples: 1,210 evaluations per module, μ_i = min over accepted points (mean error ≤ ε) of
α² d² / σ².

On a 2-core CPU the plain protocol takes hours for 19 modules, so:
- its *time* is measured on a fixed fraction, ``--plain-evals`` literal evaluations (default 110:
  one α column of one module); every evaluation costs the same full forward whatever the module,
  so the total is extrapolated linearly: time per evaluation × 1,210 × number of modules;
- its *result* μ is computed on ``--check`` modules with the same noise draws (a seeded
  generator per (α, σ, draw)) through the variants engine, and the literal loop's values on the
  timed fraction are checked equal to those (so the fast grid *is* the plain protocol's result).
genprobe runs ``gp.criticality(subject, samples=10, valley=...)`` on every module.

μ agrees "within the grid's resolution" when it lies between the plain grid's μ (upper) and the
value one grid step away in both α and σ (α_{a−1}² d² / σ_{j+1}² at a feasible grid point), or both
are 0. Different noise draws (genprobe's common random numbers vs the grid's own) can move a
boundary point across ε, so a disagreement is reported, not hidden.

genprobe's settings here: ``valley="search"``, ``refine=0`` (the plain protocol's own α grid, no
refinement), ``rtol=0.1`` (σ* to 10%, far finer than the plain grid's 0.1 steps); the library
defaults (``refine=2``, ``rtol=0.05``) are selectable with ``--refine 2 --rtol 0.05``.

Run: ``python benchmarks/bench_criticality.py [--epochs E] [--plain-evals N] [--valley full|search]
[--refine R] [--rtol T]``. ``--input cifar`` uses CIFAR-sized inputs (3, 32, 32) instead, ``--n``
another number of examples, ``--device cuda`` trains and runs both methods on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

import genprobe as gp
from genprobe.engine.variants import Edit, VariantEvaluator
from genprobe.zoo import create_model

N_TRAIN = 2000
SHAPE = (1, 8, 8)
SHAPES = {"digits": SHAPE, "cifar": (3, 32, 32)}
CLASSES = 10


def make_subject(epochs: int, seed: int = 0, *, shape: tuple[int, ...] = SHAPE, n: int = N_TRAIN,
                 device: str = "cpu") -> gp.Subject:
    """The trained subject (trained on `device`; its model and data handed back on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(math.prod(shape), CLASSES, generator=g)
    y = (x.flatten(1) @ teacher).argmax(-1)
    model = create_model("resnet", input_shape=shape, num_classes=CLASSES)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    xd, yd = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=g).split(128):
            opt.zero_grad()
            idx = idx.to(device)
            F.cross_entropy(model(xd[idx]), yd[idx]).backward()
            opt.step()
    model.cpu().eval()
    return gp.Subject(model, init=init, train=(x, y))


ALPHAS = np.linspace(0, 1, 11)
SIGMAS = np.linspace(1e-16, 1, 11)
DRAWS = 10


def draw(unit, final, a_i: int, s_i: int, r: int) -> dict[str, torch.Tensor]:
    """The grid protocol's noise z for (α index, σ index, draw r): N(0, I) per parameter tensor."""
    g = torch.Generator().manual_seed(((a_i * len(SIGMAS) + s_i) * DRAWS + r) * 7919 + 17)
    return {k: torch.randn(final[k].shape, generator=g) for k in unit.params}


@torch.no_grad()
def plain_evaluation(subject, unit, a_i: int, s_i: int, r: int, device: str = "cpu",
                     data=None) -> float:
    """One evaluation of the plain protocol: deepcopy, load θ_i^α + σ z, full forward, error.
    On `device`: the copy moved there, `data` (x, y) already there (default: the training set)."""
    a, s = ALPHAS[a_i], SIGMAS[s_i]
    x, y = subject.train if data is None else data
    model = copy.deepcopy(subject.model).to(device)
    state = model.state_dict()
    z = draw(unit, subject.final, a_i, s_i, r)
    for k in unit.params:
        state[k] = (1 - a) * subject.init[k] + a * subject.final[k] + s * z[k]
    model.load_state_dict(state)
    return float((model(x).argmax(-1) != y).double().mean())


@torch.no_grad()
def grid_errors(ev: VariantEvaluator, subject, unit) -> np.ndarray:
    """The plain protocol's per-draw errors (11, 11, 10), same draws, through the engine."""
    out = np.zeros((len(ALPHAS), len(SIGMAS), DRAWS))
    for a_i, a in enumerate(ALPHAS):
        params = {k: [] for k in unit.params}
        for s_i, s in enumerate(SIGMAS):
            for r in range(DRAWS):
                z = draw(unit, subject.final, a_i, s_i, r)
                for k in unit.params:
                    params[k].append((1 - a) * subject.init[k] + a * subject.final[k] + s * z[k])
        edit = Edit(params={k: torch.stack(v) for k, v in params.items()},
                    size=len(SIGMAS) * DRAWS)
        out[a_i] = ev.evaluate([edit])[0].error.numpy().reshape(len(SIGMAS), DRAWS)
    return out


def grid_mu(errors: np.ndarray, d2: float, epsilon: float):
    """(μ, α*, σ*, lower end one grid step away) of the grid protocol from its errors."""
    feasible = errors.mean(axis=2) <= epsilon
    best, lower = (math.inf, math.nan, math.nan), math.inf
    for a_i, s_i in zip(*np.nonzero(feasible), strict=True):
        a, s = ALPHAS[a_i], SIGMAS[s_i]
        value = (a / s) ** 2 * d2
        if value < best[0]:
            best = (value, a, s)
        a_lo, s_hi = ALPHAS[max(a_i - 1, 0)], SIGMAS[min(s_i + 1, len(SIGMAS) - 1)]
        lower = min(lower, (a_lo / s_hi) ** 2 * d2)
    return (*best, lower)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--plain-evals", type=int, default=110,
                        help="literal plain evaluations to time (110 = one α column of one module)")
    parser.add_argument("--check", nargs="*", default=["stages.2.0.conv2", "stages.2.0.bn2", "head"],
                        help="modules whose plain-protocol μ is computed and compared")
    parser.add_argument("--valley", default="search", choices=["full", "search"])
    parser.add_argument("--refine", type=int, default=0, help="α refinement rounds (genprobe default 2)")
    parser.add_argument("--rtol", type=float, default=0.1, help="σ bisection tolerance (default 0.05)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input", choices=sorted(SHAPES), default="digits",
                        help="input shape: digits (1, 8, 8) or cifar (3, 32, 32)")
    parser.add_argument("--n", type=int, default=N_TRAIN, help="training examples")
    args = parser.parse_args()

    t0 = time.perf_counter()
    subject = make_subject(args.epochs, shape=SHAPES[args.input], n=args.n, device=args.device)
    t_train = time.perf_counter() - t0
    units = subject.units()
    by_name = {u.name: u for u in units}
    trained = gp.evaluate(subject.model, subject.final, subject.train)
    epsilon = trained.error + 0.01

    t0 = time.perf_counter()
    ours = gp.criticality(subject, loss="error", samples=DRAWS, seed=0, valley=args.valley,
                          refine=args.refine, rtol=args.rtol, device=args.device)
    t_ours = time.perf_counter() - t0
    mods = ours.modules.set_index("module")
    assert abs(ours.summary["epsilon"] - epsilon) < 1e-9

    # the plain protocol's time, on a fixed fraction: one α column (11 σ × 10 draws) at a time
    check = [by_name[n] for n in args.check]
    timed_unit = check[0]
    points = [(a_i, s_i, r) for a_i in range(len(ALPHAS)) for s_i in range(len(SIGMAS))
              for r in range(DRAWS)][-args.plain_evals:]
    data = tuple(t.to(args.device) for t in subject.train)
    t0 = time.perf_counter()
    literal = [plain_evaluation(subject, timed_unit, *p, args.device, data) for p in points]
    t_fraction = time.perf_counter() - t0
    per_eval = t_fraction / len(points)
    t_plain = per_eval * len(ALPHAS) * len(SIGMAS) * DRAWS * len(units)

    # the plain protocol's result on the checked modules, same draws, via the engine
    ev = VariantEvaluator(subject.model, subject.final, subject.train, device=args.device)
    rows, max_diff = [], 0.0
    for unit in check:
        errors = grid_errors(ev, subject, unit)
        if unit is timed_unit:
            max_diff = max(abs(errors[a_i, s_i, r] - v) for (a_i, s_i, r), v in zip(points, literal, strict=True))
        d2 = float(mods.loc[unit.name, "distance"]) ** 2
        mu_p, a_p, s_p, lower = grid_mu(errors, d2, epsilon)
        mu_o = float(mods.loc[unit.name, "criticality"])
        agree = (mu_o == 0.0 and mu_p == 0.0) or (lower * (1 - 1e-6) <= mu_o <= mu_p * (1 + 1e-6))
        rows.append((unit.name, mu_p, a_p, s_p, lower, mu_o, float(mods.loc[unit.name, "alpha_star"]),
                     float(mods.loc[unit.name, "sigma_star"]), agree))

    print(f"# bench_criticality: resnet (depth 8, width 16, BN), {args.n} random {SHAPES[args.input]} inputs, "
          f"teacher labels, {args.epochs} epochs ({t_train:.0f} s)")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, device {args.device}; trained error "
          f"{trained.error:.4f}, ε = {epsilon:.4f}, {len(units)} modules, engine {ours.meta['engine']}, "
          f"valley={args.valley}, refine={args.refine}, rtol={args.rtol}")
    print(f"literal plain loop vs engine on the timed fraction: max |Δ error| = {max_diff:.2e}")
    print()
    print("| module | plain μ | plain α*, σ* | plain lower (1 grid step) | genprobe μ | genprobe α*, σ* | agree |")
    print("|---|---|---|---|---|---|---|")
    for name, mu_p, a_p, s_p, lower, mu_o, a_o, s_o, agree in rows:
        print(f"| {name} | {mu_p:.4g} | {a_p:.2f}, {s_p:.3g} | {lower:.4g} | {mu_o:.4g} | "
              f"{a_o:.3f}, {s_o:.3g} | {'yes' if agree else 'NO'} |")
    print()
    print("| method | evaluations | measured (s) | all 19 modules (s) |")
    print("|---|---|---|---|")
    print(f"| plain grid (deepcopy + full forward) | {len(points)} timed of "
          f"{1210 * len(units)} | {t_fraction:.1f} | {t_plain:.0f} (extrapolated: "
          f"{per_eval:.3f} s × 1,210 × {len(units)}) |")
    print(f"| genprobe criticality (samples=10, valley={args.valley}, refine={args.refine}, "
          f"rtol={args.rtol}) | "
          f"{int(ours.summary['evaluations'])} | {t_ours:.1f} | {t_ours:.1f} |")
    print()
    print(f"speed-up: {t_plain / t_ours:.1f}x; agreement within grid resolution: "
          f"{sum(r[-1] for r in rows)}/{len(rows)} modules; network μ (genprobe) = "
          f"{ours.summary['network_criticality']:.4g}")
    print()
    print(ours.modules.to_string(index=False))


if __name__ == "__main__":
    main()
