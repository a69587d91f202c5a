"""Value types shared by every layer: labelled data.

Nothing here imports another genprobe module but :mod:`genprobe.errors` and
:mod:`genprobe.inputs`, so that every layer
(data, engines, probes, runs) can use these types without import cycles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError, one_line
from .inputs import Inputs, check, count, normalize, stack, take


class Data(NamedTuple):
    """Inputs ``x`` and integer labels ``y`` (N,). ``x`` is a tensor (N, ...) — floating point, or
    integer (token ids) — or a tuple or dict of such tensors (see :mod:`genprobe.inputs`)."""

    x: Inputs
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor | Sequence[int]) -> Data:
        index = torch.as_tensor(index, dtype=torch.long)
        return Data(take(self.x, index), self.y[index])


def as_data(data: Data | tuple | Dataset | None, what: str) -> Data | None:
    """Convert `(X, y)` or a map-style Dataset of `(input, label)` to Data, once. `X` and each
    item's input may be a tensor, a tuple of tensors or a mapping of names to tensors."""
    if data is None:
        return None
    if isinstance(data, Data):  # a NamedTuple whose len() is the number of examples
        x, y = data.x, data.y
    elif isinstance(data, tuple) and len(data) == 2 and not isinstance(data, Dataset) and \
            (isinstance(data[0], (Tensor, Mapping, tuple)) or hasattr(data[0], "__array__")):
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
            x = stack([i[0] for i in items], what)
            y = torch.as_tensor([int(i[1]) for i in items])
        except DataError:
            raise
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise DataError(f"{what}: items must be (input, integer label) pairs, the input a "
                            f"tensor, a tuple or a mapping of tensors ({one_line(exc, 120)})") from None
    else:
        raise DataError(f"{what} must be (X, y) tensors or a map-style Dataset of (input, label), "
                        f"got {type(data).__name__}")
    try:
        x, y = normalize(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what}: inputs and labels must be tensors or arrays of numbers "
                        f"({one_line(exc, 120)})") from None
    if y.dim() == 0:
        raise DataError(f"{what}: inputs and labels need a leading example dimension")
    check(x, what)
    if count(x) != len(y):
        raise DataError(f"{what}: {count(x)} inputs but {len(y)} labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise DataError(f"{what}: labels must be a 1-D integer tensor of class indices, "
                        f"got dtype {y.dtype} shape {tuple(y.shape)}")
    if len(y) == 0:
        raise DataError(f"{what} is empty: pass at least one example, or None for no {what} data")
    if int(y.min()) < 0:
        raise DataError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")
    return Data(x, y.long())
