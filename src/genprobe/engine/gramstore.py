"""Gram matrices streamed block by block into memory-mapped files on disk, resumable.

A Gram of N examples needs N² · 8 bytes (N = 30,000: 7.2 GB), often more than the memory at
hand. :func:`stream_gram` writes each block of :func:`genprobe.engine.grams.gram_blocks` into a
``.npy`` file as it comes (plain positioned writes, so the process never holds the file resident,
as it would through a memory map), then records it as written: a run killed at any point (SIGKILL
included) continues from the blocks on disk and ends with the same matrix, since a block is
recorded only after its bytes are written, and the block layout is fixed when the file is made.
:class:`DiskMatrix` reads such a file back by rows.

A store is a directory that genprobe marks as its own (``.genprobe-kernels``). It holds, per
matrix ``NAME``, ``NAME.npy`` and ``NAME.json`` (the computation's fingerprint, the block size and
the blocks written). A directory that genprobe did not write, or a matrix file whose fingerprint
differs from the computation asked for, is refused with OutputError: nothing is overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import inputs, outputs
from ..errors import DataError, OutputError, first_line
from ..inputs import Inputs
from .grams import gram_blocks

KIND = "kernels"


def _allowed(name: str) -> bool:
    return name.endswith((".npy", ".json")) or (name.startswith(".") and name.endswith(".tmp"))


def open_store(path: str | Path) -> Path:
    """The store directory `path`, created (and marked) if absent. OutputError if it exists and is
    not an empty directory or a store genprobe wrote."""
    path = Path(path)
    outputs.check_creatable(path, "kernel directory")
    if path.exists():
        if any(path.iterdir()) and not outputs.is_owned(path, KIND, _allowed):
            raise OutputError(f"kernel directory {path} holds files genprobe did not write; choose "
                              "a new or empty directory for out=")
    path.mkdir(parents=True, exist_ok=True)
    (path / outputs.MARKS[KIND]).touch()
    return path


def _key(rows: slice, cols: slice) -> str:
    return f"{rows.start}:{rows.stop},{cols.start}:{cols.stop}"


def stream_gram(
    store: Path,
    name: str,
    fingerprint: Mapping[str, Any],
    model: nn.Module,
    state: Mapping[str, Tensor],
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    on_block=None,
    **options,
) -> DiskMatrix:
    """The Gram of x1 (against x2, or itself) in ``store/NAME.npy``, (N1, N2[, K, K]) float64,
    computed or resumed from the blocks already written.

    `fingerprint`: what identifies the computation (JSON-able; the caller includes what the
    matrix depends on: model and state digests, the inputs, options); a file of that name with
    another fingerprint is refused. `options` go to :func:`~genprobe.engine.grams.gram_blocks`
    (of, trace_outputs, implementation, memory_budget, device). ``on_block(done, total)`` is
    called after each block written (blocks written so far, of how many: progress).
    """
    npy, meta_file = store / f"{name}.npy", store / f"{name}.json"
    fingerprint = json.loads(json.dumps(dict(fingerprint)))
    meta = _read_meta(meta_file, fingerprint) if meta_file.exists() else None
    square = x2 is None
    n1 = inputs.count(x1)
    n2 = n1 if square else inputs.count(x2)
    info: dict = {}
    disk = None
    done: set[str] = set(meta["done"]) if meta else set()
    if meta and meta.get("complete"):
        return DiskMatrix(npy)
    block_size = meta["block_size"] if meta else None
    blocks = gram_blocks(model, state, x1, x2, info=info, block_size=block_size,
                         skip=lambda r, c: _key(r, c) in done, **options)
    for blk in blocks:
        if disk is None:
            shape = (n1, n2, *blk.matrix.shape[2:])
            if meta is None or not npy.exists():
                meta = {"fingerprint": fingerprint, "shape": list(shape),
                        "block_size": int(info["block_size"]), "done": [], "complete": False}
                done.clear()
                outputs.write_atomic(npy, _zeros_npy(shape))
                outputs.write_text_atomic(meta_file, json.dumps(meta))
            disk = DiskMatrix(npy)
            if list(disk.shape) != list(shape):
                raise OutputError(f"{npy} has shape {disk.shape}, not {shape}; it belongs to another "
                                  "computation: choose another out= directory")
        m = blk.matrix.numpy()
        if not all(d is None or np.isfinite(d.numpy()).all() for d in (blk.diag_rows, blk.diag_cols)):
            raise DataError(f"the derivatives of some examples in rows {blk.rows.start}-"
                            f"{blk.rows.stop - 1} are not finite (NaN/inf outputs at this state)")
        disk.write(blk.rows, blk.cols, m)
        if square and blk.rows != blk.cols:
            disk.write(blk.cols, blk.rows, m.swapaxes(0, 1) if m.ndim == 2 else m.transpose(1, 0, 3, 2))
        done.add(_key(blk.rows, blk.cols))
        meta["done"] = sorted(done)
        outputs.write_text_atomic(meta_file, json.dumps(meta))
        if on_block is not None:
            on_block(len(done), block_count(n1, None if square else n2, meta["block_size"]))
    if meta is None:  # nothing was needed and nothing recorded: cannot happen for n >= 1
        raise OutputError(f"{meta_file} records no blocks; delete {store} and run again")
    meta["complete"] = True
    outputs.write_text_atomic(meta_file, json.dumps(meta))
    return DiskMatrix(npy)


class DiskMatrix:
    """A C-ordered float64 ``.npy`` array on disk, read and written by rows with positioned file
    I/O. Indexing takes rows (``m[i:j]``, ``m[i:j, a:b]``) and returns numpy arrays;
    ``np.asarray(m)`` reads it whole."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or dtype != np.float64:
            raise OutputError(f"{self.path} is not a float64 C-ordered kernel file genprobe wrote")
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float64)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * 8  # bytes per row
        self._item = int(np.prod(self.shape[2:], dtype=np.int64)) * 8  # bytes per (i, j) entry

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows start..stop-1, read from the file (into `out`, a C-contiguous float64 array of
        their shape, when given)."""
        stop = min(stop, self.shape[0])
        if out is None:
            out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=np.float64)
        elif out.shape != (stop - start, *self.shape[1:]) or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float64 of shape {(stop - start, *self.shape[1:])}")
        with open(self.path, "rb", buffering=0) as f:
            self._read(f, out, start * self._row)
        return out

    def _read(self, f, out: np.ndarray, at: int) -> None:
        """Fill the contiguous `out` with the bytes at `at` past the header of the open file `f`."""
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            n = os.preadv(f.fileno(), [view[got:]], self.offset + at + got)
            if not n:
                raise OutputError(f"{self.path} is shorter than its header says; it is damaged: "
                                  "delete it and run again")
            got += n

    def upper_into(self, out: np.ndarray) -> np.ndarray:
        """The upper triangle of this square matrix (row i, columns i..) read into `out` (C-ordered
        float64 of its shape); the rest of `out` is not touched."""
        m = self.shape[0]
        if self.ndim != 2 or self.shape[1] != m or out.shape != self.shape or not out.flags.c_contiguous:
            raise ValueError(f"upper_into needs a square matrix and a C-ordered buffer of its shape, "
                             f"got {self.shape} and {out.shape}")
        with open(self.path, "rb", buffering=0) as f:
            for i in range(m):
                self._read(f, out[i, i:], i * self._row + 8 * i)
        return out

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("DiskMatrix takes contiguous row slices")
        start, stop, _ = rows.indices(self.shape[0])
        block = self.rows(start, stop)
        return block[(slice(None), *rest)] if rest else block

    def __array__(self, dtype=None, copy=None):
        whole = self.rows(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)

    def write(self, rows: slice, cols: slice, block: np.ndarray) -> None:
        """Write `block` (len(rows), len(cols), ...) at those rows and columns."""
        block = np.ascontiguousarray(block, dtype=np.float64)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for i, row in enumerate(block):
                os.pwrite(fd, row.tobytes(), self.offset + (rows.start + i) * self._row + cols.start * self._item)
        finally:
            os.close(fd)


def _zeros_npy(shape: tuple[int, ...]):
    """A writer of a zero-filled float64 ``.npy`` of `shape` (sparse on disk until written)."""
    return lambda tmp: np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=shape).flush()


def block_count(n1: int, n2: int | None, block_size: int) -> int:
    """How many blocks :func:`stream_gram` records for a Gram of that size and block size."""
    if n2 is None:
        if n1 <= block_size:
            return 1
        parts = -(-n1 // (block_size // 2))
        return parts * (parts - 1) // 2 + parts
    if n1 + n2 <= block_size:
        return 1
    size = max(1, block_size // 2)
    return -(-n1 // size) * -(-n2 // size)


def _read_meta(path: Path, fingerprint: dict) -> dict:
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("done"), list):
            raise ValueError("not a genprobe kernel record")
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} cannot be read ({first_line(exc)}); it is not a kernel record "
                          "genprobe wrote: choose another out= directory") from None
    if meta.get("fingerprint") != fingerprint:
        theirs = meta.get("fingerprint") or {}
        diff = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        raise OutputError(f"{path.parent} holds a kernel of another computation (differs in "
                          f"{', '.join(diff[:4])}); choose another out= directory")
    return meta


def digest(*tensors: Tensor | tuple | Mapping[str, Tensor]) -> str:
    """A short content digest of tensors (or tuples of them, or state dicts and other mappings:
    an input structure), for fingerprints."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        items = (sorted(t.items()) if isinstance(t, Mapping) else
                 [(f"[{i}]", v) for i, v in enumerate(t)] if isinstance(t, tuple) else [("", t)])
        for key, v in items:
            v = v.detach().cpu().contiguous()
            h.update(f"{key}{tuple(v.shape)}{v.dtype}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = ["KIND", "DiskMatrix", "block_count", "digest", "open_store", "stream_gram"]
