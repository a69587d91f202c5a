"""Built-in datasets, offline: ``load_dataset(name, seed=..., label_noise=...)``.

``list_datasets()`` names them, ``describe(name)`` says what each is; see
:func:`load_dataset` for normalization, subsets and label corruption.
"""

from __future__ import annotations

from . import builtin as _builtin  # noqa: F401  (registers the datasets)
from .core import (
    DATASETS,
    DatasetInfo,
    DatasetSplits,
    RawSplits,
    corrupt_labels,
    describe,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .readers import NumpyUnpickler, load_pickle, read_cifar10, read_idx, read_idx_folder

__all__ = [
    "DATASETS", "DatasetInfo", "DatasetSplits", "NumpyUnpickler", "RawSplits", "corrupt_labels",
    "describe", "list_datasets", "load_dataset", "load_pickle", "read_cifar10", "read_idx",
    "read_idx_folder", "register_dataset",
]
