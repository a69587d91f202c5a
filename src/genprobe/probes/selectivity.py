"""Class selectivity of single units and their importance (Morcos, Barrett, Rabinowitz &
Botvinick 2018).

The class selectivity of a unit is (μ_max − μ_−max) / (μ_max + μ_−max), with μ_max the largest
class-conditional mean of its activation and μ_−max the mean of the other classes' means: 0 means
no class preference, 1 a unit active for one class only. The formula is defined for
non-negative activations (post-ReLU): on a layer with negative ones (tanh, GELU, a pre-activation)
it can fall outside [0, 1], so such a layer is an error unless ``negative=`` says what to do:
``"skip"`` leaves it out (listed in ``meta["negative_layers"]``); ``"shift"`` — not Morcos et
al.'s definition, a variant — subtracts from each unit's class means their minimum where it is
below 0 (the least-preferred class's mean becomes 0), which keeps the index in [0, 1] and leaves
non-negative units unchanged. A unit's activation on one example is its value (a neuron) or its
mean over the feature map / the sequence (a channel). *Importance* is the accuracy drop when that
unit alone is zeroed; the paper's finding is that selectivity predicts it poorly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from .. import inputs, progress
from ..engine.activations import activation_stats
from ..engine.edits import Edit, masks_edit
from ..engine.sites import hooked
from ..engine.variants import VariantEvaluator
from ..errors import ConfigError, ModuleSelectionError, check_choice
from ..figures import new_figure, styled
from ..options import (
    Split,
    check_int,
    check_resources,
    check_split,
    options_checked,
    result_meta,
    split_data,
)
from ..results import Result, names, number, percent, points
from ..subject import Subject, check_subject
from .registry import Option, register_probe
from .single_directions import layer_sites, selectivity_index

NEGATIVE = ("error", "skip", "shift")
"""What selectivity does with a layer that has negative activations (see the module doc)."""


class SelectivityResult(Result):
    """Result of :func:`selectivity`.

    ``table``: one row per (``layer``, ``unit``): ``selectivity``, ``preferred_class`` (argmax of
    the class means), ``mean_activation``, ``importance`` (accuracy drop when the unit alone is
    zeroed; NaN with ``importance=False``).
    ``summary``: ``mean_selectivity`` (over all units), ``mean_selectivity:LAYER``,
    ``selectivity_importance_spearman`` (Spearman ρ over all units; NaN without importance),
    ``base_accuracy``.
    """

    probe = "selectivity"

    def brief(self) -> pd.DataFrame:
        g = self.table.groupby("layer", sort=False)
        out = g.agg(units=("unit", "size"), mean_selectivity=("selectivity", "mean"),
                    max_selectivity=("selectivity", "max"), mean_importance=("importance", "mean"),
                    max_importance=("importance", "max")).reset_index()
        return out

    @styled
    def plot(self):
        """Selectivity histogram per layer, and importance against selectivity."""
        fig = new_figure(10.0, 4.2)
        ax, bx = fig.subplots(1, 2)
        bins = np.linspace(0.0, 1.0, 21)
        for layer, part in self.table.groupby("layer", sort=False):
            ax.hist(part["selectivity"].clip(0, 1), bins=bins, histtype="step", linewidth=1.6,
                    label=layer)
            bx.scatter(part["selectivity"], part["importance"], s=10, alpha=0.8, label=layer)
        ax.set_xlabel("class selectivity (0: no class preference, 1: one class only)")
        ax.set_ylabel("units")
        ax.set_title(f"class selectivity of each unit (mean {self.summary['mean_selectivity']:.3f})")
        ax.legend(loc="best")
        bx.axhline(0.0, color="black", lw=0.8)
        bx.set_xlabel("class selectivity")
        split = self.meta.get("options", {}).get("split", "test")
        bx.set_ylabel(f"{split} accuracy drop, the unit alone zeroed")
        bx.set_title(f"importance vs selectivity (Spearman ρ = "
                     f"{self.summary['selectivity_importance_spearman']:.3f})")
        return fig

    def read(self) -> str:
        """Mean selectivity and its spread over layers; the most important single unit; how well
        selectivity predicts importance."""
        t = self.table
        split = self.meta.get("options", {}).get("split", "test")
        layers = self.brief().set_index("layer").dropna(subset=["mean_selectivity"])
        high, n_layers = int((t["selectivity"] > 0.8).sum()), t["layer"].nunique()
        text = (f"Mean class selectivity over {len(t)} units in {n_layers} "
                f"layer{'s' if n_layers != 1 else ''} is {number(self.summary['mean_selectivity'])}"
                " (0 = no class preference, 1 = fires for one class only)")
        if len(layers) > 1:
            lo, hi = layers["mean_selectivity"].idxmin(), layers["mean_selectivity"].idxmax()
            text += (f", from {number(layers.loc[lo, 'mean_selectivity'])} in {lo} to "
                     f"{number(layers.loc[hi, 'mean_selectivity'])} in {hi}")
        text += (f"; {high} unit{'s' if high != 1 else ''} ({percent(high / max(1, len(t)), 0)}) "
                 f"exceed{'s' if high == 1 else ''} 0.8.")
        shifted = self.meta.get("negative_layers", []) \
            if self.meta.get("options", {}).get("negative") == "shift" else []
        if shifted:
            text += (f" On {names(shifted)} (negative activations) it is the shifted variant, each "
                     "unit's least-preferred class mean moved to 0, not Morcos et al.'s index.")
        if t["importance"].notna().any():
            top = t.loc[t["importance"].idxmax()]
            text += (f" Zeroing one unit alone lowers the {split} accuracy by at most "
                     f"{points(top['importance'])} (unit {int(top['unit'])} of {top['layer']}); the "
                     f"mean drop over units is {points(t['importance'].mean(), 2)}.")
            rho = self.summary["selectivity_importance_spearman"]
            if math.isfinite(rho):
                strength = ("hardly at all" if abs(rho) < 0.1 else "weakly" if abs(rho) < 0.3
                            else "moderately" if abs(rho) < 0.6 else "strongly")
                if abs(rho) < 0.1:
                    how = "Selectivity and importance are hardly related"
                elif rho > 0:
                    how = f"More selective units are {strength} more important"
                else:
                    how = f"More selective units are {strength} less important"
                text += (f" {how}: Spearman ρ = {rho:+.3f} over {len(t)} units (Morcos et al.: "
                         "selective units are no more important).")
        return text


@register_probe(
    "selectivity", SelectivityResult, paper="Morcos, Barrett, Rabinowitz & Botvinick 2018",
    summary="class selectivity of every unit and its importance (accuracy drop when zeroed)",
    options=(Option("layers", str, "fnmatch pattern(s) of layers (repeatable); default: every "
                    "activation module and activation function called in the forward.", multiple=True),
             Option("importance", bool, "Also ablate each unit alone (one network per unit)."),
             Option("negative", str, "A layer with negative activations: error, skip (leave it "
                    "out) or shift (each unit's class means shifted to a minimum of 0).")),
    demo={}, tiny={"n": 12, "negative": "shift"},
    measures={"mean_selectivity": 0, "mean_selectivity:*": 0,
              "selectivity_importance_spearman": 0})
def selectivity(
    subject: Subject,
    *,
    layers: str | Sequence[str] | None = None,
    split: Split = "test",
    importance: bool = True,
    negative: Literal["error", "skip", "shift"] = "error",
    n: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str = "auto",
) -> SelectivityResult:
    """Selectivity and importance of every unit of the chosen layers, measured on `split` (see
    the module docstring); shared options as in :mod:`genprobe.options`."""
    check_subject(subject, "selectivity")
    check_split(split)
    seed = check_int("seed", seed, 0)
    if not isinstance(importance, bool):
        raise ConfigError(f"importance must be True or False, got {importance!r}")
    check_choice("negative", negative, NEGATIVE)
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    units = layer_sites(subject, layers, inputs.take(data.x, slice(0, 3)))
    sites = list(units)
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    stats = activation_stats(subject.model, subject.final, data, sites, num_classes=subject.num_classes,
                             dims={s: d for s, (_, d) in units.items()})
    below = [s for s in sites if float(stats[s].min.min()) < 0]
    if below and negative == "error":
        s = below[0]
        raise ConfigError(f"selectivity: layer {s!r} has negative activations (min "
                          f"{float(stats[s].min.min()):.3g}; {len(below)} such layer(s)); the index "
                          "is defined for non-negative ones (post-ReLU): choose post-ReLU layers, or "
                          "negative='skip' (leave them out) or 'shift' (a variant; see the docs)")
    if negative == "skip":
        sites = [s for s in sites if s not in below]
        if not sites:
            raise ModuleSelectionError("selectivity: every chosen layer has negative activations "
                                       "and negative='skip' leaves none; choose post-ReLU layers")
    ev = VariantEvaluator(subject.model, subject.final, data, batch_size=batch_size, device=device,
                          memory_budget=memory_budget)
    edits: list[Edit] = [Edit(label="base")]
    if importance:
        for s in sites:
            c = stats[s].units
            edits.append(masks_edit({s: (torch.eye(c, dtype=torch.bool), torch.zeros(c, dtype=torch.float64))},
                                    dim=stats[s].dim))
    with progress.task(f"selectivity ({len(sites)} layers)", total=len(data)) as bar:
        results = ev.evaluate(edits, on_progress=lambda done, total: bar.advance(done))
    base_acc = 1.0 - float(results[0].error)
    rows = []
    for i, s in enumerate(sites):
        st = stats[s]
        means = st.class_means
        if negative == "shift" and s in below:
            means = means - means.min(0).values.clamp(max=0.0)
        sel = selectivity_index(means)
        pref = st.class_means.argmax(0)
        drop = (1.0 - results[1 + i].error) if importance else None
        for u in range(st.units):
            rows.append({"layer": s, "unit": u, "selectivity": float(sel[u]),
                         "preferred_class": int(pref[u]), "mean_activation": float(st.mean[u]),
                         "importance": base_acc - float(drop[u]) if importance else math.nan})
    table = pd.DataFrame(rows, columns=["layer", "unit", "selectivity", "preferred_class",
                                        "mean_activation", "importance"])
    summary = {"mean_selectivity": float(table["selectivity"].mean())}
    for s, part in table.groupby("layer", sort=False):
        summary[f"mean_selectivity:{s}"] = float(part["selectivity"].mean())
    ok = table[["selectivity", "importance"]].dropna()
    from scipy.stats import spearmanr

    rho = spearmanr(ok["selectivity"], ok["importance"]).statistic if importance and len(ok) > 2 \
        and ok["importance"].nunique() > 1 and ok["selectivity"].nunique() > 1 else math.nan
    summary["selectivity_importance_spearman"] = float(rho)
    summary["base_accuracy"] = base_acc
    meta = result_meta(selectivity, dict(
        layers=layers, split=split, importance=importance, negative=negative, n=n, per_class=per_class, seed=seed,
        batch_size=batch_size, memory_budget=memory_budget, device=device), device=ev.device,
        engine=ev.mode, self_check=_check(subject, data, sites[0], stats[sites[0]], results,
                                          importance, base_acc),
        sites=sites, negative_layers=below, n_examples=len(data))
    return SelectivityResult(table=table, summary=summary, meta=meta)


def _check(subject, data, site, st, results, importance, base_acc) -> dict:
    """The engine's accuracy with unit 0 of the first layer zeroed, against a forward hook."""
    import copy

    if not importance:
        return {"what": "importance not computed", "value": 0.0, "tolerance": 0.0, "passed": True}
    model = copy.deepcopy(subject.model)

    def zero_unit_0(out):
        out = out.clone()
        out.select(st.dim, 0).zero_()
        return out

    correct = 0
    with torch.no_grad(), hooked(model, {site: zero_unit_0}):
        for start in range(0, len(data), 256):
            part = slice(start, start + 256)
            logits = inputs.call(model, inputs.take(data.x, part), subject.final)
            correct += int((logits.argmax(-1) == data.y[part]).sum())
    plain = correct / len(data)
    engine = 1.0 - float(results[1].error[0])
    value = abs(plain - engine)
    # float32 rounding may flip the prediction of an example sitting on a decision boundary
    tol = 1e-9 if logits.dtype == torch.float64 else 1.0 / len(data) + 1e-9
    return {"what": f"accuracy with unit 0 of {site} zeroed: the engine against a forward hook",
            "value": value, "tolerance": tol, "passed": bool(value <= tol)}


__all__ = ["SelectivityResult", "selectivity"]
