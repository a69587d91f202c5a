"""Draw the figures of the documentation: docs/figures/<probe>.png for every registered probe.

    python docs/make_figures.py [--work DIR]

Trains the demo's fcn (2 hidden layers of 256, 12 epochs, about 6 log-spaced checkpoints) on the
built-in digits with one thread (deterministic), runs every registered probe on it with its registry
``demo`` options, and saves each result's figure (PNG; the report and ``genprobe probe`` also
write SVG). The run is kept in ``--work`` (default: a temporary folder, removed afterwards).
About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
OUT = DOCS / "figures"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="Keep the trained run and its results here.")
    args = parser.parse_args(argv)

    import torch

    import genprobe as gp
    from genprobe.figures import DPI, style
    from genprobe.report.demo import TRAIN
    from genprobe.report.runs import training_figure
    from genprobe.store import read_metrics
    from genprobe.zoo.train import TrainConfig, train_run

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="genprobe-docs-"))
    try:
        run = work / "fcn-digits"
        if not (run / "final.safetensors").is_file():
            config = TrainConfig(arch="fcn", arch_options={"width": 256, "depth": 2}, device="cpu",
                                 **{k: v for k, v in TRAIN.items()})
            train_run(config, run, overwrite=True)
        subject = gp.Subject.load(run)
        OUT.mkdir(exist_ok=True)
        for name in gp.list_probes():
            spec = gp.get_probe(name)
            result = spec.function(subject, **spec.demo)
            with style():
                result.plot().savefig(OUT / f"{name}.png", dpi=DPI)
            print(f"{OUT / name}.png: {result.reading()}")
        with style():
            training_figure(read_metrics(run)).savefig(OUT / "training.png", dpi=DPI)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
