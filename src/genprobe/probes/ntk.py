"""The empirical neural tangent kernel (Xiao, Pennington & Schoenholz 2020).

For a network f(θ, x) with K outputs, the empirical NTK of examples x, x' is
Θ(x, x')_kl = Σ_p ∂f_k(x)/∂θ_p · ∂f_l(x')/∂θ_p: the grams engine (:mod:`genprobe.engine.grams`)
with the network's outputs in place of the loss. ``gp.ntk(subject)`` computes, at the trained state
and at each requested checkpoint, on a class-balanced seeded sample X of the training set:

- the kernel Θ(X, X): traced (default), the **mean** over the K outputs (1/K) Σ_k Θ_kk, (N, N) —
  neural-tangents' convention, directly comparable with the per-output infinite-width kernel of
  :mod:`genprobe.kernels` — or the full (N, N, K, K) array (neural-tangents' layout);
- its spectrum: λ_max, λ_min, the condition number κ = λ_max / λ_min (inf when λ_min ≤ 0);
- the largest stable learning rate of full-batch gradient descent on the MSE loss
  L(θ) = (1/2N) Σ_i ‖f(x_i) − y_i‖² (mean over examples, sum over outputs) of the linearized
  network: each kernel eigen-mode decays as (1 − ηλ/N)^t, so η < 2N / λ_max;
- the kernel's mean prediction on a test sample x: μ(x) = Θ(x, X) (Θ(X, X) + r·I)⁻¹ Y, Y the
  mean-centred one-hot labels (one-hot − 1/C), r = ``ridge`` × the mean of Θ's diagonal (ridge is
  relative, as neural-tangents' ``diag_reg``), and its test accuracy (argmax over classes); with
  ``time`` (= η·t, learning rate × steps) also the prediction after that much gradient flow,
  μ_t(x) = Θ(x, X) Θ⁻¹ (I − e^{−(ηt/N)Θ}) Y, from the eigendecomposition (no ridge needed).

Any N: the kernel is built block by block within the memory budget. When it does not fit in
memory (N² · 8 bytes traced, N²K² · 8 untraced), ``out=DIR`` streams it block by block into
memory-mapped files (:mod:`genprobe.engine.gramstore`): a killed run continues from the blocks
written. The spectrum is dense (LAPACK, in place: :mod:`genprobe.engine.lapack`) when the upper
triangle of the square matrix fits the memory budget (~4·N² bytes: 3.4 GiB at N = 30,000) — the
solve of the mean prediction and the eigendecomposition take turns on that one buffer; otherwise
the top and bottom ``LANCZOS_K`` (:mod:`genprobe.engine.spectrum`) eigenvalues come from a Lanczos solver (ARPACK) over the file,
and the mean prediction, which needs a dense solve, is NaN (logged). The prediction at ``time``
needs the eigenvectors too: two copies.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from time import perf_counter

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import inputs, progress
from ..device import resolve_device
from ..engine import spectrum
from ..engine.grams import IMPLEMENTATIONS, Implementation, gram
from ..engine.gramstore import digest, open_store, stream_gram
from ..errors import ConfigError, DataError, check_choice
from ..figures import BLUE, GREY, SEQUENTIAL, VERMILLION, new_figure, styled
from ..memory import resolve_memory_budget, return_freed_memory
from ..options import (
    Checkpoints,
    check_int,
    check_number,
    options_checked,
    result_meta,
    sample,
    select_checkpoints,
)
from ..results import Result, number, percent
from ..subject import Subject, check_subject
from ..values import Data
from .registry import Option, register_probe

logger = logging.getLogger(__name__)

FINAL = "final"


class NTKResult(Result):
    """Result of :func:`ntk`.

    ``table``: one row per state (the checkpoints asked for, ascending, then ``"final"``):
    ``state``, ``epoch`` (NaN for final), ``lambda_max``, ``lambda_min``, ``condition_number``,
    ``max_learning_rate`` (2N/λ_max, module docstring), ``mean_eigenvalue`` (trace / N),
    ``mean_prediction_accuracy`` (fraction of test examples), ``mean_prediction_accuracy_t``
    (NaN unless ``time``), ``spectrum`` (``"dense"`` or ``"lanczos"``).
    ``tables["spectrum"]``: ``state``, ``rank`` (0 = largest), ``eigenvalue``: every eigenvalue
    (dense) or the top and bottom ones (Lanczos).
    ``summary`` (final state): ``lambda_max``, ``lambda_min``, ``condition_number``,
    ``max_learning_rate``, ``mean_prediction_accuracy``, ``mean_prediction_accuracy_t`` (with
    ``time``); with checkpoints also ``lambda_max_ratio`` and ``condition_number_ratio``
    (final over the earliest checkpoint asked for).
    Tensors (final state): ``kernel`` (N, N) or (N, N, K, K), ``kernel_test`` (N_test, N[, K, K])
    — read from the ``out`` files when streamed —, ``eigenvalues`` (descending),
    ``indices`` / ``labels`` (train positions and classes), ``test_indices`` / ``test_labels``.
    """

    probe = "ntk"

    def _matrix(self, name: str) -> Tensor | None:
        if name in self.tensors:
            return self.tensors[name]
        path = self.meta.get("kernel_files", {}).get(name)
        if path is None:
            return None
        if not Path(path).is_file():
            raise DataError(f"the streamed {name} {path} is gone; run gp.ntk again with out= to rebuild it")
        return torch.from_numpy(np.load(path, mmap_mode="c"))

    @property
    def kernel(self) -> Tensor:
        """Θ(X, X) at the final state: (N, N) traced (mean over outputs) or (N, N, K, K)."""
        return self._matrix("kernel")

    @property
    def kernel_test(self) -> Tensor | None:
        """Θ(X_test, X) at the final state: (N_test, N) or (N_test, N, K, K); None without a test sample."""
        return self._matrix("kernel_test")

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of Θ(X, X) at the final state, descending (all, or the Lanczos ends)."""
        return self.tensors["eigenvalues"]

    def brief(self) -> pd.DataFrame:
        return self.table.drop(columns=["epoch"])

    def read(self) -> str:
        """The spectrum's extent, what it allows gradient descent, what the kernel predicts, and
        how λ_max and κ moved over training (with checkpoints)."""
        s, n = self.summary, int(self.meta.get("n", 0))
        kappa, lam_min, rate = s["condition_number"], s["lambda_min"], s["max_learning_rate"]
        said = []
        if math.isfinite(rate):
            said.append("full-batch gradient descent on the mean squared error of the linearized "
                        f"network is stable below a learning rate of {number(rate)}")
        if lam_min > 0 and math.isfinite(kappa):
            said.append("its slowest mode needs about κ times as many steps as its fastest")
        elif lam_min <= 0:
            said.append("the kernel is singular at this precision (λ_min ≤ 0): gradient descent "
                        "never fits the directions of its zero eigenvalues")
        text = (f"The empirical NTK of {n} training examples has eigenvalues from {number(lam_min)} "
                f"to {number(s['lambda_max'])} (condition number κ = {number(kappa)})"
                + (f": {', and '.join(said)}." if said else "."))
        acc = s["mean_prediction_accuracy"]
        if math.isfinite(acc):
            chance = 1 / max(1, len(set(self.tensors["labels"].tolist())))
            text += (f" The kernel's mean prediction, the linearized network trained to convergence, "
                     f"classifies {percent(acc)} of the test sample correctly (chance {percent(chance)}).")
        if "mean_prediction_accuracy_t" in s and math.isfinite(s["mean_prediction_accuracy_t"]):
            text += (f" After a training time η·t = {number(self.meta['options']['time'])} it reaches "
                     f"{percent(s['mean_prediction_accuracy_t'])}.")
        if "lambda_max_ratio" in s:
            first = self.table.iloc[0]["state"]

            def moved(what: str, ratio: float) -> list[str]:
                if math.isnan(ratio):
                    return []
                return [f"{what} grew {number(ratio)}-fold" if ratio > 1 else
                        f"{what} shrank to {number(ratio)} times its value" if ratio < 1 else
                        f"{what} stayed"]

            changes = moved("λ_max", s["lambda_max_ratio"]) + moved("κ", s.get("condition_number_ratio", math.nan))
            if changes:
                text += f" From epoch {first} to the end of training, {' and '.join(changes)}."
        return text

    @styled
    def plot(self):
        """Left: the spectrum of each state (log-log, eigenvalue against rank). Right, with
        checkpoints: λ_max and κ over training."""
        from matplotlib import colormaps

        over_training = len(self.table) > 1
        fig = new_figure(10.5 if over_training else 5.5, 4.0)
        axes = fig.subplots(1, 2 if over_training else 1, squeeze=False)[0]
        spec = self.tables["spectrum"]
        states = list(self.table["state"])
        cmap = colormaps[SEQUENTIAL]
        colours = [cmap(0.85 * i / max(1, len(states) - 1)) for i in range(len(states))]
        ax = axes[0]
        for state, colour in zip(states, colours, strict=True):
            rows = spec[spec["state"] == state]
            positive = rows[rows["eigenvalue"] > 0]
            ax.plot(positive["rank"] + 1, positive["eigenvalue"], ".", ms=3,
                    color="black" if state == FINAL and len(states) > 1 else colour,
                    label=state if state == FINAL else f"epoch {state}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rank (1 = largest)")
        ax.set_ylabel("eigenvalue of Θ(X, X)")
        n = int(self.meta.get("n", 0))
        how = "" if spec["state"].eq(FINAL).sum() == n else " (Lanczos: both ends)"
        ax.set_title(f"NTK spectrum{how}, N = {n}, κ = {number(self.summary['condition_number'])}")
        if len(states) > 1:
            ax.legend(markerscale=3)
        if over_training:
            ax = axes[1]
            epochs = [float("nan") if s == FINAL else float(s) for s in states]
            last = max([e for e in epochs if not math.isnan(e)], default=0.0)
            x = [last + 1 if math.isnan(e) else e for e in epochs]
            ax.plot(x, self.table["lambda_max"], "o-", color=BLUE, label="λ_max")
            ax.plot(x, self.table["condition_number"], "s--", color=VERMILLION, label="κ")
            ax.set_yscale("log")
            ax.set_xticks(x, [s if s == FINAL else str(s) for s in states])
            ax.set_xlabel("epoch")
            ax.set_title("λ_max and κ over training")
            ax.grid(True, which="major", color=GREY, alpha=0.2)
            ax.legend()
        return fig


@register_probe(
    "ntk", NTKResult, paper="Xiao, Pennington & Schoenholz 2020",
    summary="empirical NTK: spectrum, condition number, largest stable learning rate, and the "
            "test accuracy of the kernel's mean prediction",
    options=(Option("n_test", int, "Test examples for the mean prediction (0: none; default: as many "
                                   "as the train sample, or the whole test split)."),
             Option("trace_outputs", bool, "Mean over the K outputs (N x N) or the full (N, N, K, K) kernel."),
             Option("ridge", float, "Ridge of the mean-prediction solve, relative to the mean diagonal."),
             Option("time", float, "Also the prediction after gradient flow of duration "
                                   "learning rate x steps."),
             Option("out", Path, "Stream the kernels into this directory (any N; resumable).",
                    flag="kernel-dir"),
             Option("implementation", str, "Gram route: auto, layerwise, vmap or loop.")),
    demo={"n": 200, "checkpoints": "all"}, tiny={"n": 6, "n_test": 4, "checkpoints": "all", "time": 10.0},
    # max_learning_rate is 2 / lambda_max; the mean prediction's accuracy is on the test split
    measures={"lambda_max": 0, "lambda_min": 0, "condition_number": 0, "lambda_max_ratio": 0,
              "condition_number_ratio": 0}, data=lambda options: "train")
def ntk(
    subject: Subject,
    *,
    n: int | None = None,
    per_class: int | None = None,
    n_test: int | None = None,
    checkpoints: Checkpoints = None,
    trace_outputs: bool = True,
    ridge: float = 1e-6,
    time: float | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    memory_budget: int | None = None,
    implementation: Implementation = "auto",
) -> NTKResult:
    """The empirical NTK of a sample of the training set, its spectrum and mean prediction.

    Args (the shared ones — subject, n, per_class, checkpoints, seed, device, memory_budget —
    mean what :mod:`genprobe.options` says; n and per_class None: the whole train split):
        n_test: test examples for the mean prediction, a seeded class-balanced sample (0: no test
            kernel and no prediction; None: as many as the train sample, or the whole test split
            when the train sample is the whole split).
        trace_outputs: the kernel's mean over the K outputs, (N, N) (default), or (N, N, K, K).
        ridge: r / mean(diag Θ) of the mean-prediction solve (≥ 0); raise it when Θ(X, X) is not
            positive definite to working precision.
        time: η·t ≥ 0 (learning rate × gradient steps): also the prediction after that much
            gradient flow on the MSE loss (module docstring).
        out: a directory the kernels stream into (memory-mapped ``.npy``; a killed run continues
            from the blocks written); needed when a kernel does not fit the memory budget.
        implementation: the grams engine's route (``"auto"``, ``"layerwise"``, ``"vmap"``, ``"loop"``).

    Returns an :class:`NTKResult`. Raises ConfigError for a kernel that does not fit the memory
    budget without ``out``, DataError for a kernel that is not positive definite for the solve.
    """
    check_subject(subject, "ntk")
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if not isinstance(trace_outputs, bool):
        raise ConfigError(f"trace_outputs must be True or False, got {trace_outputs!r}")
    ridge = check_number("ridge", ridge, low=0.0)
    time = check_number("time", time, low=0.0, optional=True)
    n_test = check_int("n_test", n_test, 0, optional=True)
    seed = check_int("seed", seed, 0)
    epochs = select_checkpoints(subject, checkpoints)
    train, train_idx = _sample(subject, "train", n, per_class, seed)
    if n_test is None:
        n_test = len(train) if (n is not None or per_class is not None) else len(subject.data("test"))
    test, test_idx = _sample(subject, "test", n_test, None, seed) if n_test else (None, None)
    outputs_k = _output_count(subject, train)
    dev = resolve_device(device)
    budget = resolve_memory_budget(memory_budget, dev)
    rows = len(train) * (1 if trace_outputs else outputs_k)
    need = 8 * rows * rows
    if need > budget and (out is None or not trace_outputs):
        how = ("pass out=DIR (--kernel-dir) to stream it to disk" if trace_outputs else
               "use trace_outputs=True (streamed with out=DIR) or fewer examples")
        raise ConfigError(
            f"the kernel of N={len(train)} examples{'' if trace_outputs else f' x K={outputs_k} outputs'} "
            f"needs {_size(need)}, more than the memory budget ({_size(budget)}); "
            f"{how}, or raise memory_budget")
    options_checked()
    store = open_store(out) if out is not None else None
    states = [(str(e), subject.state(e)) for e in epochs] + [(FINAL, subject.final)]
    options = dict(of="outputs", trace_outputs=trace_outputs, implementation=implementation,
                   memory_budget=memory_budget, device=device)
    rows_out, spectra, files = [], [], {}
    final_kernels: dict[str, Tensor] = {}
    final_eigs = None
    routes = set()
    seconds = {"kernel": 0.0, "analysis": 0.0}
    for label, state in states:
        start = perf_counter()
        kernel, kernel_test, route = _kernels(subject, state, label, train, test, store, options, files)
        routes.add(route)
        seconds["kernel"] += perf_counter() - start
        start = perf_counter()
        return_freed_memory()  # the engine's blocks: the analysis needs one N x N buffer
        stats = spectrum.analyse(kernel, kernel_test, train, test, subject.num_classes, trace_outputs,
                         outputs_k, ridge, time, budget)
        seconds["analysis"] += perf_counter() - start
        rows_out.append({"state": label, "epoch": math.nan if label == FINAL else float(label),
                         **{k: v for k, v in stats.items() if k != "eigenvalues"}})
        spectra.append(pd.DataFrame({"state": label, "rank": np.arange(len(stats["eigenvalues"])),
                                     "eigenvalue": stats["eigenvalues"]}))
        if label == FINAL:
            final_eigs = torch.from_numpy(np.ascontiguousarray(stats["eigenvalues"]))
            if store is None:
                final_kernels["kernel"] = torch.from_numpy(np.asarray(kernel))
                if kernel_test is not None:
                    final_kernels["kernel_test"] = torch.from_numpy(np.asarray(kernel_test))
    table = pd.DataFrame(rows_out)
    final = table.iloc[-1]
    summary = {k: float(final[k]) for k in ("lambda_max", "lambda_min", "condition_number",
                                            "max_learning_rate", "mean_prediction_accuracy")}
    if time is not None:
        summary["mean_prediction_accuracy_t"] = float(final["mean_prediction_accuracy_t"])
    if epochs:
        first = table.iloc[0]
        summary["lambda_max_ratio"] = float(final["lambda_max"] / first["lambda_max"])
        summary["condition_number_ratio"] = float(final["condition_number"] / first["condition_number"])
    tensors = {**final_kernels, "eigenvalues": final_eigs, "indices": train_idx, "labels": train.y.clone()}
    if test is not None:
        tensors.update(test_indices=test_idx, test_labels=test.y.clone())
    meta = result_meta(ntk, dict(
        n=n, per_class=per_class, n_test=n_test, checkpoints=epochs, trace_outputs=trace_outputs,
        ridge=ridge, time=time, out=None if out is None else str(out), seed=seed, device=device,
        memory_budget=memory_budget, implementation=implementation),
        device=dev, engine="/".join(sorted(routes)),
        self_check=_self_check(subject, train, final_kernels.get("kernel"), files.get(FINAL),
                               trace_outputs),
        n=len(train), n_test=0 if test is None else len(test), outputs=outputs_k,
        states=[s for s, _ in states], kernel_files=files.get(FINAL, {}), seconds=seconds)
    return NTKResult(table=table, summary=summary, meta=meta, tables={"spectrum": pd.concat(spectra, ignore_index=True)},
                     tensors=tensors)


def _size(n: float) -> str:
    """Bytes, readably: 1000 bytes, 12.5 KiB, 7.2 GiB."""
    if n < 1024:
        return f"{int(n)} bytes"
    exp = min(3, int(math.log(n, 1024)))
    return f"{n / 1024**exp:.3g} {('KiB', 'MiB', 'GiB')[exp - 1]}"


def _sample(subject: Subject, split: str, n, per_class, seed: int) -> tuple[Data, Tensor]:
    """A seeded class-balanced sample of `split` (n capped at its size) and its positions."""
    data = subject.data(split)
    if n is not None and split == "test":  # n_test: at most the test split
        n = min(n, len(data))
    idx = sample(data, num_classes=subject.num_classes, n=n, per_class=per_class, seed=seed, split=split)
    return data.subset(idx), idx


def _output_count(subject: Subject, data: Data) -> int:
    with torch.no_grad():
        out = inputs.call(subject.model, inputs.take(data.x, slice(0, 1)), dict(subject.final))
    return int(out[0].numel())


def _kernels(subject, state, label, train: Data, test: Data | None, store, options, files):
    """(Θ(X, X), Θ(X_test, X), the grams engine's route) at `state`: in memory (numpy), or
    streamed into `store` (the route asked for)."""
    if store is None:
        with progress.task(f"ntk: kernel at {label}"):
            g = gram(subject.model, state, train.x, **options)
            kt = (gram(subject.model, state, test.x, train.x, **options).matrix.numpy()
                  if test is not None else None)
        return g.matrix.numpy(), kt, g.implementation
    fingerprint = {"probe": "ntk", "state": digest(state), "x": digest(train.x),
                   "trace_outputs": options["trace_outputs"], "model": type(subject.model).__name__}
    name = "kernel" if label == FINAL else f"kernel-epoch-{int(label):04d}"
    def on_block(done: int, total: int) -> None:
        bar.total(total)
        bar.advance(1)

    with progress.task(f"ntk: kernel blocks at {label} → {store}") as bar:
        k = stream_gram(store, name, fingerprint, subject.model, state, train.x,
                        on_block=on_block, **options)
    kt = None
    if test is not None:
        with progress.task(f"ntk: test-kernel blocks at {label}") as bar:
            kt = stream_gram(store, f"{name}-test", {**fingerprint, "x_test": digest(test.x)},
                             subject.model, state, test.x, train.x, on_block=on_block, **options)
    files[label] = {"kernel": str(store / f"{name}.npy"),
                    **({"kernel_test": str(store / f"{name}-test.npy")} if test is not None else {})}
    return k, kt, options["implementation"]


def _self_check(subject: Subject, train: Data, kernel: Tensor | None, files: dict | None,
                traced: bool) -> dict:
    """The engine's Θ over the first two examples against a plain autograd Jacobian loop."""
    if kernel is None:
        kernel = torch.from_numpy(np.load(files["kernel"], mmap_mode="r")[:2, :2].copy())
    m = min(2, len(train))
    state = dict(subject.final)  # the weights probed, never the module's own
    params = {k: state[k].detach().clone().requires_grad_(True)
              for k, _ in subject.model.named_parameters()}
    rows = []
    for i in range(m):
        with torch.enable_grad():
            out = inputs.call(subject.model, inputs.take(train.x, slice(i, i + 1)), {**state, **params}).reshape(-1)
            per_k = []
            for k in range(len(out)):
                g = torch.autograd.grad(out[k], list(params.values()), retain_graph=True, allow_unused=True)
                per_k.append(torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1)
                                        for t, p in zip(g, params.values(), strict=True)]))
        rows.append(torch.stack(per_k).double())  # (K, P)
    plain = torch.stack([torch.stack([rows[i] @ rows[j].T for j in range(m)]) for i in range(m)])  # (m, m, K, K)
    if traced:
        plain = plain.diagonal(dim1=-2, dim2=-1).mean(-1)
    ours = kernel[:m, :m].double()
    value = float((ours - plain).abs().max() / plain.abs().max().clamp_min(1e-300))
    tol = 1e-9 if all(p.dtype == torch.float64 for p in params.values()) else 1e-4
    return {"what": "Θ of the first two examples against a plain autograd Jacobian loop (relative)",
            "value": value, "tolerance": tol, "passed": bool(value <= tol)}


__all__ = ["NTKResult", "ntk"]
