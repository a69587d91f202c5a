"""Layer robustness: re-initialization and re-randomization (Zhang, Bengio & Singer 2019).

``gp.robustness(subject)`` sets one unit (module group) i at a time to θ_i^τ for every recorded
checkpoint τ (epoch 0 = θ⁰), and to fresh draws from its initialization distribution
(re-randomization), keeping every other parameter at θ^F, and measures error and loss on a split.
A unit is *robust* when re-initializing it to θ⁰ raises the error by less than ``threshold``
(default 0.01 = one percentage point) above the trained model's, *critical* otherwise.

Re-randomization draws unit i's parameters with :func:`genprobe.params.rerandomize` (the model's
``init_module`` when it defines one, else each module's ``reset_parameters``), ``draws`` times,
each from a generator of its own derived from ``seed``, the unit's name and the draw index: a
result is reproducible, different seeds give different draws, and no draw repeats θ⁰ by accident
of a shared global seed. A unit whose modules have no initializer gets NaN rows and
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

import numpy as np
import pandas as pd

from .. import params as P
from .. import progress
from ..engine.edits import Edit, replace_edit, stack_edits
from ..engine.variants import VariantEvaluator
from ..errors import StateError, check_choice
from ..figures import BLUE, SEQUENTIAL, VERMILLION, new_figure, styled
from ..options import (
    Checkpoints,
    Split,
    check_int,
    check_number,
    check_resources,
    check_split,
    options_checked,
    result_meta,
    select_checkpoints,
    split_data,
    trained_check,
)
from ..results import Result, names, number, percent, points
from ..subject import Subject, check_subject
from .registry import Option, register_probe

logger = logging.getLogger(__name__)

RERANDOMIZE = "rerandomize"
SPLITS = ("train", "test")


class RobustnessResult(Result):
    """Result of :func:`robustness`.

    ``table``: one row per (module, target, draw) with ``module``, ``target`` (checkpoint epoch
    as a string, or ``"rerandomize"``), ``draw`` (re-randomization draw; <NA> for re-init),
    ``split``, ``error``, ``loss``, ``delta_error`` and ``delta_loss`` (vs the trained model),
    ``robust`` (the module's verdict from re-init to θ⁰, repeated on its rows), ``moved``
    (‖θ_i^F − θ_i^0‖ / ‖θ_i^0‖), and ``kind`` (``"reinit"``/``"rerandomize"``), ``epoch``.
    ``summary``: ``critical_modules``, ``critical_fraction``, ``mean_delta_error_reinit`` (mean
    over modules of the re-init-to-θ⁰ delta), ``mean_delta_error_rerandomize`` (mean over
    modules and draws), ``base_error``, ``base_loss``.
    ``meta["self_check"]``: the engine's trained model against a plain evaluation.
    """

    probe = "robustness"

    @property
    def map(self) -> pd.DataFrame:
        """The robustness map: error per module (rows, forward order) × target (columns:
        epochs, then re-randomization averaged over draws)."""
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

    def brief(self) -> pd.DataFrame:
        """The map in percent (one row per module), with the verdict and how far it moved."""
        m = (100.0 * self.map).round(2)
        m.columns = [c if c == RERANDOMIZE else f"tau={c}" for c in m.columns]
        mods = self.modules.set_index("module").reindex(m.index)
        m["robust"] = mods["robust"].to_numpy()
        m["moved"] = mods["moved"].to_numpy()
        return m.reset_index().rename(columns={"index": "module"})

    @styled
    def plot(self):
        """The paper's robustness heatmap (colour = error, annotated) and ``moved`` per module."""
        from matplotlib.patches import Patch

        m = self.map
        mods = self.modules.set_index("module").reindex(m.index)
        rows, cols = m.shape
        fig = new_figure(3.0 + 0.8 * cols + 3.0, 1.8 + 0.4 * rows)
        gs = fig.add_gridspec(1, 3, width_ratios=[max(cols, 1), 0.2, 2.5])
        ax = fig.add_subplot(gs[0, 0])
        values = 100.0 * m.to_numpy(dtype=float)  # percent, the unit of the cells and the bar
        im = ax.imshow(values, cmap=SEQUENTIAL, aspect="auto", vmin=0.0,
                       vmax=max(float(np.nanmax(values)) if np.isfinite(values).any() else 100.0, 1e-4))
        for i in range(rows):
            for j in range(cols):
                v = values[i, j]
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if v > 0.6 * im.norm.vmax else "white")
        ax.set_xticks(range(cols), [c if c == RERANDOMIZE else f"τ={c}" for c in m.columns],
                      rotation=45, ha="right")
        robust = mods["robust"].to_numpy(dtype=bool)
        labels = [n if ok else f"{n} *" for n, ok in zip(m.index, robust, strict=True)]
        ax.set_yticks(range(rows), labels)
        ax.set_xlabel("re-initialized to checkpoint τ (epoch), or re-randomized")
        split = self.meta.get("options", {}).get("split", "test")
        ax.set_title(f"{split} error (%) after re-initializing one module; * = critical")
        fig.colorbar(im, cax=fig.add_subplot(gs[0, 1]), label=f"{split} error (%)")
        bx = fig.add_subplot(gs[0, 2], sharey=ax)
        bx.barh(range(rows), mods["moved"].to_numpy(dtype=float),
                color=[BLUE if ok else VERMILLION for ok in robust])
        bx.set_xlabel("‖θᶠ − θ⁰‖ / ‖θ⁰‖")
        bx.set_title("how far each module moved", pad=20)
        bx.tick_params(labelleft=False)
        bx.legend(handles=[Patch(color=BLUE, label="robust"), Patch(color=VERMILLION, label="critical")],
                  loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, borderaxespad=0.1,
                  handlelength=1.2, columnspacing=1.0)
        return fig

    def _rewinds_that_help(self, base: float, split: str, threshold: float) -> str:
        """A finding when rewinding a module to some checkpoint *lowers* the error by more than
        the threshold: later training made the network worse through that module (with
        corrupted labels, the signature of memorization)."""
        if self.table.empty:
            return ""
        m = self.map.drop(columns=[RERANDOMIZE], errors="ignore")
        if m.empty or not np.isfinite(m.to_numpy(dtype=float)).any():
            return ""
        stacked = m.stack().dropna()
        (module, target), best = stacked.idxmin(), float(stacked.min())
        if not best < base - threshold:
            return ""
        helping = sorted({mod for (mod, _), v in stacked.items() if v < base - threshold})
        when = "its initial values (θ⁰)" if str(target) == "0" else f"its state at epoch {target}"
        return (f" Finding: rewinding {module} to {when} lowers the {split} error from "
                f"{percent(base)} to {percent(best)}"
                + (f" ({len(helping)} modules lower it by more than {points(threshold)} at some "
                   f"checkpoint)" if len(helping) > 1 else "")
                + ": training after that point made the network worse through it — with "
                "corrupted labels, the signature of memorization.")

    def read(self) -> str:
        """Which modules are critical and robust, with the errors that decided it; a rewind that
        lowers the error (a finding); how much worse re-randomizing is; which modules moved
        most."""
        mods = self.modules
        options = self.meta.get("options", {})
        split = options.get("split", "test")
        base = self.summary["base_error"]
        critical = mods[~mods["robust"]].sort_values("error", ascending=False)
        robust = mods[mods["robust"]]
        parts = []
        if len(critical):
            worst = critical.iloc[0]
            verb = "is" if len(critical) == 1 else "are"
            text = (f"{names(list(critical['module']))} {verb} critical: re-initializing "
                    f"{worst['module']} to its initial values (θ⁰) raises the {split} error from "
                    f"{percent(base)} to {percent(worst['error'])}")
            others = [f"{r.module} to {percent(r.error)}" for r in critical.iloc[1:4].itertuples()]
            parts.append(text + (f" ({', '.join(others)})" if others else ""))
        if len(robust):
            verb = "is" if len(robust) == 1 else "are"
            low, high = robust["error"].min(), robust["error"].max()
            span = (percent(low) if percent(low) == percent(high)
                    else f"between {percent(low)} and {percent(high)}")
            change = ("lowers the {split} error (to {span}, from {base})" if high <= base else
                      "raises the {split} error by less than {t}, or lowers it (to {span}, from "
                      "{base})" if low < base else
                      "raises the {split} error by less than {t} (to {span})")
            parts.append(f"{names(list(robust['module']))} {verb} robust: re-initializing "
                         f"{'it' if len(robust) == 1 else 'any one of them'} "
                         + change.format(split=split, t=points(options.get("threshold", 0.01)),
                                         base=percent(base), span=span))
        else:
            parts.append(f"no module is robust: re-initializing any one of them raises the {split} "
                         f"error by at least {points(options.get('threshold', 0.01))}")
        text = "; ".join(parts) + "."
        text += self._rewinds_that_help(base, split, options.get("threshold", 0.01))
        rr, ri = self.summary["mean_delta_error_rerandomize"], self.summary["mean_delta_error_reinit"]
        if math.isfinite(rr):
            def change(delta: float) -> str:
                return (f"raises the {split} error by {points(delta)}" if delta > 0 else
                        f"lowers the {split} error by {points(-delta)}" if delta < 0 else
                        f"leaves the {split} error unchanged")

            text += (f" Re-randomizing a module (a fresh draw from the initial distribution instead "
                     f"of its own initial values) {change(rr)} on average; re-initializing it "
                     f"{change(ri).replace(f'the {split} error', 'it')}.")
        moved = mods.dropna(subset=["moved"])
        if len(moved):
            top = moved.loc[moved["moved"].idxmax()]
            text += (f" {top['module']} moved furthest from its initial values "
                     f"(‖θᶠ − θ⁰‖ / ‖θ⁰‖ = {number(top['moved'])})")
            if moved["robust"].any() and (~moved["robust"]).any():
                text += (f"; critical modules moved {number(moved.loc[~moved['robust'], 'moved'].mean())}"
                         f" on average, robust ones {number(moved.loc[moved['robust'], 'moved'].mean())}")
            text += "."
        return text


@register_probe(
    "robustness", RobustnessResult, paper="Zhang, Bengio & Singer 2019", needs_init=True,
    summary="test error after re-initializing / re-randomizing each module; robust or critical",
    options=(Option("rerandomize", bool, "Also re-randomize each module."),
             Option("draws", int, "Re-randomization draws per module."),
             Option("threshold", float, "Robust when re-init to θ⁰ raises the error by less (a fraction)."),
             Option("buffers", str, "BatchNorm statistics: keep (at θ^F) or follow the module.")),
    demo={}, tiny={"draws": 2},
    measures={"critical_fraction": 0, "mean_delta_error_reinit": 0,
              "mean_delta_error_rerandomize": 0})
def robustness(
    subject: Subject,
    *,
    modules: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    checkpoints: Checkpoints = "all",
    rerandomize: bool = True,
    draws: int = 1,
    split: Split = "test",
    n: int | None = None,
    per_class: int | None = None,
    threshold: float = 0.01,
    buffers: P.BufferPolicy = "keep",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str = "auto",
) -> RobustnessResult:
    """Re-initialization / re-randomization robustness of every selected module.

    Args (the shared ones — subject, modules, checkpoints, split, n, per_class, seed,
    batch_size, memory_budget, device — mean what :mod:`genprobe.options` says):
        checkpoints: epochs to re-initialize to (default ``"all"``); θ⁰ is always a column,
            since the robust/critical verdict is re-initialization to it.
        rerandomize: also re-randomize each module, ``draws`` times.
        threshold: robust ⇔ Δerror (re-init to θ⁰) < threshold (an error fraction).
        buffers: ``"keep"`` (buffers stay at θ^F) or ``"follow"`` (move with the module).
    """
    check_subject(subject, "robustness")
    check_split(split)
    check_choice("buffers", buffers, P.BUFFER_POLICIES)
    check_int("draws", draws, 1 if rerandomize else 0)
    check_number("threshold", threshold, low=0.0)
    seed = check_int("seed", seed, 0)
    init = subject.require_init("robustness")
    epochs = select_checkpoints(subject, checkpoints)
    units = subject.units(modules)
    data = split_data(subject, split, n=n, per_class=per_class, seed=seed)
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    ev = VariantEvaluator(subject.model, subject.final, data, batch_size=batch_size,
                          device=device, memory_budget=memory_budget)
    targets = [0] + [e for e in epochs if e != 0]
    edits: list[Edit] = [Edit(label="base")]
    failed: list[str] = []
    for unit in units:
        variants = [replace_edit(unit, subject.state(e), buffers=buffers) for e in targets]
        if rerandomize:
            try:
                variants += [replace_edit(unit, P.rerandomize(subject.model, subject.final, unit, seed,
                                                              draw=d, buffers=buffers), buffers=buffers)
                             for d in range(draws)]
            except StateError as exc:
                logger.warning("robustness: cannot re-randomize %s (%s); its rows are NaN",
                               unit.name, exc)
                failed.append(unit.name)
        edits.append(stack_edits(variants, label=unit.name))
    with progress.task(f"robustness ({len(units)} modules, {len(data)} examples)", total=len(data)) as bar:
        results = ev.evaluate(edits, on_progress=lambda done, total: bar.advance(done))
    base = results[0]
    table, per_module = _tables(units, targets, epochs, results[1:], init, subject.final, base,
                                rerandomize, draws, split, threshold)
    summary = _summary(table, per_module, base, rerandomize)
    check = trained_check(subject, data, base, batch_size=batch_size, device=device,
                          what="trained model: the engine against a plain evaluation")
    meta = result_meta(robustness, dict(
        modules=modules, checkpoints=epochs, rerandomize=rerandomize, draws=draws, split=split,
        n=n, per_class=per_class, threshold=threshold, buffers=buffers, seed=seed,
        batch_size=batch_size, memory_budget=memory_budget, device=device),
        device=ev.device, engine=ev.mode, self_check=check, fallback_reason=ev.fallback_reason,
        not_rerandomized=failed, n_examples=len(data))
    return RobustnessResult(table=table, summary=summary, meta=meta,
                            tables={"modules": per_module})


def _tables(units, targets, epochs, results, init, final, base, rerandomize, draws, split,
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
            for d in range(draws):
                j = len(targets) + d
                err, loss = (errors[j], losses[j]) if j < len(errors) else (math.nan, math.nan)
                cells.append(("rerandomize", -1, d, err, loss))
        cells.sort(key=lambda c: (c[0] != "reinit", c[1]))
        for kind, epoch, draw, err, loss in cells:
            rows.append({"module": unit.name, "target": str(epoch) if kind == "reinit" else RERANDOMIZE,
                         "draw": draw, "split": split, "error": err, "loss": loss,
                         "delta_error": err - base_error, "delta_loss": loss - base_loss,
                         "robust": robust, "moved": moved, "kind": kind, "epoch": epoch})
    table = pd.DataFrame(rows, columns=["module", "target", "draw", "split", "error", "loss",
                                        "delta_error", "delta_loss", "robust", "moved", "kind",
                                        "epoch"])
    table["draw"] = table["draw"].astype("Int64")
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



__all__ = ["RobustnessResult", "robustness"]
