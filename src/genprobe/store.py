"""Run directories: what ``genprobe train`` writes and ``Subject.load`` reads.

Layout of a run directory::

    config.yaml                    the full training config, genprobe version, data provenance
    checkpoints/epoch-0000.safetensors   θ⁰, before any step; then one per scheduled epoch
    final.safetensors              θ^F, the state after the last epoch
    metrics.parquet                per epoch: train/test loss and error, learning rate, seconds
    labels.safetensors             the training labels used (after corruption) and the corrupted indices
    resume.safetensors             optimizer state and RNG state of the last checkpoint (for --resume)

Checkpoints are safetensors, never pickles. :func:`read_state` also reads a user's ``.pt``/``.pth``
state dict, but only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RunError, StateError

CONFIG = "config.yaml"
FINAL = "final.safetensors"
METRICS = "metrics.parquet"
LABELS = "labels.safetensors"
RESUME = "resume.safetensors"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT = re.compile(r"epoch-(\d+)\.safetensors$")


def checkpoint_path(run: Path, epoch: int) -> Path:
    return Path(run) / CHECKPOINT_DIR / f"epoch-{epoch:04d}.safetensors"


def write_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write a state as safetensors, atomically (a crash never leaves a truncated checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, or from ``.pt``/``.pth`` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"checkpoint {path} does not exist")
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise StateError(f"{path} does not hold a state dict of tensors")
            return state
        return load_file(str(path))
    except StateError:
        raise
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StateError(f"cannot read checkpoint {path}: {first[:200]} "
                         "(is it a safetensors file, or a weights-only .pt state dict?)") from None


def list_checkpoints(run: Path) -> dict[int, Path]:
    """{epoch: path} of the checkpoints recorded in a run, sorted by epoch."""
    folder = Path(run) / CHECKPOINT_DIR
    found = {}
    for p in folder.glob("epoch-*.safetensors") if folder.is_dir() else []:
        m = _CHECKPOINT.search(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def write_config(run: Path, config: dict) -> None:
    (Path(run) / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


def read_config(run: str | Path) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist; create one with `genprobe train ... --out {run}`")
    path = run / CONFIG
    if not path.is_file():
        raise RunError(f"{run} is not a genprobe run: it has no {CONFIG} (write one with `genprobe train`)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunError(f"{path} is corrupt: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or "arch" not in config or "dataset" not in config:
        raise RunError(f"{path} is not a genprobe run config (no arch/dataset)")
    return config


def load_subject(run: str | Path, data_dir: str | Path | None = None):
    """Rebuild the Subject of a finished run: model, θ⁰, every checkpoint, θ^F, the same data split."""
    from .subject import Subject
    from .zoo.train import TrainConfig, build

    run = Path(run)
    config = TrainConfig.from_dict(read_config(run))
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if not (run / FINAL).is_file():
        raise RunError(f"run {run} is unfinished (no {FINAL}); resume it with `genprobe train --resume {run}`")
    model, splits = build(config)
    labels = read_state(run / LABELS) if (run / LABELS).is_file() else None
    if labels is not None and not torch.equal(labels["train_labels"], splits.train.y):
        raise RunError(f"run {run}: the training labels rebuilt from its config differ from the ones it "
                       "recorded; was it trained with a different version of the dataset?")
    checkpoints = {epoch: read_state(p) for epoch, p in list_checkpoints(run).items()}
    if 0 not in checkpoints:
        raise RunError(f"run {run} has no initial checkpoint {CHECKPOINT_DIR}/epoch-0000.safetensors")
    return Subject(model, init=checkpoints[0], final=read_state(run / FINAL), checkpoints=checkpoints,
                   train=splits.train, test=splits.test, num_classes=splits.num_classes,
                   meta={"run": str(run), "config": config.to_dict(), "data": splits.meta})
