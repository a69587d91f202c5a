"""Activation noise (Morcos, Barrett, Rabinowitz & Botvinick 2018); units and layers as in
:mod:`genprobe.probes.single_directions`.

``gp.activation_noise``: add Gaussian noise to every unit of a layer, with standard deviation
``scale`` × the unit's empirical standard deviation (of its per-example activation on the
training set), for each scale in ``scales``, ``draws`` times (the same draws at every scale);
curve: accuracy against the scale; summary: the area under it over [0, max scale], normalized to
[0, 1]. Every point is one edited network of :class:`genprobe.engine.variants.VariantEvaluator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from .. import inputs, progress
from ..engine.edits import Edit, activation_noise_edit
from ..engine.variants import VariantEvaluator
from ..errors import ConfigError
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
from ..results import number
from ..seeds import derive_seed
from ..subject import Subject, check_subject
from .registry import Option, register_probe
from .single_directions import CurveResult, curve_summary, layer_sites, train_stats

DEFAULT_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Noise scales (× each unit's standard deviation) of ``activation_noise``."""




class NoiseResult(CurveResult):
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
                    "activation module and activation function called in the forward.", multiple=True),
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
    :mod:`genprobe.options`."""
    check_subject(subject, "activation_noise")
    check_split(split)
    check_int("draws", draws, 1)
    seed = check_int("seed", seed, 0)
    scales = _check_scales(DEFAULT_SCALES if scales is None else scales)
    units = layer_sites(subject, layers, inputs.take(subject.data("train").x, slice(0, 3)))
    sites = list(units)
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    stats = train_stats(subject, units)
    edits: list[Edit] = [Edit(label="base")]
    seeds = {site: derive_seed(seed, "noise", site) for site in sites}
    for site in sites:
        std = torch.tensor(scales, dtype=torch.float64)[:, None] * stats[site].var.clamp_min(0).sqrt()[None, :]
        edits.append(activation_noise_edit(site, std, seed=seeds[site], draws=draws, dim=stats[site].dim))
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
    summary = curve_summary(table, "scale", results[0])
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



__all__ = ["NoiseResult", "activation_noise"]
