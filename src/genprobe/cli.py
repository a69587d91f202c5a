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

import click
import typer
from rich.console import Console

from .errors import GenprobeError

console = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="genprobe: which parts of a trained network matter, and what that says about generalization.")
probe_app = typer.Typer(no_args_is_help=True, help="Run a probe on one or more run directories.")
app.add_typer(probe_app, name="probe")

PROBE_MODULES: list[str] = []
"""Modules whose ``cli(app)`` registers a ``genprobe probe`` subcommand."""

DEVICE_HELP = "Where to compute: auto (CUDA if available), cpu, cuda or cuda:N."
DATA_DIR_HELP = "Folder holding local data files (IDX files, CIFAR-10 batches) for datasets that read them."


def load_run(run: Path, data_dir: Path | None = None):
    """The Subject of a run directory (errors become one line, exit 2)."""
    from .subject import Subject

    return Subject.load(run, data_dir=data_dir)


def write_probe_output(result, run: Path, name: str, out: Path | None = None, columns: list[str] | None = None) -> Path:
    """Save `result` to `out` (default ``RUN/probes/NAME``), its figure beside it as ``.png``,
    and print a compact text table (the `columns` given, else all). Returns the result directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or (Path(run) / "probes" / name)
    result.save(out)
    fig = result.plot()
    figure = out.with_suffix(".png")
    fig.savefig(figure, dpi=120, bbox_inches="tight")
    plt.close(fig)
    table = result.table[columns] if columns else result.table
    with __import__("pandas").option_context("display.max_rows", 60, "display.width", 160,
                                             "display.float_format", "{:.4g}".format):
        typer.echo(table.to_string(index=False))
    typer.echo(" ".join(f"{k}={v:.4g}" for k, v in result.summary.items()))
    typer.echo(f"wrote {out}/ and {figure}")
    return out


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
    except click.exceptions.NoArgsIsHelp as exc:  # help was printed; nothing went wrong
        sys.exit(0 if exc.ctx is None else 0)
    except click.ClickException as exc:
        print(f"genprobe: error: {exc.format_message()} (see --help)", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("genprobe: aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
