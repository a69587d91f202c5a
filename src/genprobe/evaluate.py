"""Loss and error of a state on data: the plain, batched evaluation every probe can fall back on."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import inputs
from .device import resolve_device
from .inputs import Inputs
from .params import State
from .values import Data

DEFAULT_BATCH_SIZE = 1024
"""Examples per forward pass in evaluation: large enough to keep a GPU busy, small enough for a
CIFAR-sized ResNet's activations to fit comfortably in a few GB."""

CPU_CHUNK_BYTES = 8 << 20
"""On the CPU a batch is also kept small enough that the network's largest activation fits in
8 MiB (at least :data:`MIN_CPU_CHUNK` examples): work then stays in cache and freed memory is
reused instead of being faulted in afresh. For a ResNet-8 (16×32×32 activations) that is 128
examples: ``evaluate`` on 2,000 CIFAR-sized images took 0.36–0.48 s that way and 1.0 s in
batches of 1,000 (2-core Xeon, 2 threads)."""

MIN_CPU_CHUNK = 16


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
def largest_activation_bytes(model: nn.Module, x: Inputs, state: State | None = None) -> float:
    """Bytes per example of the largest tensor the input or any submodule's output takes, from
    one forward pass of the first (up to) two examples of `x` (under `state` when given)."""
    sample = inputs.take(x, slice(0, 2))
    sizes = [v.numel() * v.element_size() for v in inputs.leaves(sample)]

    def record(module, args, out):
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        inputs.call(model, sample, state)
    finally:
        for h in handles:
            h.remove()
    return max(sizes) / max(inputs.count(sample), 1)


def cpu_chunk(largest_bytes: float, limit: int = DEFAULT_BATCH_SIZE) -> int:
    """Examples per CPU batch for a network whose largest activation takes `largest_bytes` per
    example: see :data:`CPU_CHUNK_BYTES`; never more than `limit`."""
    return min(limit, max(MIN_CPU_CHUNK, int(CPU_CHUNK_BYTES // max(largest_bytes, 1.0))))


def _private_model(model: nn.Module, dev: torch.device) -> nn.Module:
    """`model` itself when it can be run as it is: on `dev` and in eval mode; else an eval-mode
    copy on `dev`. The caller's model is never moved, cast or switched to eval."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device == dev for t in tensors) and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).to(dev).eval()


def input_dtype(state: State) -> torch.dtype | None:
    """The floating dtype of inputs to a model under `state`: its first floating tensor's."""
    return next((v.dtype for v in state.values() if v.is_floating_point()), None)


@torch.no_grad()
def logits(model: nn.Module, state: State, x: Inputs, *, batch_size: int | None = None,
           device: str | torch.device = "auto") -> Tensor:
    """Model outputs (N, K) for inputs `x` under `state`, on the CPU, in eval mode.

    Floating inputs are cast to the state's floating dtype, integer inputs (token ids) passed as
    they are. The caller's model, state and inputs are left untouched (a model on another
    device, or in train mode, is evaluated as an eval-mode copy). `batch_size` defaults to
    :data:`DEFAULT_BATCH_SIZE`, lowered on the CPU by :func:`cpu_chunk`.
    """
    dev = resolve_device(device)
    state_dev = {k: v.to(dev) for k, v in state.items()}
    model = _private_model(model, dev)
    dtype = input_dtype(state_dev)
    n = inputs.count(x)
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
        if dev.type == "cpu" and n:
            sample = inputs.clone(inputs.move(inputs.take(x, slice(0, 2)), dev, dtype))
            batch_size = cpu_chunk(largest_activation_bytes(model, sample, state_dev))
    out = []
    guard = True  # until the model is seen not to write its input, it gets copies
    for i in range(0, n, batch_size):
        xb = inputs.move(inputs.take(x, slice(i, i + batch_size)), dev, dtype)
        if guard and inputs.shares(xb, x):
            xb = inputs.clone(xb)
            version = inputs.version(xb)
            out.append(inputs.call(model, xb, state_dev).float().cpu())
            guard = inputs.version(xb) != version
        else:
            out.append(inputs.call(model, xb, state_dev).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, state: State, data: Data, *, batch_size: int | None = None,
             device: str | torch.device = "auto") -> Metrics:
    """Mean cross-entropy and error of `model` under `state` on `data`."""
    loss, wrong = per_example(logits(model, state, data.x, batch_size=batch_size, device=device), data.y)
    return Metrics(float(loss.mean()), float(wrong.mean()), len(data))
