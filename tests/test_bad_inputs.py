"""Bad input, one table: every case is one clear error and changes nothing it does not own.

Each case is a command line (run in-process, from inside the case's temporary folder) or an API
call. A command-line case must exit with code 2 and print exactly one line on stderr, naming the
bad thing; an API case must raise the given :class:`~genprobe.errors.GenprobeError` subclass (never
a raw ValueError, KeyError or RuntimeError) with a one-line message naming the bad thing. In both,
the case's folder, the shared trained run and the shared unfinished run are snapshotted (every
file's size, mtime and hash) before and after: a bad input writes nothing anywhere.

The unwritable-folder cases are skipped when the tests run as root, which can write anywhere.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import genprobe as gp
from genprobe import (
    ConfigError,
    DataError,
    GenprobeError,
    ModuleSelectionError,
    OutputError,
    RunError,
    StateError,
    store,
)
from genprobe.cli import main
from genprobe.data import load_dataset
from genprobe.params import select_units
from genprobe.zoo.train import TrainConfig, read_metrics, train_run
from runs import interrupted_in_epoch_2

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
NO_CUDA = not torch.cuda.is_available()


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A run of 3 epochs stopped (Ctrl-C) during its second epoch: resumable, no final state."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    with interrupted_in_epoch_2(), pytest.raises(KeyboardInterrupt):
        train_run(TrainConfig(arch="fcn", dataset="digits", epochs=3, n_train=120, n_test=60,
                              arch_options={"width": 16, "depth": 2}, device="cpu"), out)
    assert (out / store.RESUME).is_file() and not (out / store.FINAL).exists()
    return out


@pytest.fixture(scope="module")
def subject(tiny_run):
    return gp.Subject.load(tiny_run)


# ----------------------------------------------------------------------------- the case context


class Ctx:
    """What a case sees: its empty folder `tmp`, the shared finished `run` and `unfinished` run
    (read-only), `copy` (a copy of one of them, made by the case's setup to damage), `subject`."""

    def __init__(self, tmp: Path, run: Path, unfinished: Path, subject) -> None:
        self.tmp, self.run, self.unfinished, self.subject = tmp, run, unfinished, subject
        self.copy = tmp / "copy"

    def copy_run(self, unfinished: bool = False) -> Path:
        shutil.copytree(self.unfinished if unfinished else self.run, self.copy)
        return self.copy

    def paths(self) -> dict[str, Path]:
        return {"tmp": self.tmp, "run": self.run, "unfinished": self.unfinished, "copy": self.copy}


@dataclass
class Case:
    id: str
    call: list[str] | Callable[[Ctx], object]  # command-line arguments, or an API call
    expect: int | type[GenprobeError]  # the exit code (2), or the exception type
    fragment: str  # in the message: names the bad thing
    setup: Callable[[Ctx], object] | None = None
    skip: str | None = None


def cli(id, args, fragment, setup=None, skip=None) -> Case:
    return Case(id, args, 2, fragment, setup, skip)


def api(id, call, error, fragment, setup=None, skip=None) -> Case:
    return Case(id, call, error, fragment, setup, skip)


# -- setups ------------------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def config_file(text: str | bytes) -> Callable[[Ctx], object]:
    return lambda c: write(c.tmp / "c.yaml", text)


def a_file(c: Ctx) -> None:
    write(c.tmp / "afile", "the user's own file\n")


def user_folder(c: Ctx) -> None:
    write(c.tmp / "userdir" / "thesis.tex", "months of work\n")


def read_only_folder(c: Ctx) -> None:
    (c.tmp / "ro").mkdir()
    (c.tmp / "ro").chmod(stat.S_IRUSR | stat.S_IXUSR)


def empty_folder(c: Ctx) -> None:
    (c.tmp / "empty").mkdir()


def damaged(change: Callable[[Path], object], unfinished: bool = False) -> Callable[[Ctx], object]:
    """A setup copying a run to `copy`, then applying `change` to the copy."""
    return lambda c: change(c.copy_run(unfinished))


def edit_config(**changes) -> Callable[[Path], object]:
    def change(run: Path) -> None:
        config = yaml.safe_load((run / store.CONFIG).read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            elif isinstance(value, dict):
                config[key] = {**config.get(key, {}), **value}
            else:
                config[key] = value
        (run / store.CONFIG).write_text(yaml.safe_dump(config))

    return change


_DELETE = object()


def replace_file(name: str, content: str | bytes) -> Callable[[Path], object]:
    return lambda run: write(run / name, content)


def remove(name: str) -> Callable[[Path], object]:
    def change(run: Path) -> None:
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return change


def nan_final(run: Path) -> None:
    state = store.read_state(run / store.FINAL)
    state["layers.1.weight"][0, 0] = math.nan
    store.write_state(run / store.FINAL, state)


def wrong_model_checkpoint(run: Path) -> None:
    store.write_state(store.checkpoint_path(run, 1), {"weight": torch.zeros(2, 2)})


def other_labels(run: Path) -> None:
    labels = store.read_state(run / store.LABELS)
    labels["train_labels"] = (labels["train_labels"] + 1) % 10
    store.write_state(run / store.LABELS, labels)


def resume_without_rng(run: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(run / store.RESUME), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "rng"}  # noqa: SIM118
    save_file(tensors, str(run / store.RESUME), metadata=meta)


def foreign_entry_in_run(run: Path) -> None:
    write(run / "notes.txt", "my notes about this run\n")


def foreign_probe_result(run: Path) -> None:
    write(run / "probes" / "mine" / "data.csv", "1,2,3\n")


def with_result(c: Ctx) -> None:
    gp.Result(table=__import__("pandas").DataFrame({"a": [1.0]}), summary={"x": 1.0}).save(c.tmp / "res")


def result_with(name: str, content: str | bytes) -> Callable[[Ctx], object]:
    def setup(c: Ctx) -> None:
        with_result(c)
        write(c.tmp / "res" / name, content)

    return setup


def idx_garbage(c: Ctx) -> None:
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        write(c.tmp / "idx" / name, b"definitely not IDX")


def cifar_garbage(c: Ctx) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write(c.tmp / "cifar" / name, b"definitely not a pickle")


# -- API helpers -------------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def tiny_state(**changes) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    for k, v in changes.items():
        key = k.replace("_", ".")
        if v is _DELETE:
            del state[key]
        else:
            state[key] = v
    return state


def data(n=6, features=4, classes=3, **changes):
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n) % classes
    return changes.get("x", x), changes.get("y", y)


def make_subject(**kwargs):
    options = {"init": tiny_state(**{"0_weight": torch.ones(5, 4)}), "train": data(), "test": data()}
    return gp.Subject(kwargs.pop("model", tiny_model()), **(options | kwargs))


def nan_tensor(*shape):
    t = torch.zeros(*shape)
    t.view(-1)[0] = math.nan
    return t


def robustness(**options):
    return lambda c: gp.robustness(c.subject, **options)


def criticality(**options):
    return lambda c: gp.get_probe("criticality").function(c.subject, **options)


def stiffness(**options):
    return lambda c: gp.get_probe("stiffness").function(c.subject, **options)


def units(modules):
    return lambda c: select_units(tiny_model(), modules)


TRAIN = ["train", "--arch", "fcn", "--dataset", "digits", "--out", "{tmp}/out"]
TINY = ["--n-train", "60", "--n-test", "30", "--epochs", "1", "--opt", "width=8", "--opt", "depth=1"]
PROBE = ["--out", "{tmp}/res"]
RESUME = ["train", "--resume", "{copy}"]
CONFIG_OK = "arch: fcn\ndataset: digits\nepochs: 1\nn_train: 60\nn_test: 30\n"

# ----------------------------------------------------------------------------- the table

CASES: list[Case] = [
    # -- train: flags -----------------------------------------------------------------------------
    cli("train-arch", ["train", "--arch", "nope", "--out", "{tmp}/out"], "unknown arch='nope'"),
    cli("train-dataset", ["train", "--dataset", "nope", "--out", "{tmp}/out"], "unknown dataset='nope'"),
    cli("train-epochs-0", TRAIN + ["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    cli("train-epochs-negative", TRAIN + ["--epochs", "-3"], "epochs must be an integer >= 1, got -3"),
    cli("train-epochs-text", TRAIN + ["--epochs", "abc"], "Invalid value for '--epochs'"),
    cli("train-lr-negative", TRAIN + ["--lr", "-1"], "lr must be a positive number, got -1"),
    cli("train-lr-zero", TRAIN + ["--lr", "0"], "lr must be a positive number, got 0"),
    cli("train-lr-nan", TRAIN + ["--lr", "nan"], "lr must be a positive number, got nan"),
    cli("train-lr-inf", TRAIN + ["--lr", "inf"], "lr must be a positive number, got inf"),
    cli("train-batch-size", TRAIN + ["--batch-size", "0"], "batch_size must be an integer >= 1"),
    cli("train-optimizer", TRAIN + ["--optimizer", "rmsprop"], "unknown optimizer='rmsprop'"),
    cli("train-schedule", TRAIN + ["--schedule", "linear"], "unknown schedule='linear'"),
    cli("train-momentum-1", TRAIN + ["--momentum", "1"], "momentum must be a number in [0, 1), got 1"),
    cli("train-momentum-negative", TRAIN + ["--momentum", "-0.1"], "momentum must be a number in [0, 1)"),
    cli("train-weight-decay", TRAIN + ["--weight-decay", "-1"], "weight_decay must be a number >= 0"),
    cli("train-label-noise-high", TRAIN + ["--label-noise", "1.5"], "label_noise must be in [0, 1], got 1.5"),
    cli("train-label-noise-negative", TRAIN + ["--label-noise", "-0.1"], "label_noise must be in [0, 1]"),
    cli("train-checkpoints-outside", TRAIN + ["--epochs", "3", "--checkpoints", "1,99"], "outside 0..3"),
    cli("train-checkpoints-log-text", TRAIN + ["--checkpoints", "log:x"], "checkpoints='log:x'"),
    cli("train-checkpoints-log-0", TRAIN + ["--checkpoints", "log:0"], "checkpoints='log:0'"),
    cli("train-checkpoints-words", TRAIN + ["--checkpoints", "often"], "checkpoints='often'"),
    cli("train-n-train-0", TRAIN + ["--n-train", "0"], "n_train must be an integer >= 1"),
    cli("train-n-train-too-many", TRAIN + ["--n-train", "100000"], "n_train=100000 but the split holds only"),
    cli("train-n-test-negative", TRAIN + ["--n-test", "-1"], "n_test must be an integer >= 1"),
    cli("train-seed-negative", TRAIN + ["--seed", "-1"], "seed must be an integer >= 0, got -1"),
    cli("train-opt-no-equals", TRAIN + ["--opt", "width"], "--opt 'width': write KEY=VALUE"),
    cli("train-opt-unknown", TRAIN + ["--opt", "widht=3"], "has no option 'widht'"),
    cli("train-opt-negative-width", TRAIN + ["--opt", "width=-1"], "width must be an integer >= 1, got -1"),
    cli("train-opt-text-width", TRAIN + ["--opt", "width=abc"], "width must be an integer >= 1, got 'abc'"),
    cli("train-opt-activation", TRAIN + ["--opt", "activation=nope"], "unknown activation='nope'"),
    cli("train-opt-dropout", TRAIN + ["--opt", "dropout=2.0"] + TINY, "dropout"),
    cli("train-opt-resnet-depth", ["train", "--arch", "resnet", "--dataset", "digits", "--opt", "depth=3",
                                   "--out", "{tmp}/out"] + TINY[:4], "depth must be 6n+2"),
    cli("train-opt-heads", ["train", "--arch", "transformer", "--dataset", "mnist1d", "--opt", "heads=3",
                            "--out", "{tmp}/out", "--n-train", "60", "--n-test", "30"], "divisible by heads=3"),
    cli("train-data-opt-unknown", TRAIN + ["--data-opt", "nope=1"], "has no option 'nope'"),
    cli("train-data-opt-no-key", TRAIN + ["--data-opt", "=3"], "write KEY=VALUE"),
    cli("train-data-opt-value", ["train", "--dataset", "gaussian", "--data-opt", "dim=0", "--out", "{tmp}/out"],
        "dim must be an integer >= 1, got 0"),
    cli("train-device-tpu", TRAIN + ["--device", "tpu"], "device='tpu'"),
    cli("train-device-empty", TRAIN + ["--device", ""], "device=''"),
    cli("train-device-cuda", TRAIN + ["--device", "cuda:0"], "no CUDA device",
        skip=None if NO_CUDA else "a CUDA device is present"),
    cli("train-idx-no-data-dir", ["train", "--dataset", "idx", "--out", "{tmp}/out"], "reads --data-dir"),
    cli("train-idx-missing-dir", ["train", "--dataset", "idx", "--data-dir", "{tmp}/nowhere", "--out",
                                  "{tmp}/out"], "is not a folder"),
    cli("train-idx-empty-dir", ["train", "--dataset", "idx", "--data-dir", "{tmp}/empty", "--out", "{tmp}/out"],
        "lacks some IDX files", empty_folder),
    cli("train-idx-garbage", ["train", "--dataset", "idx", "--data-dir", "{tmp}/idx", "--out", "{tmp}/out"],
        "is not an IDX file", idx_garbage),
    cli("train-cifar-garbage", ["train", "--dataset", "cifar10", "--data-dir", "{tmp}/cifar", "--out",
                                "{tmp}/out"], "data_batch_1", cifar_garbage),
    cli("train-unknown-flag", TRAIN + ["--epoch", "3"], "No such option: --epoch"),
    cli("train-unknown-command", ["nonsense-command"], "No such command 'nonsense-command'"),
    # -- train: config files ----------------------------------------------------------------------
    cli("config-missing", ["train", "{tmp}/nothing.yaml"], "nothing.yaml does not exist"),
    cli("config-directory", ["train", "{tmp}/empty"], "empty is a directory", empty_folder),
    cli("config-bad-yaml", ["train", "{tmp}/c.yaml"], "is not valid YAML", config_file("arch: [fcn\n")),
    cli("config-list", ["train", "{tmp}/c.yaml"], "must be a mapping", config_file("- fcn\n- digits\n")),
    cli("config-duplicate-key", ["train", "{tmp}/c.yaml"], "key 'epochs' appears twice, at lines 3 "
        "and 4; keep one", config_file("arch: fcn\ndataset: digits\nepochs: 3\nepochs: 5\n")),
    cli("sweep-duplicate-key", ["sweep", "{tmp}/c.yaml", "--out", "{tmp}/out"], "key 'lr' appears "
        "twice, at lines 3 and 4", config_file("train: {arch: fcn, dataset: digits}\ngrid:\n  lr: "
                                                "[0.1]\n  lr: [0.2]\n")),
    cli("config-binary", ["train", "{tmp}/c.yaml"], "cannot be read as YAML text", config_file(b"\xff\xfe\x00\x81")),
    cli("config-unknown-key", ["train", "{tmp}/c.yaml"], "unknown training option 'epoch'",
        config_file(CONFIG_OK + "epoch: 3\n")),
    cli("config-epochs-text", ["train", "{tmp}/c.yaml"], "epochs must be an integer >= 1, got 'ten'",
        config_file("arch: fcn\ndataset: digits\nepochs: ten\n")),
    cli("config-epochs-bool", ["train", "{tmp}/c.yaml"], "epochs must be an integer >= 1, got True",
        config_file("arch: fcn\ndataset: digits\nepochs: yes\n")),
    cli("config-arch-options-scalar", ["train", "{tmp}/c.yaml"], "arch_options must be a mapping",
        config_file(CONFIG_OK + "arch_options: 5\n")),
    cli("config-dataset-options-list", ["train", "{tmp}/c.yaml"], "dataset_options must be a mapping",
        config_file(CONFIG_OK + "dataset_options: [1, 2]\n")),
    cli("config-label-noise-text", ["train", "{tmp}/c.yaml"], "label_noise must be in [0, 1], got 'x'",
        config_file(CONFIG_OK + "label_noise: x\n")),
    cli("config-momentum-null", ["train", "{tmp}/c.yaml"], "momentum must be a number in [0, 1), got None",
        config_file(CONFIG_OK + "momentum: null\n")),
    cli("config-weight-decay-text", ["train", "{tmp}/c.yaml"], "weight_decay must be a number >= 0",
        config_file(CONFIG_OK + "weight_decay: lots\n")),
    cli("config-device-number", ["train", "{tmp}/c.yaml"], "device must be a string, got 5",
        config_file(CONFIG_OK + "device: 5\n")),
    cli("config-seed-float", ["train", "{tmp}/c.yaml"], "seed must be an integer >= 0, got 1.5",
        config_file(CONFIG_OK + "seed: 1.5\n")),
    cli("config-arch-list", ["train", "{tmp}/c.yaml"], "arch must be a string",
        config_file("arch: [fcn]\ndataset: digits\n")),
    cli("config-checkpoints-list", ["train", "{tmp}/c.yaml"], "checkpoints must be",
        config_file(CONFIG_OK + "checkpoints: [1]\n")),
    # -- train: --out targets ---------------------------------------------------------------------
    cli("out-is-a-file", TRAIN[:-1] + ["{tmp}/afile"] + TINY, "afile is a file", a_file),
    cli("out-under-a-file", TRAIN[:-1] + ["{tmp}/afile/run"] + TINY, "lies under", a_file),
    cli("out-user-folder", TRAIN[:-1] + ["{tmp}/userdir"] + TINY, "userdir already exists", user_folder),
    cli("out-user-folder-overwrite", TRAIN[:-1] + ["{tmp}/userdir", "--overwrite"] + TINY,
        "is not a genprobe run directory (it holds thesis.tex)", user_folder),
    cli("out-dot", TRAIN[:-1] + ["."] + TINY, "run directory . already exists", user_folder),
    cli("out-dot-overwrite", TRAIN[:-1] + [".", "--overwrite"] + TINY, "not a genprobe run directory",
        user_folder),
    cli("out-another-run", TRAIN[:-1] + ["{copy}"] + TINY, "already exists", damaged(lambda r: None)),
    cli("out-run-with-user-file", TRAIN[:-1] + ["{copy}", "--overwrite"] + TINY,
        "also holds notes.txt, which genprobe did not write", damaged(foreign_entry_in_run)),
    cli("out-run-with-foreign-probe", TRAIN[:-1] + ["{copy}", "--overwrite"] + TINY,
        "also holds probes/mine, which genprobe did not write", damaged(foreign_probe_result)),
    cli("out-run-unmarked", TRAIN[:-1] + ["{copy}", "--overwrite"] + TINY,
        "not a genprobe run directory", damaged(remove(".genprobe-run"))),
    cli("out-checkpoints-folder", TRAIN[:-1] + ["{copy}/checkpoints", "--overwrite"] + TINY,
        "not a genprobe run directory", damaged(lambda r: None)),
    cli("out-unwritable", TRAIN[:-1] + ["{tmp}/ro/run"] + TINY, "no write permission", read_only_folder,
        skip="root can write anywhere" if ROOT else None),
    # -- train: --resume --------------------------------------------------------------------------
    cli("resume-nowhere", ["train", "--resume", "{tmp}/nowhere"], "nowhere does not exist"),
    cli("resume-a-file", ["train", "--resume", "{tmp}/afile"], "afile is a file", a_file),
    cli("resume-empty-folder", ["train", "--resume", "{tmp}/empty"], "has no config.yaml", empty_folder),
    cli("resume-finished", RESUME, "already finished", damaged(lambda r: None)),
    cli("resume-config-bad-yaml", RESUME, "config.yaml is corrupt",
        damaged(replace_file(store.CONFIG, "arch: [fcn\n"), unfinished=True)),
    cli("resume-config-list", RESUME, "not a mapping",
        damaged(replace_file(store.CONFIG, "- a\n- b\n"), unfinished=True)),
    cli("resume-config-binary", RESUME, "config.yaml is corrupt or unreadable",
        damaged(replace_file(store.CONFIG, b"\xff\xfe\x00\x81"), unfinished=True)),
    cli("resume-config-no-arch", RESUME, "no arch/dataset",
        damaged(edit_config(arch=_DELETE), unfinished=True)),
    cli("resume-config-bad-value", RESUME, "epochs must be an integer >= 1",
        damaged(edit_config(epochs=-2), unfinished=True)),
    cli("resume-no-resume-file", RESUME, "has no resume.safetensors",
        damaged(remove(store.RESUME), unfinished=True)),
    cli("resume-corrupt-resume-file", RESUME, "resume.safetensors is corrupt",
        damaged(replace_file(store.RESUME, b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"), unfinished=True)),
    cli("resume-resume-file-no-rng", RESUME, "resume.safetensors is corrupt",
        damaged(resume_without_rng, unfinished=True)),
    cli("resume-no-metrics", RESUME, "has no metrics.parquet", damaged(remove(store.METRICS), unfinished=True)),
    cli("resume-corrupt-metrics", RESUME, "metrics.parquet is corrupt",
        damaged(replace_file(store.METRICS, b"PAR1 this is not parquet PAR1"), unfinished=True)),
    cli("resume-shape-mismatch", RESUME, "has shape",
        damaged(edit_config(arch_options={"width": 8}), unfinished=True)),
    cli("resume-flag-disagrees", RESUME + ["--epochs", "5"], "--epochs 5 disagrees", damaged(lambda r: None, True)),
    cli("resume-with-out", RESUME + ["--out", "{tmp}/x"], "drop the CONFIG argument", damaged(lambda r: None, True)),
    # -- probes: the command line -----------------------------------------------------------------
    cli("probe-unknown", ["probe", "nope", "{run}"], "No such command 'nope'"),
    cli("probe-run-nowhere", ["probe", "robustness", "{tmp}/nowhere"] + PROBE, "nowhere does not exist"),
    cli("probe-run-is-result", ["probe", "robustness", "{tmp}/res", "--out", "{tmp}/res2"],
        "no config.yaml", with_result),
    cli("probe-modules-nomatch", ["probe", "robustness", "{run}", "--modules", "conv*"] + PROBE,
        "module pattern 'conv*' matches no module"),
    cli("probe-checkpoints-missing", ["probe", "robustness", "{run}", "--checkpoints", "7"] + PROBE,
        "no checkpoint for epoch 7"),
    cli("probe-checkpoints-text", ["probe", "robustness", "{run}", "--checkpoints", "first"] + PROBE,
        "--checkpoints='first'"),
    cli("probe-seed-negative", ["probe", "robustness", "{run}", "--seed", "-1"] + PROBE, "seed"),
    cli("probe-n-0", ["probe", "robustness", "{run}", "--n", "0"] + PROBE, "n must be an integer >= 1, got 0"),
    cli("probe-n-too-many", ["probe", "robustness", "{run}", "--n", "100000"] + PROBE, "n=100000 is larger"),
    cli("probe-per-class-too-many", ["probe", "robustness", "{run}", "--per-class", "1000"] + PROBE,
        "per_class=1000"),
    cli("probe-n-and-per-class", ["probe", "robustness", "{run}", "--n", "5", "--per-class", "2"] + PROBE,
        "give n or per_class, not both"),
    cli("probe-split", ["probe", "robustness", "{run}", "--split", "validation"] + PROBE,
        "split='validation'"),
    cli("probe-device", ["probe", "robustness", "{run}", "--device", "tpu"] + PROBE, "device='tpu'"),
    cli("probe-memory-budget", ["probe", "robustness", "{run}", "--memory-budget-mb", "-5"] + PROBE,
        "--memory-budget-mb must be positive"),
    cli("probe-batch-size", ["probe", "robustness", "{run}", "--batch-size", "0"] + PROBE, "batch_size"),
    cli("probe-two-runs-one-out", ["probe", "robustness", "{run}", "{run}"] + PROBE,
        "--out names one result directory"),
    cli("probe-out-a-file", ["probe", "robustness", "{run}", "--out", "{tmp}/afile"], "afile is a file", a_file),
    cli("probe-out-under-a-file", ["probe", "robustness", "{run}", "--out", "{tmp}/afile/res"], "lies under",
        a_file),
    cli("probe-out-user-folder", ["probe", "robustness", "{run}", "--out", "{tmp}/userdir"],
        "not a genprobe result directory (it holds thesis.tex)", user_folder),
    cli("probe-out-dot", ["probe", "robustness", "{run}", "--out", "."], "not a genprobe result directory",
        user_folder),
    cli("probe-out-a-run", ["probe", "robustness", "{run}", "--out", "{copy}"], "not a genprobe result directory",
        damaged(lambda r: None)),
    cli("probe-out-result-with-user-file", ["probe", "robustness", "{run}", "--out", "{tmp}/res"],
        "not a genprobe result directory", result_with("notes.txt", "mine\n")),
    cli("probe-out-unwritable", ["probe", "robustness", "{run}", "--out", "{tmp}/ro/res"], "no write permission",
        read_only_folder, skip="root can write anywhere" if ROOT else None),
    cli("probe-run-unfinished", ["probe", "robustness", "{unfinished}"] + PROBE, "is unfinished"),
    cli("probe-run-corrupt-final", ["probe", "robustness", "{copy}"] + PROBE, "cannot read checkpoint",
        damaged(replace_file(store.FINAL, b"garbage"))),
    cli("probe-run-shape-mismatch", ["probe", "robustness", "{copy}"] + PROBE, "has shape",
        damaged(edit_config(arch_options={"width": 8}))),
    cli("robustness-draws", ["probe", "robustness", "{run}", "--draws", "0"] + PROBE, "draws"),
    cli("robustness-threshold", ["probe", "robustness", "{run}", "--threshold", "-1"] + PROBE, "threshold"),
    cli("robustness-threshold-nan", ["probe", "robustness", "{run}", "--threshold", "nan"] + PROBE, "threshold"),
    cli("robustness-buffers", ["probe", "robustness", "{run}", "--buffers", "freeze"] + PROBE, "buffers='freeze'"),
    cli("criticality-samples", ["probe", "criticality", "{run}", "--samples", "0"] + PROBE, "samples"),
    cli("criticality-epsilon", ["probe", "criticality", "{run}", "--epsilon", "nan"] + PROBE, "epsilon"),
    cli("criticality-loss", ["probe", "criticality", "{run}", "--loss", "hinge"] + PROBE, "loss='hinge'"),
    cli("criticality-noise", ["probe", "criticality", "{run}", "--noise", "pink"] + PROBE, "noise='pink'"),
    cli("criticality-valley", ["probe", "criticality", "{run}", "--valley", "deep"] + PROBE, "valley='deep'"),
    cli("stiffness-pairs", ["probe", "stiffness", "{run}", "--pairs", "all"] + PROBE, "pairs='all'"),
    cli("stiffness-distance", ["probe", "stiffness", "{run}", "--distance", "manhattan"] + PROBE,
        "distance='manhattan'"),
    cli("stiffness-bins", ["probe", "stiffness", "{run}", "--bins", "0"] + PROBE, "bins"),
    # -- API: training ----------------------------------------------------------------------------
    api("api-train-not-a-config", lambda c: train_run({"arch": "fcn"}, c.tmp / "out"), ConfigError,
        "config must be a TrainConfig"),
    api("api-config-from-list", lambda c: TrainConfig.from_dict(["fcn"]), ConfigError, "must be a mapping"),
    api("api-config-bool-epochs", lambda c: TrainConfig(epochs=True).validated(), ConfigError, "epochs"),
    api("api-train-out-file", lambda c: train_run(TrainConfig(epochs=1), c.tmp / "afile"), OutputError,
        "afile is a file", a_file),
    api("api-train-out-user-folder", lambda c: train_run(TrainConfig(epochs=1), c.tmp / "userdir", overwrite=True),
        OutputError, "not a genprobe run directory", user_folder),
    api("api-resume-corrupt-metrics",
        lambda c: train_run(TrainConfig(), c.copy, resume=True), RunError, "metrics.parquet is corrupt",
        damaged(replace_file(store.METRICS, b"\x00" * 64), unfinished=True)),
    api("api-read-metrics-missing", lambda c: read_metrics(c.tmp), RunError, "has no metrics.parquet"),
    # -- API: Subject -----------------------------------------------------------------------------
    api("subject-not-a-model", lambda c: gp.Subject("resnet"), StateError, "must be a torch.nn.Module, got str"),
    api("subject-final-a-list", lambda c: make_subject(final=[1, 2]), StateError, "final must be a dict"),
    api("subject-final-shape", lambda c: make_subject(final=tiny_state(**{"2_weight": torch.zeros(3, 4)})),
        StateError, "final['2.weight'] has shape (3, 4), the model expects (3, 5)"),
    api("subject-final-missing-key", lambda c: make_subject(final=tiny_state(**{"2_bias": _DELETE})),
        StateError, "missing key '2.bias'"),
    api("subject-final-extra-key", lambda c: make_subject(final=tiny_state(**{"9_weight": torch.zeros(1)})),
        StateError, "unexpected key '9.weight'"),
    api("subject-final-not-tensor", lambda c: make_subject(final=tiny_state(**{"0_bias": [0.0] * 5})),
        StateError, "final['0.bias'] is a list"),
    api("subject-final-nan", lambda c: make_subject(final=tiny_state(**{"0_weight": nan_tensor(5, 4)})),
        StateError, "final['0.weight'] holds 1 NaN"),
    api("subject-init-nan", lambda c: make_subject(init=tiny_state(**{"2_bias": nan_tensor(3)})),
        StateError, "init['2.bias'] holds 1 NaN"),
    api("subject-checkpoint-key", lambda c: make_subject(checkpoints={"one": tiny_state()}), StateError,
        "checkpoint keys must be epochs"),
    api("subject-checkpoint-negative", lambda c: make_subject(checkpoints={-1: tiny_state()}), StateError,
        "got -1"),
    api("subject-init-is-final", lambda c: make_subject(init=tiny_model().state_dict()), StateError,
        "init is identical to final"),
    api("subject-length-mismatch", lambda c: make_subject(train=(torch.zeros(6, 4), torch.zeros(5).long())),
        DataError, "train: 6 inputs but 5 labels"),
    api("subject-float-labels", lambda c: make_subject(train=data(y=torch.zeros(6))), DataError,
        "labels must be a 1-D integer tensor"),
    api("subject-2d-labels", lambda c: make_subject(test=data(y=torch.zeros(6, 1).long())), DataError,
        "test: labels must be a 1-D integer tensor"),
    api("subject-negative-labels", lambda c: make_subject(train=data(y=-torch.ones(6).long())), DataError,
        "labels must be class indices >= 0, got -1"),
    api("subject-labels-out-of-range", lambda c: make_subject(num_classes=3, test=data(y=torch.full((6,), 5))),
        DataError, "test: label 5 is out of range for num_classes=3"),
    api("subject-nan-inputs", lambda c: make_subject(train=data(x=nan_tensor(6, 4))), DataError,
        "train: 1 input(s) hold NaN"),
    api("subject-empty-split", lambda c: make_subject(test=(torch.zeros(0, 4), torch.zeros(0).long())),
        DataError, "test is empty"),
    api("subject-data-a-number", lambda c: make_subject(train=5), DataError, "train must be (X, y) tensors"),
    api("subject-data-unreadable", lambda c: make_subject(train=[("x", "y")]), DataError, "train"),
    api("subject-complex-inputs", lambda c: make_subject(train=data(x=torch.zeros(6, 4, dtype=torch.cfloat))),
        DataError, "inputs must be real numbers"),
    api("subject-num-classes-0", lambda c: make_subject(num_classes=0), DataError, "num_classes must be a positive"),
    api("subject-num-classes-text", lambda c: make_subject(num_classes="3"), DataError, "got '3'"),
    api("subject-inputs-wrong-shape", lambda c: gp.robustness(make_subject(train=data(features=7),
                                                                           test=data(features=7)), draws=1),
        DataError, "input"),
    api("subject-state-epoch", lambda c: c.subject.state(99), StateError, "no checkpoint for epoch 99"),
    api("subject-data-split", lambda c: c.subject.data("validation"), DataError, "split='validation'"),
    api("subject-no-init", lambda c: gp.robustness(make_subject(init=None)), StateError,
        "needs the initial state"),
    api("subject-no-train-data", lambda c: gp.robustness(make_subject(train=None), split="train"), DataError,
        "no train data"),
    # -- API: Subject.load of damaged runs --------------------------------------------------------
    api("load-nowhere", lambda c: gp.Subject.load(c.tmp / "nowhere"), RunError, "nowhere does not exist"),
    api("load-a-file", lambda c: gp.Subject.load(c.tmp / "afile"), RunError, "afile is a file", a_file),
    api("load-unfinished", lambda c: gp.Subject.load(c.unfinished), RunError, "is unfinished"),
    api("load-corrupt-final", lambda c: gp.Subject.load(c.copy), StateError, "cannot read checkpoint",
        damaged(replace_file(store.FINAL, b"\x00" * 40))),
    api("load-corrupt-checkpoint", lambda c: gp.Subject.load(c.copy), StateError, "epoch-0001.safetensors",
        damaged(replace_file("checkpoints/epoch-0001.safetensors", b"{}"))),
    api("load-no-initial-checkpoint", lambda c: gp.Subject.load(c.copy), RunError, "no initial checkpoint",
        damaged(remove("checkpoints/epoch-0000.safetensors"))),
    api("load-other-labels", lambda c: gp.Subject.load(c.copy), RunError, "training labels",
        damaged(other_labels)),
    api("load-corrupt-labels", lambda c: gp.Subject.load(c.copy), StateError, "labels.safetensors",
        damaged(replace_file(store.LABELS, b"nope"))),
    api("load-shape-mismatch", lambda c: gp.Subject.load(c.copy), StateError, "has shape",
        damaged(edit_config(arch_options={"width": 8}))),
    api("load-config-not-mapping", lambda c: gp.Subject.load(c.copy), RunError, "not a mapping",
        damaged(replace_file(store.CONFIG, "just a sentence\n"))),
    api("load-config-unknown-option", lambda c: gp.Subject.load(c.copy), ConfigError,
        "unknown training option 'colour'", damaged(edit_config(colour="red"))),
    api("load-checkpoint-other-model", lambda c: gp.Subject.load(c.copy), StateError, "checkpoints[1]",
        damaged(wrong_model_checkpoint)),
    api("load-nan-final", lambda c: gp.Subject.load(c.copy), StateError, "NaN", damaged(nan_final)),
    api("read-state-pt-not-a-dict", lambda c: store.read_state(c.tmp / "x.pt"), StateError,
        "does not hold a state dict", lambda c: torch.save([1, 2], c.tmp / "x.pt")),
    api("read-state-folder", lambda c: store.read_state(c.tmp / "empty"), StateError, "empty",
        empty_folder),
    # -- API: module selections -------------------------------------------------------------------
    api("modules-int", units(123), ModuleSelectionError, "modules=123 (int)"),
    api("modules-float", units(3.5), ModuleSelectionError, "modules=3.5"),
    api("modules-bytes", units(b"0"), ModuleSelectionError, "modules=b'0'"),
    api("modules-list-with-int", units(["0", 2]), ModuleSelectionError, "pattern 2 (int) is not a string"),
    api("modules-mapping-int-pattern", units({"head": 2}), ModuleSelectionError, "group 'head'"),
    api("modules-mapping-int-name", units({1: "0"}), ModuleSelectionError, "unit name 1"),
    api("modules-mapping-empty-patterns", units({"head": []}), ModuleSelectionError, "group 'head'"),
    api("modules-empty-list", units([]), ModuleSelectionError, "empty module selection"),
    api("modules-no-match", units("conv*"), ModuleSelectionError, "'conv*' matches no module"),
    api("modules-group-no-match", units({"g": "conv*"}), ModuleSelectionError, "match no module"),
    api("modules-overlap", units({"a": "0", "b": ["0", "2"]}), ModuleSelectionError, "must not overlap"),
    api("modules-probe", robustness(modules=42), ModuleSelectionError, "modules=42"),
    # -- API: probe options -----------------------------------------------------------------------
    api("robustness-not-a-subject", lambda c: gp.robustness("run"), GenprobeError, "Subject"),
    api("robustness-draws-0", robustness(draws=0), ConfigError, "draws"),
    api("robustness-threshold-text", robustness(threshold="high"), ConfigError, "threshold"),
    api("robustness-split", robustness(split="val"), ConfigError, "split='val'"),
    api("robustness-seed-negative", robustness(seed=-1), ConfigError, "seed"),
    api("robustness-seed-float", robustness(seed=1.5), ConfigError, "seed"),
    api("robustness-n-bool", robustness(n=True), ConfigError, "n must be"),
    api("robustness-per-class-0", robustness(per_class=0), ConfigError, "per_class"),
    api("robustness-checkpoints-word", robustness(checkpoints="some"), ConfigError, "checkpoints='some'"),
    api("robustness-checkpoints-missing", robustness(checkpoints=[99]), StateError, "no checkpoint for epoch 99"),
    api("robustness-checkpoints-text", robustness(checkpoints=["a"]), ConfigError, "'a'"),
    api("api-robustness-buffers", robustness(buffers="x"), ConfigError, "buffers='x'"),
    api("robustness-device-name", robustness(device="tpu"), ConfigError, "device='tpu'"),
    api("robustness-device-number", robustness(device=5), ConfigError, "device=5"),
    api("robustness-batch-size", robustness(batch_size=0), ConfigError, "batch_size"),
    api("robustness-memory-budget", robustness(memory_budget=-1), ConfigError, "memory_budget"),
    api("criticality-samples-0", criticality(samples=0), ConfigError, "samples"),
    api("criticality-alphas", criticality(alphas=[2.0]), ConfigError, "alphas"),
    api("api-criticality-loss", criticality(loss="hinge"), ConfigError, "loss='hinge'"),
    api("stiffness-bins-0", stiffness(bins=0), ConfigError, "bins"),
    api("api-stiffness-pairs", stiffness(pairs="all"), ConfigError, "pairs='all'"),
    # -- API: saved results -----------------------------------------------------------------------
    api("load-result-nowhere", lambda c: gp.load(c.tmp / "nowhere"), RunError, "nowhere"),
    api("load-result-a-file", lambda c: gp.load(c.tmp / "afile"), RunError, "afile", a_file),
    api("load-result-empty-folder", lambda c: gp.load(c.tmp / "empty"), RunError, "empty", empty_folder),
    api("load-result-a-run", lambda c: gp.load(c.run), RunError, "not a readable genprobe result"),
    api("load-result-bad-json", lambda c: gp.load(c.tmp / "res"), RunError, "res",
        result_with("meta.json", "{not json")),
    api("load-result-json-list", lambda c: gp.load(c.tmp / "res"), RunError, "res", result_with("meta.json", "[]")),
    api("load-result-json-no-tables", lambda c: gp.load(c.tmp / "res"), RunError, "res",
        result_with("meta.json", '{"summary": {}}')),
    api("load-result-corrupt-table", lambda c: gp.load(c.tmp / "res"), RunError, "res",
        result_with("table.parquet", b"PAR1 garbage PAR1")),
    api("load-result-wrong-kind", lambda c: gp.RobustnessResult.load(c.tmp / "res"), RunError,
        "not 'robustness'", with_result),
    # -- API: datasets ----------------------------------------------------------------------------
    api("dataset-unknown", lambda c: load_dataset("imagenet"), DataError, "unknown dataset='imagenet'"),
    api("dataset-seed", lambda c: load_dataset("digits", seed=-1), ConfigError, "seed"),
    api("dataset-label-noise", lambda c: load_dataset("digits", label_noise=2), ConfigError,
        "label_noise"),
    api("dataset-option", lambda c: load_dataset("digits", colour=1), ConfigError, "no option 'colour'"),
    api("dataset-mnist1d-samples", lambda c: load_dataset("mnist1d", num_samples=3), ConfigError,
        "num_samples"),
]


def test_the_table_is_large_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 100, len(ids)


# ----------------------------------------------------------------------------- the checks


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots`: (kind, size, mtime, sha256) of files, kind and mode of folders."""
    seen = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            info = path.lstat()
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                seen[str(path)] = ("file", info.st_size, info.st_mtime_ns, digest)
            else:
                seen[str(path)] = ("dir" if path.is_dir() else "other", stat.S_IMODE(info.st_mode))
    return seen


def _changes(before: dict, after: dict) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, tiny_run, unfinished_run, subject, capsys, monkeypatch):
    if case.skip:
        pytest.skip(case.skip)
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(work, tiny_run, unfinished_run, subject)
    if case.setup is not None:
        case.setup(ctx)
    monkeypatch.chdir(work)
    roots = (work, tiny_run, unfinished_run)
    before = snapshot(*roots)
    try:
        if callable(case.call):
            with pytest.raises(GenprobeError) as info:
                case.call(ctx)
            message = str(info.value)
            assert isinstance(info.value, case.expect), f"{type(info.value).__name__}: {message}"
            assert "\n" not in message.strip(), message
        else:
            args = [a.format(**ctx.paths()) for a in case.call]
            capsys.readouterr()
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code or 0
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == case.expect, err
            assert len(lines) == 1, err
            message = lines[0]
            assert message.startswith("genprobe: error: "), message
        assert case.fragment in message, message
        assert not _changes(before, snapshot(*roots)), _changes(before, snapshot(*roots))
    finally:
        for path in [work, *work.rglob("*")]:  # let pytest clean up a read-only folder
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
