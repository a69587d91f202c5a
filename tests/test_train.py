"""Training runs: the run directory, Subject.load round trip, resume, checkpoints, safe loading."""

import pickle

import pandas as pd
import pytest
import torch

import genprobe as gp
from genprobe import ConfigError, RunError, StateError, store
from genprobe.zoo import list_models
from genprobe.zoo.train import TrainConfig, read_metrics, train_run

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
    import genprobe.zoo.train as T

    calls = {"n": 0}
    original = T._epoch_metrics

    def crash_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 0 metrics, epoch 1 metrics, then crash in epoch 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    T._epoch_metrics = crash_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            train_run(TrainConfig(**cfg), interrupted)
    finally:
        T._epoch_metrics = original
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
    ({"epochs": 0}, "epochs must be a positive integer"),
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
    with pytest.raises(RunError, match="already exists"):
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
