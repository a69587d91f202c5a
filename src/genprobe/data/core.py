"""Dataset registry, :func:`load_dataset`, normalization, seeded subsets, label corruption.

A dataset is a function registered with :func:`register_dataset` (timm-style). It returns a
:class:`RawSplits` of numpy arrays; :func:`load_dataset` then, in this order, takes the seeded
``n_train`` / ``n_test`` subsets, standardizes inputs with the training split's scalar mean and
std, corrupts a fraction of the training labels, and converts to tensors.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..options import check_int
from ..registry import Registry
from ..values import Data

log = logging.getLogger(__name__)

SUBSET_STREAM = 1
"""Seed stream of the ``n_train`` / ``n_test`` subsets: ``default_rng([SUBSET_STREAM, seed])``,
independent of the label-corruption draws, which use ``default_rng(seed)``."""


@dataclass
class RawSplits:
    """What a registered dataset function returns, before subsetting and normalization.

    ``x_*`` are arrays of shape ``(N, *input_shape)`` (any real dtype), ``y_*`` integer ``(N,)``.
    ``source`` names the file or package read, ``split`` says where the train/test split comes
    from; ``extra`` is merged into the loaded dataset's ``meta``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    split: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset.

    Attributes:
        train, test: :class:`~genprobe.subject.Data`; ``x`` float32 ``(N, *input_shape)``
            standardized with the training split's mean and std, ``y`` int64 ``(N,)``. Only
            ``train.y`` carries label corruption.
        input_shape: shape of one input, ``(C, H, W)`` for images, ``(D,)`` for vectors.
        num_classes: number of classes K; labels are in ``0..K-1``.
        meta: JSON-serializable provenance: ``name``, ``source``, ``split``,
            ``normalization`` ``{"mean", "std"}`` (of the raw inputs, subtracted and divided),
            ``seed``, ``label_noise``, ``corrupted_indices`` (training indices whose labels were
            redrawn), ``n_relabeled`` (how many of those actually changed), ``n_train``,
            ``n_test``, ``options`` (every dataset option, defaults included), ``input_shape``,
            ``num_classes``, ``data_dir``.
    """

    train: Data
    test: Data
    input_shape: tuple[int, ...]
    num_classes: int
    meta: dict[str, Any]


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: the loading function, its one-line description, whether it generates
    ``n_train`` / ``n_test`` samples itself (instead of subsetting a fixed set), and whether it
    reads the user's files (``data_dir``) rather than data that ships with genprobe."""

    name: str
    fn: Callable[..., RawSplits]
    description: str
    generates_sizes: bool = False
    reads_files: bool = False

    def options(self) -> dict[str, Any]:
        """The dataset's own options and their defaults."""
        skip = {"seed", "data_dir", "n_train", "n_test"}
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in skip}


DATASETS: Registry[DatasetInfo] = Registry("dataset", error=DataError)
"""The datasets, in registration order: name -> :class:`DatasetInfo`."""


def register_dataset(name: str, *, generates_sizes: bool = False,
                     reads_files: bool = False) -> Callable:
    """Decorator registering ``fn(*, seed, data_dir, **options) -> RawSplits`` as `name`.

    The first line of the function's docstring is its description (``genprobe datasets``).
    Every dataset that does not read the user's files (`reads_files`) is loaded offline by the
    shared dataset tester (``tests/test_data.py``).
    """

    def decorator(fn: Callable[..., RawSplits]) -> Callable[..., RawSplits]:
        doc = (fn.__doc__ or "").strip().splitlines()
        DATASETS.register(name, DatasetInfo(name, fn, doc[0] if doc else "", generates_sizes,
                                            reads_files))
        return fn

    return decorator


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names in registration order, filtered by an fnmatch `pattern` such
    as ``"mnist*"``."""
    return DATASETS.names(pattern)


def _info(name: str) -> DatasetInfo:
    return DATASETS.entry(name)


def describe(name: str) -> str:
    """One-line description of dataset `name`."""
    return _info(name).description


# -- label corruption -------------------------------------------------------------------------


def corrupt_labels(y: torch.Tensor | np.ndarray, p: float, seed: int,
                   num_classes: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Replace the labels of a fraction `p` of examples by uniformly random labels.

    Exactly ``round(p * N)`` indices are chosen without replacement, and each gets a label
    drawn uniformly from all ``num_classes`` classes, its true class included (as in
    Zhang et al. 2017, "Understanding deep learning requires rethinking generalization"), so
    about ``1/K`` of the chosen labels stay correct by chance. Deterministic under `seed`
    (``numpy.random.default_rng(seed)``); the input is not modified.

    Args:
        y: (N,) integer labels.
        p: fraction in [0, 1].
        num_classes: K; default ``max(y) + 1``.

    Returns:
        ``(new_y, corrupted_indices)``: int64 (N,) tensor and the sorted chosen indices.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"label_noise must be a fraction in [0, 1], got {p!r}")
    labels = np.asarray(torch.as_tensor(y).cpu(), dtype=np.int64).copy()
    k = int(num_classes if num_classes is not None else labels.max(initial=-1) + 1)
    n = round(p * len(labels))
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(labels), size=n, replace=False))
    labels[index] = rng.integers(0, k, size=n)
    return torch.from_numpy(labels), index.tolist()


# -- loading ----------------------------------------------------------------------------------


def _check_options(info: DatasetInfo, options: dict[str, Any]) -> dict[str, Any]:
    allowed = info.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        choices = ", ".join(allowed) or "none"
        raise ConfigError(f"dataset {info.name!r} has no option {unknown[0]!r}; its options: {choices}")
    return allowed | options


def _check_size(name: str, value: int | None, available: int | None) -> None:
    if value is None:
        return
    check_int(name, value, 1)
    if available is not None and value > available:
        raise ConfigError(f"{name}={value} but the split holds only {available} examples")


def _subset(x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator):
    if n is None or n == len(y):
        return x, y
    index = np.sort(rng.choice(len(y), size=n, replace=False))
    return x[index], y[index]


def _mean_std(x: np.ndarray, chunk: int = 1 << 22) -> tuple[float, float]:
    """Scalar mean and (population) std of all entries of `x`, accumulated in float64 in
    chunks (two passes), so a 47M-entry dataset needs no 376 MB float64 temporary."""
    flat = np.asarray(x).reshape(-1)
    if flat.size == 0:
        return 0.0, 1.0
    mean = sum(float(flat[i:i + chunk].sum(dtype=np.float64)) for i in range(0, flat.size, chunk))
    mean /= flat.size
    sq = 0.0
    for i in range(0, flat.size, chunk):
        centered = flat[i:i + chunk].astype(np.float64) - mean
        sq += float(np.dot(centered, centered))
    return mean, (sq / flat.size) ** 0.5


def _to_float32(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """(x - mean) / std as a new contiguous float32 tensor (never a view of a cached array)."""
    out = np.asarray(x, dtype=np.float32) - np.float32(mean)
    out /= np.float32(std)
    return torch.from_numpy(np.ascontiguousarray(out))


def _check_raw(name: str, raw: RawSplits) -> None:
    for split in ("train", "test"):
        x, y = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}")
        if len(x) != len(y) or y.ndim != 1:
            raise DataError(f"dataset {name!r}: {split} split has {len(x)} inputs but labels "
                            f"of shape {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= raw.num_classes):
            raise DataError(f"dataset {name!r}: {split} labels must be in 0..{raw.num_classes - 1}, "
                            f"found {int(y.min())}..{int(y.max())}")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise DataError(f"dataset {name!r}: train inputs have shape {raw.x_train.shape[1:]} but "
                        f"test inputs {raw.x_test.shape[1:]}")


def load_dataset(name: str, *, seed: int = 0, data_dir: str | Path | None = None,
                 label_noise: float = 0.0, n_train: int | None = None, n_test: int | None = None,
                 **options: Any) -> DatasetSplits:
    """Load a built-in dataset, offline.

    Args:
        name: a name from :func:`list_datasets` (``genprobe datasets`` describes each).
        seed: drives the ``n_train`` / ``n_test`` subsets, the label corruption, and the
            generated datasets that say so; the fixed train/test split of a dataset never
            depends on it.
        data_dir: folder of local files, for the datasets that read one (``idx``, ``cifar10``).
        label_noise: fraction p of training labels redrawn uniformly (see :func:`corrupt_labels`).
        n_train, n_test: take a seeded random subset of this many examples (for generated
            datasets: generate this many). Default: the whole split.
        **options: the dataset's own options (see ``DATASETS[name].options()``).

    Raises:
        DataError: unknown name, source not installed (the message gives the install
            command), unreadable files.
        ConfigError: a bad option value.
    """
    info = _info(name)
    check_int("seed", seed, 0)
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) \
            or not 0.0 <= label_noise <= 1.0:
        raise ConfigError(f"label_noise must be a fraction in [0, 1], got {label_noise!r}")
    options = _check_options(info, options)
    data_dir = None if data_dir is None else Path(data_dir)
    _check_size("n_train", n_train, None)
    _check_size("n_test", n_test, None)

    sizes = {"n_train": n_train, "n_test": n_test} if info.generates_sizes else {}
    raw = info.fn(seed=seed, data_dir=data_dir, **sizes, **options)
    _check_raw(name, raw)
    rng = np.random.default_rng([SUBSET_STREAM, seed])
    if not info.generates_sizes:
        _check_size("n_train", n_train, len(raw.y_train))
        _check_size("n_test", n_test, len(raw.y_test))
    x_train, y_train = _subset(raw.x_train, raw.y_train, n_train, rng)
    x_test, y_test = _subset(raw.x_test, raw.y_test, n_test, rng)

    mean, std = _mean_std(x_train)
    std = std if std > 0 else 1.0
    y_clean = torch.tensor(y_train, dtype=torch.int64)
    y_noisy, corrupted = corrupt_labels(y_clean, label_noise, seed, raw.num_classes)
    train = Data(_to_float32(x_train, mean, std), y_noisy)
    test = Data(_to_float32(x_test, mean, std), torch.tensor(y_test, dtype=torch.int64))
    input_shape = tuple(int(d) for d in train.x.shape[1:])
    meta = {
        "name": name, "description": info.description, "source": raw.source, "split": raw.split,
        "normalization": {"mean": mean, "std": std},
        "seed": seed, "label_noise": float(label_noise), "corrupted_indices": corrupted,
        "n_relabeled": int((y_noisy != y_clean).sum()),
        "n_train": len(train), "n_test": len(test), "options": options,
        "input_shape": list(input_shape), "num_classes": raw.num_classes,
        "data_dir": None if data_dir is None else str(data_dir),
    } | raw.extra
    log.info("loaded %s: %d train / %d test, input %s, %d classes", name, len(train), len(test),
             input_shape, raw.num_classes)
    return DatasetSplits(train, test, input_shape, raw.num_classes, meta)
