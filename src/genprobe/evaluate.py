"""Loss and error of a state on data: the plain, batched evaluation every probe can fall back on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .device import resolve_device
from .params import State
from .subject import Data

DEFAULT_BATCH_SIZE = 1024
"""Examples per forward pass in evaluation: large enough to keep a CPU busy, small enough for a
CIFAR-sized ResNet's activations to fit comfortably in a few GB."""


@dataclass(frozen=True)
class Metrics:
    """Mean cross-entropy ``loss`` (nats), ``error`` (fraction misclassified, 0–1), over ``n`` examples."""

    loss: float
    error: float
    n: int


def per_example(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy, 0–1 error) per example, float64, shape (N,)."""
    loss = F.cross_entropy(logits.double(), y, reduction="none")
    wrong = (logits.argmax(dim=-1) != y).double()
    return loss, wrong


@torch.no_grad()
def logits(model: nn.Module, state: State, x: Tensor, *, batch_size: int | None = None,
           device: str | torch.device = "auto") -> Tensor:
    """Model outputs (N, K) for inputs `x` under `state`, on the CPU. The model must be in eval mode."""
    dev = resolve_device(device)
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    state_dev = {k: v.to(dev) for k, v in state.items()}
    model = model.to(dev)
    out = [functional_call(model, state_dev, (x[i:i + batch_size].to(dev),)).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def evaluate(model: nn.Module, state: State, data: Data, *, batch_size: int | None = None,
             device: str | torch.device = "auto") -> Metrics:
    """Mean cross-entropy and error of `model` under `state` on `data`."""
    loss, wrong = per_example(logits(model, state, data.x, batch_size=batch_size, device=device), data.y)
    return Metrics(float(loss.mean()), float(wrong.mean()), len(data))
