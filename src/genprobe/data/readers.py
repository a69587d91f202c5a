"""Readers for data files: a restricted unpickler, the IDX format, CIFAR-10 python batches.

Every reader raises :class:`~genprobe.errors.DataError` naming the file when the file is
missing, truncated or not in the expected format. No reader ever runs code from a file:
pickles go through :class:`NumpyUnpickler`, which builds numpy arrays and plain Python
containers and refuses every other global.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    (module, name): obj
    for prefix in ("numpy.core", "numpy._core")
    for module, name, obj in (
        (f"{prefix}.multiarray", "_reconstruct", _reconstruct),
        (f"{prefix}.multiarray", "scalar", scalar),
        (f"{prefix}.numeric", "_frombuffer", _frombuffer),
    )
}


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocols < 3, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_NUMPY_GLOBALS |= {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): _latin1_encode}
"""The only globals a pickle may name: what numpy needs to rebuild arrays and scalars, and
the latin-1 ``_codecs.encode`` that Python 3 uses for ``bytes`` at pickle protocol 2."""

_GZIP_MAGIC = b"\x1f\x8b"


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy arrays, numpy scalars and builtin containers.

    Any other global (``os.system``, ``builtins.eval``, a class of some package) raises
    :class:`pickle.UnpicklingError` instead of being imported, so loading a hostile pickle
    cannot run code. The admitted globals are mapped to numpy's own objects directly; nothing
    is imported by name.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def _open_bytes(path: Path) -> bytes:
    """The bytes of `path`, gunzipped when the file starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is a corrupt or truncated gzip file ({exc})") from None
    return raw


def load_pickle(path: str | Path, *, encoding: str = "latin1") -> Any:
    """Unpickle `path` (gzip'd or not) with :class:`NumpyUnpickler`.

    Args:
        encoding: how Python 2 ``str`` objects are decoded; ``"latin1"`` for numpy arrays
            pickled by Python 2, ``"bytes"`` to keep them as bytes (CIFAR-10's dict keys).
    """
    path = Path(path)
    data = _open_bytes(path)
    try:
        return NumpyUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"{path} is not a readable pickle of numpy arrays ({type(exc).__name__}: {exc})") from None


# -- IDX ------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type codes (third byte of the magic number) -> big-endian numpy dtype."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip'd or not.

    The header is two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; the data follows in C order, big-endian.

    Returns:
        array of shape ``dims`` in native byte order (uint8 for MNIST images and labels).

    Raises:
        DataError: naming the file, when the header is wrong or the data is truncated or too long.
    """
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - 4 - 4 * ndim
    if got != expected:
        raise DataError(f"{path}: IDX header says shape {dims} ({expected} bytes of data) "
                        f"but the file holds {got} bytes; the file is truncated or corrupt")
    array = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four MNIST-format files in `folder` (``.gz`` or not, ``-idx`` or ``.idx``), or None
    when any is missing."""
    found = {}
    for key, stem in _IDX_FILES.items():
        candidates = [stem, stem.replace("-idx", ".idx")]
        paths = [folder / (c + ext) for c in candidates for ext in ("", ".gz")]
        hit = next((p for p in paths if p.is_file()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def read_idx_folder(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)`` from a folder of MNIST-format IDX files.

    Images come back as stored (``(N, H, W)`` uint8 for MNIST); labels as int64 ``(N,)``.
    """
    folder = Path(folder)
    files = find_idx_files(folder)
    if files is None:
        names = ", ".join(f"{s}[.gz]" for s in _IDX_FILES.values())
        raise DataError(f"{folder} does not hold the MNIST-format IDX files {names}")
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{files[split + '_y']}: {len(y)} labels of shape {y.shape} "
                            f"for {len(x)} images in {files[split + '_x'].name}")
    return (arrays["train_x"], arrays["train_y"].astype(np.int64),
            arrays["test_x"], arrays["test_y"].astype(np.int64))


# -- CIFAR-10 -------------------------------------------------------------------------------

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``x`` (N, 3, 32, 32) uint8 and ``y`` (N,) int64."""
    path = Path(path)
    batch = load_pickle(path, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: b'data' must be an (N, 3072) uint8 array, got {shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: b'labels' must be {len(data)} integers, got shape {labels.shape}")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar10_folder(folder: Path) -> Path | None:
    """The folder holding the CIFAR-10 batches: `folder` itself or its
    ``cifar-10-batches-py`` subfolder; None when neither holds all six files."""
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if all((candidate / n).is_file() for n in (*CIFAR10_TRAIN, CIFAR10_TEST)):
            return candidate
    return None


def read_cifar10(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)`` from CIFAR-10 python batches in `folder`.

    Images are (N, 3, 32, 32) uint8, labels (N,) int64 (50,000 / 10,000 for the real data).
    """
    folder = Path(folder)
    where = cifar10_folder(folder)
    if where is None:
        raise DataError(f"{folder} does not hold the CIFAR-10 python batches "
                        f"{', '.join(CIFAR10_TRAIN)}, {CIFAR10_TEST}")
    train = [read_cifar10_batch(where / name) for name in CIFAR10_TRAIN]
    test_x, test_y = read_cifar10_batch(where / CIFAR10_TEST)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            test_x, test_y)
