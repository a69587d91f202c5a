"""Stiffness: alignment of per-example loss gradients (Fort, Nowak, Jastrzebski & Narayanan 2019).

For examples x_1, x_2 with loss gradients g = ∇_θ L(x, y) at a state, the *cosine stiffness* is
cos(g_1, g_2) and the *sign stiffness* sign(g_1 · g_2): positive when a gradient step on x_1
also lowers the loss on x_2. ``gp.stiffness(subject)`` picks a class-balanced, seeded sample and
computes the N × N matrices with the grams engine (:mod:`genprobe.engine.grams`), then

- the *class stiffness matrix* C(a, b): mean stiffness over pairs with x_1 in class a and x_2 in
  class b, excluding i = j; *within-class* stiffness = mean of its diagonal, *between-class* =
  mean of its off-diagonal entries;
- stiffness against the input-space distance of the pair (``distance="cosine"``: 1 − cos(x_1,
  x_2) of the flattened inputs; ``"euclidean"``: ‖x_1 − x_2‖), in ``bins`` equal-width bins over
  the observed range; the *critical length* ξ is the first distance at which the mean cosine
  stiffness crosses from positive to ≤ 0, linearly interpolated between bin centres (NaN when
  it never does);
- the same at each requested checkpoint (θ^τ), to follow stiffness over training.

Pairs: ``"train-train"`` and ``"test-test"`` use one sample (rows = columns; i = j pairs are
excluded everywhere, and the distance curve uses each unordered pair once).
``"train-test"``: rows are a train sample, columns a test sample (drawn with the same
``per_class``); every (row, column) pair counts, since a train and a test example are never the
same example. Examples whose gradient is exactly zero get stiffness 0 with everything.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import inputs, progress
from ..engine.grams import IMPLEMENTATIONS, Implementation, cosine_from_gram, gram, resolve_loss
from ..errors import DataError, StateError, check_choice
from ..evaluate import logits, per_example
from ..figures import BLACK, DIVERGING, GREY, VERMILLION, new_figure, styled
from ..inputs import Inputs
from ..options import (
    Checkpoints,
    check_int,
    check_resources,
    options_checked,
    result_meta,
    sample,
    select_checkpoints,
)
from ..params import split_state
from ..results import Result, number
from ..subject import Subject, check_subject
from ..values import Data
from .registry import Option, register_probe

logger = logging.getLogger(__name__)

PAIRS = ("train-train", "train-test", "test-test")
DISTANCES = ("cosine", "euclidean")
DEFAULT_PER_CLASS = 20
"""Examples per class when neither ``per_class`` nor ``n`` is given (200 for 10 classes: a
40,000-pair matrix, enough for stable class means at a few seconds' cost on small models)."""
FINAL = "final"
MIN_BIN_PAIRS = 30
"""Distance bins holding fewer pairs are drawn hollow and unconnected: their mean is uncertain."""

Pairs = Literal["train-train", "train-test", "test-test"]
Distance = Literal["cosine", "euclidean"]


class StiffnessResult(Result):
    """Result of :func:`stiffness`.

    ``table``: the class stiffness matrix in long form, one row per (state, class pair):
    ``checkpoint`` (``"final"`` or the epoch as a string), ``class_a`` (row class),
    ``class_b`` (column class), ``cosine`` and ``sign`` (mean stiffness over the pairs),
    ``pairs`` (number of pairs, i = j excluded).
    ``summary`` (final state): ``within_class``, ``between_class`` (cosine), ``within_class_sign``,
    ``between_class_sign``, ``mean_stiffness`` (all pairs), ``critical_length`` (distance units
    of ``distance``), ``n_rows``, ``n_cols``.
    Tensors: ``cosine``, ``sign`` (N1 × N2, final state), ``indices`` / ``labels`` (rows: positions
    in their split and classes), ``col_indices`` / ``col_labels`` (columns), and with checkpoints
    ``cosine_over_training`` (S × N1 × N2, states in ``meta["states"]`` order).
    ``meta["self_check"]``: the engine's squared gradient norm of the first row example against
    a plain autograd gradient, and (same split) the cosine matrix's unit diagonal.
    """

    probe = "stiffness"

    @property
    def cosine(self) -> Tensor:
        """Cosine stiffness cos(g_i, g_j) (N1, N2), final state."""
        return self.tensors["cosine"]

    @property
    def sign(self) -> Tensor:
        """Sign stiffness sign(g_i · g_j) (N1, N2), final state."""
        return self.tensors["sign"]

    @property
    def indices(self) -> Tensor:
        """Positions of the row examples in their split, in matrix order (N1,)."""
        return self.tensors["indices"]

    @property
    def labels(self) -> Tensor:
        """Classes of the row examples (N1,)."""
        return self.tensors["labels"]

    @property
    def col_indices(self) -> Tensor:
        """Positions of the column examples in their split (N2,) (= ``indices`` for same-split pairs)."""
        return self.tensors["col_indices"]

    @property
    def col_labels(self) -> Tensor:
        """Classes of the column examples (N2,)."""
        return self.tensors["col_labels"]

    @property
    def distance_curve(self) -> pd.DataFrame:
        """``checkpoint``, ``bin_low``, ``bin_high``, ``cosine``, ``sign``, ``pairs`` per distance bin."""
        return self.tables["distance"]

    @property
    def over_training(self) -> pd.DataFrame:
        """Per state: ``checkpoint``, ``epoch`` (NaN for final), ``within_class``, ``between_class``,
        ``within_class_sign``, ``between_class_sign``, ``mean_stiffness``, ``critical_length``."""
        return self.tables["states"]

    def brief(self) -> pd.DataFrame:
        """The class stiffness matrix (cosine) at the final state: rows class of x₁, columns x₂."""
        m = self.class_matrix(FINAL).round(3)
        m.columns = [f"class {c}" for c in m.columns]
        return m.reset_index().rename(columns={"class_a": "class"})

    def class_matrix(self, checkpoint: str = FINAL, value: str = "cosine") -> pd.DataFrame:
        """The class stiffness matrix C(a, b) (rows class_a, columns class_b) at one state."""
        t = self.table[self.table["checkpoint"] == str(checkpoint)]
        if t.empty:
            raise StateError(f"no state {checkpoint!r} in this result; states: {self.meta.get('states')}")
        return t.pivot(index="class_a", columns="class_b", values=value)

    @styled
    def plot(self):
        """Class stiffness heatmap, stiffness vs input distance, and within/between-class
        stiffness over training (when checkpoints were computed)."""
        states = self.over_training
        trained = len(states) > 1
        fig = new_figure(5.0 * (3 if trained else 2), 4.4)
        fig.get_layout_engine().set(wspace=0.08)  # the colour bar's label clear of the next panel
        axes = fig.subplots(1, 3 if trained else 2)
        c = self.class_matrix(FINAL)
        values = c.to_numpy(dtype=float)
        lim = max(float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0, 1e-6)
        im = axes[0].imshow(values, cmap=DIVERGING, vmin=-lim, vmax=lim)
        step = max(1, math.ceil(len(c.columns) / 20))  # at most ~20 class labels per axis
        axes[0].set_xticks(range(len(c.columns))[::step], [str(v) for v in c.columns][::step])
        axes[0].set_yticks(range(len(c.index))[::step], [str(v) for v in c.index][::step])
        pairs = self.meta.get("options", {}).get("pairs", "")
        axes[0].set_xlabel("class of x₂" + (" (test)" if pairs == "train-test" else ""))
        axes[0].set_ylabel("class of x₁")
        axes[0].set_title(f"class stiffness (cosine), {pairs}")
        fig.colorbar(im, ax=axes[0], shrink=0.8, label="mean cos(g₁, g₂)")
        curve = self.distance_curve
        ax = axes[1]
        final_curve = curve.loc[curve["checkpoint"] == FINAL, "cosine"].to_numpy()
        epochs = [c for c in dict.fromkeys(curve["checkpoint"]) if c != FINAL]
        shown = {FINAL} | {c for c in (epochs[:1] + epochs[len(epochs) // 2:][:1])  # first, middle
                           if not np.array_equal(curve.loc[curve["checkpoint"] == c, "cosine"].to_numpy(),
                                                 final_curve)}
        for label, part in curve.groupby("checkpoint", sort=False):
            if label not in shown:
                continue
            mid = (0.5 * (part["bin_low"] + part["bin_high"])).to_numpy()
            values = part["cosine"].to_numpy(dtype=float)
            sure = part["pairs"].to_numpy() >= MIN_BIN_PAIRS
            line = ax.plot(mid, np.where(sure, values, np.nan), marker="o",
                           label="cosine, final" if label == FINAL else f"cosine, epoch {label}")[0]
            ax.plot(mid[~sure], values[~sure], ls="none", marker="o", ms=5, mfc="none",
                    color=line.get_color())
        final = curve[curve["checkpoint"] == FINAL]
        sure = (final["pairs"] >= MIN_BIN_PAIRS).to_numpy()
        ax.plot((0.5 * (final["bin_low"] + final["bin_high"])).to_numpy(),
                np.where(sure, final["sign"].to_numpy(dtype=float), np.nan), ls="--", color=GREY,
                label="sign, final")
        if not sure.all():
            ax.plot([], [], ls="none", marker="o", mfc="none", color=GREY,
                    label=f"hollow: bin of < {MIN_BIN_PAIRS} pairs")
        ax.axhline(0.0, color=BLACK, lw=0.8)
        xi = self.summary.get("critical_length", math.nan)
        if math.isfinite(xi):
            ax.axvline(xi, color=VERMILLION, lw=1.2, ls=":", label=f"critical length ξ = {xi:.3g}")
        ax.set_xlabel(f"input distance ({self.meta.get('options', {}).get('distance', '')})")
        ax.set_ylabel("mean stiffness")
        ax.set_title("stiffness vs distance")
        ax.legend(loc="best")
        if trained:
            ax = axes[2]
            seq = states[states["checkpoint"] != FINAL]
            ax.plot(seq["epoch"], seq["within_class"], marker="o", label="within class")
            ax.plot(seq["epoch"], seq["between_class"], marker="o", label="between classes")
            ax.axhline(0.0, color=BLACK, lw=0.8)
            ax.set_xlabel("epoch")
            ax.set_ylabel("cosine stiffness")
            ax.set_title("stiffness over training")
            ax.legend(loc="best")
        return fig

    def read(self) -> str:
        """Within- against between-class stiffness, the critical length, and how both moved over
        training (when checkpoints were computed)."""
        options = self.meta.get("options", {})
        within, between = self.summary["within_class"], self.summary["between_class"]
        pairs = options.get("pairs", "train-train")
        effects = []  # what a gradient step on one example does to the others (NaN: unsaid)
        if not math.isnan(within):
            effects.append(("lowers" if within >= 0.05 else "raises" if within <= -0.05
                            else "barely changes") + " the loss of others of its class")
        if not math.isnan(between):
            effects.append("leaves the loss of other classes' examples about unchanged"
                           if abs(between) < 0.05 else
                           "lowers the loss of other classes' examples too" if between > 0 else
                           "raises the loss of other classes' examples")
        joined = ", but " if len(effects) == 2 and between <= -0.05 else ", and "
        text = (f"Within-class cosine stiffness is {number(within)} and between-class "
                f"{number(between)} ({pairs} pairs of {number(self.summary['n_rows'], 9)} × "
                f"{number(self.summary['n_cols'], 9)} examples)"
                + (f": a gradient step on one example {joined.join(effects)}." if effects else "."))
        xi = self.summary["critical_length"]
        distance = options.get("distance", "cosine")
        curve = self.tables.get("distance", pd.DataFrame())
        if len(curve) and "checkpoint" in curve.columns:
            curve = curve[curve["checkpoint"] == FINAL]
        if "cosine" in curve.columns:
            curve = curve.dropna(subset=["cosine"])  # a bin without pairs has no stiffness
        trend = ""
        if len(curve) > 1 and "cosine" in curve.columns:
            near, far = float(curve["cosine"].iloc[0]), float(curve["cosine"].iloc[-1])
            how = "falls" if far < near else "rises" if far > near else "stays"
            trend = (f"Mean stiffness {how} with the input distance of the pair ({number(near)} "
                     f"for the closest, {number(far)} for the farthest)")
        if math.isfinite(xi):
            text += (f" {trend or 'Mean stiffness'}{' and' if trend else ''} first crosses zero "
                     f"at the critical length ξ = {number(xi)} ({distance} distance).")
        else:
            text += (f" {trend + '; it' if trend else 'Mean stiffness'} does not cross zero over "
                     f"the observed {distance} distances (no critical length).")
        seq = self.over_training
        seq = seq[seq["checkpoint"] != FINAL].dropna(subset=["epoch", "within_class", "between_class"])
        if len(seq) > 1:
            first, last = seq.iloc[0], seq.iloc[-1]
            text += (f" Over training, within-class stiffness went from {number(first['within_class'])}"
                     f" at epoch {first['epoch']:.0f} to {number(last['within_class'])} at epoch "
                     f"{last['epoch']:.0f}, between-class from {number(first['between_class'])} to "
                     f"{number(last['between_class'])}.")
        return text


# ----------------------------------------------------------------------------- sampling


def _states(subject: Subject, checkpoints: Checkpoints) -> list[tuple[str, float, dict]]:
    """(label, epoch, state) for each requested checkpoint (ascending), then the final state."""
    out = [(str(e), float(e), subject.checkpoints[e]) for e in select_checkpoints(subject, checkpoints)]
    out.append((FINAL, math.nan, subject.final))
    return out


def _sample(data: Data, split: str, num_classes: int, per_class, n, seed: int) -> Tensor:
    counts = torch.bincount(data.y, minlength=num_classes)[:num_classes]
    empty = [c for c in range(num_classes) if int(counts[c]) == 0]
    if empty:
        raise DataError(f"class(es) {empty} have no examples in the {split} split: stiffness needs "
                        "every class; pass a subject whose split covers all classes")
    if per_class is None and n is None:
        per_class = min(DEFAULT_PER_CLASS, int(counts.min()))
    return sample(data, num_classes=num_classes, n=n, per_class=per_class, seed=seed, split=split)


def _self_check(subject: Subject, state: dict, data: Data, diag: Tensor, cos: Tensor | None) -> dict:
    """The engine's ‖g_0‖² against one plain autograd gradient; the cosine's unit diagonal."""
    model = subject.model
    params, buffers = split_state(model, state)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        out = inputs.call(model, inputs.take(data.x, slice(0, 1)), (leaves, buffers))
        loss = resolve_loss("cross_entropy")(out, data.y[:1]).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    plain = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    value = abs(plain - float(diag[0])) / max(plain, 1e-30)
    if cos is not None:
        nonzero = diag > 0
        value = max(value, float((cos.diagonal()[nonzero] - 1).abs().max()) if bool(nonzero.any()) else 0.0)
    tol = 1e-9 if next(iter(params.values())).dtype == torch.float64 else 1e-4
    return {"what": "squared gradient norm of row 0 against autograd; unit cosine diagonal",
            "value": value, "tolerance": tol, "passed": bool(value <= tol)}


# ----------------------------------------------------------------------------- measures


def _check_losses(subject: Subject, state: dict, data: Data, positions: Tensor, split: str,
                  label: str, device) -> None:
    out = logits(subject.model, state, data.x, device=device)
    loss, _ = per_example(out, data.y)
    bad = (~torch.isfinite(loss)).nonzero().flatten()
    if len(bad):
        shown = ", ".join(str(int(positions[i])) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(f"the loss is not finite at state {label!r} for {len(bad)} {split} "
                        f"example(s), positions {shown}: stiffness is undefined there")


def _pair_distance(x1: Inputs, x2: Inputs, kind: str) -> Tensor:
    """(N1, N2) input-space distances; a tuple's or mapping's parts are flattened and joined."""
    a, b = (torch.cat([v.reshape(len(v), -1).double() for v in inputs.leaves(x)], 1) for x in (x1, x2))
    if kind == "euclidean":
        return torch.cdist(a, b)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    denom = (na[:, None] * nb[None, :]).clamp_min(1e-300)
    cos = torch.where((na[:, None] > 0) & (nb[None, :] > 0), (a @ b.T) / denom, torch.zeros(()).double())
    return (1.0 - cos).clamp(0.0, 2.0)


def _class_rows(label: str, cos: Tensor, sign: Tensor, rl: Tensor, cl: Tensor, same: bool,
                num_classes: int) -> list[dict]:
    rows = []
    for a in range(num_classes):
        ra = rl == a
        for b in range(num_classes):
            cb = cl == b
            block_c, block_s = cos[ra][:, cb], sign[ra][:, cb]
            count = block_c.numel()
            sc, ss = float(block_c.sum()), float(block_s.sum())
            if same and a == b:
                count -= int(ra.sum())
                sc -= float(block_c.diagonal().sum())
                ss -= float(block_s.diagonal().sum())
            rows.append({"checkpoint": label, "class_a": a, "class_b": b,
                         "cosine": sc / count if count else math.nan,
                         "sign": ss / count if count else math.nan, "pairs": count})
    return rows


def _distance_rows(label: str, cos: Tensor, sign: Tensor, dist: Tensor, mask: Tensor,
                   edges: Tensor) -> list[dict]:
    d, c, s = dist[mask], cos[mask], sign[mask]
    nb = len(edges) - 1
    which = torch.bucketize(d, edges[1:-1], right=True).clamp(0, nb - 1)
    counts = torch.bincount(which, minlength=nb)
    sum_c = torch.zeros(nb, dtype=torch.float64).index_add_(0, which, c)
    sum_s = torch.zeros(nb, dtype=torch.float64).index_add_(0, which, s)
    rows = []
    for k in range(nb):
        n = int(counts[k])
        rows.append({"checkpoint": label, "bin_low": float(edges[k]), "bin_high": float(edges[k + 1]),
                     "cosine": float(sum_c[k]) / n if n else math.nan,
                     "sign": float(sum_s[k]) / n if n else math.nan, "pairs": n})
    return rows


def critical_length(curve: pd.DataFrame, value: str = "cosine") -> float:
    """First distance where the binned mean stiffness crosses from > 0 to ≤ 0 (interpolated
    linearly between bin centres, skipping empty bins); NaN if it never does."""
    part = curve[curve["pairs"] > 0]
    mid = (0.5 * (part["bin_low"] + part["bin_high"])).to_numpy(dtype=float)
    val = part[value].to_numpy(dtype=float)
    for k in range(1, len(val)):
        if val[k - 1] > 0 >= val[k]:
            return float(mid[k - 1] + (mid[k] - mid[k - 1]) * val[k - 1] / (val[k - 1] - val[k]))
    return math.nan


def _state_summary(label: str, epoch: float, classes: pd.DataFrame, curve: pd.DataFrame,
                   cos: Tensor, sign: Tensor, mask: Tensor) -> dict:
    diag = classes["class_a"] == classes["class_b"]
    return {"checkpoint": label, "epoch": epoch,
            "within_class": float(classes.loc[diag, "cosine"].mean()),
            "between_class": float(classes.loc[~diag, "cosine"].mean()),
            "within_class_sign": float(classes.loc[diag, "sign"].mean()),
            "between_class_sign": float(classes.loc[~diag, "sign"].mean()),
            "mean_stiffness": float(cos[mask].mean()) if bool(mask.any()) else math.nan,
            "critical_length": critical_length(curve)}


# ----------------------------------------------------------------------------- probe


@register_probe(
    "stiffness", StiffnessResult, paper="Fort, Nowak, Jastrzebski & Narayanan 2019",
    summary="alignment of per-example loss gradients: class stiffness, stiffness vs distance",
    options=(Option("pairs", str, "train-train, train-test or test-test."),
             Option("distance", str, "Input distance: cosine or euclidean."),
             Option("bins", int, "Distance bins."),
             Option("implementation", str, "Gram route: auto, layerwise, vmap or loop.")),
    demo={"per_class": 10, "checkpoints": "all"}, tiny={"per_class": 3, "checkpoints": "all"},
    # Fort et al.: gradients that help each other (stiffness > 0), over longer distances, go
    # with generalization
    measures={"within_class": -1, "between_class": 0, "within_class_sign": -1,
              "between_class_sign": 0, "mean_stiffness": -1, "critical_length": -1},
    data=lambda options: "test" if "test" in str(options.get("pairs", "train-train")) else "train")
def stiffness(
    subject: Subject,
    *,
    per_class: int | None = None,
    n: int | None = None,
    pairs: Pairs = "train-train",
    checkpoints: Checkpoints = None,
    distance: Distance = "cosine",
    bins: int = 20,
    seed: int = 0,
    device: str = "auto",
    memory_budget: int | None = None,
    implementation: Implementation = "auto",
) -> StiffnessResult:
    """Gradient-alignment stiffness of a class-balanced sample (see the module docstring).

    Args (the shared ones — subject, per_class, n, checkpoints, seed, device, memory_budget —
    mean what :mod:`genprobe.options` says):
        per_class: default :data:`DEFAULT_PER_CLASS`, capped by the smallest class.
        pairs: ``"train-train"``, ``"train-test"`` (rows train, columns test), ``"test-test"``.
        checkpoints: states to follow over training besides θ^F (default None: θ^F only); the
            summary describes θ^F.
        distance: input-space distance for the distance curve: ``"cosine"`` or ``"euclidean"``.
        bins: number of equal-width distance bins.
        implementation: the grams engine's route (:func:`genprobe.engine.grams.gram`).
    """
    check_subject(subject, "stiffness")
    check_choice("pairs", pairs, PAIRS)
    check_choice("distance", distance, DISTANCES)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    check_int("bins", bins, 1)
    seed = check_int("seed", seed, 0)
    if subject.num_classes is None:
        raise DataError("stiffness needs labelled data: pass train=(X, y) / test=(X, y) to Subject")
    k = int(subject.num_classes)
    row_split, col_split = pairs.split("-")
    same = row_split == col_split
    row_data = subject.data(row_split)
    rows = _sample(row_data, row_split, k, per_class, n, seed)
    col_data = row_data if same else subject.data(col_split)
    cols = rows if same else _sample(col_data, col_split, k, per_class, n, seed)
    rd, cd = row_data.subset(rows), col_data.subset(cols)
    dist = _pair_distance(rd.x, cd.x, distance)
    mask = torch.ones(len(rows), len(cols), dtype=torch.bool)
    if same:
        mask = torch.ones_like(mask).triu(1)
    edges = _edges(dist[mask], bins)
    states = _states(subject, checkpoints)
    dev = check_resources(memory_budget=memory_budget, device=device)
    options_checked()
    class_rows, dist_rows, summaries, cos_all = [], [], [], []
    done: list[tuple[dict, Tensor]] = []
    used = None
    check = None
    with progress.task("stiffness", total=len(states)) as bar:
        for label, epoch, state in states:
            cos = next((c for st, c in done if _same_state(st, state)), None)
            if cos is None:
                _check_losses(subject, state, rd, rows, row_split, label, device)
                if not same:
                    _check_losses(subject, state, cd, cols, col_split, label, device)
                g = gram(subject.model, state, rd.x, None if same else cd.x, y1=rd.y,
                         y2=None if same else cd.y, implementation=implementation,
                         memory_budget=memory_budget, device=device)
                used = g.implementation
                cos = cosine_from_gram(g.matrix, g.diag1, g.diag2)
                done.append((state, cos))
                if check is None:  # on the first state computed
                    check = _self_check(subject, state, rd, g.diag1, cos if same else None)
                    check["state"] = label
            sign = torch.sign(cos)
            cr = _class_rows(label, cos, sign, rd.y, cd.y, same, k)
            dr = _distance_rows(label, cos, sign, dist, mask, edges)
            class_rows += cr
            dist_rows += dr
            summaries.append(_state_summary(label, epoch, pd.DataFrame(cr), pd.DataFrame(dr), cos, sign, mask))
            cos_all.append(cos)
            logger.info("stiffness at %s: within %.3f, between %.3f", label, summaries[-1]["within_class"],
                        summaries[-1]["between_class"])
            bar.advance()
    table = pd.DataFrame(class_rows, columns=["checkpoint", "class_a", "class_b", "cosine", "sign", "pairs"])
    curve = pd.DataFrame(dist_rows, columns=["checkpoint", "bin_low", "bin_high", "cosine", "sign", "pairs"])
    over = pd.DataFrame(summaries)
    final = summaries[-1]
    summary = {key: final[key] for key in ("within_class", "between_class", "critical_length",
                                           "within_class_sign", "between_class_sign", "mean_stiffness")}
    summary.update(n_rows=len(rows), n_cols=len(cols))
    tensors = {"cosine": cos_all[-1], "sign": torch.sign(cos_all[-1]), "indices": rows.clone(),
               "labels": rd.y.clone(), "col_indices": cols.clone(), "col_labels": cd.y.clone()}
    if len(states) > 1:
        tensors["cosine_over_training"] = torch.stack(cos_all)
    meta = result_meta(stiffness, dict(
        per_class=per_class, n=n, pairs=pairs, checkpoints=[int(s[0]) for s in states[:-1]],
        distance=distance, bins=bins, seed=seed, device=device, memory_budget=memory_budget,
        implementation=implementation), device=dev, engine=used, self_check=check,
        states=[s[0] for s in states], loss="cross_entropy")
    return StiffnessResult(table=table, summary=summary, meta=meta,
                           tables={"distance": curve, "states": over}, tensors=tensors)


def _edges(d: Tensor, bins: int) -> Tensor:
    if d.numel() == 0:
        return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    lo, hi = float(d.min()), float(d.max())
    if hi <= lo:
        hi = lo + 1e-12
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64)


def _same_state(a: dict, b: dict) -> bool:
    """Whether two states hold equal values (a final state equal to the last checkpoint is
    computed once)."""
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


__all__ = ["StiffnessResult", "critical_length", "stiffness"]
