"""Reliance on single directions: cumulative ablation and activation noise (Morcos, Barrett,
Rabinowitz & Botvinick 2018, "On the importance of single directions for generalization").

A *unit* (a direction) is one feature of a linear layer's output, one channel (feature map) of a
conv layer's output, or one hidden neuron of a transformer MLP; a *layer* is a module whose output
holds the units (by default every activation module: ``nn.ReLU``, ``nn.GELU``, ...; see
:func:`genprobe.params.select_sites`).

- ``gp.ablation``: set k units of a layer to zero (``mode="zero"``) or to their mean activation over
  the training set (``mode="mean"``; a feature map is set to its channel's mean value), for k from
  0 to all units, in ``orders`` random orders (``order="random"``), or most selective first
  (``"selectivity"``, class selectivity on the training set), or largest activation norm first
  (``"norm"``: √E[h²] of the unit on the training set — the paper's weight norm is not defined for
  a unit of a parameterless module); ``scope="all"`` ablates the same fraction of every layer at once.
  Curve: accuracy against the fraction ablated; summary: its area (trapezoid over the fraction in
  [0, 1], so in [0, 1]), mean over orders.
- ``gp.activation_noise``: add Gaussian noise to every unit of a layer, with standard deviation
  ``scale`` × the unit's empirical standard deviation (of its per-example activation on the
  training set), for each scale in ``scales``, ``draws`` times (the same draws at every scale);
  curve: accuracy against the scale; summary: the area under it over [0, max scale], normalized to
  [0, 1].

Every point is one edited network evaluated by :class:`genprobe.engine.variants.VariantEvaluator`
(only the part of the forward pass after the layer is recomputed; the levels of one order are one
stack of variants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import progress
from ..engine.activations import UnitStats, activation_stats, unit_dim
from ..engine.variants import Edit, VariantEvaluator, activation_noise_edit, masks_edit
from ..errors import ConfigError, ModuleSelectionError, check_choice
from ..figures import new_figure, styled
from ..params import select_sites
from ..results import Result, names, number, percent
from ..subject import Subject
from .common import (
    Split,
    check_int,
    check_resources,
    check_split,
    check_subject,
    derive_seed,
    generator,
    result_meta,
    split_data,
    trained_check,
)
from .registry import Option, options_checked, register_probe

MODES = ("zero", "mean")
ORDERS = ("random", "selectivity", "norm")
SCOPES = ("per-layer", "all")
DEFAULT_STEPS = 20
"""Levels of a curve when ``steps`` is None: every k for layers of at most this many units, else
this many equal fractions (k = round(j·C / steps))."""
DEFAULT_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Noise scales (× each unit's standard deviation) of ``activation_noise``."""
ALL = "all"


# ----------------------------------------------------------------------------- shared


def layer_sites(subject: Subject, layers, example: Tensor) -> dict[str, int]:
    """The layers to probe and their unit counts ``{layer: C}`` (the size of the output's unit
    dim, :func:`~genprobe.engine.activations.unit_dim`), in forward order, checked on `example`
    (a couple of inputs).

    Default (``layers=None``): every activation module; a model with none gets every module
    owning parameters whose output has a unit dimension, except the last one (the classifier).
    An explicitly named layer whose output has no unit dimension is a ModuleSelectionError.
    """
    sites = select_sites(subject.model, layers, subject.forward_order())
    if layers is None and not sites:
        owners = [u.modules[0] for u in subject.units()]
        sites = [m for m in owners[:-1] if m]
    shapes = _output_shapes(subject, example, sites)
    usable = {}
    for site in sites:
        shape = shapes.get(site)
        if not isinstance(shape, tuple) or len(shape) < 2:
            if layers is not None:
                what = "is never called" if site not in shapes else f"gives {shape!r}"
                raise ModuleSelectionError(f"layer {site!r} {what}: its output has no unit dimension "
                                           "(need a tensor (N, C, ...)); choose another layer")
            continue
        usable[site] = shape[unit_dim(shape)]
    if not usable:
        raise ModuleSelectionError("no layer with units to probe: the model has no activation "
                                   "modules; name layers whose outputs hold units, e.g. layers='fc1'")
    return usable


def train_stats(subject: Subject, sites: Sequence[str]) -> dict[str, UnitStats]:
    """The unit statistics of `sites` on the training set (the means of mean-ablation, the
    spreads of the noise, the selectivity order)."""
    return activation_stats(subject.model, subject.final, subject.data("train"), sites,
                            num_classes=subject.num_classes)


def _output_shapes(subject: Subject, x: Tensor, sites: Sequence[str]) -> dict[str, object]:
    """What each site's module returns on two examples: a shape tuple, or a type name."""
    import copy

    model = copy.deepcopy(subject.model)
    modules = dict(model.named_modules())
    found: dict[str, object] = {}
    handles = []
    for site in sites:
        def hook(mod, args, out, site=site):
            found.setdefault(site, tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__)
        handles.append(modules[site].register_forward_hook(hook))
    try:
        with torch.no_grad():
            torch.func.functional_call(model, subject.final, (x,))
    finally:
        for h in handles:
            h.remove()
    return found


def selectivity_index(class_means: Tensor) -> Tensor:
    """(μ_max − μ_−max) / (μ_max + μ_−max) per unit from class-conditional means (K, C);
    μ_−max is the mean of the other classes' means. 0 where the denominator is 0."""
    k = class_means.shape[0]
    top, _ = class_means.max(0)
    rest = (class_means.sum(0) - top) / max(k - 1, 1)
    denom = top + rest
    return torch.where(denom != 0, (top - rest) / torch.where(denom != 0, denom, 1.0), 0.0)


def _levels(units: int, steps: int | None) -> list[int]:
    if steps is None:
        steps = min(units, DEFAULT_STEPS)
    if steps > units:
        raise ConfigError(f"steps={steps} is beyond the unit count of a layer ({units} units); "
                          f"use steps <= {units}")
    return sorted({round(j * units / steps) for j in range(steps + 1)})


def _rank(stats: UnitStats, order: str, gen: torch.Generator) -> Tensor:
    """Units in ablation order (a permutation of 0..C-1)."""
    if order == "random":
        return torch.randperm(stats.units, generator=gen)
    key = selectivity_index(stats.class_means) if order == "selectivity" else \
        (stats.var + stats.mean ** 2).clamp_min(0).sqrt()
    return torch.argsort(-key, stable=True)


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return math.nan
    span = float(x[-1] - x[0])
    return float(np.trapezoid(y, x) / span) if span > 0 else math.nan


class _CurveResult(Result):
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


# ----------------------------------------------------------------------------- ablation


class AblationResult(_CurveResult):
    """Result of :func:`ablation`.

    ``table``: one row per (``layer``, ``k``, ``order_id``): ``fraction`` (k / units),
    ``accuracy``, ``loss`` (mean cross-entropy, nats); ``layer`` is ``"all"`` with scope="all".
    ``summary``: ``auc:LAYER`` per layer (mean over orders), ``auc_all`` (mean over layers, or the
    all-layers curve), ``base_accuracy``. ``tables["layers"]``: ``layer``, ``units``, ``dim``.
    Tensors: ``rank/LAYER/ORDER`` (the ablation order, a permutation of the units) and
    ``mean/LAYER`` (each unit's training-set mean, the value of ``mode="mean"``).
    """

    probe = "ablation"

    def title(self) -> str:
        o = self.meta.get("options", {})
        return f"cumulative ablation ({o.get('mode')}, {o.get('order')} order); band: range over orders"

    def doing(self) -> str:
        o = self.meta.get("options", {})
        how = "to zero" if o.get("mode") == "zero" else "to their training-set mean"
        order = {"random": "in random order", "selectivity": "most selective first",
                 "norm": "largest first"}.get(o.get("order"), "")
        scope = "of every layer at once" if o.get("scope") == "all" else "of a layer"
        return f"Setting more and more units {scope} {how} ({order})"

    def start_phrase(self) -> str:
        return "with none ablated"

    def end_phrase(self) -> str:
        return "with all ablated"

    def middle(self, curves: dict[str, pd.DataFrame]) -> str:
        halves, fraction = [], math.nan
        for layer, part in curves.items():
            at = part.iloc[int((part[self.x] - 0.5).abs().to_numpy().argmin())]  # nearest to half
            fraction = float(at[self.x])
            halves.append(f"{percent(at['mean'])} in {layer}")
        return f"with {percent(fraction, 0)} of the units ablated it is {names(halves, 6)}"

    def moral(self) -> str:
        return ("A network that relies less on single directions keeps a larger area; Morcos et "
                "al. found that networks which generalize better do.")


@register_probe(
    "ablation", AblationResult, paper="Morcos, Barrett, Rabinowitz & Botvinick 2018",
    summary="accuracy as more and more units of a layer are ablated; area under the curve",
    options=(Option("layers", str, "fnmatch pattern(s) of layers whose output units are ablated "
                    "(repeatable); default: every activation module.", multiple=True),
             Option("mode", str, "zero, or mean (the unit's training-set mean)."),
             Option("order", str, "random, selectivity (most selective first) or norm."),
             Option("orders", int, "Random orders (mean and range)."),
             Option("steps", int, "Levels of each curve."),
             Option("scope", str, "per-layer, or all (every layer at once).")),
    demo={"orders": 3}, tiny={"orders": 2, "steps": 3},
    # Morcos et al.: networks that generalize worse degrade faster as units are ablated
    measures={"auc_all": -1, "auc:*": -1})
def ablation(
    subject: Subject,
    *,
    layers: str | Sequence[str] | None = None,
    mode: Literal["zero", "mean"] = "zero",
    order: Literal["random", "selectivity", "norm"] = "random",
    orders: int = 5,
    steps: int | None = None,
    scope: Literal["per-layer", "all"] = "per-layer",
    split: Split = "test",
    n: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str = "auto",
) -> AblationResult:
    """Cumulative ablation curves (see the module docstring).

    The shared options (subject, split, n, per_class, seed, batch_size, memory_budget, device)
    mean what :mod:`genprobe.probes.common` says. `layers`: fnmatch patterns of modules whose
    output units are ablated (:func:`genprobe.params.select_sites`). `orders`: number of random
    orders (1 for the deterministic ones). `steps`: levels per curve (default: every k up to
    :data:`DEFAULT_STEPS` units, else that many equal fractions); more than a layer's units is
    an error.
    """
    check_subject(subject, "ablation")
    check_choice("mode", mode, MODES)
    check_choice("order", order, ORDERS)
    check_choice("scope", scope, SCOPES)
    check_split(split)
    check_int("orders", orders, 1)
    check_int("steps", steps, 1, optional=True)
    seed = check_int("seed", seed, 0)
    units = layer_sites(subject, layers, subject.data("train").x[:2])
    sites = list(units)
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    if scope == "per-layer":
        levels = {site: _levels(c, steps) for site, c in units.items()}
    else:
        fractions = _fractions(steps, min(units.values()))
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    stats = train_stats(subject, sites)
    n_orders = orders if order == "random" else 1
    value = {s: (stats[s].element_mean if mode == "mean" else torch.zeros(stats[s].units, dtype=torch.float64))
             for s in sites}
    edits: list[Edit] = [Edit(label="base")]
    plan = []  # (layer name, levels per site, order_id)
    ranks = {f"rank/{s}/{o}": _rank(stats[s], order, generator(seed, "ablation", s, o))
             for s in sites for o in range(n_orders)}
    if scope == "per-layer":
        for site in sites:
            for o in range(n_orders):
                rank = ranks[f"rank/{site}/{o}"]
                masks = _prefix_masks(rank, levels[site])
                edits.append(masks_edit({site: (masks, value[site])}))
                plan.append((site, {site: levels[site]}, o))
    else:
        for o in range(n_orders):
            per_site = {}
            for site in sites:
                c = stats[site].units
                rank = ranks[f"rank/{site}/{o}"]
                per_site[site] = (_prefix_masks(rank, [round(f * c) for f in fractions]), value[site])
            edits.append(masks_edit(per_site))
            plan.append((ALL, {"fractions": fractions}, o))
    ev = VariantEvaluator(subject.model, subject.final, data, batch_size=batch_size, device=device,
                          memory_budget=memory_budget)
    with progress.task(f"ablation ({len(edits) - 1} curves, {len(data)} examples)", total=len(data)) as bar:
        results = ev.evaluate(edits, on_progress=lambda done, total: bar.advance(done))
    rows = []
    for (layer, levels, o), res in zip(plan, results[1:], strict=True):
        if layer == ALL:
            xs = levels["fractions"]
            ks = [math.nan] * len(xs)
        else:
            ks = levels[layer]
            xs = [k / stats[layer].units for k in ks]
        for k, x, err, loss in zip(ks, xs, res.error.tolist(), res.loss.tolist(), strict=True):
            rows.append({"layer": layer, "k": k, "fraction": x, "order_id": o,
                         "accuracy": 1.0 - err, "loss": loss})
    table = pd.DataFrame(rows, columns=["layer", "k", "fraction", "order_id", "accuracy", "loss"])
    summary = _curve_summary(table, "fraction", results[0])
    layers_table = pd.DataFrame([{"layer": s, "units": stats[s].units, "dim": stats[s].dim} for s in sites]
                                + ([{"layer": ALL, "units": sum(stats[s].units for s in sites), "dim": -1}]
                                   if scope == "all" else []))
    check = trained_check(subject, data, results[0], batch_size=batch_size, device=device,
                          what="k = 0 (no unit ablated) against a plain evaluation")
    meta = result_meta(ablation, dict(
        layers=layers, mode=mode, order=order, orders=n_orders, steps=steps, scope=scope,
        split=split, n=n, per_class=per_class, seed=seed, batch_size=batch_size,
        memory_budget=memory_budget, device=device), device=ev.device, engine=ev.mode,
        self_check=check, sites=sites, n_examples=len(data),
        mean_source="training-set mean of each unit (element mean for feature maps)")
    tensors = ranks | {f"mean/{s}": stats[s].element_mean for s in sites}
    return AblationResult(table=table, summary=summary, meta=meta, tables={"layers": layers_table},
                          tensors=tensors)


def _prefix_masks(rank: Tensor, levels: Sequence[int]) -> Tensor:
    """(len(levels), C) masks: row j ablates the first levels[j] units of `rank`."""
    c = len(rank)
    masks = torch.zeros(len(levels), c, dtype=torch.bool)
    for j, k in enumerate(levels):
        masks[j, rank[:k]] = True
    return masks


def _fractions(steps: int | None, smallest: int) -> list[float]:
    steps = min(smallest, DEFAULT_STEPS) if steps is None else steps
    if steps > smallest:
        raise ConfigError(f"steps={steps} is beyond the unit count of a layer ({smallest} units); "
                          f"use steps <= {smallest}")
    return [j / steps for j in range(steps + 1)]


def _curve_summary(table: pd.DataFrame, x: str, base) -> dict[str, float]:
    summary = {}
    for layer, part in table.groupby("layer", sort=False):
        curve = part.groupby(x)["accuracy"].mean()
        summary[f"auc:{layer}"] = _auc(curve.index.to_numpy(dtype=float), curve.to_numpy(dtype=float))
    aucs = [v for v in summary.values() if math.isfinite(v)]
    summary["auc_all"] = summary.get(f"auc:{ALL}", float(np.mean(aucs)) if aucs else math.nan)
    summary["base_accuracy"] = 1.0 - float(base.error)
    return summary


# ----------------------------------------------------------------------------- noise


class NoiseResult(_CurveResult):
    """Result of :func:`activation_noise`.

    ``table``: one row per (``layer``, ``scale``, ``draw``): ``accuracy``, ``loss``.
    ``summary``: ``auc:LAYER`` (area under accuracy vs scale over [0, max scale], normalized to
    [0, 1]; mean over draws), ``auc_all`` (mean over layers), ``base_accuracy``.
    """

    probe = "activation_noise"
    x = "scale"
    xlabel = "noise scale (× each unit's standard deviation)"

    def title(self) -> str:
        return "activation noise; band: range over draws"

    def doing(self) -> str:
        return ("Adding Gaussian noise to the units of a layer, with a standard deviation of "
                "scale × each unit's own")

    def start_phrase(self) -> str:
        return "without noise"

    def end_phrase(self) -> str:
        return f"at scale {number(float(self.table[self.x].max()))}"

    def moral(self) -> str:
        return "A layer whose accuracy holds under noise does not rely on a few precise directions."


@register_probe(
    "activation_noise", NoiseResult, paper="Morcos, Barrett, Rabinowitz & Botvinick 2018",
    summary="accuracy as Gaussian noise proportional to each unit's spread is added to a layer",
    options=(Option("layers", str, "fnmatch pattern(s) of layers (repeatable); default: every "
                    "activation module.", multiple=True),
             Option("scales", float, "Noise scale (repeatable) [0, 0.25, 0.5, 1, 2, 4].", multiple=True),
             Option("draws", int, "Noise draws per scale (the same at every scale).")),
    demo={"draws": 2}, tiny={"draws": 2, "scales": [0.0, 0.5, 2.0]},
    measures={"auc_all": -1, "auc:*": -1})
def activation_noise(
    subject: Subject,
    *,
    layers: str | Sequence[str] | None = None,
    scales: Sequence[float] | None = None,
    draws: int = 3,
    split: Split = "test",
    n: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str = "auto",
) -> NoiseResult:
    """Accuracy against activation noise (see the module docstring); shared options as in
    :mod:`genprobe.probes.common`."""
    check_subject(subject, "activation_noise")
    check_split(split)
    check_int("draws", draws, 1)
    seed = check_int("seed", seed, 0)
    scales = _check_scales(DEFAULT_SCALES if scales is None else scales)
    sites = list(layer_sites(subject, layers, subject.data("train").x[:2]))
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    stats = train_stats(subject, sites)
    edits: list[Edit] = [Edit(label="base")]
    seeds = {site: derive_seed(seed, "noise", site) for site in sites}
    for site in sites:
        std = torch.tensor(scales, dtype=torch.float64)[:, None] * stats[site].var.clamp_min(0).sqrt()[None, :]
        edits.append(activation_noise_edit(site, std, seed=seeds[site], draws=draws))
    ev = VariantEvaluator(subject.model, subject.final, data, batch_size=batch_size, device=device,
                          memory_budget=memory_budget)
    with progress.task(f"activation noise ({len(sites)} layers, {len(data)} examples)", total=len(data)) as bar:
        results = ev.evaluate(edits, on_progress=lambda done, total: bar.advance(done))
    rows = []
    for site, res in zip(sites, results[1:], strict=True):
        for v, (err, loss) in enumerate(zip(res.error.tolist(), res.loss.tolist(), strict=True)):
            rows.append({"layer": site, "scale": scales[v // draws], "draw": v % draws,
                         "accuracy": 1.0 - err, "loss": loss})
    table = pd.DataFrame(rows, columns=["layer", "scale", "draw", "accuracy", "loss"])
    summary = _curve_summary(table, "scale", results[0])
    zero = table[table["scale"] == 0.0]
    check = trained_check(  # and scale 0 must give the trained network exactly
        subject, data, results[0], batch_size=batch_size, device=device,
        extra=[float((zero["accuracy"] - (1.0 - float(results[0].error))).abs().max())] if len(zero) else [],
        what="zero noise and the engine's trained network against a plain evaluation")
    layers_table = pd.DataFrame([{"layer": s, "units": stats[s].units, "dim": stats[s].dim} for s in sites])
    meta = result_meta(activation_noise, dict(
        layers=layers, scales=scales, draws=draws, split=split, n=n, per_class=per_class,
        seed=seed, batch_size=batch_size, memory_budget=memory_budget, device=device),
        device=ev.device, engine=ev.mode, self_check=check, sites=sites, n_examples=len(data),
        noise_seed=seeds,
        std_source="standard deviation of each unit's per-example activation on the training set")
    return NoiseResult(table=table, summary=summary, meta=meta, tables={"layers": layers_table})


def _check_scales(scales) -> list[float]:
    try:
        out = sorted({float(s) for s in np.asarray(scales, dtype=float).ravel()})
    except (TypeError, ValueError):
        raise ConfigError(f"scales must be numbers >= 0, got {scales!r}") from None
    if not out or any(not math.isfinite(s) or s < 0 for s in out):
        raise ConfigError(f"scales must be a non-empty list of finite numbers >= 0, got {scales!r}")
    return out


__all__ = ["AblationResult", "NoiseResult", "ablation", "activation_noise", "layer_sites", "train_stats",
           "selectivity_index"]
