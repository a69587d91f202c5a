"""Command line: a thin layer over the public API.

Every user error (a :class:`~genprobe.errors.GenprobeError`, or a bad option caught by the
parser) prints one line, ``genprobe: error: <what is wrong and what to do>``, and exits 2.

Probes plug in through :data:`PROBE_MODULES`: each module named there defines
``cli(app: typer.Typer)``, which registers its ``genprobe probe <name>`` command; the shared
helpers :func:`load_run` and :func:`write_probe_output` keep those commands short.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from .errors import GenprobeError

console = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="genprobe: which parts of a trained network matter, and what that says about generalization.")
probe_app = typer.Typer(no_args_is_help=True, help="Run a probe on one or more run directories.")
app.add_typer(probe_app, name="probe")

PROBE_MODULES: list[str] = ["genprobe.probes.robustness", "genprobe.probes.criticality",
                            "genprobe.probes.stiffness"]
"""Modules whose ``cli(app)`` registers a ``genprobe probe`` subcommand."""

DEVICE_HELP = "Where to compute: auto (CUDA if available), cpu, cuda or cuda:N."
RUN_HELP = "Run directory written by `genprobe train`."
MODULES_HELP = "fnmatch pattern(s) of modules (repeatable); default: all."
DATA_DIR_HELP = "Folder holding local data files (IDX files, CIFAR-10 batches) for datasets that read them."


def load_run(run: Path, data_dir: Path | None = None):
    """The Subject of a run directory (errors become one line, exit 2)."""
    from .subject import Subject

    return Subject.load(run, data_dir=data_dir)


def write_probe_output(result, run: Path, name: str, out: Path | None = None, columns: list[str] | None = None) -> Path:
    """Save `result` to `out` (default ``RUN/probes/NAME``), its figure beside it as ``.png``,
    and print a compact text table (the `columns` given, else all). Returns the result directory."""
    out = out or (Path(run) / "probes" / name)
    figure = _save_with_figure(result, out)
    table = result.table[columns] if columns else result.table
    import pandas as pd

    with pd.option_context("display.max_rows", 60, "display.width", 160,
                                             "display.float_format", "{:.4g}".format):
        typer.echo(table.to_string(index=False))
    typer.echo(" ".join(f"{k}={v:.4g}" for k, v in result.summary.items()))
    typer.echo(f"wrote {out}/ and {figure}")
    return out


def _save_with_figure(result, out: Path) -> Path:
    """Save `result` to directory `out` and its figure to ``out.png``; return the figure's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result.save(out)
    fig = result.plot()
    figure = out.with_suffix(".png")
    fig.savefig(figure, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return figure


def _register_probes() -> None:
    for name in PROBE_MODULES:
        importlib.import_module(name).cli(probe_app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``genprobe`` console script and ``python -m genprobe``."""
    logging.basicConfig(level=logging.WARNING, format="genprobe: %(levelname)s: %(message)s")
    _register_probes()
    try:
        app(args=argv, standalone_mode=False)
    except GenprobeError as exc:
        print(f"genprobe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("genprobe: aborted", file=sys.stderr)
        sys.exit(130)
    except typer.exceptions.TyperException as exc:  # the parser's errors (typer >= 0.29 vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `genprobe` or `genprobe probe` alone
            print(exc.format_message())
            sys.exit(0)
        message = " ".join(exc.format_message().split())
        print(f"genprobe: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- commands


def _parse_options(pairs: list[str] | None, flag: str) -> dict:
    """``["width=256", "activation=tanh"]`` -> ``{"width": 256, "activation": "tanh"}`` (YAML-typed values)."""
    import yaml

    from .errors import ConfigError

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: write KEY=VALUE, e.g. {flag} width=256")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="YAML file of training options (flags override it)."),
    arch: str | None = typer.Option(None, help="Architecture (see `genprobe archs`)."),
    dataset: str | None = typer.Option(None, help="Dataset (see `genprobe datasets`)."),
    out: Path | None = typer.Option(None, help="Run directory to write (default runs/ARCH-DATASET)."),
    epochs: int | None = typer.Option(None, help="Training epochs [10]."),
    lr: float | None = typer.Option(None, help="Peak learning rate [0.05]."),
    batch_size: int | None = typer.Option(None, help="Minibatch size [128]."),
    optimizer: str | None = typer.Option(None, help="sgd or adam [sgd]."),
    momentum: float | None = typer.Option(None, help="SGD momentum [0.9]."),
    weight_decay: float | None = typer.Option(None, help="L2 weight decay [5e-4]."),
    schedule: str | None = typer.Option(None, help="cosine, constant or step [cosine]."),
    label_noise: float | None = typer.Option(None, help="Fraction of training labels replaced by random ones [0]."),
    checkpoints: str | None = typer.Option(None, help="every, log:N, or epochs like 1,2,5 [every]."),
    n_train: int | None = typer.Option(None, help="Use a seeded subset of this many training examples."),
    n_test: int | None = typer.Option(None, help="Use a seeded subset of this many test examples."),
    opt: list[str] | None = typer.Option(None, "--opt", help="Architecture option KEY=VALUE (repeatable), e.g. --opt width=256."),
    data_opt: list[str] | None = typer.Option(None, "--data-opt", help="Dataset option KEY=VALUE (repeatable)."),
    seed: int | None = typer.Option(None, help="Seed of data split, corruption, init and data order [0]."),
    data_dir: Path | None = typer.Option(None, help=DATA_DIR_HELP),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    resume: Path | None = typer.Option(None, help="Resume the unfinished run in this directory."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Train an architecture on a dataset, writing a run directory with checkpoints and metrics."""
    from .zoo.train import TrainConfig, read_metrics, train_run

    if resume is not None:
        path = train_run(TrainConfig(), resume, resume=True, progress=True)
    else:
        base = TrainConfig.from_yaml(config).to_dict() if config else {}
        flags = dict(arch=arch, dataset=dataset, epochs=epochs, lr=lr, batch_size=batch_size,
                     optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                     label_noise=label_noise, checkpoints=checkpoints, n_train=n_train, n_test=n_test,
                     seed=seed, device=device, data_dir=str(data_dir) if data_dir else None)
        merged = base | {k: v for k, v in flags.items() if v is not None}
        merged["arch_options"] = base.get("arch_options", {}) | _parse_options(opt, "--opt")
        merged["dataset_options"] = base.get("dataset_options", {}) | _parse_options(data_opt, "--data-opt")
        cfg = TrainConfig.from_dict(merged)
        out = out or Path("runs") / f"{cfg.arch}-{cfg.dataset}"
        path = train_run(cfg, out, overwrite=overwrite, progress=True)
    last = read_metrics(path).iloc[-1]
    typer.echo(f"{path}: epoch {int(last.epoch)} train error {last.train_error:.4f} "
               f"test error {last.test_error:.4f} test loss {last.test_loss:.4f}")


@app.command()
def datasets() -> None:
    """List the built-in datasets."""
    from .data import describe, list_datasets

    for name in list_datasets():
        typer.echo(f"{name:15s} {describe(name)}")


@app.command()
def archs() -> None:
    """List the built-in architectures and their options."""
    from .zoo import list_models, model_options

    for name in list_models():
        options = ", ".join(f"{k}={v!r}" for k, v in model_options(name).items())
        typer.echo(f"{name:12s} {options}")


DEMO_PROBES = {
    "robustness": {},
    "criticality": {"samples": 4, "max_examples": 500},
    "stiffness": {"per_class": 10, "checkpoints": "all"},
}
"""The probes the demo runs, with options that keep the whole tour under a minute or two on a CPU."""


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where to write the demo run and its probe results."),
    epochs: int = typer.Option(10, help="Training epochs of the demo model."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """The one-command tour: train a small FCN on the built-in digits, then probe it."""
    import genprobe as gp

    from .zoo.train import TrainConfig, read_metrics, train_run

    cfg = TrainConfig(arch="fcn", dataset="digits", arch_options={"width": 256, "depth": 3},
                      epochs=epochs, checkpoints="every", device=device)
    run = out / "fcn-digits"
    typer.echo(f"training {cfg.arch} (3 hidden layers of 256) on {cfg.dataset} for {epochs} epochs -> {run}")
    train_run(cfg, run, overwrite=True, progress=True)
    metrics = read_metrics(run)
    typer.echo(metrics[["epoch", "train_loss", "train_error", "test_loss", "test_error"]]
               .to_string(index=False, float_format="{:.4f}".format))
    subject = gp.Subject.load(run)
    for name, options in DEMO_PROBES.items():
        typer.echo(f"\n== {name}")
        result = getattr(gp, name)(subject, device=device, **options)
        _save_with_figure(result, run / "probes" / name)
        typer.echo("  " + "  ".join(f"{k}={v:.4g}" for k, v in result.summary.items()))
    typer.echo(f"\nresults and figures in {run / 'probes'}/")
