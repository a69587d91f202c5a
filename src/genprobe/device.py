"""Device choice, shared by every entry point (`device="auto"|"cpu"|"cuda"|"cuda:N"`)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU. Asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ConfigError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device={device!r}; use auto, cpu, cuda or cuda:N") from exc


def rng_devices() -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save and restore: every visible
    one, since ``torch.manual_seed`` seeds them all (none on a CPU-only machine)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
