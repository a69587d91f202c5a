"""The one-command tour: ``genprobe demo`` trains a small family of models on the built-in digits,
runs every registered probe on each, ranks the measures over the family, and writes the report.

The family (:data:`FAMILY`): a ``resnet``, a ``cnn`` with global average pooling, an ``fcn``, and
the same ``fcn`` trained on labels of which half were replaced by random ones (the two ``fcn``
differ in the labels alone, so the granulated τ has an axis), for 60 epochs, long enough to
memorize them (train error 0.3% on the corrupted labels, test error 41%: by far
the largest generalization gap of the family; at 40 epochs it has not yet: 11.8% and 32.8%). Every registered probe runs with its registry
``demo`` options (:attr:`genprobe.probes.registry.ProbeSpec.demo`), so a probe registered later
joins the demo with no change here; ``--quick`` trains fewer epochs and gives the probes smaller
samples (:data:`QUICK`).

It is a sweep (:func:`genprobe.sweep.run_sweep`): the output directory is a sweep directory, a
second run reuses every finished model and probe result, and nothing is written outside it. The
full and the quick demo go to different directories by default (``runs/demo`` and
``runs/demo-quick``), since a sweep directory holds one configuration.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAMILY: list[dict[str, Any]] = [
    {"arch": "resnet"},
    {"arch": "cnn", "readout": "gap", "channels": 32, "depth": 3},
    {"arch": "fcn", "width": 256, "depth": 2, "epochs": 60},
    {"arch": "fcn", "width": 256, "depth": 2, "label_noise": 0.5, "epochs": 60},
]
"""The demo's models (training options and architecture options, as a sweep's ``runs``); the
slowest first, so that parallel jobs finish together."""
TRAIN = {"dataset": "digits", "epochs": 12, "batch_size": 64, "lr": 0.05, "checkpoints": "log:6"}
"""Training options shared by the family (about 6 log-spaced checkpoints: the probes that follow
training use them)."""
QUICK_EPOCHS = 4
"""Epochs of the quick demo."""
QUICK: dict[str, dict[str, Any]] = {
    "ablation": {"orders": 1, "steps": 8},
    "activation_noise": {"draws": 1},
    "criticality": {"samples": 2, "n": 200, "refine": 0, "valley": "search"},
    "ntk": {"n": 60},
    "robustness": {"checkpoints": [0], "n": 200},
    "selectivity": {"n": 200},
    "stiffness": {"per_class": 4},
}
"""The quick demo's options, over each probe's registry ``demo`` options (a probe missing here
runs with its ``demo`` options; an option its function does not take is dropped)."""
RANKING = {"min_models": len(FAMILY)}
"""The demo ranks its four models (below the default minimum of 8) to show the ranking and its
intervals; four models separate no measure from the next, and the report says so."""
DEFAULT_OUT = Path("runs/demo")
DEFAULT_QUICK_OUT = Path("runs/demo-quick")


def demo_config(quick: bool = False):
    """The demo's :class:`~genprobe.sweep.SweepConfig` (every registered probe, its options)."""
    from ..probes.registry import get_probe, list_probes
    from ..sweep import SweepConfig

    probes = {}
    for name in list_probes():
        spec = get_probe(name)
        accepted = spec.parameters()
        options = dict(spec.demo) | (QUICK.get(name, {}) if quick else {})
        probes[name] = {k: v for k, v in options.items() if k in accepted}
    train = TRAIN | ({"epochs": QUICK_EPOCHS} if quick else {})
    return SweepConfig.from_dict({"name": "demo-quick" if quick else "demo", "train": train,
                                  "runs": FAMILY, "probes": probes, "baselines": True,
                                  "ranking": RANKING, "figures": True}, source="the built-in demo")


def run_demo(out: Path | None = None, *, quick: bool = False, device: str = "auto",
             echo: Callable[[str], None] = print) -> Path:
    """Train, probe and rank the demo family into sweep directory `out`, write its report, and
    return the report's path; `echo` receives a line at each step."""
    from ..sweep import run_sweep
    from . import report

    out = Path(out) if out is not None else (DEFAULT_QUICK_OUT if quick else DEFAULT_OUT)
    config = demo_config(quick)
    began = time.perf_counter()
    echo(f"demo: {len(FAMILY)} models on {TRAIN['dataset']}, probes: "
         f"{', '.join(config.probes)} -> {out}")

    def finished(record: dict) -> None:
        metrics = record.get("metrics", {})
        what = (f"test error {100 * metrics['test_error']:.1f}%, gap "
                f"{100 * (metrics['test_error'] - metrics['train_error']):.1f} pp"
                if record["status"] == "done" else f"FAILED: {record.get('error')}")
        echo(f"  {record['run']}: {what} ({record.get('seconds', float('nan')):.0f} s)")

    from ..executors import available_cores

    jobs = max(1, min(len(FAMILY), len(available_cores())))  # small models: one core each
    outcome = run_sweep(config, out, device=device, jobs=jobs, threads=1 if jobs > 1 else None,
                        on_run=finished)
    if outcome.reused:
        echo(f"  {outcome.reused} models were already done in {out} and were reused")
    echo(f"demo: {outcome.done} models done, {outcome.failed} failed "
         f"({time.perf_counter() - began:.0f} s); writing the report")
    page = report(out)
    reading = json.loads(page.with_suffix(".json").read_text())["sweep"].get("ranking_reading")
    if reading:
        echo(f"demo: {reading}")
    echo(f"demo: done in {time.perf_counter() - began:.0f} s; the report: {page}")
    return page


__all__ = ["DEFAULT_OUT", "DEFAULT_QUICK_OUT", "FAMILY", "QUICK", "QUICK_EPOCHS", "RANKING", "TRAIN",
           "demo_config", "run_demo"]
