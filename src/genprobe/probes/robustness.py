"""Layer robustness: re-initialization and re-randomization (Zhang, Bengio & Singer 2019).

``gp.robustness(subject)`` sets one unit (module group) i at a time to θ_i^τ for every recorded
checkpoint τ (epoch 0 = θ⁰), and to fresh draws from its initialization distribution
(re-randomization), keeping every other parameter at θ^F, and measures error and loss on a split.
A unit is *robust* when re-initializing it to θ⁰ raises the error by less than ``threshold``
(default 0.01 = one percentage point) above the trained model's, *critical* otherwise.

Re-randomization draws unit i's parameters with :func:`genprobe.params.rerandomize` (the model's
``init_module`` when it defines one, else each module's ``reset_parameters``) under seeds
``0, 1, ..., seeds - 1``; seed s is used for every unit, so a result is reproducible and
different seeds give different draws. A unit whose modules have no initializer gets NaN rows and
a logged warning (listed in ``meta["not_rerandomized"]``). Buffers (BatchNorm statistics) follow
``buffers`` (see :mod:`genprobe.params`; default ``"keep"``: they stay at θ^F).

All cells are evaluated by :class:`genprobe.engine.variants.VariantEvaluator`: each unit's
targets form one stack of variants, and only the part of the forward pass downstream of the unit
is recomputed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .. import params as P
from ..engine.variants import Edit, VariantEvaluator, replace_edit, stack_edits
from ..errors import ConfigError, StateError, check_choice
from ..results import Result
from ..subject import Subject

logger = logging.getLogger(__name__)

RERANDOMIZE = "rerandomize"
SPLITS = ("train", "test")


class RobustnessResult(Result):
    """Result of :func:`robustness`.

    ``table``: one row per (module, target, seed) with ``module``, ``target`` (checkpoint epoch
    as a string, or ``"rerandomize"``), ``seed`` (re-randomization seed; <NA> for re-init),
    ``split``, ``error``, ``loss``, ``delta_error`` and ``delta_loss`` (vs the trained model),
    ``robust`` (the module's verdict from re-init to θ⁰, repeated on its rows), ``moved``
    (‖θ_i^F − θ_i^0‖ / ‖θ_i^0‖), and ``kind`` (``"reinit"``/``"rerandomize"``), ``epoch``.
    ``summary``: ``critical_modules``, ``critical_fraction``, ``mean_delta_error_reinit`` (mean
    over modules of the re-init-to-θ⁰ delta), ``mean_delta_error_rerandomize`` (mean over
    modules and seeds), ``base_error``, ``base_loss``.
    """

    probe = "robustness"

    @property
    def map(self) -> pd.DataFrame:
        """The robustness map: error per module (rows, forward order) × target (columns:
        epochs, then re-randomization averaged over seeds)."""
        t = self.table
        order = list(dict.fromkeys(t["module"]))
        targets = list(dict.fromkeys(t["target"]))
        m = t.pivot_table(index="module", columns="target", values="error", aggfunc="mean",
                          dropna=False)
        return m.reindex(index=order, columns=targets)

    @property
    def modules(self) -> pd.DataFrame:
        """One row per module: ``module``, ``moved``, ``robust``, ``delta_error`` (re-init to θ⁰)."""
        return self.tables["modules"]

    def plot(self):
        """The paper's robustness heatmap (colour = error, annotated) and ``moved`` per module."""
        from matplotlib.figure import Figure

        m = self.map
        mods = self.modules.set_index("module").reindex(m.index)
        rows, cols = m.shape
        fig = Figure(figsize=(3.0 + 0.8 * cols + 3.0, 1.8 + 0.4 * rows), layout="constrained")
        gs = fig.add_gridspec(1, 3, width_ratios=[max(cols, 1), 0.2, 2.5])
        ax = fig.add_subplot(gs[0, 0])
        values = m.to_numpy(dtype=float)
        im = ax.imshow(values, cmap="viridis_r", aspect="auto", vmin=0.0,
                       vmax=max(float(np.nanmax(values)) if np.isfinite(values).any() else 1.0, 1e-6))
        for i in range(rows):
            for j in range(cols):
                v = values[i, j]
                if math.isfinite(v):
                    ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.5 * im.norm.vmax else "black")
        ax.set_xticks(range(cols), [c if c == RERANDOMIZE else f"τ={c}" for c in m.columns],
                      rotation=45, ha="right")
        labels = [f"{n} *" if not bool(mods.loc[n, "robust"]) else n for n in m.index]
        ax.set_yticks(range(rows), labels)
        split = self.meta.get("options", {}).get("split", "test")
        ax.set_title(f"{split} error (%) after re-initializing one module; * = critical")
        fig.colorbar(im, cax=fig.add_subplot(gs[0, 1]), label=f"{split} error")
        bx = fig.add_subplot(gs[0, 2], sharey=ax)
        bx.barh(range(rows), mods["moved"].to_numpy(dtype=float), color="tab:gray")
        bx.set_xlabel("‖θᶠ − θ⁰‖ / ‖θ⁰‖")
        bx.set_title("moved")
        bx.tick_params(labelleft=False)
        return fig


def robustness(
    subject: Subject,
    *,
    modules: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    checkpoints: Sequence[int] | None = None,
    rerandomize: bool = True,
    seeds: int = 1,
    split: Literal["train", "test"] = "test",
    threshold: float = 0.01,
    buffers: P.BufferPolicy = "keep",
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str = "auto",
) -> RobustnessResult:
    """Re-initialization / re-randomization robustness of every selected module.

    Args:
        subject: the network (needs ``init``; checkpoints give the extra columns).
        modules: a selection (see :func:`genprobe.params.select_units`); default: every module
            owning parameters, in forward order. Group a residual block with ``{name: pattern}``.
        checkpoints: epochs to re-initialize to; default: every recorded epoch (0 included).
        rerandomize: also re-randomize each module, under seeds ``0 .. seeds-1``.
        split: data to measure on. threshold: robust ⇔ Δerror (re-init to θ⁰) < threshold.
        buffers: ``"keep"`` (buffers stay at θ^F) or ``"follow"`` (move with the module).
        batch_size, memory_budget, device: see :class:`~genprobe.engine.variants.VariantEvaluator`.
    """
    check_choice("split", split, SPLITS)
    check_choice("buffers", buffers, P.BUFFER_POLICIES)
    if not isinstance(seeds, int) or seeds < (1 if rerandomize else 0):
        raise ConfigError(f"seeds must be an int >= 1 with rerandomize=True, got {seeds!r}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(f"threshold must be a finite number >= 0 (an error fraction), got {threshold!r}")
    init = subject.require_init("robustness")
    epochs = _epochs(subject, checkpoints)
    units = subject.units(modules)
    data = subject.data(split)
    ev = VariantEvaluator(subject.model, subject.final, data, batch_size=batch_size,
                          device=device, memory_budget=memory_budget)
    targets = [0] + [e for e in epochs if e != 0]
    edits: list[Edit] = [Edit(label="base")]
    failed: list[str] = []
    for unit in units:
        variants = [replace_edit(unit, subject.state(e), buffers=buffers) for e in targets]
        if rerandomize:
            try:
                variants += [replace_edit(unit, P.rerandomize(subject.model, subject.final, unit, s,
                                                              buffers=buffers), buffers=buffers)
                             for s in range(seeds)]
            except StateError as exc:
                logger.warning("robustness: cannot re-randomize %s (%s); its rows are NaN",
                               unit.name, exc)
                failed.append(unit.name)
        edits.append(stack_edits(variants, label=unit.name))
    results = ev.evaluate(edits)
    base = results[0]
    table, per_module = _tables(units, targets, epochs, results[1:], init, subject.final, base,
                                rerandomize, seeds, split, threshold)
    summary = _summary(table, per_module, base, rerandomize)
    meta = {"options": {"modules": modules if not isinstance(modules, Mapping) else dict(modules),
                        "checkpoints": epochs, "rerandomize": rerandomize, "seeds": seeds,
                        "split": split, "threshold": threshold, "buffers": buffers,
                        "batch_size": batch_size, "device": str(ev.device)},
            "seed": list(range(seeds)) if rerandomize else [],
            "engine": ev.mode, "fallback_reason": ev.fallback_reason,
            "not_rerandomized": failed,
            "n_examples": len(data)}
    return RobustnessResult(table=table, summary=summary, meta=meta,
                            tables={"modules": per_module})


def _epochs(subject: Subject, checkpoints: Sequence[int] | None) -> list[int]:
    recorded = sorted(subject.checkpoints)
    if checkpoints is None:
        return recorded
    if isinstance(checkpoints, (int, str)):
        checkpoints = [checkpoints]
    epochs = []
    for c in checkpoints:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or int(c) not in subject.checkpoints:
            raise StateError(f"no checkpoint for epoch {c!r}; recorded epochs: {recorded}")
        if int(c) not in epochs:
            epochs.append(int(c))
    return sorted(epochs)


def _tables(units, targets, epochs, results, init, final, base, rerandomize, seeds, split,
            threshold) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, per_module = [], []
    base_error, base_loss = float(base.error), float(base.loss)
    for unit, res in zip(units, results, strict=True):
        errors, losses = res.error.tolist(), res.loss.tolist()
        size = P.norm(init, unit.params)
        moved = P.distance(final, init, unit.params) / size if size > 0 else math.nan
        delta0 = errors[0] - base_error
        robust = bool(delta0 < threshold - 1e-9)  # exact ties (one example = 1pp) are critical
        per_module.append({"module": unit.name, "moved": moved, "robust": robust,
                           "delta_error": delta0, "error": errors[0]})
        cells = [("reinit", e, None, errors[i], losses[i]) for i, e in enumerate(targets) if e in epochs]
        if rerandomize:
            for s in range(seeds):
                j = len(targets) + s
                err, loss = (errors[j], losses[j]) if j < len(errors) else (math.nan, math.nan)
                cells.append(("rerandomize", -1, s, err, loss))
        cells.sort(key=lambda c: (c[0] != "reinit", c[1]))
        for kind, epoch, seed, err, loss in cells:
            rows.append({"module": unit.name, "target": str(epoch) if kind == "reinit" else RERANDOMIZE,
                         "seed": seed, "split": split, "error": err, "loss": loss,
                         "delta_error": err - base_error, "delta_loss": loss - base_loss,
                         "robust": robust, "moved": moved, "kind": kind, "epoch": epoch})
    table = pd.DataFrame(rows, columns=["module", "target", "seed", "split", "error", "loss",
                                        "delta_error", "delta_loss", "robust", "moved", "kind",
                                        "epoch"])
    table["seed"] = table["seed"].astype("Int64")
    table["robust"] = table["robust"].astype(bool)
    return table, pd.DataFrame(per_module, columns=["module", "moved", "robust", "delta_error", "error"])


def _summary(table: pd.DataFrame, per_module: pd.DataFrame, base, rerandomize: bool) -> dict[str, float]:
    n = len(per_module)
    critical = int((~per_module["robust"]).sum())
    rr = table.loc[table["kind"] == "rerandomize", "delta_error"]
    return {"critical_modules": critical, "critical_fraction": critical / n if n else math.nan,
            "mean_delta_error_reinit": float(per_module["delta_error"].mean()) if n else math.nan,
            "mean_delta_error_rerandomize": float(rr.mean()) if rerandomize and rr.notna().any() else math.nan,
            "base_error": float(base.error), "base_loss": float(base.loss)}



# ----------------------------------------------------------------------------- CLI


def cli(app) -> None:
    """Register ``genprobe probe robustness``."""
    import typer

    from ..cli import (
        DATA_DIR_HELP,
        DEVICE_HELP,
        MODULES_HELP,
        RUN_HELP,
        load_run,
        write_probe_output,
    )

    @app.command("robustness")
    def robustness_cmd(
        run: Path = typer.Argument(..., help=RUN_HELP),
        modules: list[str] = typer.Option(None, "--modules", "-m",
                                          help=MODULES_HELP),
        checkpoints: list[int] = typer.Option(None, "--checkpoints", "-c",
                                              help="Epoch(s) to re-initialize to (repeatable); default: all recorded."),
        rerandomize: bool = typer.Option(True, "--rerandomize/--no-rerandomize",
                                         help="Also re-randomize each module."),
        seeds: int = typer.Option(1, help="Re-randomization seeds 0..SEEDS-1."),
        split: str = typer.Option("test", help="Split to measure on: train or test."),
        threshold: float = typer.Option(0.01, help="Robust when re-init to θ⁰ raises error by less."),
        batch_size: int = typer.Option(None, help="Largest data chunk per forward pass."),
        out: Path = typer.Option(None, help="Result directory (default RUN/probes/robustness)."),
        device: str = typer.Option("auto", help=DEVICE_HELP),
        data_dir: Path = typer.Option(None, help=DATA_DIR_HELP),
    ) -> None:
        """Layer robustness (Zhang et al. 2019): re-initialize / re-randomize each module."""
        subject = load_run(run, data_dir)
        result = robustness(subject, modules=modules or None, checkpoints=checkpoints or None,
                            rerandomize=rerandomize, seeds=seeds, split=split, threshold=threshold,
                            batch_size=batch_size, device=device)
        write_probe_output(result, run, "robustness", out,
                           columns=["module", "target", "seed", "error", "delta_error", "robust", "moved"])


__all__ = ["RobustnessResult", "robustness"]
