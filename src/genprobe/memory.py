"""One meaning of ``memory_budget`` for every probe and engine.

``memory_budget`` is the number of bytes of working memory a probe's engine may use on the
compute device for its temporaries: cached activations and stacked edited parameters in the
variants engine, one block of per-example derivatives in the grams engine. It never counts the
model's own parameters or the data. ``None`` means :func:`default_memory_budget`.
"""

from __future__ import annotations

import ctypes

import torch

from .errors import ConfigError

DEFAULT_MEMORY_FRACTION = 0.25
"""Default budget: this fraction of the memory available on the device (CPU: MemAvailable;
CUDA: free memory), so that the engine leaves room for the model, the data and other work."""
DEFAULT_MEMORY_CAP = 8 * 2**30
"""Upper bound of the default budget (bytes): beyond a few GiB bigger blocks stop paying off."""
FALLBACK_MEMORY_BUDGET = 2**30
"""Budget when the available memory cannot be read (1 GiB)."""


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def default_memory_budget(device: torch.device) -> int:
    """Bytes an engine may use by default: see :data:`DEFAULT_MEMORY_FRACTION`."""
    available = available_memory(device)
    if not available:
        return FALLBACK_MEMORY_BUDGET
    return int(min(DEFAULT_MEMORY_CAP, DEFAULT_MEMORY_FRACTION * available))


def resolve_memory_budget(memory_budget: int | float | None, device: torch.device) -> int:
    """The budget in bytes: `memory_budget` checked (a positive number), or the default."""
    if memory_budget is None:
        return default_memory_budget(device)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
            or not memory_budget >= 1:
        raise ConfigError(f"memory_budget must be a positive number of bytes (or None for the "
                          f"default), got {memory_budget!r}")
    return int(memory_budget)


def return_freed_memory() -> None:
    """Hand the heap pages that freed temporaries left behind back to the operating system.

    glibc keeps them (measured: the grams engine's blocks left ~0.7 GiB resident after a
    10,000-example MNIST kernel); call this before a phase that needs one large buffer. A no-op
    where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_resident() -> bool:
    """Start this process's peak resident memory afresh (Linux: ``/proc/self/clear_refs``, so
    that :func:`peak_resident` measures from now); whether that was possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident() -> int | None:
    """This process's peak resident memory in bytes since :func:`reset_peak_resident` (Linux's
    ``VmHWM``: the libraries and data already resident count too), None where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


__all__ = ["DEFAULT_MEMORY_CAP", "DEFAULT_MEMORY_FRACTION", "FALLBACK_MEMORY_BUDGET",
           "available_memory", "default_memory_budget", "peak_resident", "reset_peak_resident",
           "resolve_memory_budget", "return_freed_memory"]
