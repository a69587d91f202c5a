"""Reading a finished run directory back: the layer above the run format (:mod:`genprobe.store`).

:func:`read_run` rebuilds what :class:`genprobe.subject.Subject` needs from a run written by
``genprobe train``: the model, every recorded state, and the same data split. It never touches
the caller's global RNG (the model is built under a forked generator).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import store
from .errors import RunError
from .zoo.train import TrainConfig, build


def read_run(run: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """The keyword arguments of ``Subject(...)`` for the finished run at `run`."""
    run = Path(run)
    config = TrainConfig.from_dict(store.read_config(run))
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if not (run / store.FINAL).is_file():
        raise RunError(f"run {run} is unfinished (no {store.FINAL}); resume it with "
                       f"`genprobe train --resume {run}`")
    model, splits = build(config)
    labels = store.read_state(run / store.LABELS) if (run / store.LABELS).is_file() else None
    if labels is not None and not torch.equal(labels.get("train_labels", torch.empty(0)), splits.train.y):
        raise RunError(f"run {run}: the training labels rebuilt from its config differ from the ones it "
                       "recorded; was it trained with a different version of the dataset?")
    checkpoints = {epoch: store.read_state(p) for epoch, p in store.list_checkpoints(run).items()}
    if 0 not in checkpoints:
        raise RunError(f"run {run} has no initial checkpoint {store.CHECKPOINT_DIR}/epoch-0000.safetensors")
    return {"model": model, "init": checkpoints[0], "final": store.read_state(run / store.FINAL),
            "checkpoints": checkpoints, "train": splits.train, "test": splits.test,
            "num_classes": splits.num_classes,
            "meta": {"run": str(run), "config": config.to_dict(), "data": splits.meta}}


__all__ = ["read_run"]
