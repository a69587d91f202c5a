"""What the single-direction probes share (Morcos, Barrett, Rabinowitz & Botvinick 2018, "On the
importance of single directions for generalization"): the layers whose units they edit and those
units' statistics, the class-selectivity index, and the accuracy curves of ablation and noise
with their areas.

A *unit* (a direction) is one feature of a linear layer's output, one channel (feature map) of a
conv layer's output, or one hidden neuron of a transformer MLP; a *layer* is a site whose output
holds the units: by default every activation module (``nn.ReLU``, ``nn.GELU``, ...) and every
activation function the forward calls itself (``relu(fc1)``: :mod:`genprobe.engine.sites`; see
:func:`genprobe.params.select_sites`). The probes: :mod:`genprobe.probes.ablation`,
:mod:`genprobe.probes.activation_noise`, :mod:`genprobe.probes.selectivity`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import inputs
from ..engine.activations import UnitStats, activation_stats
from ..engine.sites import discover, is_functional
from ..errors import ModuleSelectionError
from ..figures import new_figure, styled
from ..inputs import Inputs
from ..params import select_sites
from ..results import Result, percent
from ..subject import Subject

ALL = "all"
"""The layer name of a curve over every layer at once (ablation's ``scope="all"``)."""



def layer_sites(subject: Subject, layers, example: Inputs) -> dict[str, tuple[int, int]]:
    """The layers to probe, their unit counts and unit dims ``{layer: (C, dim)}`` (the dim the
    weights of the layer producing the output index, :func:`~genprobe.engine.sites.discover`),
    in forward order, checked on `example` (a couple of inputs).

    Default (``layers=None``): every activation module and every activation function the
    forward calls itself (a functional site, :mod:`genprobe.engine.sites`: ``"relu(fc1)"``); a
    model with neither gets every module owning parameters whose output has a unit dimension,
    except the last one (the classifier). An explicitly named layer whose output has no unit
    dimension, or no row per example (a position embedding of shape (T, D)), is a
    ModuleSelectionError; by default it is skipped.
    """
    dims: dict[str, int] = {}
    shapes = discover(copy.deepcopy(subject.model), example, subject.final, dims=dims)
    functional = [s for s in shapes if is_functional(s)]
    order = list(shapes) + [n for n in subject.forward_order() if n not in shapes]
    sites = select_sites(subject.model, layers, order, functional=functional)
    if layers is None and not sites:
        owners = [u.modules[0] for u in subject.units()]
        sites = [m for m in owners[:-1] if m]
    usable = {}
    for site in sites:
        shape = shapes.get(site)
        if not isinstance(shape, tuple) or len(shape) < 2 or shape[0] != inputs.count(example):
            if layers is not None:
                what = "is never called" if site not in shapes else f"gives {shape!r}"
                if isinstance(shape, tuple) and len(shape) >= 2:  # e.g. position embeddings
                    what += f" for {inputs.count(example)} examples, not one row per example"
                raise ModuleSelectionError(f"layer {site!r} {what}: its output has no unit dimension "
                                           "(need a tensor (N, C, ...)); choose another layer")
            continue
        usable[site] = (shape[dims[site]], dims[site])
    if not usable:
        raise ModuleSelectionError("no layer with units to probe: the model has no activation "
                                   "modules; name layers whose outputs hold units, e.g. layers='fc1'")
    return usable


def train_stats(subject: Subject, sites: Mapping[str, tuple[int, int]]) -> dict[str, UnitStats]:
    """The unit statistics of `sites` (:func:`layer_sites`) on the training set (the means of
    mean-ablation, the spreads of the noise, the selectivity order)."""
    return activation_stats(subject.model, subject.final, subject.data("train"), list(sites),
                            num_classes=subject.num_classes, dims={s: d for s, (_, d) in sites.items()})


def selectivity_index(class_means: Tensor) -> Tensor:
    """(μ_max − μ_−max) / (μ_max + μ_−max) per unit from class-conditional means (K, C);
    μ_−max is the mean of the other classes' means. 0 where the denominator is 0."""
    k = class_means.shape[0]
    top, _ = class_means.max(0)
    rest = (class_means.sum(0) - top) / max(k - 1, 1)
    denom = top + rest
    return torch.where(denom != 0, (top - rest) / torch.where(denom != 0, denom, 1.0), 0.0)


def auc(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return math.nan
    span = float(x[-1] - x[0])
    return float(np.trapezoid(y, x) / span) if span > 0 else math.nan


class CurveResult(Result):
    """Shared plotting and tables of the ablation and noise curves."""

    x: str = "fraction"
    xlabel: str = "fraction of units ablated"

    def curves(self) -> pd.DataFrame:
        """Mean, min and max accuracy over orders/draws per (layer, x)."""
        group = self.table.groupby(["layer", self.x], sort=False)["accuracy"]
        return group.agg(["mean", "min", "max"]).reset_index()

    def brief(self) -> pd.DataFrame:
        rows = []
        for layer, part in self.curves().groupby("layer", sort=False):
            rows.append({"layer": layer, "units": int(self.tables["layers"].set_index("layer").loc[layer, "units"]),
                         "auc": self.summary.get(f"auc:{layer}", math.nan),
                         "accuracy_at_start": float(part["mean"].iloc[0]),
                         "accuracy_at_end": float(part["mean"].iloc[-1])})
        return pd.DataFrame(rows)

    @styled
    def plot(self):
        """Accuracy against the fraction ablated (or the noise scale): mean over orders (line)
        and their range (band), one line per layer."""
        fig = new_figure(6.4, 4.4)
        ax = fig.add_subplot()
        for layer, part in self.curves().groupby("layer", sort=False):
            line = ax.plot(part[self.x], part["mean"], marker="o",
                           label=f"{layer} (AUC {self.summary.get(f'auc:{layer}', math.nan):.2f})")[0]
            ax.fill_between(part[self.x], part["min"], part["max"], alpha=0.2, color=line.get_color(),
                            linewidth=0)
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(f"{self.meta.get('options', {}).get('split', 'test')} accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(self.title())
        ax.legend(loc="best")
        return fig

    def title(self) -> str:
        return ""

    def read(self) -> str:
        """How far accuracy falls along each layer's curve, and which layers are the most and
        least fragile by the area under the curve."""
        split = self.meta.get("options", {}).get("split", "test")
        base = self.summary["base_accuracy"]
        curves = {layer: part for layer, part in self.curves().dropna(subset=["mean"])
                  .groupby("layer", sort=False)}
        aucs = {layer: self.summary.get(f"auc:{layer}", math.nan) for layer in curves}
        ends = {layer: float(part["mean"].iloc[-1]) for layer, part in curves.items()}
        if not ends:
            return (f"{self.doing()}: no point of any curve is defined (every accuracy is NaN), "
                    "so there is nothing to read.")
        text = f"{self.doing()}: {split} accuracy, {percent(base)} {self.start_phrase()}, is "
        if len(ends) == 1:
            layer = next(iter(ends))
            text += f"{percent(ends[layer])} {self.end_phrase()} ({layer})"
        else:
            low, high = min(ends, key=ends.get), max(ends, key=ends.get)
            if percent(ends[low]) == percent(ends[high]):
                text += f"{percent(ends[low])} in every layer {self.end_phrase()}"
            else:
                text += (f"between {percent(ends[low])} ({low}) and {percent(ends[high])} "
                         f"({high}) {self.end_phrase()}")
        middle = self.middle(curves)
        text += (f"; {middle}." if middle else ".")
        finite = {k: v for k, v in aucs.items() if math.isfinite(v)}
        low, high = (min(finite, key=finite.get), max(finite, key=finite.get)) if finite else (None, None)
        if len(finite) > 1 and f"{finite[low]:.2f}" == f"{finite[high]:.2f}":
            text += f" The area under the curve (1 = no loss at all) is {finite[low]:.2f} in every layer."
        elif len(finite) > 1:
            text += (f" The area under the curve (1 = no loss at all) is {finite[low]:.2f} for "
                     f"{low}, the most fragile layer, and {finite[high]:.2f} for {high}, the least.")
        elif finite:
            layer, auc = next(iter(finite.items()))
            text += f" The area under the curve (1 = no loss at all) is {auc:.2f} ({layer})."
        return text + " " + self.moral()

    def doing(self) -> str:
        return ""

    def start_phrase(self) -> str:
        return ""

    def end_phrase(self) -> str:
        return ""

    def middle(self, curves: dict[str, pd.DataFrame]) -> str:
        return ""

    def moral(self) -> str:
        return ""


def curve_summary(table: pd.DataFrame, x: str, base) -> dict[str, float]:
    summary = {}
    for layer, part in table.groupby("layer", sort=False):
        curve = part.groupby(x)["accuracy"].mean()
        summary[f"auc:{layer}"] = auc(curve.index.to_numpy(dtype=float), curve.to_numpy(dtype=float))
    aucs = [v for v in summary.values() if math.isfinite(v)]
    summary["auc_all"] = summary.get(f"auc:{ALL}", float(np.mean(aucs)) if aucs else math.nan)
    summary["base_accuracy"] = 1.0 - float(base.error)
    return summary



__all__ = ["ALL", "CurveResult", "auc", "curve_summary", "layer_sites", "selectivity_index", "train_stats"]
