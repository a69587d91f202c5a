"""What a model returns, as logits: the one rule the Subject applies for every probe, the
measures and the engines.

A model may return a tensor of logits (N, K); a tuple or list whose first element is the logits
(``return_dict=False`` models); a mapping or an object with a ``logits`` entry or attribute (a
Hugging Face ``ModelOutput``, a dict). Anything else needs ``Subject(..., output=f)``, `f` a
function from what the model returned to the (N, K) logits tensor (it is also applied while
``torch.fx`` traces the model, to proxies: plain indexing and attribute access work there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, fx, nn

from .errors import ConfigError, StateError

Output = Callable[[Any], Tensor]
"""``output=``: a function from what the model returns to its (N, K) logits."""


def _tensor(value: Any) -> bool:
    return isinstance(value, (Tensor, fx.Proxy))  # a proxy while torch.fx traces the model


def describe(out: Any) -> str:
    """What a model returned, in a few words: a tensor's shape, a mapping's keys, a length."""
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        keys = list(out)
        return (f"a {type(out).__name__} with keys {', '.join(map(repr, keys[:6]))}"
                + (" ..." if len(keys) > 6 else ""))
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(type(v).__name__ for v in out[:4])})"
    return f"a {type(out).__name__}"


def logits_of(out: Any, output: Output | None = None) -> Tensor:
    """The logits in `out`, what a model returned (see the module doc); with `output`, what
    ``output(out)`` returns. StateError saying what was returned when there are none."""
    if output is not None:
        logits = output(out)
        if not _tensor(logits):
            raise StateError(f"output= returned {describe(logits)}, not the logits tensor; on "
                             f"{describe(out)} from the model")
        return logits
    if _tensor(out):
        return out
    if isinstance(out, Mapping) and _tensor(out.get("logits")):
        return out["logits"]
    if not isinstance(out, Mapping) and _tensor(getattr(out, "logits", None)):
        return out.logits
    if isinstance(out, (tuple, list)) and out and _tensor(out[0]):
        return out[0]
    raise StateError(f"the model returned {describe(out)}, with no logits genprobe can find (a "
                     "tensor, a first element, or a 'logits' entry); pass Subject(..., "
                     "output=lambda out: <its (N, K) logits tensor>)")


def check_output(output: Any) -> Output | None:
    """`output` if it is None or callable; ConfigError otherwise."""
    if output is not None and not callable(output):
        raise ConfigError(f"output= must be a function from what the model returns to its "
                          f"logits, got {type(output).__name__}")
    return output


def returning_logits(model: nn.Module, output: Output | None) -> nn.Module:
    """`model` (a private copy, changed in place) made to return its logits: its class becomes a
    subclass of the same name whose ``forward`` applies :func:`logits_of`. Parameter, buffer and
    module names, hooks and tracing stay those of the model itself. The Subject calls it once, on
    a model whose class does not return logits yet (``_genprobe_returns_logits``)."""
    cls = type(model)

    @functools.wraps(cls.forward)  # torch.fx reads the signature through __wrapped__
    def forward(self, *args, **kwargs):
        return logits_of(cls.forward(self, *args, **kwargs), output)

    model.__class__ = type(cls.__name__, (cls,), {
        "forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__, "_genprobe_returns_logits": True})
    return model


__all__ = ["Output", "check_output", "describe", "logits_of", "returning_logits"]
