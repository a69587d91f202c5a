"""A model's input: one tensor, a tuple of tensors, or a mapping of names to tensors.

An example's input is what a Dataset item's first element holds; a batch of inputs has the same
structure with the example dimension first on every tensor ("leaf"):

- a tensor ``x`` (N, ...): the model is called as ``model(x)``;
- a tuple ``(a, b, ...)``: positional arguments, ``model(a, b, ...)`` (e.g. ``(x, mask)``);
- a mapping ``{"input_ids": ..., "attention_mask": ...}``: keyword arguments,
  ``model(**inputs)`` (a tokenizer's ``BatchEncoding`` is a mapping and is read as one).

Floating leaves are cast to the model's dtype when moved; integer leaves (token ids, attention
masks) are never cast. :class:`Streamed` inputs stay in their Dataset and are read a batch at a
time (:func:`take`), for data larger than memory. The functions here are the one place that
knows the structure: the engines batch, slice, stack and move inputs through them, so a tensor
input takes the same path it always did (each function's first branch) at no cost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DataError, one_line

Inputs = Tensor | tuple | dict
"""A batch of inputs: a tensor, a tuple of tensors, or a dict of names to tensors (N first)."""


def normalize(x: Any) -> Inputs:
    """`x` as Inputs: a mapping becomes a plain dict (a ``BatchEncoding`` included), a list or
    tuple a tuple, anything else a tensor (``torch.as_tensor``). Raises TypeError or ValueError
    on values that are not numbers."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        return {str(k): _leaf(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and x and not _numbers(x):
        return tuple(_leaf(v) for v in x)
    return torch.as_tensor(x)


def _numbers(x: Sequence) -> bool:
    """Whether a list or tuple is itself numeric data (nested numbers), not a tuple of arrays."""
    first = x[0]
    return isinstance(first, (int, float, bool)) or (isinstance(first, (tuple, list))
                                                     and bool(first) and _numbers(first))


def _leaf(v: Any) -> Tensor:
    if isinstance(v, (Mapping, tuple, list)) and not (isinstance(v, (tuple, list)) and v and _numbers(v)):
        raise TypeError("an input's parts must be tensors, not nested containers")
    return v if isinstance(v, Tensor) else torch.as_tensor(v)


def read_item(dataset: Any, i: int, what: str) -> tuple[Any, Any]:
    """Item `i` of a map-style `dataset` as its ``(input, label)`` pair; DataError naming the
    index when ``__getitem__`` raises or returns something else than a pair."""
    try:
        item = dataset[i]
    except Exception as exc:  # noqa: BLE001 - the user's Dataset: say where it failed
        raise DataError(f"{what}: reading item {i} of the dataset raised "
                        f"{type(exc).__name__}: {one_line(exc, 120)}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
        raise DataError(f"{what}: item {i} of the dataset is {got}, not an (input, label) pair; "
                        "return (input, label) from __getitem__")
    return item[0], item[1]


class _Items(torch.utils.data.Dataset):
    """Items `positions` of a Dataset as a worker process reads them: ``(position, input)``, or
    ``(position, DataError)`` where reading failed (raised in the main process, one line)."""

    def __init__(self, dataset: Any, positions: list[int], what: str):
        self.dataset, self.positions, self.what = dataset, positions, what

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int) -> tuple[int, Any]:
        i = self.positions[j]
        try:
            return i, read_item(self.dataset, i, self.what)[0]
        except DataError as exc:
            return i, exc


class _Stacked:
    """A worker's collate: a chunk of ``(position, input)`` as one batch — one tensor per leaf
    crosses to the main process, not one per item — or the chunk's first DataError."""

    def __init__(self, what: str, reference: Inputs):
        self.what, self.reference = what, reference

    def __call__(self, chunk: list[tuple[int, Any]]) -> Inputs | DataError:
        for _, item in chunk:
            if isinstance(item, DataError):
                return item
        try:
            return stack([item for _, item in chunk], self.what, [i for i, _ in chunk],
                         reference=self.reference)
        except DataError as exc:
            return exc


READ_AHEAD_CHUNK = 16
"""Items a worker reads per task when Dataset items are read ahead (``Streamed.workers``)."""


@dataclass(frozen=True, eq=False)
class Streamed:
    """Inputs left in a map-style Dataset: items ``positions`` of ``dataset``, read a batch at
    a time by :func:`take` (and checked as they are read, floating parts cast to ``dtype``).
    ``first``: item ``positions[0]``'s input, read once, for shapes and messages. ``workers``:
    processes (a torch DataLoader's) that read items ahead while a pass goes through the
    selection in order; 0 reads them in the calling process."""

    dataset: Any
    positions: Tensor  # (N,) int64 indices into dataset
    what: str
    first: Inputs
    dtype: torch.dtype | None = None
    workers: int = 0
    _ahead: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict:  # a pass's reader (its worker processes) stays here
        return {**self.__dict__, "_ahead": {}}

    def read(self, index: Tensor | slice | Sequence[int]) -> Inputs:
        """Examples `index` (of this selection), read from the Dataset and stacked."""
        where = self.positions[index]
        if not len(where):
            return take(stack([self.first], self.what), slice(0, 0))
        if self.workers and isinstance(index, slice) and index.step in (None, 1):
            x = self._read_ahead(*index.indices(len(self))[:2])
        else:
            items = [read_item(self.dataset, int(i), self.what)[0] for i in where.reshape(-1).tolist()]
            x = stack(items, self.what, [int(i) for i in where.reshape(-1)], reference=self.first)
        check(x, self.what, where.reshape(-1))
        return x if self.dtype is None else move(x, "cpu", self.dtype)

    def _read_ahead(self, start: int, stop: int) -> Inputs:
        """Items `start`..`stop` of the selection, stacked, from the pass's DataLoader: the one
        that has read up to `start` goes on (its workers already read ahead); any other request
        starts one at `start`, over the rest of the selection. It ends with the selection."""
        ahead = self._ahead
        if ahead.get("next") != start:
            ahead.clear()
            loader = torch.utils.data.DataLoader(
                _Items(self.dataset, self.positions[start:].tolist(), self.what),
                batch_size=READ_AHEAD_CHUNK, num_workers=self.workers,
                collate_fn=_Stacked(self.what, self.first))
            ahead.update(next=start, chunks=iter(loader), held=[])
        held, want = ahead["held"], stop - start
        try:
            while sum(count(h) for h in held) < want:
                x = next(ahead["chunks"])
                if isinstance(x, DataError):
                    raise x
                held.append(x)
        except BaseException:
            ahead.clear()
            raise
        x = cat(held) if len(held) > 1 else held[0]
        rest = count(x) - want
        ahead.update(next=stop, held=[take(x, slice(want, None))] if rest else [])
        if stop >= len(self):
            ahead.clear()
        return take(x, slice(0, want)) if rest else x


def leaves(x: Inputs) -> list[Tensor]:
    """The tensors of `x`, in order (a dict's in its key order)."""
    if isinstance(x, Tensor):
        return [x]
    return list(x.values()) if isinstance(x, dict) else list(x)


def apply(fn: Callable[[Tensor], Tensor], x: Inputs) -> Inputs:
    """`x` with `fn` applied to every leaf, same structure."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return tuple(fn(v) for v in x)


def count(x: Inputs | Streamed) -> int:
    """Number of examples (the leading dimension)."""
    return len(x) if isinstance(x, (Tensor, Streamed)) else len(leaves(x)[0])


def take(x: Inputs | Streamed, index: Tensor | slice | Sequence[int]) -> Inputs:
    """Examples `index` of `x` (a slice keeps views; streamed inputs are read)."""
    if isinstance(x, Tensor):
        return x[index]
    if not isinstance(index, (Tensor, slice)):
        index = torch.as_tensor(index, dtype=torch.long)
    if isinstance(x, Streamed):
        return x.read(index)
    return apply(lambda v: v[index], x)


def load(x: Inputs | Streamed) -> Inputs:
    """`x` in memory: streamed inputs read whole (for a sample a probe drew), others as they are."""
    return x.read(slice(None)) if isinstance(x, Streamed) else x


def move(x: Inputs, device: torch.device | str, dtype: torch.dtype | None) -> Inputs:
    """`x` on `device`, floating leaves in `dtype` (integer leaves, token ids and masks, stay
    integer). A view or a new tensor: never written to."""
    def one(v: Tensor) -> Tensor:
        return v.to(device, dtype) if v.is_floating_point() and dtype is not None else v.to(device)
    return one(x) if isinstance(x, Tensor) else apply(one, x)


def clone(x: Inputs) -> Inputs:
    return x.clone() if isinstance(x, Tensor) else apply(Tensor.clone, x)


def shares(a: Inputs, b: Inputs | Streamed) -> bool:
    """Whether a leaf of `a` starts at the same storage as the corresponding leaf of `b` (a
    slice of the caller's data, which a model writing its input would corrupt). Batches read
    from streamed inputs are new tensors."""
    return not isinstance(b, Streamed) and any(u.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
               for u, v in zip(leaves(a), leaves(b), strict=True))


def version(x: Inputs) -> int:
    """Sum of the leaves' in-place write counters: it changes when the model writes its input."""
    return sum(v._version for v in leaves(x))


def cat(parts: Sequence[Inputs]) -> Inputs:
    """Concatenate batches of one structure along the example dimension."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))


def call(model: nn.Module | Callable, x: Inputs, state: Mapping[str, Tensor] | tuple | None = None):
    """`model` on `x` — ``model(x)``, ``model(*x)`` or ``model(**x)`` — under `state` (a state
    dict or a ``(params, buffers)`` pair, through ``torch.func.functional_call``) when given."""
    if isinstance(x, Tensor):
        args, kwargs = (x,), {}
    elif isinstance(x, dict):
        args, kwargs = (), x
    else:
        args, kwargs = x, {}
    if state is None:
        return model(*args, **kwargs)
    return torch.func.functional_call(model, state, args, kwargs)


def is_floating(x: Inputs) -> bool:
    """Whether `x` is one floating tensor (an image, a feature vector): the inputs for which
    input-space quantities (a path norm's all-ones input, pixel distances) are defined."""
    return isinstance(x, Tensor) and x.is_floating_point()


def describe(x: Inputs, first: int = 1) -> str:
    """Shapes (without the first `first` dimensions) and dtypes of `x`, for messages: ``(1, 28,
    28) float32`` or ``{input_ids: (16,) int64, attention_mask: (16,) int64}``."""
    def one(v: Tensor) -> str:
        return f"{tuple(v.shape[first:])} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(x, Tensor):
        return one(x)
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in x.items()) + "}"
    return "(" + ", ".join(one(v) for v in x) + ")"


def structure(x: Inputs) -> tuple:
    """What must agree between examples: the kind, the keys, and each leaf's shape and dtype
    kind (integer or floating)."""
    def one(v: Tensor) -> tuple:
        return tuple(v.shape), v.is_floating_point()
    if isinstance(x, Tensor):
        return ("tensor", one(x))
    if isinstance(x, dict):
        return ("mapping", tuple((k, one(v)) for k, v in x.items()))
    return ("tuple", tuple(one(v) for v in x))


def stack(items: Sequence[Any], what: str, positions: Sequence[int] | None = None,
          reference: Inputs | None = None) -> Inputs:
    """Batch per-example inputs (each a tensor, tuple or mapping of one example, without the
    example dimension) into one Inputs. DataError naming the first item (by its `positions` in
    the dataset, default 0, 1, ...) whose structure (kind, keys, shapes) differs from
    `reference`'s (default: the first item's; named item 0)."""
    parts = [normalize(i) for i in items]
    positions = list(range(len(parts))) if positions is None else list(positions)
    first = parts[0] if reference is None else reference
    ref = structure(first)
    for i, p in zip(positions, parts, strict=True):
        if structure(p) != ref:
            raise DataError(f"{what}: item {i}'s input is {_kind(p)} {describe(p, 0)}, item 0's "
                            f"{_kind(first)} {describe(first, 0)}; every input must have the "
                            "same structure and shapes (pad sequences to one length)")
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.stack(parts)
    if isinstance(first, dict):
        return {k: torch.stack([p[k] for p in parts]) for k in first}
    return tuple(torch.stack([p[j] for p in parts]) for j in range(len(first)))


def _kind(x: Inputs) -> str:
    return "a tensor" if isinstance(x, Tensor) else "a mapping" if isinstance(x, dict) else "a tuple"


def check(x: Inputs, what: str, positions: Tensor | None = None) -> None:
    """DataError unless every leaf has the same leading length and holds real numbers or
    integers without NaN or infinity (no complex; a boolean mask only as a part of a tuple or
    mapping)."""
    parts = leaves(x)
    names = (list(x) if isinstance(x, dict) else [f"[{i}]" for i in range(len(parts))]
             if not isinstance(x, Tensor) else [""])
    if not parts:
        raise DataError(f"{what}: an input structure with no tensors")
    n = None
    for name, v in zip(names, parts, strict=True):
        part = f" {name}" if name else ""
        if v.dim() == 0:
            raise DataError(f"{what}: inputs{part} need a leading example dimension")
        if n is not None and len(v) != n:
            raise DataError(f"{what}: input{part} has {len(v)} examples, the first part {n}")
        n = len(v)
        if v.is_complex() or (v.dtype == torch.bool and isinstance(x, Tensor)):
            raise DataError(f"{what}: inputs{part} must be real numbers or integer token ids, got "
                            f"dtype {v.dtype}")
        if v.is_floating_point() and v.numel():
            bad = (~torch.isfinite(v.reshape(len(v), -1))).any(1).nonzero().flatten()
            if len(bad):
                first = int(bad[0]) if positions is None else int(positions[int(bad[0])])
                raise DataError(f"{what}: {len(bad)} input(s){part} hold NaN or infinite values "
                                f"(first at position {first}); clean or drop them")
