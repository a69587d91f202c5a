"""NTK phase diagrams over (σ_w², depth) (Xiao, Pennington & Schoenholz 2020, Fig. 1 and the
authors' notebook ``Disentangling_Trainability_and_Generalization.ipynb``).

``gp.ntk_phase(arch=..., sigma_w2=[...], depths=[...])`` computes, for every σ_w² and depth, the
infinite-width NTK Θ of the architecture (:mod:`genprobe.kernels.infinite`) on a seeded,
class-balanced training subset X and reports

- its spectrum on X: λ_max, λ_min and the condition number κ = λ_max/λ_min (κ = inf when
  λ_min ≤ 0 in float64: the kernel is numerically singular);
- the test accuracy of the mean prediction of the network trained to convergence on MSE,
  μ(x) = Θ(x, X)(Θ(X, X) + ridge · (tr Θ/N) · I)⁻¹ Y, with Y the mean-centred one-hot labels
  (one-hot minus 1/K), predicted class argmax_k μ_k(x); ``ridge`` is neural-tangents' relative
  ``diag_reg`` (the notebook's 1e-4);
- χ₁ and the order-to-chaos quantities of σ_w² (:mod:`genprobe.kernels.chaos`).

Each σ_w²'s depths come from one pass through the recursion. What the paper predicts: in the
ordered phase (χ₁ < 1) Θ tends to a constant matrix, κ grows with depth and the network becomes
untrainable beyond ~ξ₁ layers; in the chaotic phase (χ₁ > 1) Θ tends to a multiple of the identity,
κ → 1, but the mean prediction forgets the data (test accuracy → chance) beyond ~ξ* layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import progress
from ..engine import lapack, spectrum
from ..errors import ConfigError, DataError, check_choice
from ..figures import GREY, SEQUENTIAL, SEQUENTIAL_ALT, VERMILLION, new_figure, styled
from ..options import check_int, check_number, sample
from ..results import Result
from ..values import Data
from .chaos import critical_sigma_w2, order_to_chaos
from .infinite import (
    ARCHS,
    Activation,
    Arch,
    check_depths,
    check_hyperparameters,
    infinite,
    infinite_by_depth,
)

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-4
"""Relative ridge of the mean prediction (× tr Θ/N): the authors' notebook's ``diag_reg``."""
DEPTH_SCALE_MULTIPLE = 8.0
"""The plot draws this multiple of the depth scales ξ₁, ξ* (the authors' notebook draws 8ξ): the
depth beyond which a signal has decayed by e⁻⁸ ≈ 3e-4."""
CHANCE_MULTIPLE = 2.0
"""A depth *generalizes* while the test accuracy exceeds this multiple of chance (1/K)."""


class NTKPhaseResult(Result):
    """Result of :func:`ntk_phase`.

    ``table``: one row per (σ_w², depth): ``sigma_w2``, ``depth``, ``condition_number`` (κ),
    ``lambda_max``, ``lambda_min`` (of Θ on the training inputs), ``test_accuracy`` (of the mean
    prediction), ``chi1`` (χ₁ of σ_w²) and ``phase`` (``ordered``/``critical``/``chaotic``).
    ``tables["sigma_w2"]`` (:attr:`phases`): one row per σ_w² with ``q_star``, ``chi1``,
    ``c_star``, ``chi_c_star``, ``phase``, ``depth_scale`` (ξ₁ or ξ*) and ``generalizing_depth``
    (the largest grid depth up to which the accuracy stays above 2× chance; NaN if it never is).
    ``summary``: ``critical_sigma_w2``, ``chance`` (1/K), ``best_test_accuracy`` and, per region,
    ``max_generalizing_depth_ordered`` / ``_chaotic`` (the largest generalizing depth over the
    region's σ_w²; NaN when the grid has no σ_w² there or none generalizes).
    """

    probe = "ntk_phase"

    @property
    def phases(self) -> pd.DataFrame:
        """One row per σ_w²: the order-to-chaos quantities and the generalizing depth."""
        return self.tables["sigma_w2"]

    def grid(self, column: str) -> pd.DataFrame:
        """`column` of the table as a (depth × σ_w²) frame."""
        return self.table.pivot(index="depth", columns="sigma_w2", values=column)

    def brief(self) -> pd.DataFrame:
        """Test accuracy and log10 κ per depth (rows) and σ_w² (columns), as ``acc (log10 κ)``."""
        acc, kappa = self.grid("test_accuracy"), np.log10(self.grid("condition_number"))
        cells = {f"σw²={w:.3g}": [f"{a:.2f} ({k:.1f})" for a, k in zip(acc[w], kappa[w], strict=True)]
                 for w in acc.columns}
        return pd.DataFrame({"depth": acc.index.to_numpy(), **cells})

    def read(self) -> str:
        """What the diagram shows, in one paragraph."""
        s, crit = self.summary, self.summary["critical_sigma_w2"]
        parts = [f"The ordered/chaotic boundary (χ₁ = 1) is at σ_w² = {crit:.3g}."]
        for region in ("ordered", "chaotic"):
            depth = s.get(f"max_generalizing_depth_{region}", math.nan)
            if math.isfinite(depth):
                parts.append(f"In the {region} phase the mean prediction stays above twice chance "
                             f"up to depth {depth:.0f} at best.")
        t = self.table
        deepest = t[t["depth"] == t["depth"].max()]
        for region, rows in deepest.groupby("phase"):
            kappa = np.log10(rows["condition_number"].to_numpy(dtype=float))
            parts.append(f"At depth {int(rows['depth'].iloc[0])} ({region}), log10 κ ranges "
                         f"{np.nanmin(kappa):.1f}–{np.nanmax(kappa):.1f} and the test accuracy "
                         f"{rows['test_accuracy'].min():.2f}–{rows['test_accuracy'].max():.2f} "
                         f"(chance {s['chance']:.2f}).")
        return " ".join(parts)

    @property
    def depth_scales(self) -> pd.DataFrame:
        """The depth scale ξ₁ (ordered) or ξ* (chaotic) on a fine σ_w² grid spanning the diagram
        (``sigma_w2``, ``phase``, ``depth_scale``): the curves of :meth:`plot`."""
        return self.tables["depth_scales"]

    @styled
    def plot(self):
        """Two heatmaps over (σ_w², depth) like the paper's: log10 κ and the test accuracy, with the
        critical σ_w² (χ₁ = 1) as a vertical line and 8ξ₁ (ordered) / 8ξ* (chaotic) as curves."""
        from matplotlib import colormaps

        fig = new_figure(11.0, 4.4)
        axes = fig.subplots(1, 2, sharey=True)
        kappa = np.log10(self.grid("condition_number").to_numpy(dtype=float))
        acc = self.grid("test_accuracy").to_numpy(dtype=float)
        ws = self.grid("test_accuracy").columns.to_numpy(dtype=float)
        depths = self.grid("test_accuracy").index.to_numpy(dtype=float)
        x_edges, y_edges = _edges(ws, max(0.05, 0.05 * ws[0])), _edges(depths, 0.5)
        finite = kappa[np.isfinite(kappa)]
        top = float(finite.max()) if finite.size else 1.0
        crit = self.summary["critical_sigma_w2"]
        curves = self.depth_scales
        for ax, values, cmap, label, limits in (
                (axes[0], np.where(np.isinf(kappa), top + 1.0, kappa), SEQUENTIAL, "log10 κ",
                 (0.0, max(top, 1e-3))),
                (axes[1], acc, SEQUENTIAL_ALT, "test accuracy", (0.0, 1.0))):
            cm = colormaps[cmap].with_extremes(over=GREY)
            mesh = ax.pcolormesh(x_edges, y_edges, values, cmap=cm, vmin=limits[0], vmax=limits[1])
            fig.colorbar(mesh, ax=ax, label=label, extend="max" if np.isinf(kappa).any() and
                         ax is axes[0] else "neither")
            if x_edges[0] <= crit <= x_edges[-1]:
                ax.axvline(crit, color=VERMILLION, lw=1.4, label=f"χ₁ = 1 (σ_w² = {crit:.3g})")
            for region, style in (("ordered", "--"), ("chaotic", ":")):
                part = curves[(curves["phase"] == region) & np.isfinite(curves["depth_scale"])]
                if len(part):
                    name = "ξ₁" if region == "ordered" else "ξ*"
                    ax.plot(part["sigma_w2"], DEPTH_SCALE_MULTIPLE * part["depth_scale"],
                            color="white", ls=style, lw=1.6, marker="o" if len(part) == 1 else None,
                            label=f"{DEPTH_SCALE_MULTIPLE:g}{name} ({region})")
            ax.set_xlim(x_edges[0], x_edges[-1])
            ax.set_ylim(y_edges[0], y_edges[-1])
            ax.set_xlabel("σ_w²")
        axes[0].set_ylabel("depth L")
        axes[0].set_title("condition number of Θ(X, X)" + (" (grey: λ_min ≤ 0)"
                                                          if np.isinf(kappa).any() else ""))
        axes[1].set_title(f"test accuracy of the mean prediction (chance {self.summary['chance']:.2f})")
        if axes[1].get_legend_handles_labels()[0]:
            axes[1].legend(loc="upper right", facecolor=GREY, framealpha=0.6, labelcolor="white")
        return fig


def _edges(centres: np.ndarray, half_width: float) -> np.ndarray:
    """Cell edges around sorted cell centres: midpoints, the ends extended by half a gap."""
    if len(centres) == 1:
        return np.array([centres[0] - half_width, centres[0] + half_width])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _depth_scale_curves(sigma_w2s: list[float], sigma_b2: float, activation: str,
                        points: int = 200) -> pd.DataFrame:
    """ξ₁ / ξ* on `points` σ_w² evenly spanning the diagram (just the grid when it is one σ_w²)."""
    grid = np.linspace(sigma_w2s[0], sigma_w2s[-1], points) if len(sigma_w2s) > 1 else sigma_w2s
    rows = [order_to_chaos(float(w), sigma_b2, activation) for w in grid]
    return pd.DataFrame({"sigma_w2": [r.sigma_w2 for r in rows], "phase": [r.phase for r in rows],
                         "depth_scale": [r.depth_scale for r in rows]})


# ----------------------------------------------------------------------------- data


def _load(data, *, n_train: int, n_test: int | None, seed: int,
          data_dir) -> tuple[Data, Data, int, dict]:
    """Training and test subsets (class-balanced, seeded), the class count and provenance."""
    if isinstance(data, str):
        from ..data import load_dataset

        splits = load_dataset(data, seed=seed, data_dir=data_dir)
        train, test, k = splits.train, splits.test, splits.num_classes
        source = {"dataset": data, "normalization": splits.meta["normalization"]}
    elif isinstance(data, (tuple, list)) and len(data) == 4:
        try:
            x_tr, y_tr, x_te, y_te = (torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v)
                                      for v in data)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"data must be (x_train, y_train, x_test, y_test) arrays or tensors "
                            f"({' '.join(str(exc).split())[:80]})") from None
        for name, y in (("y_train", y_tr), ("y_test", y_te)):
            if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool or len(y) == 0 \
                    or int(y.min()) < 0:
                raise DataError(f"{name} must be a non-empty 1-D tensor of class indices >= 0")
        if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
            raise DataError(f"data: {len(x_tr)} training inputs for {len(y_tr)} labels, "
                            f"{len(x_te)} test inputs for {len(y_te)} labels")
        train, test = Data(x_tr, y_tr.long()), Data(x_te, y_te.long())
        k = int(max(int(y_tr.max()), int(y_te.max()))) + 1
        source = {"dataset": "arrays"}
    else:
        raise DataError(f"data must be a built-in dataset name or an (x_train, y_train, x_test, "
                        f"y_test) tuple, got {type(data).__name__}")
    train = train.subset(sample(train, num_classes=k, n=n_train, seed=seed, split="train"))
    n_test = len(test) if n_test is None else min(n_test, len(test))
    test = test.subset(sample(test, num_classes=k, n=n_test, seed=seed, split="test"))
    return train, test, k, source


def _as_arch_inputs(x: Tensor, arch: str) -> Tensor:
    """Vector inputs (N, D) for a CNN are read as one-channel 1-D signals (N, 1, D)."""
    return x.unsqueeze(1) if arch != "fcn" and x.dim() == 2 else x


# ----------------------------------------------------------------------------- measures


def _spectrum_and_accuracy(theta: Tensor, train: Data, test: Data, classes: int,
                           ridge: float) -> tuple[float, float, float, float]:
    """(κ, λ_max, λ_min, test accuracy of the mean prediction) from Θ of [train; test] rows
    against train columns (:mod:`genprobe.engine.spectrum`, as the empirical NTK's)."""
    if not torch.isfinite(theta).all():  # e.g. ReLU with σ_w² > 2: Θ grows as (σ_w²/2)^L
        logger.warning("the NTK overflowed float64; its spectrum and accuracy are NaN")
        return math.nan, math.nan, math.nan, math.nan
    n = len(train)
    kernel, cross = theta[:n].cpu().numpy(), theta[n:].cpu().numpy()
    try:
        stats = spectrum.analyse(kernel, cross, train, test, classes, traced=True, outputs_k=1,
                                 ridge=ridge, time=None, budget=0)
    except DataError:  # Θ + r·I not positive definite (ridge = 0, or a near-constant kernel)
        logger.warning("Θ(X, X) + ridge·I is not positive definite (ridge=%g); the test accuracy "
                       "is NaN", ridge)
        stats = spectrum.ends(spectrum.eigenvalues(kernel, lapack.symmetric_buffer(n)), n)
        stats["mean_prediction_accuracy"] = math.nan
    return (stats["condition_number"], stats["lambda_max"], stats["lambda_min"],
            stats["mean_prediction_accuracy"])


def _generalizing_depth(depths: np.ndarray, accuracy: np.ndarray, threshold: float) -> float:
    """The largest depth up to which every grid depth's accuracy exceeds `threshold`."""
    above = accuracy > threshold
    if not above[0]:
        return math.nan
    return float(depths[len(above) - 1 if above.all() else int(np.argmin(above)) - 1])


def _numbers(name: str, values, check) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, Tensor)):
        values = [values]
    values = [check(v.item() if isinstance(v, (Tensor, np.generic)) else v) for v in values]
    if not values:
        raise ConfigError(f"{name} is empty; give at least one value")
    return sorted(set(values))


def ntk_phase(
    *,
    arch: Arch = "fcn",
    sigma_w2: Sequence[float],
    depths: Sequence[int],
    sigma_b2: float = 0.18,
    activation: Activation = "erf",
    data: str | tuple = "digits",
    n_train: int = 256,
    n_test: int | None = 1000,
    ridge: float = DEFAULT_RIDGE,
    seed: int = 0,
    filter_size: int = 3,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str | torch.device = "auto",
) -> NTKPhaseResult:
    """The NTK phase diagram of an infinitely wide `arch` over (σ_w², depth) (module docstring).

    Args:
        arch: ``"fcn"``, ``"cnn-flatten"`` or ``"cnn-gap"`` (:func:`genprobe.kernels.infinite`).
        sigma_w2: the weight variances σ_w² > 0 (a list; the x axis).
        depths: hidden-layer counts ≥ 0 (a list; the y axis).
        sigma_b2: the bias variance σ_b² ≥ 0 of every layer.
        activation: ``"erf"`` (the paper's) or ``"relu"``.
        data: a built-in dataset name (``genprobe datasets``; standardized as by
            :func:`genprobe.data.load_dataset`) or an ``(x_train, y_train, x_test, y_test)`` tuple.
            Vector inputs are one-channel 1-D signals for the CNNs.
        n_train: training examples (class-balanced, seeded by `seed`).
        n_test: test examples (class-balanced, seeded); at most the test split's size; None: all.
        ridge: relative ridge of the mean prediction (× tr Θ/N), ≥ 0.
        seed: seeds the subsets (and the dataset's own draws).
        data_dir: folder of local files for the datasets that read one (``idx``, ``cifar10``).
        filter_size, batch_size, memory_budget, device: as for :func:`genprobe.kernels.infinite`.
    """
    check_choice("arch", arch, ARCHS)
    sigma_b2 = check_hyperparameters(1.0, sigma_b2, activation)[1]
    sigma_w2s = _numbers("sigma_w2", sigma_w2,
                         lambda v: check_hyperparameters(v, sigma_b2, activation)[0])
    depth_list = _numbers("depths", depths, lambda v: check_int("depths", v, 0))
    n_train = check_int("n_train", n_train, 1)
    n_test = check_int("n_test", n_test, 1, optional=True)
    ridge = check_number("ridge", ridge, low=0.0)
    seed = check_int("seed", seed, 0)
    train, test, k, source = _load(data, n_train=n_train, n_test=n_test, seed=seed,
                                   data_dir=data_dir)
    x_train, x_test = _as_arch_inputs(train.x, arch), _as_arch_inputs(test.x, arch)
    x_all = torch.cat([x_train, x_test])
    for w in sigma_w2s:  # before any work, and before the order-to-chaos root finding
        check_depths(x_all, depth_list, w, sigma_b2, activation)
    crit = critical_sigma_w2(sigma_b2, activation)
    chance = 1.0 / k

    rows, phase_rows, block = [], [], {}
    with progress.task(f"ntk_phase ({arch})", total=len(sigma_w2s)) as bar:
        for w in sigma_w2s:
            chaos = order_to_chaos(w, sigma_b2, activation)
            kernels = infinite_by_depth(arch, x_all, x_train, depths=depth_list, sigma_w2=w,
                                        sigma_b2=sigma_b2, activation=activation,
                                        filter_size=filter_size, batch_size=batch_size,
                                        memory_budget=memory_budget, device=device)
            for d in depth_list:
                kappa, lam_max, lam_min, acc = _spectrum_and_accuracy(
                    kernels[d].ntk, train, test, k, ridge)
                rows.append({"sigma_w2": w, "depth": d, "condition_number": kappa,
                             "lambda_max": lam_max, "lambda_min": lam_min, "test_accuracy": acc,
                             "chi1": chaos.chi1, "phase": chaos.phase})
            block = {"batch_size": kernels[depth_list[0]].batch_size,
                     "column_batch": kernels[depth_list[0]].column_batch}
            accs = np.array([r["test_accuracy"] for r in rows[-len(depth_list):]])
            phase_rows.append({"sigma_w2": w, "q_star": chaos.q_star, "chi1": chaos.chi1,
                               "c_star": chaos.c_star, "chi_c_star": chaos.chi_c_star,
                               "phase": chaos.phase, "depth_scale": chaos.depth_scale,
                               "generalizing_depth": _generalizing_depth(
                                   np.array(depth_list), accs, CHANCE_MULTIPLE * chance)})
            bar.advance()
        # self-check: the last σ_w²'s shallowest kernel again, from a separate call
        direct = infinite(arch, x_train, depth=depth_list[0], sigma_w2=sigma_w2s[-1],
                          sigma_b2=sigma_b2, activation=activation, filter_size=filter_size,
                          batch_size=batch_size, memory_budget=memory_budget, device=device).ntk
        one_pass = kernels[depth_list[0]].ntk[:len(train)]
        discrepancy = float((one_pass - direct).abs().max() / direct.abs().max())

    table = pd.DataFrame(rows)
    phases = pd.DataFrame(phase_rows)
    summary = {"critical_sigma_w2": crit, "chance": chance,
               "best_test_accuracy": float(table["test_accuracy"].max())}
    for region in ("ordered", "chaotic"):
        part = phases.loc[phases["phase"] == region, "generalizing_depth"]
        summary[f"max_generalizing_depth_{region}"] = float(part.max()) if part.notna().any() \
            else math.nan
    options = {"arch": arch, "sigma_w2": sigma_w2s, "depths": depth_list, "sigma_b2": sigma_b2,
               "activation": activation, "n_train": n_train, "n_test": n_test, "ridge": ridge,
               "seed": seed, "filter_size": filter_size, "batch_size": batch_size,
               "memory_budget": memory_budget, "device": str(device)}
    data_meta = {**source, "n_train": len(train), "n_test": len(test), "num_classes": k,
                 "input_shape": list(x_train.shape[1:])}
    meta = {"options": options, "block": block, "data": data_meta,
            "self_check": {"what": "NTK at the shallowest depth from the one-pass recursion against "
                                   "a separate infinite() call (max relative difference)",
                           "value": discrepancy, "tolerance": 1e-10,
                           "passed": bool(discrepancy <= 1e-10)}}
    curves = _depth_scale_curves(sigma_w2s, sigma_b2, activation)
    return NTKPhaseResult(table=table, summary=summary, meta=meta,
                          tables={"sigma_w2": phases, "depth_scales": curves})


__all__ = ["DEFAULT_RIDGE", "NTKPhaseResult", "ntk_phase"]
