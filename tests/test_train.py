"""Training runs: the run directory, Subject.load round trip, resume, checkpoints, safe loading."""

import pickle

import pandas as pd
import pytest
import torch

import genprobe as gp
from genprobe import ConfigError, RunError, StateError, store
from genprobe.errors import OutputError
from genprobe.zoo import list_models
from genprobe.zoo.train import TrainConfig, read_metrics, train_run
from runs import interrupted_in_epoch_2

DATASET_FOR = {"fcn": "digits", "cnn": "digits", "vgg": "digits", "resnet": "digits", "transformer": "mnist1d"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fcn"
    cfg = TrainConfig(arch="fcn", dataset="digits", arch_options={"width": 32, "depth": 2}, epochs=3,
                      label_noise=0.2, device="cpu", checkpoints="1,3")
    return train_run(cfg, out)


def test_run_directory_layout(run):
    assert sorted(store.list_checkpoints(run)) == [0, 1, 3]
    assert (run / "final.safetensors").is_file() and not (run / "resume.safetensors").exists()
    metrics = read_metrics(run)
    assert list(metrics.epoch) == [0, 1, 2, 3]
    assert {"train_loss", "train_error", "test_loss", "test_error", "lr", "seconds"} <= set(metrics.columns)
    config = store.read_config(run)
    assert config["data"]["normalization"] and config["genprobe_version"] == gp.__version__


def test_subject_load_round_trip(run):
    s = gp.Subject.load(run)
    assert torch.equal(s.final["layers.1.weight"], store.read_state(run / "final.safetensors")["layers.1.weight"])
    assert torch.equal(s.init["layers.1.weight"], store.read_state(store.checkpoint_path(run, 0))["layers.1.weight"])
    assert sorted(s.checkpoints) == [0, 1, 3]
    labels = store.read_state(run / "labels.safetensors")
    assert torch.equal(s.train.y, labels["train_labels"])
    assert len(labels["corrupted_indices"]) == round(0.2 * len(s.train))
    final = read_metrics(run).iloc[-1]
    m = gp.evaluate(s.model, s.final, s.test)
    assert m.error == pytest.approx(final.test_error) and m.loss == pytest.approx(final.test_loss, rel=1e-5)


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    cfg = dict(arch="fcn", dataset="digits", arch_options={"width": 16, "depth": 1, "dropout": 0.2},
               epochs=3, device="cpu")
    whole = train_run(TrainConfig(**cfg), tmp_path / "whole")
    again = train_run(TrainConfig(**cfg), tmp_path / "again")
    a, b = store.read_state(whole / "final.safetensors"), store.read_state(again / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    interrupted = tmp_path / "interrupted"
    with interrupted_in_epoch_2(), pytest.raises(KeyboardInterrupt):
        train_run(TrainConfig(**cfg), interrupted)
    assert not (interrupted / "final.safetensors").exists() and (interrupted / "resume.safetensors").exists()
    train_run(TrainConfig(), interrupted, resume=True)
    c = store.read_state(interrupted / "final.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    pd.testing.assert_frame_equal(read_metrics(whole).drop(columns="seconds"),
                                  read_metrics(interrupted).drop(columns="seconds"))


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_trains_and_loss_goes_down(arch, tmp_path):
    cfg = TrainConfig(arch=arch, dataset=DATASET_FOR[arch], epochs=2, n_train=512, n_test=128,
                      device="cpu", lr=0.05)
    metrics = read_metrics(train_run(cfg, tmp_path / arch))
    assert metrics.train_loss.iloc[-1] < metrics.train_loss.iloc[0]


@pytest.mark.parametrize("change, message", [
    ({"arch": "nope"}, "unknown arch='nope'"),
    ({"dataset": "nope"}, "unknown dataset='nope'"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"label_noise": 1.5}, "label_noise must be in"),
    ({"checkpoints": "1,99"}, "outside 0..3"),
    ({"arch_options": {"widht": 3}}, "has no option 'widht'"),
])
def test_bad_config_leaves_nothing_behind(change, message, tmp_path):
    cfg = TrainConfig(**{"arch": "fcn", "dataset": "digits", "epochs": 3, **change})
    with pytest.raises(ConfigError, match=message):
        train_run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_and_unfinished_runs(run, tmp_path):
    with pytest.raises(OutputError, match="already exists"):
        train_run(TrainConfig(epochs=1), run)
    with pytest.raises(RunError, match="already finished"):
        train_run(TrainConfig(), run, resume=True)
    with pytest.raises(RunError, match="does not exist"):
        gp.Subject.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no config.yaml"):
        gp.Subject.load(tmp_path / "empty")


def test_corrupt_checkpoint_is_one_clear_error(run, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(StateError, match="cannot read checkpoint .*bad.safetensors"):
        store.read_state(bad)


def test_pt_files_are_loaded_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(StateError, match="cannot read checkpoint"):
        store.read_state(evil)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(store.read_state(good)["w"], torch.ones(2))


def test_checkpoint_schedules():
    assert TrainConfig(epochs=4).checkpoint_epochs() == [0, 1, 2, 3, 4]
    assert TrainConfig(epochs=100, checkpoints="log:5").checkpoint_epochs() == [0, 1, 3, 10, 32, 100]
    assert TrainConfig(epochs=10, checkpoints="2,5").checkpoint_epochs() == [0, 2, 5, 10]


# ----------------------------------------------------------------------------- never lose data

TINY = dict(arch="fcn", dataset="digits", epochs=2, n_train=60, n_test=30,
            arch_options={"width": 8, "depth": 1}, device="cpu")
DIVERGES = dict(TINY, lr=1e6, schedule="constant", batch_size=8)


def tree(root):
    """{relative path: bytes (files) or None (folders)} of everything under `root`."""
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def temporary_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".replaced-" in p.name]


def test_a_run_is_marked_as_genprobe_s(run):
    assert (run / ".genprobe-run").is_file()
    assert not temporary_files(run.parent)


def test_overwrite_replaces_a_genprobe_run_and_its_probe_results(tmp_path):
    out = train_run(TrainConfig(**TINY), tmp_path / "run")
    gp.Result(table=pd.DataFrame({"a": [1.0]}), summary={"x": 1.0}).save(out / "probes" / "robustness")
    train_run(TrainConfig(**{**TINY, "epochs": 1}), out, overwrite=True)
    assert store.read_config(out)["epochs"] == 1 and not (out / "probes").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no replaced run left aside
    assert (out / ".genprobe-run").is_file() and not temporary_files(tmp_path)


@pytest.mark.parametrize("damage", ["user file", "user folder in probes", "user file in checkpoints",
                                    "no marker"])
def test_overwrite_refuses_what_genprobe_did_not_write(damage, tmp_path):
    out = train_run(TrainConfig(**TINY), tmp_path / "run")
    if damage == "user file":
        (out / "notes.txt").write_text("mine")
    elif damage == "user folder in probes":
        (out / "probes" / "mine").mkdir(parents=True)
        (out / "probes" / "mine" / "a.csv").write_text("1")
    elif damage == "user file in checkpoints":
        (out / "checkpoints" / "best.pt").write_text("mine")
    else:
        (out / ".genprobe-run").unlink()
    before = tree(out)
    named = {"user file": "notes.txt", "user folder in probes": "probes/mine",
             "user file in checkpoints": "checkpoints/best.pt", "no marker": "not a genprobe run"}[damage]
    with pytest.raises(OutputError, match=named):
        train_run(TrainConfig(**TINY), out, overwrite=True)
    assert tree(out) == before


def test_out_that_cannot_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputError, match="is a file"):
        train_run(TrainConfig(**TINY), tmp_path / "file")
    with pytest.raises(OutputError, match="lies under"):
        train_run(TrainConfig(**TINY), tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_diverged_run_removes_only_what_it_wrote(tmp_path):
    with pytest.raises(RunError, match="diverged"):
        train_run(TrainConfig(**DIVERGES), tmp_path / "a" / "b" / "run")
    assert list(tmp_path.iterdir()) == []  # the folders it created are gone too
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="diverged"):
        train_run(TrainConfig(**DIVERGES), tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []
    old = train_run(TrainConfig(**TINY), tmp_path / "old")
    before = tree(old)
    with pytest.raises(RunError, match="diverged"):
        train_run(TrainConfig(**DIVERGES), old, overwrite=True)
    assert tree(old) == before  # the replaced run is put back as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old"]


def test_interrupted_at_any_write_leaves_no_temporary_file_and_resumes_exactly(tmp_path, monkeypatch):
    """Ctrl-C inside each of a run's atomic writes in turn (after the temporary file is
    written, before the rename): no temporary file is left; before the first epoch is saved
    nothing is left at all, after it the run resumes to exactly the uninterrupted result."""
    whole = train_run(TrainConfig(**TINY), tmp_path / "whole")
    final = store.read_state(whole / "final.safetensors")
    original = store.write_atomic
    writes = 12  # config, labels, θ⁰, metrics, resume; 3 per epoch; final
    for k in range(1, writes + 1):
        calls = {"n": 0}

        def interrupted_write(path, write, calls=calls, k=k):
            calls["n"] += 1
            if calls["n"] != k:
                return original(path, write)

            def write_then_interrupt(tmp):
                write(tmp)
                raise KeyboardInterrupt

            return original(path, write_then_interrupt)

        out = tmp_path / f"run-{k}"
        monkeypatch.setattr(store, "write_atomic", interrupted_write)
        with pytest.raises(KeyboardInterrupt):
            train_run(TrainConfig(**TINY), out)
        monkeypatch.setattr(store, "write_atomic", original)
        assert not temporary_files(tmp_path), k
        if k <= 5:
            assert not out.exists(), k
            continue
        assert (out / "resume.safetensors").is_file() and not (out / "final.safetensors").exists()
        train_run(TrainConfig(), out, resume=True)
        resumed = store.read_state(out / "final.safetensors")
        assert all(torch.equal(final[key], resumed[key]) for key in final), k
        pd.testing.assert_frame_equal(read_metrics(whole).drop(columns="seconds"),
                                      read_metrics(out).drop(columns="seconds"))
    assert calls["n"] == writes


@pytest.mark.parametrize("damage, error, message", [
    ("resume garbage", RunError, "resume.safetensors is corrupt"),
    ("no metrics", RunError, "has no metrics.parquet"),
    ("metrics garbage", RunError, "metrics.parquet is corrupt"),
    ("metrics short", RunError, "lacks the metrics of epochs"),
    ("config a list", RunError, "not a mapping"),
    ("config wider", StateError, "has shape"),
])
def test_a_damaged_unfinished_run_is_one_clear_error(damage, error, message, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with interrupted_in_epoch_2(), pytest.raises(KeyboardInterrupt):
        train_run(TrainConfig(**TINY), out)
    if damage == "resume garbage":
        (out / "resume.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    elif damage == "no metrics":
        (out / "metrics.parquet").unlink()
    elif damage == "metrics garbage":
        (out / "metrics.parquet").write_bytes(b"PAR1 nonsense")
    elif damage == "metrics short":
        store.write_metrics(out, read_metrics(out).query("epoch > 0"))
    elif damage == "config a list":
        (out / "config.yaml").write_text("- fcn\n- digits\n")
    else:
        config = store.read_config(out)
        config["arch_options"]["width"] = 9
        store.write_config(out, config)
    before = tree(out)
    with pytest.raises(error, match=message) as info:
        train_run(TrainConfig(), out, resume=True)
    assert "\n" not in str(info.value)
    assert tree(out) == before


def test_ctrl_c_during_train_exits_130_and_the_run_resumes(tmp_path):
    """A real SIGINT to `python -m genprobe train`, once the first checkpoint after θ⁰ exists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text("arch: fcn\ndataset: digits\nn_train: 60\nn_test: 30\ndevice: cpu\n"
                      "arch_options: {width: 8, depth: 1}\n")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    child = subprocess.Popen(
        [sys.executable, "-m", "genprobe", "train", str(config), "--epochs", "200", "--out", "run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell may ignore it
    run = tmp_path / "run"
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "epoch-0001.safetensors").exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert child.returncode == 130, err
    assert len(lines) == 1 and "resume with: genprobe train --resume run" in lines[0], err
    assert not (run / "final.safetensors").exists() and not temporary_files(tmp_path)
    from genprobe.cli import main

    try:
        main(["train", "--resume", str(run)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert list(read_metrics(run).epoch) == list(range(201))
    assert (run / "final.safetensors").is_file() and not (run / "resume.safetensors").exists()


# ----------------------------------------------------------------------------- training to a target

# A tiny network on the Gaussian mixture: its train loss falls below 0.1 within about 10 epochs.
FITS = dict(arch="fcn", dataset="gaussian", n_train=200, n_test=100, batch_size=32, lr=0.1,
            arch_options={"width": 16, "depth": 1}, device="cpu", epochs=30)


def stopped_at(config, metrics, column, target):
    """The stopping rule, checked from outside: the last epoch meets `target`, the one before does not."""
    last, before = metrics.iloc[-1], metrics.iloc[-2]
    return int(last.epoch) < config.epochs and last[column] <= target < before[column]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    config = TrainConfig(**FITS, stop_loss=0.1, checkpoints="2,4,6,25")
    return config, train_run(config, tmp_path_factory.mktemp("stopped") / "run")


def test_training_stops_at_the_first_epoch_that_reaches_stop_loss(stopped):
    from genprobe.zoo.train import training_outcome

    config, run = stopped
    metrics = read_metrics(run)
    assert stopped_at(config, metrics, "train_loss", 0.1), metrics
    last = int(metrics.epoch.iloc[-1])
    assert list(metrics.epoch) == list(range(last + 1))
    assert sorted(store.list_checkpoints(run)) == sorted({0, 2, 4, 6, last})  # never 25 or 30
    final = store.read_state(run / "final.safetensors")
    checkpoint = store.read_state(store.checkpoint_path(run, last))
    assert all(torch.equal(final[k], checkpoint[k]) for k in final)
    assert not (run / "resume.safetensors").exists()
    assert store.read_config(run)["stop_loss"] == 0.1 and store.read_config(run)["stop_error"] is None
    assert training_outcome(config, metrics) == {"epochs_run": last, "converged": True,
                                                 "criterion": "train loss ≤ 0.1"}
    with pytest.raises(RunError, match="already finished"):
        train_run(TrainConfig(), run, resume=True)
    # the learning-rate schedule still spans `epochs`, not the epochs actually trained
    assert list(metrics.lr.iloc[1:]) == [config.learning_rate(e) for e in range(1, last + 1)]


def test_a_stopped_run_loads_and_probes_its_checkpoints(stopped):
    _, run = stopped
    last = int(read_metrics(run).epoch.iloc[-1])
    s = gp.Subject.load(run)
    assert sorted(s.checkpoints) == sorted({0, 2, 4, 6, last})
    assert torch.equal(s.checkpoints[last]["layers.1.weight"], s.final["layers.1.weight"])
    r = gp.robustness(s, checkpoints="all", rerandomize=False, device="cpu")
    assert sorted(r.table.loc[r.table.kind == "reinit", "epoch"].dropna().unique()) == sorted({0, 2, 4, 6, last})


def test_a_target_not_reached_trains_every_epoch(tmp_path):
    from genprobe.zoo.train import training_outcome

    config = TrainConfig(**{**FITS, "epochs": 3}, stop_loss=1e-3)
    metrics = read_metrics(train_run(config, tmp_path / "run"))
    assert list(metrics.epoch) == [0, 1, 2, 3] and metrics.train_loss.iloc[-1] > 1e-3
    assert training_outcome(config, metrics) == {"epochs_run": 3, "converged": False,
                                                 "criterion": "train loss ≤ 0.001"}
    assert training_outcome(TrainConfig(**FITS), metrics) == {"epochs_run": 3, "converged": None,
                                                              "criterion": ""}


def test_both_targets_stop_once_both_are_met(tmp_path):
    from genprobe.zoo.train import training_outcome

    loss_only = read_metrics(train_run(TrainConfig(**FITS, stop_loss=0.3), tmp_path / "loss"))
    error_only = read_metrics(train_run(TrainConfig(**FITS, stop_error=0.02), tmp_path / "error"))
    both = TrainConfig(**FITS, stop_loss=0.3, stop_error=0.02)
    metrics = read_metrics(train_run(both, tmp_path / "both"))
    assert stopped_at(TrainConfig(**FITS), error_only, "train_error", 0.02)
    last, before = metrics.iloc[-1], metrics.iloc[-2]
    assert last.train_loss <= 0.3 and last.train_error <= 0.02
    assert before.train_loss > 0.3 or before.train_error > 0.02
    assert last.epoch == max(loss_only.epoch.iloc[-1], error_only.epoch.iloc[-1])
    assert loss_only.epoch.iloc[-1] != error_only.epoch.iloc[-1]  # so that "both" is tested
    assert training_outcome(both, metrics) == {"epochs_run": int(last.epoch), "converged": True,
                                               "criterion": "train loss ≤ 0.3 and train error ≤ 0.02"}


@pytest.mark.parametrize("change, message", [
    ({"stop_loss": 0.0}, "stop_loss must be a positive finite number"),
    ({"stop_loss": -1.0}, "stop_loss must be a positive finite number"),
    ({"stop_loss": float("nan")}, "stop_loss must be a positive finite number"),
    ({"stop_loss": float("inf")}, "stop_loss must be a positive finite number"),
    ({"stop_loss": "0.01"}, "stop_loss must be a positive finite number"),
    ({"stop_loss": True}, "stop_loss must be a positive finite number"),
    ({"stop_error": 0.0}, r"stop_error must be a number in \(0, 1\)"),
    ({"stop_error": 1.0}, r"stop_error must be a number in \(0, 1\)"),
    ({"stop_error": 1.5}, r"stop_error must be a number in \(0, 1\)"),
    ({"stop_error": float("nan")}, r"stop_error must be a number in \(0, 1\)"),
])
def test_bad_stop_targets_are_one_clear_error(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        train_run(TrainConfig(**{**TINY, **change}), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**TINY, **change})


def test_an_interrupted_target_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    config = dict(FITS, stop_loss=0.1, arch_options={"width": 16, "depth": 1, "dropout": 0.1})
    whole = train_run(TrainConfig(**config), tmp_path / "whole")
    final = store.read_state(whole / "final.safetensors")

    def same_as_whole(run):
        resumed = store.read_state(run / "final.safetensors")
        assert all(torch.equal(final[k], resumed[k]) for k in final)
        pd.testing.assert_frame_equal(read_metrics(whole).drop(columns="seconds"),
                                      read_metrics(run).drop(columns="seconds"))
        assert sorted(store.list_checkpoints(run)) == sorted(store.list_checkpoints(whole))

    early = tmp_path / "early"  # interrupted in epoch 2, long before the target
    with interrupted_in_epoch_2(), pytest.raises(KeyboardInterrupt):
        train_run(TrainConfig(**config), early)
    assert int(read_metrics(early).epoch.iloc[-1]) == 1
    train_run(TrainConfig(), early, resume=True)
    same_as_whole(early)

    late = tmp_path / "late"  # interrupted after the stopping epoch was saved, before final
    original = store.write_state

    def no_final(path, state):
        if path.name == "final.safetensors":
            raise KeyboardInterrupt
        original(path, state)

    monkeypatch.setattr(store, "write_state", no_final)
    with pytest.raises(KeyboardInterrupt):
        train_run(TrainConfig(**config), late)
    monkeypatch.setattr(store, "write_state", original)
    assert (late / "resume.safetensors").is_file() and not (late / "final.safetensors").exists()
    train_run(TrainConfig(), late, resume=True)  # trains no further
    same_as_whole(late)


def test_train_command_stop_flags_round_trip_through_config_yaml(tmp_path, capsys):
    from invoke import call

    base = ["--arch", "fcn", "--dataset", "gaussian", "--n-train", "200", "--n-test", "100",
            "--batch-size", "32", "--lr", "0.1", "--opt", "width=16", "--opt", "depth=1",
            "--device", "cpu", "--epochs", "30"]
    code, out, err = call(["train", *base, "--stop-loss", "0.1", "--out", tmp_path / "flags"], capsys)
    assert code == 0, err
    assert "reached train loss ≤ 0.1" in out
    saved = store.read_config(tmp_path / "flags")
    assert saved["stop_loss"] == 0.1 and saved["stop_error"] is None
    assert TrainConfig.from_dict(saved).stop_loss == 0.1
    assert read_metrics(tmp_path / "flags").epoch.iloc[-1] < 30

    config = tmp_path / "target.yaml"
    config.write_text("arch: fcn\ndataset: gaussian\nn_train: 200\nn_test: 100\nbatch_size: 32\n"
                      "arch_options: {width: 16, depth: 1}\ndevice: cpu\nepochs: 2\nstop_error: 0.001\n")
    code, out, err = call(["train", config, "--out", tmp_path / "yaml"], capsys)
    assert code == 0, err
    assert "did not reach train error ≤ 0.001" in out
    assert store.read_config(tmp_path / "yaml")["stop_error"] == 0.001

    code, _, err = call(["train", *base, "--stop-error", "2", "--out", tmp_path / "bad"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "stop_error must be a number in (0, 1)" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_the_training_reading_says_whether_the_target_was_reached(stopped):
    from genprobe.report.runs import training_reading

    _, run = stopped
    config, metrics = store.read_config(run), read_metrics(run)
    last = metrics.iloc[-1]
    text = training_reading(config, metrics)
    assert f"stopped at epoch {int(last.epoch)} of at most 30: train loss {last.train_loss:.3g} ≤ 0.1." in text
    text = training_reading(config | {"stop_loss": 1e-3}, metrics)
    assert (f"did not reach train loss ≤ 0.001 in {int(last.epoch)} of at most 30 epochs "
            f"(last {last.train_loss:.3g})") in text
    assert "stop" not in training_reading(config | {"stop_loss": None}, metrics)
