"""Trained runs for the slow paper-finding tests, trained once and shared.

``trained_run("fcn", "mnist", epochs=5, n_train=10000)`` trains (or reuses) a run directory and
returns its path. Runs are deterministic under their config and torch's CPU thread count (the
order of floating-point reductions depends on it), so they are cached under
``$GENPROBE_TEST_RUNS`` (default: a folder in the system temp dir) keyed by the config, by
``torch.get_num_threads()`` and by the source of the code that makes them: a change to the
zoo, the training loop or the data, or a different thread count, retrains.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

import genprobe
from genprobe.zoo.train import TrainConfig, train_run

_SOURCES = ["zoo/models.py", "zoo/train.py", "data"]


def _code_digest() -> str:
    root = Path(genprobe.__file__).parent
    h = hashlib.sha256()
    for rel in _SOURCES:
        p = root / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def trained_run(arch: str, dataset: str, **options) -> Path:
    """A finished run of `arch` on `dataset` with TrainConfig `options` (plus arch_options=...)."""
    config = TrainConfig(arch=arch, dataset=dataset, device="cpu", **options)
    key = json.dumps(config.to_dict(), sort_keys=True) + f"threads={torch.get_num_threads()}" + _code_digest()
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("GENPROBE_TEST_RUNS", Path(tempfile.gettempdir()) / "genprobe-test-runs"))
    path = root / f"{arch}-{dataset}-{digest}"
    if not (path / "final.safetensors").is_file():
        train_run(config, path, overwrite=True)
    return path


@contextmanager
def interrupted_in_epoch_2():
    """Inside the block, training raises KeyboardInterrupt (a Ctrl-C) during its second epoch:
    at the third metrics evaluation (epoch 0, epoch 1, then epoch 2)."""
    import genprobe.zoo.train as T

    calls = {"n": 0}
    original = T._epoch_metrics

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    T._epoch_metrics = interrupt
    try:
        yield
    finally:
        T._epoch_metrics = original
