"""Command line: a thin layer over the public API.

Every user error (a :class:`~genprobe.errors.GenprobeError`, or a bad option caught by the
parser) prints one line, ``genprobe: error: <what is wrong and what to do>``, and exits 2.
Ctrl-C prints one line saying what was kept and how to resume, and exits 130.

``genprobe probe NAME`` commands are built from the probe registry
(:mod:`genprobe.probes.registry`): the shared options a probe's function accepts
(:data:`genprobe.options.SHARED_HELP`), then its own registered options.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ._version import __version__
from .errors import ConfigError, GenprobeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="genprobe: which parts of a trained network matter, and what that says about generalization.")
probe_app = typer.Typer(no_args_is_help=True, help="Run a probe on one or more run directories "
                        "(list them with `genprobe probes`).")
app.add_typer(probe_app, name="probe")

DEVICE_HELP = "Where to compute: auto (CUDA if available), cpu, cuda or cuda:N."
LIBRARY: Any = "<the library's default>"
"""An option's default when the library function the command calls owns it: :func:`main` fills
in the function's own default (and a ``{default}`` in its help) before parsing that command's
arguments, so that the command line never restates a default (see :data:`_OWNERS`)."""
DATA_DIR_HELP = "Folder holding local data files (IDX files, CIFAR-10 batches) for datasets that read them."

_on_interrupt: Callable[[], str] | None = None
"""What the running command kept, for the one line printed on Ctrl-C (set by long commands)."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"genprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress (bars on a terminal or in a notebook, periodic lines in a log)."),
) -> None:
    from .progress import set_quiet

    set_quiet(quiet)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``genprobe`` console script and ``python -m genprobe``."""
    global _on_interrupt
    logging.basicConfig(level=logging.WARNING, format="genprobe: %(levelname)s: %(message)s")
    _on_interrupt = None
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if "probe" in args:  # its subcommands import every probe: only for `genprobe probe ...`
            _register_probes()
        for command in set(args) & set(_OWNERS):  # imports the library: only for that command
            _library_defaults(command)
        code = app(args=args, standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt into Exit(130) and returns its code
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except GenprobeError as exc:
        print(f"genprobe: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        kept = _on_interrupt() if _on_interrupt is not None else "nothing was written"
        print(f"genprobe: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.exceptions.TyperException as exc:  # the parser's errors (typer >= 0.29 vendors click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `genprobe` or `genprobe probe` alone
            print(exc.format_message())
            sys.exit(0)
        message = " ".join(exc.format_message().split())
        print(f"genprobe: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- probes

_SHARED_ORDER = ("modules", "checkpoints", "split", "n", "per_class", "seed", "batch_size",
                 "memory_budget", "device")


def _option(name: str, annotation, default, help: str, *decls: str) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *(decls or (flag,)), help=help))


def _probe_command(spec) -> Callable:
    """A typer command for registered probe `spec` (see the module docstring)."""
    from .options import SHARED_HELP

    accepted = spec.parameters()
    params = [inspect.Parameter("runs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Path],
                                default=typer.Argument(..., metavar="RUN",
                                                       help="Run directories written by `genprobe train`."))]
    for name in _SHARED_ORDER:
        if name not in accepted:
            continue
        default = accepted[name].default
        if name == "modules":
            params.append(_option(name, list[str] | None, None, SHARED_HELP[name], "--modules", "-m"))
        elif name == "checkpoints":
            shown = default if isinstance(default, str) else ("none" if default is None else
                                                              ",".join(map(str, default)))
            params.append(_option(name, str, shown, SHARED_HELP[name], "--checkpoints", "-c"))
        elif name == "memory_budget":
            params.append(_option(name, float | None, None, SHARED_HELP[name], "--memory-budget-mb"))
        elif name == "device":
            params.append(_option(name, str, default, SHARED_HELP[name]))
        else:
            kind = {"split": str, "seed": int}.get(name, int | None)
            params.append(_option(name, kind, default, SHARED_HELP[name]))
    for opt in spec.options:
        default, name = accepted[opt.name].default, opt.cli_name
        if opt.multiple:
            params.append(_option(name, list[opt.type] | None, None, opt.help))
        elif opt.type is bool:
            flag = name.replace("_", "-")
            params.append(_option(name, bool, default, opt.help, f"--{flag}/--no-{flag}"))
        else:
            params.append(_option(name, opt.type | None if default is None else opt.type,
                                  default, opt.help))
    params.append(_option("out", Path | None, None,
                          f"Result directory (default RUN/probes/{spec.name}); one run only."))
    params.append(_option("data_dir", Path | None, None, DATA_DIR_HELP))

    def command(**kwargs) -> None:
        runs, out, data_dir = kwargs.pop("runs"), kwargs.pop("out"), kwargs.pop("data_dir")
        if out is not None and len(runs) > 1:
            raise ConfigError(f"--out names one result directory but {len(runs)} runs were given; "
                              "drop --out to write each into RUN/probes/" + spec.name)
        options = _probe_options(kwargs)
        for opt in spec.options:
            options[opt.name] = options.pop(opt.cli_name)
        for run in runs:
            _run_probe(spec, run, out, data_dir, options)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = (f"{spec.summary[:1].upper()}{spec.summary[1:]} ({spec.paper}). Writes the result "
                       f"and its figure.png to RUN/probes/{spec.name}/ (or --out) and prints its summary.")
    return command


def _probe_options(kwargs: dict) -> dict:
    from .options import parse_checkpoints

    options = {}
    for name, value in kwargs.items():
        if name == "checkpoints":
            value = parse_checkpoints(value)
        elif name == "memory_budget" and value is not None:
            if not value > 0:
                raise ConfigError(f"--memory-budget-mb must be positive, got {value!r}")
            value = int(value * 2**20)
        elif isinstance(value, list):
            value = value or None
        options[name] = value
    return options


def _run_probe(spec, run: Path, out: Path | None, data_dir: Path | None, options: dict) -> None:
    from . import outputs
    from .results import result_file
    from .subject import Subject

    out = Path(out) if out is not None else Path(run) / "probes" / spec.name
    outputs.check_replaceable(out, "result", result_file, "result directory")  # before the work
    subject = Subject.load(run, data_dir=data_dir)
    global _on_interrupt
    _on_interrupt = lambda: f"nothing of this {spec.name} run was written ({out} is unchanged)"  # noqa: E731
    result = spec.function(subject, **options)
    result.save(out, figure=True)
    _echo_result(result, out)


def _echo_result(result, out: Path) -> None:
    """Print a saved result's self-check when it failed (first, on stderr), its compact table,
    its summary and where it was written."""
    import pandas as pd

    from .results import self_check_failure

    failure = self_check_failure(result.meta.get("self_check"))
    if failure:
        print(f"genprobe: {result.probe}: {failure}; do not trust these numbers", file=sys.stderr)
    with pd.option_context("display.max_rows", 60, "display.width", 160,
                           "display.float_format", "{:.4g}".format):
        typer.echo(result.brief().to_string(index=False))
    typer.echo(" ".join(f"{k}={v:.4g}" for k, v in result.summary.items()))
    typer.echo(f"wrote {out}/ (figure: {out / 'figure.png'})")


def _register_probes() -> None:
    from .probes.registry import get_probe, list_probes

    registered = {c.name for c in probe_app.registered_commands}
    for name in list_probes():
        if name not in registered:
            probe_app.command(name)(_probe_command(get_probe(name)))


@app.command()
def probes() -> None:
    """List the registered probes."""
    from .probes.registry import get_probe, list_probes

    for name in list_probes():
        spec = get_probe(name)
        typer.echo(f"{name:12s} {spec.summary} ({spec.paper})")


@app.command()
def measures(
    sweep: Path = typer.Argument(..., metavar="SWEEP",
                                 help="A sweep directory written by `genprobe sweep`."),
    target: str = typer.Option("gap", help="Column the measures should rank the models by."),
    out: Path | None = typer.Option(None, help="Figure file (.png; an .svg is written beside "
                                    "it). Default: SWEEP/measures.png."),
    bootstrap: int | None = typer.Option(None, help="Bootstrap resamples of the models for "
                                         "the intervals [sweep's ranking option, else 1000]."),
    level: float | None = typer.Option(None, help="Confidence level of the intervals, in (0, 1) "
                                       "[0.95]."),
    reference: str | None = typer.Option(None, help="Measure every other is compared with "
                                         "[baseline.dist_from_init]."),
    min_models: int | None = typer.Option(None, help="Score a measure only when defined on at "
                                          "least this many models [8]."),
    min_share: float | None = typer.Option(None, help="... and on at least this share of them "
                                           "[0.5]."),
    cmi: str | None = typer.Option(None, help="CMI convention: paper (Jiang et al.'s definition) "
                                   "or pgdl (the competition's scoring program) [paper]."),
    max_train_error: float | None = typer.Option(None, help="Leave out runs whose training error "
                                                 "is above this (collapsed or under-fit) [0.5]."),
    seed: int | None = typer.Option(None, help="Seed of the bootstrap [0]."),
) -> None:
    """Rank every registered measure of a sweep by how well it predicts the generalization gap
    (Kendall τ-b, Jiang et al.'s granulated τ, the PGDL CMI score), each with a bootstrap
    interval and compared with a reference measure; print the table and write the figure.
    Options default to the sweep config's `ranking:`."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from . import measures as R
    from .figures import save_figure
    from .sweep import measures_figure_paths, read_table

    table = read_table(sweep)
    png, _ = measures_figure_paths(sweep, out)  # refuse a foreign file before any work
    ranking = R.rank_sweep(table, target=target, bootstrap=bootstrap, level=level,
                           reference=reference, min_models=min_models, min_share=min_share,
                           cmi=cmi, max_train_error=max_train_error, seed=seed)
    attrs = ranking.attrs
    options = attrs["options"]
    hp = attrs["hyperparameters"]
    console = Console(soft_wrap=True)
    grid = Table(title=f"{attrs['n_models']} models of {sweep}; target {target}; hyper-parameters: "
                       f"{', '.join(hp) or 'none'}; {options['level']:.0%} bootstrap intervals "
                       f"({options['bootstrap']} resamples of {attrs['resampling']}); CMI: "
                       f"{options['cmi']} convention; sorted by |{options['compare']}|")
    columns = ["measure", "dir", "Kendall τ-b", "granulated τ", "CMI",
               f"vs {options['reference']}", "p (Holm)", "models"]
    for column in columns:
        grid.add_column(column, justify="left" if column == "measure" else "right",
                        no_wrap=column == "measure")
    scored = ranking.dropna(subset=["kendall_tau"])
    for _, row in scored.iterrows():
        name = row["measure"] + (f" (= {row['aliases']})" if row["aliases"] else "")
        vs = ("reference" if row["measure"] == options["reference"] else
              R.format_score(row, "vs_reference", "-"))
        grid.add_row(name, f"{row['direction']:+d}" if row["direction"] else "0",
                     *(R.format_score(row, score, "-") for score in R.SCORES),
                     vs, f"{row['p_holm']:.3f}" if pd.notna(row["p_holm"]) else "-",
                     str(row["n_models"]))
    console.print(grid)
    console.print(R.headline(ranking))
    unscored = ranking[ranking["kendall_tau"].isna()]
    for _, row in unscored.iterrows():
        console.print(f"not scored: {row['measure']}: {row['note']}")
    if attrs["excluded"]:
        console.print(f"left out ({len(attrs['excluded'])} runs):")
        for run, why in attrs["excluded"].items():
            console.print(f"  {run}: {why}")
    if attrs["not_ranked"]:
        console.print(f"{len(attrs['not_ranked'])} columns are not ranked (not measures, or "
                      "computed from the test split; `genprobe.measures.classify` says why): "
                      f"{', '.join(sorted(attrs['not_ranked'])[:8])}"
                      f"{', ...' if len(attrs['not_ranked']) > 8 else ''}")
    save_figure(R.plot_rank_correlation(table, ranking), png.with_suffix(""))
    typer.echo(f"wrote {png} and {png.with_suffix('.svg')}")


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
    epochs: int | None = typer.Option(None, help="Training epochs [{default}] (the most, with --stop-loss/--stop-error)."),
    lr: float | None = typer.Option(None, help="Peak learning rate [{default}]."),
    batch_size: int | None = typer.Option(None, help="Minibatch size [{default}]."),
    optimizer: str | None = typer.Option(None, help="sgd or adam [{default}]."),
    momentum: float | None = typer.Option(None, help="SGD momentum [{default}]."),
    weight_decay: float | None = typer.Option(None, help="L2 weight decay [{default}]."),
    schedule: str | None = typer.Option(None, help="cosine, constant or step [{default}]."),
    label_noise: float | None = typer.Option(None, help="Fraction of training labels replaced by random ones [{default}]."),
    checkpoints: str | None = typer.Option(None, help="every, log:N, or epochs like 1,2,5 [{default}]."),
    stop_loss: float | None = typer.Option(None, help="Stop after the first epoch whose training cross-entropy is <= this, e.g. 0.01."),
    stop_error: float | None = typer.Option(None, help="Stop after the first epoch whose training error is <= this, in (0, 1)."),
    n_train: int | None = typer.Option(None, help="Use a seeded subset of this many training examples."),
    n_test: int | None = typer.Option(None, help="Use a seeded subset of this many test examples."),
    opt: list[str] | None = typer.Option(None, "--opt", help="Architecture option KEY=VALUE (repeatable), e.g. --opt width=256."),
    data_opt: list[str] | None = typer.Option(None, "--data-opt", help="Dataset option KEY=VALUE (repeatable)."),
    seed: int | None = typer.Option(None, help="Seed of data split, corruption, init and data order [{default}]."),
    data_dir: Path | None = typer.Option(None, help=DATA_DIR_HELP),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    resume: Path | None = typer.Option(None, help="Resume the unfinished run in this directory."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Train an architecture on a dataset, writing a run directory with checkpoints and metrics."""
    from . import store
    from .zoo.train import TrainConfig, read_metrics, train_run, training_outcome

    flags = dict(arch=arch, dataset=dataset, epochs=epochs, lr=lr, batch_size=batch_size,
                 optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                 label_noise=label_noise, checkpoints=checkpoints, n_train=n_train, n_test=n_test,
                 stop_loss=stop_loss, stop_error=stop_error, seed=seed, device=device,
                 data_dir=str(data_dir) if data_dir else None)
    if resume is not None:
        _check_resume_flags(resume, config, out, overwrite, flags, opt, data_opt)
        _interrupt_note(resume)
        path = train_run(TrainConfig(), resume, resume=True, progress=True)
    else:
        base = TrainConfig.from_yaml(config).to_dict() if config else {}
        merged = base | {k: v for k, v in flags.items() if v is not None}
        merged["arch_options"] = base.get("arch_options", {}) | _parse_options(opt, "--opt")
        merged["dataset_options"] = base.get("dataset_options", {}) | _parse_options(data_opt, "--data-opt")
        cfg = TrainConfig.from_dict(merged)
        out = out or Path("runs") / f"{cfg.arch}-{cfg.dataset}"
        _interrupt_note(out)
        path = train_run(cfg, out, overwrite=overwrite, progress=True)
    metrics = read_metrics(path)
    last = metrics.iloc[-1]
    outcome = training_outcome(TrainConfig.from_dict(store.read_config(path)), metrics)
    target = "" if outcome["converged"] is None else \
        f"; {'reached' if outcome['converged'] else 'did not reach'} {outcome['criterion']}"
    typer.echo(f"{path}: epoch {int(last.epoch)} train error {last.train_error:.4f} "
               f"test error {last.test_error:.4f} test loss {last.test_loss:.4f}{target}")


def _check_resume_flags(run: Path, config, out, overwrite, flags: dict, opt, data_opt) -> None:
    """--resume continues a run as it was configured: a flag that disagrees is an error."""
    from . import store

    if config is not None or out is not None or overwrite:
        raise ConfigError("--resume RUN continues that run in place: drop the CONFIG argument, "
                          "--out and --overwrite")
    saved = store.read_config(run)
    for key, value in flags.items():
        if value is not None and saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {value} disagrees with the run's {key}={saved.get(key)!r}; "
                              f"--resume continues {run} as it was configured: drop {flag}")
    for pairs, key, flag in ((opt, "arch_options", "--opt"), (data_opt, "dataset_options", "--data-opt")):
        for name, value in _parse_options(pairs, flag).items():
            if saved.get(key, {}).get(name) != value:
                raise ConfigError(f"{flag} {name}={value} disagrees with the run's {key} "
                                  f"{saved.get(key, {})}; --resume continues {run} as configured")


def _interrupt_note(run: Path) -> None:
    """On Ctrl-C during training: which epochs the run keeps and the command that resumes it."""
    global _on_interrupt

    def note() -> str:
        from . import store

        epochs = sorted(store.list_checkpoints(run)) if Path(run).is_dir() else []
        if not epochs or not (Path(run) / store.RESUME).is_file():
            return f"the run {run} was not started; nothing to resume"
        return (f"{run} keeps its completed epochs (last checkpoint: epoch {epochs[-1]}); "
                f"resume with: genprobe train --resume {run}")

    _on_interrupt = note


@app.command()
def units(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory written by `genprobe train`."),
    modules: list[str] | None = typer.Option(None, "--modules", "-m", help="Patterns selecting units, as the probes take them (e.g. -m 'layers.*')."),
) -> None:
    """List a run's units (what --modules selects, in forward order, with their parameter counts)
    and the activation modules the single-direction probes use by default."""
    from .subject import Subject
    from .subject import units as table_of

    table = table_of(Subject.load(run), modules or None)
    for row in table.itertuples():
        kind = "site" if row.site else f"{row.parameters:,} parameters"
        typer.echo(f"{row.unit:40s} {row.types:28s} {kind}")


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


def _number_list(text: str, flag: str, kind: type) -> list:
    """``"0.5,1,1.5"`` -> ``[0.5, 1.0, 1.5]`` (ConfigError naming `flag` on a bad item)."""
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: write comma-separated {kind.__name__}s, e.g. "
                          f"{flag} {'1,2,4' if kind is int else '0.5,1.5,2.5'}") from None


@app.command("ntk-phase")
def ntk_phase(
    arch: str = typer.Option(LIBRARY, help="fcn, cnn-flatten or cnn-gap (infinite width)."),
    dataset: str = typer.Option(LIBRARY, help="Built-in dataset (see `genprobe datasets`)."),
    sigma_w2: str = typer.Option("0.5,1,1.25,1.5,1.75,2,2.5,3", "--sigma-w2",
                                 help="Comma-separated weight variances σ_w²."),
    depths: str = typer.Option("1,2,4,8,16,32,64,100", help="Comma-separated depths (hidden layers)."),
    sigma_b2: float = typer.Option(LIBRARY, "--sigma-b2", help="Bias variance σ_b²."),
    activation: str = typer.Option(LIBRARY, help="erf or relu."),
    n_train: int = typer.Option(LIBRARY, help="Training examples (class-balanced, seeded)."),
    n_test: int | None = typer.Option(LIBRARY, help="Test examples (at most the test split)."),
    ridge: float = typer.Option(LIBRARY, help="Relative ridge of the mean prediction (× tr Θ/N)."),
    filter_size: int = typer.Option(LIBRARY, help="Convolution width of the CNNs."),
    seed: int = typer.Option(LIBRARY, help="Seed of the subsets."),
    device: str = typer.Option(LIBRARY, help=DEVICE_HELP),
    data_dir: Path | None = typer.Option(None, help=DATA_DIR_HELP),
    out: Path | None = typer.Option(None, help="Result directory (default runs/ntk-phase-ARCH-DATASET)."),
) -> None:
    """NTK phase diagram (Xiao, Pennington & Schoenholz 2020): condition number and mean-prediction
    test accuracy of the infinite-width NTK over (σ_w², depth). Writes the result and figure.png."""
    from . import outputs
    from .kernels import ntk_phase as compute
    from .results import result_file

    out = Path(out) if out is not None else Path("runs") / f"ntk-phase-{arch}-{dataset}"
    widths = _number_list(sigma_w2, "--sigma-w2", float)
    layers = _number_list(depths, "--depths", int)
    outputs.check_replaceable(out, "result", result_file, "result directory")  # before the work
    global _on_interrupt
    _on_interrupt = lambda: f"nothing of this ntk-phase run was written ({out} is unchanged)"  # noqa: E731
    result = compute(arch=arch, sigma_w2=widths, depths=layers, sigma_b2=sigma_b2,
                     activation=activation, data=dataset, n_train=n_train, n_test=n_test,
                     ridge=ridge, seed=seed, filter_size=filter_size, data_dir=data_dir,
                     device=device)
    result.save(out, figure=True)
    _echo_result(result, out)


@app.command()
def report(
    path: Path = typer.Argument(..., metavar="RUN|SWEEP",
                                help="A run directory (`genprobe train`) or a sweep directory (`genprobe sweep`)."),
    out: Path | None = typer.Option(None, help="HTML file to write (default PATH/report.html); "
                                    "the JSON export goes beside it (.json)."),
) -> None:
    """Write a self-contained HTML report (figures inline, nothing fetched) and its JSON export:
    per run, the training curves and every probe's figure with a plain-language reading; per
    sweep, how well each measure ranks the runs by generalization gap."""
    from .report import report as write_report

    page = write_report(path, out)
    typer.echo(f"wrote {page} and {page.with_suffix('.json')}")


@app.command()
def demo(
    out: Path | None = typer.Option(None, help="Sweep directory to write (default runs/demo, or "
                                    "runs/demo-quick with --quick); a second run reuses what is done."),
    quick: bool = typer.Option(False, "--quick", help="Fewer epochs and smaller probe samples "
                               "(under 2 minutes on 2 cores)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """The one-command tour: train an fcn, a cnn with global average pooling, a resnet and an fcn
    on corrupted labels on the built-in digits, run every registered probe on each, rank the
    measures by generalization gap, and write the report (prints its path)."""
    from .report.demo import DEFAULT_OUT, DEFAULT_QUICK_OUT, run_demo

    where = out or (DEFAULT_QUICK_OUT if quick else DEFAULT_OUT)
    global _on_interrupt
    _on_interrupt = lambda: (f"finished models and probe results are kept in {where}; "  # noqa: E731
                             f"`genprobe demo{' --quick' if quick else ''}"
                             f"{f' --out {out}' if out else ''}` goes on from there")
    run_demo(where, quick=quick, device=device, echo=typer.echo)


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="Sweep config (YAML): train, grid and/or runs, probes, "
                                  "baselines; e.g. examples/sweeps/tiny.yaml."),
    out: Path | None = typer.Option(None, help="Sweep directory (default sweeps/NAME, NAME the "
                                    "config's name or file stem)."),
    jobs: int | None = typer.Option(None, help="Runs at once (default: the config's jobs, else 1)."),
    threads: int | None = typer.Option(None, help="Threads per run (default: the config's, else "
                                       "an equal share of the cores). Results depend on it."),
    executor: str = typer.Option("local", help="local (worker processes, no Ray), ray, or submitit "
                                 "(a SLURM job per run; pip install 'genprobe[submitit]')."),
    address: str | None = typer.Option(None, help="Ray cluster address host:port (with --executor "
                                       "ray; default: a local Ray instance)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    allow_large: bool = typer.Option(False, help="Accept a sweep of more than 1,000 runs."),
    slurm_partition: str | None = typer.Option(None, help="SLURM partition(s) of the jobs "
                                               "(--executor submitit; default: the config's "
                                               "slurm: partition, else the cluster's default)."),
    slurm_time: int | None = typer.Option(None, help="Time limit of each job, minutes (default: "
                                          "the config's slurm: time, else 60)."),
    slurm_cpus: int | None = typer.Option(None, help="CPUs per job (default: the config's slurm: "
                                          "cpus, else --threads, else 1)."),
    slurm_gpus: int | None = typer.Option(None, help="GPUs per job (default: the config's slurm: "
                                          "gpus, else 0)."),
    slurm_mem: float | None = typer.Option(None, help="Memory per job, GB (default: the config's "
                                           "slurm: mem, else the partition's default)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="--no-wait: submit the jobs and return "
                              "(--executor submitit); the same command again collects them."),
    plan: bool = typer.Option(False, "--plan", help="Print the runs (done, to do), the estimated "
                              "seconds of one run per phase and the total for these --jobs and "
                              "--executor, then exit; nothing is written to --out (estimates from "
                              "its finished runs, else a short calibration in a temporary folder)."),
) -> None:
    """Train a grid of models and probe each (SWEEP/table.parquet); re-run to resume or retry."""
    import pandas as pd

    from .sweep import SweepConfig, default_out, plan_sweep, run_sweep
    from .sweep.layout import RECORD, TABLE, records, run_dir

    cfg = SweepConfig.from_yaml(config)
    out = out or default_out(cfg)
    slurm = {k: v for k, v in (("partition", slurm_partition), ("time", slurm_time),
                               ("cpus", slurm_cpus), ("gpus", slurm_gpus), ("mem", slurm_mem))
             if v is not None}
    if plan:
        typer.echo(plan_sweep(cfg, out, jobs=jobs, threads=threads, executor=executor,
                              address=address, device=device, allow_large=allow_large,
                              slurm=slurm, wait=wait).text())
        return
    again = (f"genprobe sweep {config} --out {out}"
             + (" --executor submitit" if executor == "submitit" else ""))

    def kept() -> str:
        jobs_go_on = "; its SLURM jobs go on" if executor == "submitit" else ""
        return (f"{out} keeps {len(records(out))} recorded run(s) and the trained epochs of unfinished "
                f"ones{jobs_go_on}; resume with: {again}")

    global _on_interrupt
    _on_interrupt = kept
    outcome = run_sweep(cfg, out, jobs=jobs, threads=threads, executor=executor, address=address,
                        device=device, allow_large=allow_large, slurm=slurm, wait=wait)
    if outcome.running:
        before = outcome.running - outcome.submitted
        typer.echo(f"submitted {outcome.submitted} job(s)"
                   + (f" ({before} more still queued or running from before)" if before else "")
                   + f"; {outcome.done} of {outcome.runs} runs done; their logs are in "
                   f"{out / 'submitit'}. Collect them with the same command without --no-wait "
                   f"(it waits for the jobs, submits again those that died, and writes "
                   f"{out / TABLE}): {again}")
        return
    shown = [c for c in ("run", *outcome.table.attrs["hyperparameters"], "test_error",
                         "gap", "status") if c in outcome.table.columns]
    with pd.option_context("display.max_rows", 60, "display.width", 160,
                           "display.float_format", "{:.4g}".format):
        typer.echo(outcome.table[shown].to_string(index=False))
    typer.echo(f"wrote {out / TABLE}: {outcome.runs} runs, {outcome.done} done "
               f"({outcome.reused} from before), {outcome.failed} failed")
    if outcome.failed:
        print(f"genprobe: {outcome.failed} of {outcome.runs} runs failed (status and error in "
              f"{out / TABLE} and {run_dir(out, 'RUN') / RECORD}); run the same command "
              "again to retry them", file=sys.stderr)
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- library defaults

_OWNERS = {  # command: (its function here, the library's "module:function or class", renames)
    "ntk-phase": (ntk_phase, "genprobe.kernels.phase:ntk_phase", {"dataset": "data"}),
    "train": (train, "genprobe.zoo.train:TrainConfig", {}),
}


def _library_defaults(command: str) -> None:
    """Give `command`'s :data:`LIBRARY` options the defaults of the library function it calls,
    and write them into a ``{default}`` in an option's help (a value shown as typed: a sequence
    comma-joined)."""
    import importlib

    function, owner, renames = _OWNERS[command]
    module, _, name = owner.partition(":")
    library = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    for key, param in inspect.signature(function).parameters.items():
        info = param.default
        default = library.get(renames.get(key, key))
        if not isinstance(info, typer.models.OptionInfo) or default is None:
            continue
        value = default.default
        if info.default is LIBRARY:
            info.default = value
        if info.help and "{default}" in info.help:
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else f"{value:g}" \
                if isinstance(value, float) else str(value)
            info.help = info.help.replace("{default}", shown)
