"""The command line: happy paths, and one line + exit code 2 for every kind of bad input."""

import os
import subprocess
import sys

import pytest

from invoke import call


def run_cli(*args, cwd=None):
    """Run `python -m genprobe ARGS` in a subprocess: (exit code, stdout, stderr)."""
    env = os.environ | {"MPLBACKEND": "Agg", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "genprobe", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_help_and_listings(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0 and "train" in out and "probe" in out and "demo" in out
    code, out, _ = call(["datasets"], capsys)
    assert code == 0 and "digits" in out and "fashion-mnist" in out
    code, out, _ = call(["archs"], capsys)
    assert code == 0 and "resnet" in out and "readout" in out


def test_train_writes_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = call(["train", "--arch", "fcn", "--dataset", "digits", "--epochs", "2",
                              "--opt", "width=16", "--opt", "depth=1", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "test error" in stdout and (out / "final.safetensors").is_file()


def test_train_from_yaml_with_flag_override(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("arch: fcn\ndataset: digits\nepochs: 5\narch_options: {width: 8, depth: 1}\n")
    code, _, err = call(["train", config, "--epochs", "1", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    import genprobe.store as store
    assert store.read_config(tmp_path / "r")["epochs"] == 1


@pytest.mark.parametrize("args, message", [
    (["train", "--arch", "nope", "--dataset", "digits"], "unknown arch='nope'"),
    (["train", "--arch", "fcn", "--dataset", "nope"], "unknown dataset='nope'"),
    (["train", "--arch", "fcn", "--epochs", "0"], "epochs must be an integer >= 1"),
    (["train", "--arch", "fcn", "--epochs", "abc"], "Invalid value"),
    (["train", "--arch", "fcn", "--opt", "width"], "write KEY=VALUE"),
    (["train", "--arch", "fcn", "--device", "cuda:0"] if not __import__("torch").cuda.is_available()
     else ["train", "--arch", "fcn", "--device", "tpu"], "device"),
    (["train", "no-such-config.yaml"], "config file no-such-config.yaml does not exist"),
    (["train", "--resume", "no-such-run"], "does not exist"),
    (["nonsense-command"], "No such command"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = call(args + ["--out", tmp_path / "out"] if args[0] == "train" and "--resume" not in args
                        and args[1].startswith("--") else args, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_corrupt_run_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("arch: [unclosed\n")
    code, _, err = call(["train", "--resume", tmp_path / "run"], capsys)
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_module_entry_point_and_demo_help(tmp_path):
    """`python -m genprobe` works; the demo itself (minutes) runs in tests/test_report.py (slow)."""
    code, out, err = run_cli("demo", "--help", cwd=tmp_path)
    assert code == 0, err
    assert "--quick" in out and "--out" in out


def test_readme_lists_exactly_the_registered_probes():
    import re
    from pathlib import Path

    from genprobe.probes.registry import get_probe, list_probes

    text = (Path(__file__).parents[1] / "README.md").read_text()
    table = text[text.index("## What the probes are"):text.index("Options shared by the probes")]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.M))
    assert list(rows) == list_probes()
    for name, paper in rows.items():
        assert paper.strip() == get_probe(name).paper


def test_version_probes_listing_and_probe_help(capsys):
    import genprobe

    code, out, _ = call(["--version"], capsys)
    assert code == 0 and out.strip() == f"genprobe {genprobe.__version__}"
    code, out, _ = call(["probes"], capsys)
    assert code == 0 and all(name in out for name in genprobe.list_probes())
    code, out, _ = call(["probe", "robustness", "--help"], capsys)
    assert code == 0 and "--draws" in out and "--checkpoints" in out and "RUN" in out


def test_a_failed_self_check_comes_first_on_stderr(tiny_run, tmp_path, capsys, monkeypatch):
    """A probe whose self-check fails says so before its numbers, never only in meta.json."""
    import genprobe.options as common

    def failing(*args, **kwargs):
        return {"what": "the engine against a plain evaluation", "value": 0.3, "tolerance": 1e-4,
                "passed": False}

    args = ["probe", "robustness", tiny_run, "--draws", "1", "--checkpoints", "0", "--out"]
    code, out, err = call([*args, tmp_path / "passing"], capsys)
    assert code == 0 and "Self-check FAILED" not in err, err
    monkeypatch.setattr("genprobe.probes.robustness.trained_check", failing)
    assert common.trained_check is not failing
    code, out, err = call([*args, tmp_path / "failing"], capsys)
    assert code == 0, err
    assert err.startswith("genprobe: robustness: Self-check FAILED: the engine against a plain "
                          "evaluation: 0.3 against a tolerance of 0.0001"), err


def test_ctrl_c_while_the_command_line_imports_is_one_line(monkeypatch, capsys):
    """A Ctrl-C that lands while `genprobe` is still importing its command line (the first
    ~0.1 s of every command) is said in one line with exit 130, not a traceback."""
    import types

    from genprobe.__main__ import main

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "genprobe.cli", Importing("genprobe.cli"))
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "genprobe: interrupted; nothing was written\n"


def test_commands_show_the_library_defaults_they_do_not_restate(capsys):
    """ntk-phase's options and train's help take their defaults from the function they call: a
    default changed in the library shows in --help without touching the command line."""
    import inspect

    import typer

    import genprobe.cli as cli
    from genprobe.kernels.phase import ntk_phase
    from genprobe.zoo.train import TrainConfig

    code, out, _ = call(["ntk-phase", "--help"], capsys)
    assert code == 0 and "LIBRARY" not in out and "library's default" not in out
    assert f"[default: {inspect.signature(ntk_phase).parameters['sigma_b2'].default}]" in out
    code, out, _ = call(["train", "--help"], capsys)
    assert code == 0 and "{default}" not in out
    assert f"[{TrainConfig().epochs}]" in " ".join(out.split())
    for command in cli._OWNERS:  # every placeholder of every owned command is filled
        cli._library_defaults(command)
        function = cli._OWNERS[command][0]
        for param in inspect.signature(function).parameters.values():
            info = param.default
            if isinstance(info, typer.models.OptionInfo):
                assert info.default is not cli.LIBRARY, (command, param.name)
                assert "{default}" not in (info.help or ""), (command, param.name)


def test_units_lists_a_runs_units(tiny_run, capsys):
    import genprobe as gp

    code, out, err = call(["units", tiny_run], capsys)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    subject = gp.Subject.load(tiny_run)
    assert names[:len(subject.units())] == [u.name for u in subject.units()]
    assert "parameters" in out and out.rstrip().endswith("site")  # the fcn's ReLUs come last
    first = subject.units()[0].name
    code, out, _ = call(["units", tiny_run, "-m", first], capsys)
    assert code == 0 and out.split()[0] == first
    code, _, err = call(["units", tiny_run, "-m", "nosuch"], capsys)
    assert code == 2 and err.startswith("genprobe: error:") and "nosuch" in err
