"""Value types shared by every layer: labelled data.

Nothing here imports another genprobe module but :mod:`genprobe.errors`,
:mod:`genprobe.inputs` and :mod:`genprobe.memory`, so that every layer
(data, engines, probes, runs) can use these types without import cycles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError, one_line
from .inputs import Inputs, Streamed, check, count, leaves, normalize, read_item, stack, take
from .memory import available_memory

log = logging.getLogger(__name__)


class Data(NamedTuple):
    """Inputs ``x`` and integer labels ``y`` (N,). ``x`` is a tensor (N, ...) — floating point, or
    integer (token ids) — or a tuple or dict of such tensors (see :mod:`genprobe.inputs`), or
    inputs streamed from a Dataset (:class:`~genprobe.inputs.Streamed`); a subset is in memory."""

    x: Inputs | Streamed
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor | Sequence[int]) -> Data:
        index = torch.as_tensor(index, dtype=torch.long)
        return Data(take(self.x, index), self.y[index])


STREAM_FRACTION = 0.25
"""A Dataset is streamed (read a batch at a time, never whole) when its inputs would take more
than this fraction of the memory available (item 0's size × the number of items)."""


def as_data(data: Data | tuple | Dataset | None, what: str, stream: bool | None = None) -> Data | None:
    """Convert `(X, y)` or a map-style Dataset of `(input, label)` to Data, once. `X` and each
    item's input may be a tensor, a tuple of tensors or a mapping of names to tensors.

    A Dataset is read into memory, or left where it is (:class:`~genprobe.inputs.Streamed`) when
    `stream` is True, or None and its inputs would not fit (:data:`STREAM_FRACTION`). Streamed
    labels come from the Dataset's ``targets`` (as torchvision's datasets hold them: one label
    per item, in order), else from reading every item once."""
    if data is None:
        return None
    if stream is not None and not isinstance(stream, bool):
        raise DataError(f"stream must be True, False or None (decide by size), got {stream!r}")
    if isinstance(data, Data):  # a NamedTuple whose len() is the number of examples
        x, y = data.x, data.y
    elif isinstance(data, tuple) and len(data) == 2 and not isinstance(data, Dataset) and \
            (isinstance(data[0], (Tensor, Mapping, tuple)) or hasattr(data[0], "__array__")):
        x, y = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        x, y = _read_dataset(data, what, stream)
    else:
        raise DataError(f"{what} must be (X, y) tensors or a map-style Dataset of (input, label), "
                        f"got {type(data).__name__}")
    try:
        x = x if isinstance(x, Streamed) else normalize(x)
        y = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what}: inputs and labels must be tensors or arrays of numbers "
                        f"({one_line(exc, 120)})") from None
    if y.dim() == 0:
        raise DataError(f"{what}: inputs and labels need a leading example dimension")
    if not isinstance(x, Streamed):
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


def _read_dataset(data, what: str, stream: bool | None) -> tuple[Inputs | Streamed, Tensor]:
    n = len(data)
    if n == 0:
        raise DataError(f"{what} is empty")
    first, _ = read_item(data, 0, what)
    try:
        first = normalize(first)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what}: items must be (input, integer label) pairs, the input a tensor, "
                        f"a tuple or a mapping of tensors ({one_line(exc, 120)})") from None
    size = n * sum(v.numel() * v.element_size() for v in leaves(first))
    if stream is None:
        stream = size > STREAM_FRACTION * (available_memory(torch.device("cpu")) or float("inf"))
        if stream:
            log.info("%s: %d items of %.3g MiB in all are streamed from the Dataset, a batch at a "
                     "time (pass stream=False to read them into memory)", what, n, size / 2**20)
    try:
        if stream:
            return Streamed(data, torch.arange(n), what, first), _labels(data, n, what)
        items = [read_item(data, i, what) for i in range(n)]
        x = stack([i[0] for i in items], what)
        y = torch.as_tensor([int(i[1]) for i in items])
    except DataError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise DataError(f"{what}: items must be (input, integer label) pairs, the input a tensor, "
                        f"a tuple or a mapping of tensors ({one_line(exc, 120)})") from None
    return x, y


def _labels(data, n: int, what: str) -> Tensor:
    """The labels of a streamed Dataset: its ``targets`` when it has one label per item, else
    every item read once (logged: for an image folder that reads every image)."""
    targets = getattr(data, "targets", None)
    if targets is not None:
        y = torch.as_tensor(targets)
        if y.dim() != 1 or len(y) != n:
            raise DataError(f"{what}: the Dataset's targets hold {tuple(y.shape)} labels for {n} "
                            "items; give one label per item, in order, or no targets attribute")
        return y
    log.info("%s: reading the labels of %d items (every item once; a `targets` attribute on the "
             "Dataset, one label per item, skips this)", what, n)
    return torch.as_tensor([int(read_item(data, i, what)[1]) for i in range(n)])
