"""genprobe's one seed derivation, below everything that draws: the probes' samples and noise,
re-randomization, activation noise, the measures' draws and the training order.

Every stream is ``numpy.random.SeedSequence([seed, *keys])`` of the user's `seed` and keys naming
what the stream is for (a purpose, a unit's name, a draw, an epoch, an example's position), a
string key entering as its ``zlib.crc32``: independent streams for independent things, the same
stream for the same (seed, keys), whatever else a call draws. The datasets' own streams
(:mod:`genprobe.data`) are SeedSequences too, of a stream constant and the seed.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch


def seed_sequence(seed: int, *keys: str | int) -> np.random.SeedSequence:
    """genprobe's one seed derivation: ``numpy.random.SeedSequence([seed, *keys])``, a string key
    entering as its ``zlib.crc32``. Independent streams for independent things (a purpose, a
    unit's name, a draw, an example's position), the same stream for the same (seed, keys)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.SeedSequence(
        [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys])


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 62-bit integer seed from :func:`seed_sequence` of `seed` and `keys`."""
    state = seed_sequence(seed, *keys).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) % (1 << 62)


def generator(seed: int, *keys: str | int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of `seed` and `keys`."""
    import torch  # here, so that numpy-only users (the ranking) do not import torch

    return torch.Generator().manual_seed(derive_seed(seed, *keys))


__all__ = ["derive_seed", "generator", "seed_sequence"]
