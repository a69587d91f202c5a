"""Cumulative ablation (Morcos, Barrett, Rabinowitz & Botvinick 2018, "On the importance of
single directions for generalization"); units and layers as in :mod:`genprobe.probes.single_directions`.

``gp.ablation``: set k units of a layer to zero (``mode="zero"``) or to their mean activation over
the training set (``mode="mean"``; a feature map is set to its channel's mean value), for k from 0
to all units, in ``orders`` random orders (``order="random"``), or most selective first
(``"selectivity"``, class selectivity on the training set), or largest activation norm first
(``"norm"``: √E[h²] of the unit on the training set — the paper's weight norm is not defined for a
unit of a parameterless module); ``scope="all"`` ablates the same fraction of every layer at once.
Curve: accuracy against the fraction ablated; summary: its area (trapezoid over the fraction in
[0, 1], so in [0, 1]), mean over orders.

Every point is one edited network evaluated by :class:`genprobe.engine.variants.VariantEvaluator`
(only the part of the forward pass after the layer is recomputed; the levels of one order are one
stack of variants).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from .. import inputs, progress
from ..engine.activations import UnitStats
from ..engine.edits import Edit, masks_edit
from ..engine.variants import VariantEvaluator
from ..errors import ConfigError, check_choice
from ..options import (
    Split,
    check_int,
    check_resources,
    check_split,
    options_checked,
    result_meta,
    split_data,
    trained_check,
)
from ..results import names, percent
from ..seeds import generator
from ..subject import Subject, check_subject
from .registry import Option, register_probe
from .single_directions import (
    ALL,
    CurveResult,
    curve_summary,
    layer_sites,
    selectivity_index,
    train_stats,
)

MODES = ("zero", "mean")
ORDERS = ("random", "selectivity", "norm")
SCOPES = ("per-layer", "all")
DEFAULT_STEPS = 20
"""Levels of a curve when ``steps`` is None: every k for layers of at most this many units, else
this many equal fractions (k = round(j·C / steps))."""


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




class AblationResult(CurveResult):
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
                    "(repeatable); default: every activation module and activation function called in "
                    "the forward, e.g. relu(fc1).", multiple=True),
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
    mean what :mod:`genprobe.options` says. `layers`: fnmatch patterns of modules whose
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
    units = layer_sites(subject, layers, inputs.take(subject.data("train").x, slice(0, 3)))
    sites = list(units)
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    if scope == "per-layer":
        levels = {site: _levels(c, steps) for site, (c, _) in units.items()}
    else:
        fractions = _fractions(steps, min(c for c, _ in units.values()))
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    stats = train_stats(subject, units)
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
                edits.append(masks_edit({site: (masks, value[site])}, dim=stats[site].dim))
                plan.append((site, {site: levels[site]}, o))
    else:
        for o in range(n_orders):
            per_site = {}
            for site in sites:
                c = stats[site].units
                rank = ranks[f"rank/{site}/{o}"]
                per_site[site] = (_prefix_masks(rank, [round(f * c) for f in fractions]), value[site])
            edits.append(masks_edit(per_site, dim={s: stats[s].dim for s in sites}))
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
    summary = curve_summary(table, "fraction", results[0])
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



__all__ = ["AblationResult", "ablation"]
