"""Module criticality: valleys from θ⁰ to θ^F (Chatterji, Neyshabur & Sedghi 2020).

For a unit (module group) i, the path θ_i^α = (1 − α) θ_i^0 + α θ_i^F keeps every other parameter
at θ^F, and Gaussian noise u is added to unit i only. Its *valley* is the training loss
L_S(f(θ_i^α + u, Θ^F_{-i})) over α and the noise scale σ, and its criticality is

    μ_i = min over 0 ≤ α, σ ≤ 1 of α² ‖θ_i^F − θ_i^0‖²_F / σ²
          subject to E_u[L_S(f(θ_i^α + u, Θ^F_{-i}))] ≤ ε.

Network criticality is μ = Σ_i μ_i; it enters the bound L_D ≤ ε + O(√(μ / m)) for m training
examples, and ``summary["bound"]`` is that term, √(μ / m), with the constants dropped as the paper
states it (m = the number of training examples used).

Conventions (ours where the paper left a choice open; all recorded in ``meta``):

- ``loss="error"`` (default, as in the paper): L_S is the 0–1 training error; ``epsilon``
  defaults to the trained error plus :data:`ERROR_MARGIN` (one percentage point, the robustness
  probe's threshold: a relative rule degenerates when the trained error is 0).
  ``loss="cross_entropy"``: L_S is the mean cross-entropy; ``epsilon`` defaults to
  :data:`CE_RATIO` × the trained loss (1.01, as in the authors' code). An ``epsilon`` below the
  trained model's own loss is a ConfigError: no valley can meet it at α = 1, σ → 0.
- ``noise="absolute"``: u ~ N(0, σ² I). ``noise="relative"``: per parameter tensor k the noise has
  standard deviation σ · ‖θ^α_k‖_F / √numel_k, so that E‖u_k‖² = σ² ‖θ^α_k‖² (the magnitude-aware
  convention of sharpness measures; the formula is :func:`genprobe.engine.edits.noise_std`,
  shared with ``noise_edit``: the scale follows the tensor being perturbed). The objective
  α²d²/σ² is the same formula in both modes.
- Common random numbers: unit i's draws z ~ N(0, I) (``samples`` of them) are fixed under
  ``seed`` and the unit's name, and u = σ · scale · z. Every (α, σ) point of a unit uses the same
  draws, so the Monte-Carlo mean is a deterministic function of (α, σ) and a search over σ is
  stable. ``loss_se`` is the standard error of that mean over the draws.
- Buffers (BatchNorm running statistics) stay at θ^F ("keep", see :mod:`genprobe.params`).

The search (per unit; see :func:`criticality_search`):

1. Noiseless valley L(α, 0) and the σ grid L(α, σ_j) at every α (the valley table / heatmap).
   σ = 1 is always part of the grid (the constraint's upper end).
2. For each α the feasible set in σ is assumed to be a down-set, {σ : L(α, σ) ≤ ε} = (0, σ*(α)]
   (noise hurts more the larger it is, which holds near a minimum). This is checked on the grid
   and recorded per α (``monotone``); where it fails, σ*(α) is searched above the *largest*
   feasible grid σ, which is what the definition asks for (the grid is the fallback).
   σ*(α) is then bisected geometrically inside its grid bracket until σ_hi / σ_lo ≤ 1 + ``rtol``.
   The bisection of all α runs in lock-step with branch and bound: an α whose best possible
   objective α²d²/σ_hi² exceeds the best verified one is dropped.
3. ``refine`` rounds add α* ± h/2, α* ± h/4, … around the best α (h the α grid step). They
   only add candidates, so they never raise μ_i; they can make μ_i(ε) non-monotone in ε by up
   to the refinement's own gain (without refinement, larger ε never gives larger μ_i under the
   down-set assumption, with the same draws).

``valley="search"`` skips what μ does not need: the σ grid at α whose noiseless loss exceeds ε
(under the down-set assumption no σ > 0 can help there), and everything after the noiseless
valley once α = 0 meets ε. It gives the same μ when the assumption holds, and a valley table
with holes (the heatmap shows them blank).

Edge cases, explicitly: α = 0 with some σ (the σ → 0 limit included) meeting ε gives μ_i = 0
(rewinding the module fully keeps the loss under ε: a robust module); θ_i^F = θ_i^0 gives μ_i = 0;
an α > 0 feasible only in the limit σ → 0 (below σ_grid_min × :data:`FLOOR_RATIO`) is infeasible
(objective ∞); a unit with no feasible α at all gets μ_i = ∞ (not possible when ε > L(θ^F) and
the loss is continuous in σ, since α = 1 is then feasible for small σ).

Every evaluation runs through :class:`genprobe.engine.variants.VariantEvaluator`: the points one
round of the search asks for are one stacked edit per unit
(:func:`genprobe.engine.edits.path_edit`, built lazily and split to the memory budget by the
engine), all units in one call; only the part of the forward pass downstream of the unit is
recomputed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import params as P
from .. import progress
from ..engine.edits import Edit, path_edit
from ..engine.variants import VariantEvaluator
from ..errors import ConfigError, check_choice
from ..figures import BLUE, SEQUENTIAL, VERMILLION, new_figure, styled
from ..options import (
    Split,
    check_int,
    check_number,
    check_resources,
    check_split,
    options_checked,
    result_meta,
    split_data,
    trained_check,
)
from ..results import Result, names, number, percent
from ..seeds import generator
from ..subject import Subject, check_subject
from .registry import Option, register_probe

logger = logging.getLogger(__name__)

LOSSES = ("error", "cross_entropy")
NOISES = ("absolute", "relative")
VALLEYS = ("full", "search")

ERROR_MARGIN = 0.01
"""Default ε for ``loss="error"``: trained error + 0.01 (one percentage point, the robustness
probe's threshold). Additive, because the trained error is often exactly 0."""
CE_RATIO = 1.01
"""Default ε for ``loss="cross_entropy"``: 1.01 × trained loss, the authors' own rule."""
DEFAULT_ALPHAS = tuple(float(a) for a in np.linspace(0.0, 1.0, 11))
"""The authors' α grid {0, 0.1, …, 1}."""
DEFAULT_SIGMAS = tuple(float(s) for s in np.geomspace(1e-3, 1.0, 5))
"""Valley grid σ ∈ {0.001, 0.0056, 0.032, 0.18, 1}: half-decade steps, because σ* spans orders
of magnitude across modules (the authors' linear grid 0.1, …, 1 cannot resolve σ* < 0.1). The
bisection refines inside these brackets; the grid brackets it and draws the heatmap."""
FLOOR_RATIO = 1e-4
"""σ below (smallest grid σ) × FLOOR_RATIO counts as σ → 0: an α feasible only there is infeasible."""
MAX_VALLEY_PANELS = 12
"""The figure draws the valleys of at most this many modules, the most critical (the bars show
every module): more panels are unreadable, and slow to lay out."""


# ----------------------------------------------------------------------------- search


@dataclass
class AlphaState:
    """Search state of one α: σ bracket [lo, hi] (lo feasible, hi infeasible or None)."""

    alpha: float
    lo: float = 0.0
    hi: float | None = None
    feasible: bool = False        # some σ (the σ → 0 limit included) meets ε
    verified: bool = True         # lo was evaluated (False: lo is the untested floor)
    monotone: bool = True         # the grid's feasibility pattern in σ is a down-set
    pruned: bool = False

    def objective(self, d2: float) -> float:
        """α² d² / σ*², with 0 at α = 0 when feasible, ∞ when infeasible."""
        if not self.feasible:
            return math.inf
        if self.alpha == 0.0 or d2 == 0.0:
            return 0.0
        if not self.verified or self.lo <= 0.0:
            return math.inf
        return self.alpha ** 2 * d2 / self.lo ** 2

    def lower_bound(self, d2: float) -> float:
        if not self.feasible:
            return math.inf
        if self.alpha == 0.0 or d2 == 0.0:
            return 0.0
        return self.alpha ** 2 * d2 / (self.hi if self.hi is not None else self.lo) ** 2

    def open(self, rtol: float) -> bool:
        return self.feasible and self.hi is not None and self.hi > self.lo * (1.0 + rtol)


@dataclass
class SearchOutcome:
    """Result of :func:`criticality_search`: per-α states, the optimum and the points asked."""

    alphas: list[AlphaState]
    criticality: float
    alpha_star: float
    sigma_star: float
    rounds: int = 0
    points: list[tuple[float, float, str]] = field(default_factory=list)


Request = list[tuple[float, float, str]]
"""(α, σ, stage) points; σ = 0 is the noiseless point."""


def criticality_search(
    d2: float, epsilon: float, alphas: Sequence[float], sigmas: Sequence[float], *,
    rtol: float = 0.05, refine: int = 2, full_grid: bool = True,
) -> Generator[Request, list[float], SearchOutcome]:
    """The search of one unit as a coroutine: yields lists of (α, σ, stage) points, receives
    their MC mean losses (same order), returns a :class:`SearchOutcome`.

    `d2` = ‖θ_i^F − θ_i^0‖²_F; `sigmas` the sorted grid in (0, 1] (containing 1.0); `alphas`
    the α grid in [0, 1]. `full_grid`: evaluate the σ grid at every α (the valley heatmap);
    otherwise only at the α whose noiseless loss meets ε, and stop at μ = 0 as soon as α = 0
    does (valley="search"). Driving it with an exact loss function gives μ_i within `rtol` (in σ)
    of the definition restricted to the α candidates, whenever feasibility in σ is a down-set.
    """
    states: list[AlphaState] = []
    asked: list[tuple[float, float, str]] = []
    rounds = 0

    def best() -> tuple[float, AlphaState | None]:
        scored = [(s.objective(d2), s) for s in states]
        scored = [t for t in scored if math.isfinite(t[0])]
        return min(scored, key=lambda t: (t[0], t[1].alpha)) if scored else (math.inf, None)

    def solve(new: list[float], stage: str):
        nonlocal rounds
        fresh = [AlphaState(a) for a in new]
        n = len(sigmas)
        if full_grid:
            request = [(a, 0.0, stage) for a in new] + [(a, s, stage) for a in new for s in sigmas]
            losses = yield request
            zero, grid = losses[:len(new)], losses[len(new):]
            on_grid = fresh
        else:  # noiseless first; the σ grid only where σ → 0 meets ε
            request = [(a, 0.0, stage) for a in new]
            zero = yield request
            asked.extend(request)
            rounds += 1
            if any(a == 0.0 and z <= epsilon for a, z in zip(new, zero, strict=True)):
                for st, z in zip(fresh, zero, strict=True):
                    st.feasible = bool(z <= epsilon)
                states.extend(fresh)
                return
            on_grid = [st for st, z in zip(fresh, zero, strict=True) if z <= epsilon]
            request = [(st.alpha, s, stage) for st in on_grid for s in sigmas]
            grid = (yield request) if request else []
        asked.extend(request)
        rounds += 1
        row = {id(st): i for i, st in enumerate(on_grid)}
        for st, z in zip(fresh, zero, strict=True):
            if id(st) not in row:
                st.feasible = False  # infeasible at σ → 0; larger σ assumed no better
                continue
            i = row[id(st)]
            _init_bracket(st, [z <= epsilon] + [grid[i * n + j] <= epsilon for j in range(n)], sigmas)
        states.extend(fresh)
        if best()[0] == 0.0:
            return
        rounds += yield from _bisect(fresh, d2, epsilon, rtol, best, asked)

    alphas = sorted({float(a) for a in alphas})
    yield from solve(alphas, "grid")
    step = min(np.diff(alphas)) if len(alphas) > 1 else 1.0
    for r in range(refine):
        value, st = best()
        if st is None or value == 0.0:
            break
        h = step / 2 ** (r + 1)
        have = {s.alpha for s in states}
        new = [round(a, 12) for a in (st.alpha - h, st.alpha + h)
               if 0.0 <= a <= 1.0 and round(a, 12) not in have]
        if new:
            yield from solve(new, "refine")
    value, st = best()
    states.sort(key=lambda s: s.alpha)
    if st is None:
        return SearchOutcome(states, math.inf, math.nan, math.nan, rounds, asked)
    # at α* = 0 any σ works; report the largest one evaluated feasible (0: only σ → 0)
    sigma = st.lo if (st.verified and st.lo in sigmas or st.alpha > 0) else 0.0
    return SearchOutcome(states, value, st.alpha, sigma, rounds, asked)


def _bisect(fresh: list[AlphaState], d2: float, epsilon: float, rtol: float, best,
            asked: list) -> Generator[Request, list[float], int]:
    """Bisect the σ bracket of every α of `fresh` still open (ratio above 1 + `rtol`) and not
    pruned (its lower bound on μ above the best found so far, `best()`), all of them a round at a
    time: yields the (α, σ, "search") points of a round, receives their losses, records them in
    `asked`; returns the number of rounds."""
    rounds = 0
    while True:
        bound = best()[0]
        active = [s for s in fresh if s.open(rtol) and not s.pruned]
        for s in active:
            if s.lower_bound(d2) > bound:
                s.pruned = True
        active = [s for s in active if not s.pruned]
        if not active:
            return rounds
        request = []
        for s in active:
            if not s.verified:
                request.append((s.alpha, s.lo, "search"))
            request.append((s.alpha, math.sqrt(s.lo * s.hi), "search"))
        losses = yield request
        asked.extend(request)
        rounds += 1
        k = 0
        for s in active:
            floor_ok = True
            if not s.verified:
                floor_ok = losses[k] <= epsilon
                k += 1
            mid_ok = losses[k] <= epsilon
            k += 1
            _update(s, floor_ok, mid_ok)


def _update(s: AlphaState, floor_ok: bool, mid_ok: bool) -> None:
    """One bisection step of α's bracket, given feasibility at its (untested) floor and midpoint."""
    mid = math.sqrt(s.lo * s.hi)
    if not s.verified:
        s.verified = True
        if not floor_ok:
            if not mid_ok:               # infeasible down to the floor: only the σ → 0 limit
                s.feasible = False
                return
            s.monotone = False
    if mid_ok:
        s.lo = mid
    else:
        s.hi = mid


def _init_bracket(st: AlphaState, ok: list[bool], sigmas: Sequence[float]) -> None:
    """Set α's bracket from its feasibility at σ = 0 (ok[0]) and on the grid (ok[1:])."""
    first_bad = next((j for j, v in enumerate(ok) if not v), len(ok))
    st.monotone = not any(ok[first_bad:])
    feasible = [j for j, v in enumerate(ok) if v]
    if not feasible:
        st.feasible = False
        return
    st.feasible = True
    j = feasible[-1]
    if j == len(ok) - 1:                    # σ = 1 feasible: the constraint's end
        st.lo, st.hi = sigmas[-1], None
    elif j == 0:                            # only σ → 0: bisect below the smallest grid σ
        st.lo, st.hi, st.verified = sigmas[0] * FLOOR_RATIO, sigmas[0], False
    else:
        st.lo, st.hi = sigmas[j - 1], sigmas[j]


# ----------------------------------------------------------------------------- noise and edits


def noise_draws(unit: P.Unit, state: Mapping[str, Tensor], samples: int, seed: int) -> dict[str, Tensor]:
    """The unit's fixed standard-normal draws z: key → (samples, *shape), in `state`'s dtypes.

    From :func:`genprobe.seeds.generator` of (`seed`, "criticality", the unit's name): a unit
    gets the same draws whatever else is selected.
    The noise at scale σ is u = σ · scale_k · z (see the module doc).
    """
    g = generator(seed, "criticality", unit.name)
    return {k: torch.randn((samples, *state[k].shape), generator=g, dtype=state[k].dtype)
            for k in unit.params}


def point_params(unit: P.Unit, init: Mapping[str, Tensor], final: Mapping[str, Tensor],
                 z: Mapping[str, Tensor], alpha: float, sigma: float, noise: str) -> dict[str, Tensor]:
    """Unit i's parameters at (α, σ): key → (B, *shape), B = 1 for σ = 0 else the number of draws
    (the engine's :func:`~genprobe.engine.edits.path_edit`, built in full)."""
    edit, _ = path_edit(unit, init, final, [(alpha, sigma)], z, scale=noise)
    return edit.params.take(range(edit.size))


@dataclass
class _Job:
    """One unit's search, driven round by round."""

    unit: P.Unit
    d2: float
    z: dict[str, Tensor]
    search: Generator[Request, list[float], SearchOutcome]
    request: Request | None = None
    outcome: SearchOutcome | None = None
    evaluations: int = 0


DRAW_STAGES = (1, 4)
"""The noise draws of a point with σ > 0 are evaluated in stages: the first one, then up to 4,
then all ``samples``. A point whose losses so far already sum above ``samples`` × ε is
infeasible whatever its other draws give (losses are non-negative), so they are not evaluated:
the same feasibility, so the same μ, for fewer evaluations. Its row records the draws evaluated
(``samples``) and their mean. Measured on an MNIST-1D MLP and a digits CNN (n = 500, 8 draws):
33% and 21% fewer evaluations with the full valley, 24% and 16% fewer with ``valley="search"``
(``benchmarks/RESULTS.md``); each stage is one more pass over the data, so (1, 4) rather than
(1, 2, 4), whose extra pass cost more than its 1–2% fewer evaluations saved."""


def _evaluate_round(ev: VariantEvaluator, jobs: list[_Job], init, final, noise: str, loss: str,
                    rows: list[dict], epsilon: float) -> dict[int, list[float]]:
    """Evaluate every pending point of every job; append table rows; return job → MC means
    (over the draws evaluated: see :data:`DRAW_STAGES`).

    A job's points of a stage are one stacked edit of the unit (θ_i^α + σ·scale·z for its fixed
    draws z), built lazily by the engine, which splits it to its memory budget; all jobs in one
    call per stage.
    """
    samples = len(next(iter(jobs[0].z.values()))) if jobs and jobs[0].z else 0
    got = [[([], []) for _ in job.request] for job in jobs]  # per point: (ce, err) pieces
    rejected = [[False] * len(job.request) for job in jobs]
    done = 0
    for upto in [b for b in DRAW_STAGES if b < samples] + [max(samples, 1)]:
        edits, plan = [], []
        for j, job in enumerate(jobs):
            wanted = [i for i, (_, sigma, _) in enumerate(job.request)
                      if (done == 0 if sigma == 0.0 else not rejected[j][i])]
            if not wanted:
                continue
            z = {k: v[done:upto] for k, v in job.z.items()}
            edit, counts = path_edit(job.unit, init, final, [job.request[i][:2] for i in wanted], z,
                                     scale=noise)
            edits.append(edit)
            plan.append((j, wanted, counts))
        for (j, wanted, counts), res in zip(plan, ev.evaluate(edits) if edits else [], strict=True):
            offset = 0
            for i, size in zip(wanted, counts, strict=True):
                got[j][i][0].append(res.loss[offset:offset + size].double())
                got[j][i][1].append(res.error[offset:offset + size].double())
                offset += size
                if jobs[j].request[i][1] > 0.0:
                    so_far = torch.cat(got[j][i][1 if loss == "error" else 0]).sum()
                    rejected[j][i] = float(so_far) > samples * epsilon * (1 + 1e-12) + 1e-12
        done = upto
        if all(all(r or job.request[i][1] == 0.0 for i, r in enumerate(rej))
               for job, rej in zip(jobs, rejected, strict=True)):
            break
    means: dict[int, list[float]] = {}
    for j, job in enumerate(jobs):
        means[j] = [_record(rows, job, job_point=point, ce=torch.cat(ce), err=torch.cat(err), loss=loss)
                    for point, (ce, err) in zip(job.request, got[j], strict=True)]
    return means


def _record(rows: list[dict], job: _Job, job_point, ce: Tensor, err: Tensor, loss: str) -> float:
    """Append one (α, σ) point's row; return its MC mean of L_S."""
    alpha, sigma, stage = job_point
    value = err if loss == "error" else ce
    n = value.numel()
    mean = float(value.mean())
    se = float(value.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    job.evaluations += n
    rows.append({"module": job.unit.name, "alpha": alpha, "sigma": sigma, "loss_mean": mean,
                 "loss_se": se, "error_mean": float(err.mean()), "cross_entropy_mean": float(ce.mean()),
                 "samples": n, "stage": stage})
    return mean


def _drive(ev: VariantEvaluator, jobs: list[_Job], init, final, noise, loss, epsilon: float) -> list[dict]:
    """Run every unit's search to completion, all units' points of a round in one pass."""
    rows: list[dict] = []
    for job in jobs:
        job.request = next(job.search)
    with progress.task("criticality", total=len(jobs)) as bar:
        rounds = 0
        while True:
            live = [job for job in jobs if job.outcome is None]
            if not live:
                return rows
            rounds += 1
            means = _evaluate_round(ev, live, init, final, noise, loss, rows, epsilon)
            finished = 0
            for j, job in enumerate(live):
                try:
                    job.request = job.search.send(means[j])
                except StopIteration as stop:
                    job.outcome, job.request = stop.value, None
                    finished += 1
            bar.advance(finished, description=f"criticality: round {rounds}, {len(rows)} points")


# ----------------------------------------------------------------------------- result


class CriticalityResult(Result):
    """Result of :func:`criticality`.

    ``table`` (the valley): one row per evaluated (``module``, ``alpha``, ``sigma``) with
    ``loss_mean`` (MC mean of L_S under the chosen ``loss``), ``loss_se`` (its standard error over
    the draws), ``error_mean``, ``cross_entropy_mean``, ``samples`` (draws evaluated: 1 at σ = 0;
    fewer than asked where the first already proved the point infeasible, :data:`DRAW_STAGES`),
    ``stage`` (``"grid"`` valley grid incl. σ = 0, ``"search"`` bisection, ``"refine"`` α
    refinement) and ``feasible`` (loss_mean ≤ ε).
    ``modules``: ``module``, ``criticality`` (μ_i), ``alpha_star``, ``sigma_star`` (at α* = 0, where
    any σ attains μ_i = 0: the largest feasible grid σ evaluated, 0 if none was), ``distance``
    (‖θ_i^F − θ_i^0‖_F), ``loss_at_star``, ``monotone`` (feasibility was a down-set in σ at
    every α), ``evaluations`` (network evaluations on the data).
    ``alphas``: per (``module``, ``alpha``): ``sigma_star`` (largest feasible σ found, 0 when
    none), ``sigma_hi`` (smallest infeasible σ above it; NaN when σ = 1 is feasible),
    ``objective`` (α² d² / σ*²), ``feasible``, ``monotone``, ``pruned`` (dropped by the bound).
    ``summary``: ``network_criticality`` (Σ μ_i), ``max_module_criticality``, ``bound``
    (√(μ/m)), ``epsilon``, ``trained_loss``, ``trained_error``, ``n_examples``, ``evaluations``.
    """

    probe = "criticality"

    @property
    def modules(self) -> pd.DataFrame:
        """One row per module: criticality μ_i and where it is attained."""
        return self.tables["modules"]

    @property
    def alphas(self) -> pd.DataFrame:
        """One row per (module, α): σ*(α) and the objective."""
        return self.tables["alphas"]

    def brief(self) -> pd.DataFrame:
        """One row per module: μ_i, where it is attained, and how far the module moved."""
        return self.modules[["module", "criticality", "alpha_star", "sigma_star", "distance",
                             "loss_at_star", "evaluations"]]

    @styled
    def plot(self):
        """Per module, the valley (loss over α (x) and σ (y), ε contour, σ*(α) dots), and μ_i bars."""
        mods = list(self.modules["module"])
        n = len(mods)
        shown = mods
        if n > MAX_VALLEY_PANELS:  # the most critical, in forward order (∞ first, then μ)
            top = self.modules["criticality"].rank(method="first", ascending=False) <= MAX_VALLEY_PANELS
            shown = [m for m, keep in zip(mods, top, strict=True) if keep]
        cols = min(4, max(len(shown), 1))
        rows = math.ceil(len(shown) / cols) + 1
        fig = new_figure(3.2 * cols + 1.0, 2.8 * rows + 0.6)
        gs = fig.add_gridspec(rows, cols)
        eps = self.summary["epsilon"]
        grid = self.table[self.table["stage"] == "grid"]
        vmax = max(float(grid["loss_mean"].max()) if len(grid) else 1.0, eps, 1e-12)
        im = None
        mu_of = dict(zip(self.modules["module"], self.modules["criticality"], strict=True))
        for i, name in enumerate(shown):
            ax = fig.add_subplot(gs[i // cols, i % cols])
            im = _valley_panel(ax, grid[grid["module"] == name], self.alphas, name, eps, vmax)
            ax.set_title(f"{name} (μ_i = {mu_of[name]:.3g})")
        options = self.meta.get("options", {})
        if im is not None:
            fig.colorbar(im, ax=fig.axes, shrink=0.6,
                         label=f"{options.get('split', 'train')} {options.get('loss', 'loss')}")
        which = "each module" if len(shown) == n else f"the {len(shown)} most critical of {n} modules"
        fig.suptitle(f"Valley of {which}: loss at θ_i = (1−α)θ⁰ + αθᶠ + noise of scale σ.\n"
                     f"White line: loss = ε ({eps:.3g}); red dots: σ*(α), the largest σ meeting ε; "
                     "μ_i = min over α of α²‖θᶠ−θ⁰‖² / σ*²")
        bx = fig.add_subplot(gs[rows - 1, :])
        mu = self.modules["criticality"].to_numpy(dtype=float)
        finite = mu[np.isfinite(mu)]
        top = float(finite.max()) if len(finite) else 1.0
        bx.bar(range(n), np.where(np.isfinite(mu), mu, top * 1.1),
               color=np.where(np.isfinite(mu), BLUE, VERMILLION))
        positive = finite[finite > 0]
        if len(positive) and positive.max() / positive.min() > 100:  # orders of magnitude apart
            bx.set_yscale("log")
        bx.set_xticks(range(n), mods, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
        bx.set_ylabel("module criticality μ_i")
        infinite = "; red = ∞" if not np.isfinite(mu).all() else ""
        bx.set_title(f"module criticality (network μ = Σ μ_i = {self.summary['network_criticality']:.4g}"
                     f"{infinite})")
        return fig

    def read(self) -> str:
        """Network criticality and the bound's term; the most and least critical modules; the
        modules with μ_i = 0 (robust) or ∞."""
        mods = self.modules
        options = self.meta.get("options", {})
        split, loss = options.get("split", "train"), options.get("loss", "error")
        total, m = self.summary["network_criticality"], number(self.summary["n_examples"], 9)
        eps = self.summary["epsilon"]
        eps_text = percent(eps) if loss == "error" else number(eps)
        text = (f"Network criticality μ = Σ μ_i = {number(total)} over {len(mods)} modules, so the "
                f"generalization bound's term √(μ/m) is {number(self.summary['bound'])} for "
                f"m = {m} {split} examples, at ε = {eps_text} ({split} {loss}).")
        mu = mods["criticality"]
        finite = mods[np.isfinite(mu)]
        if len(finite) > 1 and finite["criticality"].max() > 0:
            hi = finite.loc[finite["criticality"].idxmax()]
            lo = finite.loc[finite["criticality"].idxmin()]
            share = hi["criticality"] / finite["criticality"].sum()
            text += (f" The most critical module is {hi['module']} (μ_i = {number(hi['criticality'])},"
                     f" {percent(share, 0)} of the finite total); the least critical is "
                     f"{lo['module']} (μ_i = {number(lo['criticality'])}).")
        zero = list(mods.loc[mu == 0, "module"])
        if zero:
            text += (f" {names(zero)} {'has' if len(zero) == 1 else 'have'} μ_i = 0: rewinding "
                     f"{'it' if len(zero) == 1 else 'each'} fully to its initial values keeps the "
                     f"{split} {loss} within ε (robust).")
        inf = list(mods.loc[np.isinf(mu), "module"])
        if inf:
            text += (f" {names(inf)} {'has' if len(inf) == 1 else 'have'} μ_i = ∞: no point of "
                     f"{'its' if len(inf) == 1 else 'their'} valley met ε.")
        text += (" A low μ_i means a low, wide valley from θ⁰ to θᶠ: the module tolerates being "
                 "rewound and perturbed.")
        return text


def _valley_panel(ax, grid: pd.DataFrame, alphas: pd.DataFrame, name: str, eps: float, vmax: float):
    m = grid.pivot_table(index="sigma", columns="alpha", values="loss_mean", aggfunc="mean")
    m = m.sort_index()
    values = np.ma.masked_invalid(m.to_numpy(dtype=float))  # valley="search" leaves holes
    im = ax.imshow(values, origin="lower", aspect="auto", cmap=SEQUENTIAL, vmin=0.0, vmax=vmax)
    if values.shape[0] > 1 and values.shape[1] > 1 and values.count() and values.min() <= eps <= values.max():
        ax.contour(values, levels=[eps], colors="white", linewidths=1.4)
    a_vals, s_vals = list(m.columns), list(m.index)
    step = max(1, math.ceil(len(a_vals) / 6))  # at most ~6 readable labels per axis
    ax.set_xticks(range(len(a_vals))[::step], [f"{a:.1f}" for a in a_vals][::step])
    step = max(1, math.ceil(len(s_vals) / 6))
    ax.set_yticks(range(len(s_vals))[::step], [_sigma_label(s) for s in s_vals][::step])
    star = alphas[(alphas["module"] == name) & alphas["feasible"] & (alphas["sigma_star"] > 0)]
    if len(star) and len(a_vals) > 1 and len(s_vals) > 1:
        ax.plot(np.interp(star["alpha"], a_vals, range(len(a_vals))),
                np.interp(np.log10(star["sigma_star"]), np.log10(np.maximum(s_vals, 1e-30)),
                          range(len(s_vals))), "o", color=VERMILLION, markeredgecolor="white",
                markeredgewidth=0.6, markersize=5)
    ax.set_title(name)
    ax.set_xlabel("α (0 = θ⁰, 1 = θᶠ)")
    ax.set_ylabel("noise σ")
    return im


def _sigma_label(s: float) -> str:
    """σ as a short tick label: 0, 0.001, 0.0056, 0.032, 0.18, 1."""
    return "0" if s == 0 else f"{s:.2g}" if s >= 1e-3 else f"{s:.0e}"


# ----------------------------------------------------------------------------- probe


@register_probe(
    "criticality", CriticalityResult, paper="Chatterji, Neyshabur & Sedghi 2020", needs_init=True,
    summary="valleys from θ⁰ to θ^F under noise; module criticality μ_i and network criticality",
    options=(Option("epsilon", float, "Loss level ε [trained error + 0.01, or 1.01 × trained CE]."),
             Option("loss", str, "L_S: error (0-1, the paper) or cross_entropy."),
             Option("samples", int, "Noise draws per (α, σ) point."),
             Option("noise", str, "absolute σ, or relative to each tensor's RMS."),
             Option("valley", str, "full: the whole α × σ grid (figure); search: only what μ needs."),
             Option("refine", int, "α refinement rounds around the best α."),
             Option("alphas", float, "α grid value in [0, 1] (repeatable) [0, 0.1, ..., 1].", multiple=True),
             Option("sigmas", float, "σ grid value in (0, 1] (repeatable) [0.001 ... 1, half-decades].",
                    multiple=True)),
    demo={"samples": 4, "n": 500},
    tiny={"samples": 2, "alphas": [0.0, 0.5, 1.0], "sigmas": [0.01, 0.1], "refine": 1},
    # Chatterji et al.: lower criticality, better generalization; bound is √(μ/m), a transform
    # of network_criticality at fixed m; epsilon and trained_* are the network's training fit
    measures={"network_criticality": 1, "max_module_criticality": 1})
def criticality(
    subject: Subject,
    *,
    modules: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    epsilon: float | None = None,
    loss: Literal["error", "cross_entropy"] = "error",
    alphas: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    samples: int = 8,
    noise: Literal["absolute", "relative"] = "absolute",
    split: Split = "train",
    n: int | None = None,
    per_class: int | None = None,
    rtol: float = 0.05,
    refine: int = 2,
    valley: Literal["full", "search"] = "full",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str = "auto",
) -> CriticalityResult:
    """Module criticality μ_i of every selected unit, network criticality Σ μ_i, and the valleys.

    The shared options (subject, modules, split, n, per_class, seed, batch_size, memory_budget,
    device) mean what :mod:`genprobe.options` says.

    Args:
        subject: the network (needs ``init``, θ⁰).
        modules: a selection (see :func:`genprobe.params.select_units`); default every module
            owning parameters.
        epsilon: the loss level ε; default: trained error + 0.01 (``loss="error"``) or
            1.01 × trained cross-entropy. Must be ≥ the trained model's own loss.
        loss: L_S, the training 0–1 ``"error"`` (paper) or ``"cross_entropy"``.
        alphas: α candidates in [0, 1] (default 0, 0.1, …, 1). sigmas: valley grid σ in (0, 1]
            (default :data:`DEFAULT_SIGMAS`; 1 is always added).
        samples: noise draws per (α, σ) point. noise: ``"absolute"`` or ``"relative"`` σ.
        split: data for L_S (the paper: ``"train"``). n / per_class: a seeded class-balanced
            subset (:func:`genprobe.options.sample`).
        rtol: bisection stops when σ_hi / σ_lo ≤ 1 + rtol. refine: α refinement rounds.
        valley: ``"full"`` evaluates the whole α × σ grid (the valley figure); ``"search"``
            only what μ needs: the noiseless valley, then the σ grid at the α whose noiseless
            loss meets ε (larger σ is assumed no better elsewhere), and nothing more once α = 0
            meets ε (μ_i = 0). Same μ under the down-set assumption, far fewer evaluations.
        seed: noise draws and the subset. batch_size, memory_budget, device: see
            :class:`~genprobe.engine.variants.VariantEvaluator`.
    """
    check_subject(subject, "criticality")
    check_choice("loss", loss, LOSSES)
    check_choice("noise", noise, NOISES)
    check_split(split)
    check_choice("valley", valley, VALLEYS)
    alphas = _check_grid("alphas", DEFAULT_ALPHAS if alphas is None else alphas, 0.0, True)
    sigmas = _check_grid("sigmas", DEFAULT_SIGMAS if sigmas is None else sigmas, 0.0, False)
    if sigmas[-1] != 1.0:
        sigmas = sigmas + [1.0]
    check_int("samples", samples, 1)
    check_int("refine", refine, 0)
    seed = check_int("seed", seed, 0)
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ConfigError(f"rtol must be a positive number, got {rtol!r}")
    init = subject.require_init("criticality")
    final = subject.final
    units = subject.units(modules)
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    check_number("epsilon", epsilon, low=0.0, optional=True)
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    ev = VariantEvaluator(subject.model, final, data, batch_size=batch_size, device=device,
                          memory_budget=memory_budget)
    base = ev.evaluate([Edit(label="trained")])[0]
    trained = float(base.error if loss == "error" else base.loss)
    epsilon, rule = _epsilon(epsilon, loss, trained, split)

    jobs = []
    for unit in units:
        d2 = P.distance(final, init, unit.params) ** 2
        search = criticality_search(d2, epsilon, alphas, sigmas, rtol=rtol, refine=refine,
                                    full_grid=valley == "full")
        jobs.append(_Job(unit, d2, noise_draws(unit, final, samples, seed), search))
    rows = _drive(ev, jobs, init, final, noise, loss, epsilon)
    table = pd.DataFrame(rows, columns=["module", "alpha", "sigma", "loss_mean", "loss_se",
                                        "error_mean", "cross_entropy_mean", "samples", "stage"])
    table["feasible"] = table["loss_mean"] <= epsilon
    table["samples"] = table["samples"].astype("int64")
    per_module, per_alpha = _module_tables(jobs, table)
    mu = per_module["criticality"].to_numpy(dtype=float)
    total = float(mu.sum()) if len(mu) else 0.0
    summary = {"network_criticality": total,
               "max_module_criticality": float(mu.max()) if len(mu) else 0.0,
               "bound": math.sqrt(total / len(data)),
               "epsilon": epsilon, "trained_loss": trained, "trained_error": float(base.error),
               "n_examples": len(data), "evaluations": int(sum(j.evaluations for j in jobs))}
    meta = result_meta(criticality, dict(
        modules=modules, epsilon=epsilon, loss=loss, alphas=alphas, sigmas=sigmas, samples=samples,
        noise=noise, split=split, n=n, per_class=per_class, rtol=rtol, refine=refine,
        valley=valley, seed=seed, batch_size=batch_size, memory_budget=memory_budget,
        device=device), device=ev.device, engine=ev.mode,
        self_check=_self_check(subject, data, table, base, loss, batch_size, device),
        fallback_reason=ev.fallback_reason, epsilon_rule=rule,
        noise_convention=_NOISE_DOC[noise], buffers="keep",
        bound_formula="sqrt(network_criticality / n_examples)")
    return CriticalityResult(table=table, summary=summary, meta=meta,
                             tables={"modules": per_module, "alphas": per_alpha})


def _self_check(subject: Subject, data, table: pd.DataFrame, base, loss: str, batch_size,
                device) -> dict:
    """The valley at α = 1, σ = 0 equals the trained loss, and the engine's trained network
    equals a plain evaluation."""
    trained = float(base.error if loss == "error" else base.loss)
    ends = table[(table["alpha"] == 1.0) & (table["sigma"] == 0.0)]["loss_mean"]
    check = trained_check(subject, data, base, batch_size=batch_size, device=device,
                          extra=[abs(float(v) - trained) for v in ends],
                          what="valley at α = 1, σ = 0 against the trained loss; engine against a "
                               "plain evaluation")
    return check | {"modules_checked": len(ends)}


_NOISE_DOC = {
    "absolute": "u ~ N(0, sigma^2 I) on the module's parameters",
    "relative": "per tensor k: std sigma * ||theta^alpha_k||_F / sqrt(numel_k)",
}


def _module_tables(jobs: list[_Job], table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    mods, alphas = [], []
    for job in jobs:
        out = job.outcome
        name = job.unit.name
        for s in out.alphas:
            ok = s.feasible and s.verified
            alphas.append({"module": name, "alpha": s.alpha,
                           "sigma_star": s.lo if ok else 0.0,
                           "sigma_hi": math.nan if s.hi is None else s.hi,
                           "objective": s.objective(job.d2), "feasible": bool(s.feasible),
                           "monotone": bool(s.monotone), "pruned": bool(s.pruned)})
        at = table[(table["module"] == name) & (table["alpha"] == out.alpha_star)
                   & (table["sigma"] == out.sigma_star)]
        mods.append({"module": name, "criticality": out.criticality, "alpha_star": out.alpha_star,
                     "sigma_star": out.sigma_star, "distance": math.sqrt(job.d2),
                     "loss_at_star": float(at["loss_mean"].iloc[0]) if len(at) else math.nan,
                     "monotone": all(s.monotone for s in out.alphas),
                     "evaluations": job.evaluations})
    return pd.DataFrame(mods), pd.DataFrame(alphas)


def _epsilon(epsilon: float | None, loss: str, trained: float, split: str) -> tuple[float, str]:
    if epsilon is None:
        if loss == "error":
            return trained + ERROR_MARGIN, f"default: trained error + {ERROR_MARGIN}"
        return CE_RATIO * trained, f"default: {CE_RATIO} x trained cross-entropy"
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
        raise ConfigError(f"epsilon must be a finite number (a {loss} level), got {epsilon!r}")
    if epsilon < trained - 1e-12:
        raise ConfigError(
            f"epsilon={epsilon:.6g} is below the trained model's own {split} {loss} "
            f"({trained:.6g}): no point of any valley can meet it (at α = 1, σ → 0 the loss is "
            f"the trained loss); pass epsilon >= {trained:.6g}, or None for the default")
    return float(epsilon), "given"


def _check_grid(name: str, values, low: float, closed: bool) -> list[float]:
    try:
        grid = sorted({float(v) for v in np.asarray(values, dtype=float).ravel()})
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of numbers, got {values!r}") from None
    if not grid:
        raise ConfigError(f"{name} must not be empty")
    bad = [v for v in grid if not (math.isfinite(v) and (v >= low if closed else v > low) and v <= 1.0)]
    if bad:
        interval = "[0, 1]" if closed else "(0, 1]"
        raise ConfigError(f"{name} must lie in {interval}; got {bad[0]!r}")
    return grid


__all__ = ["CriticalityResult", "criticality", "criticality_search", "noise_draws",
           "point_params"]
