"""Value types shared by every layer: labelled data.

Nothing here imports another genprobe module but :mod:`genprobe.errors`, so that every layer
(data, engines, probes, runs) can use these types without import cycles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError, one_line


class Data(NamedTuple):
    """Inputs ``x`` (N, ...) — floating point, or integer (token ids) — and integer labels ``y`` (N,)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor | Sequence[int]) -> Data:
        index = torch.as_tensor(index, dtype=torch.long)
        return Data(self.x[index], self.y[index])


def as_data(data: Data | tuple | Dataset | None, what: str) -> Data | None:
    """Convert `(X, y)` tensors or a map-style Dataset of `(input, label)` to Data, once."""
    if data is None:
        return None
    if isinstance(data, Data):  # a NamedTuple whose len() is the number of examples
        x, y = data.x, data.y
    elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        items = []
        for i in range(len(data)):
            try:
                item = data[i]
            except Exception as exc:  # noqa: BLE001 - the user's Dataset: say where it failed
                raise DataError(f"{what}: reading item {i} of the dataset raised "
                                f"{type(exc).__name__}: {one_line(exc, 120)}") from None
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                got = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
                raise DataError(f"{what}: item {i} of the dataset is {got}, not an (input, label) "
                                "pair; return (input, label) from __getitem__")
            items.append(item)
        if not items:
            raise DataError(f"{what} is empty")
        try:
            inputs = [torch.as_tensor(i[0]) for i in items]
            bad = next((i for i, v in enumerate(inputs) if v.shape != inputs[0].shape), None)
            if bad is not None:
                raise DataError(f"{what}: item {bad}'s input has shape {tuple(inputs[bad].shape)}, "
                                f"item 0's {tuple(inputs[0].shape)}; every input must have the "
                                "same shape (pad sequences to one length)")
            x = torch.stack(inputs)
            y = torch.as_tensor([int(i[1]) for i in items])
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise DataError(f"{what}: items must be (input tensor, integer label) pairs "
                            f"({one_line(exc, 120)})") from None
    else:
        raise DataError(f"{what} must be (X, y) tensors or a map-style Dataset of (input, label), "
                        f"got {type(data).__name__}")
    try:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what}: inputs and labels must be tensors or arrays of numbers "
                        f"({one_line(exc, 120)})") from None
    if x.dim() == 0 or y.dim() == 0:
        raise DataError(f"{what}: inputs and labels need a leading example dimension")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise DataError(f"{what}: labels must be a 1-D integer tensor of class indices, "
                        f"got dtype {y.dtype} shape {tuple(y.shape)}")
    if len(y) == 0:
        raise DataError(f"{what} is empty: pass at least one example, or None for no {what} data")
    if x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"{what}: inputs must be real numbers or integer token ids, got dtype {x.dtype}")
    if x.is_floating_point():
        bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero().flatten()
        if len(bad):
            raise DataError(f"{what}: {len(bad)} input(s) hold NaN or infinite values (first at "
                            f"position {int(bad[0])}); clean or drop them")
    if int(y.min()) < 0:
        raise DataError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")
    return Data(x, y.long())
