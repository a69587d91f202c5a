"""The options layer, below the engines: the options every probe shares, with one meaning each,
and the helpers every probe, the kernels and the measures use to check them, resolve the data
and its sample, derive seeds, record ``meta`` (:func:`result_meta`) and mark where the checks
end (:func:`options_checked`, which a sweep's check before training stops at).

=================  ===========================================================================
``subject``        the network and its data (:class:`genprobe.subject.Subject`).
``modules``        which units to probe: an ``fnmatch`` pattern, a list of patterns, or a mapping
                   ``{unit name: pattern(s)}`` grouping modules into one unit; default every module
                   owning parameters, in forward order (:func:`genprobe.params.select_units`).
``checkpoints``    recorded states θ^τ to use besides θ^F: ``"all"`` (every recorded epoch, 0 = θ⁰
                   included), a list of epochs, or ``None`` (none). Each probe's default is in its
                   signature (:func:`select_checkpoints`).
``split``          ``"train"`` or ``"test"``: the data the probe measures on.
``n``              a seeded, class-balanced subset of ``n`` examples of the split, spread evenly over
                   the classes (:func:`sample`); ``None``: the whole split (or the probe's default).
``per_class``      a seeded, class-balanced subset of ``per_class`` examples of every class.
``seed``           an int ≥ 0 seeding everything the probe samples (subsets, noise, re-randomized
                   weights); the same seed gives the same result. Never the global RNG.
``device``         ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
``memory_budget``  bytes of working memory the engine may use (:mod:`genprobe.memory`).
``batch_size``     the largest data chunk per forward pass (default: chosen for the device).
=================  ===========================================================================
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError, StateError
from .seeds import generator
from .values import Data

SPLITS = ("train", "test")
Split = Literal["train", "test"]
Checkpoints = Literal["all"] | Sequence[int] | None

SHARED_HELP = {
    "modules": "fnmatch pattern(s) of modules (repeatable); default: every module owning parameters.",
    "checkpoints": "Recorded epochs to use: 'all', 'none' or a list like 0,1,5.",
    "split": "Data to measure on: train or test.",
    "n": "A seeded class-balanced subset of N examples of the split.",
    "per_class": "A seeded class-balanced subset of this many examples per class.",
    "seed": "Seed of everything the probe samples (an int >= 0).",
    "device": "Where to compute: auto (CUDA if available), cpu, cuda or cuda:N.",
    "memory_budget": "Working memory of the engine, in MiB (default: 25% of free memory, at most 8 GiB).",
    "batch_size": "Largest data chunk per forward pass.",
}
"""Command-line help of the shared options (the CLI adds those a probe's function accepts)."""


def check_int(name: str, value, minimum: int = 0, *, optional: bool = False) -> int | None:
    """`value` as an int ≥ `minimum` (None allowed when `optional`); ConfigError otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, low: float = -math.inf, high: float = math.inf,
                 optional: bool = False) -> float | None:
    """`value` as a finite float in [low, high]; ConfigError naming `name` otherwise."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_resources(*, batch_size=None, memory_budget=None, device="auto") -> torch.device:
    """The resolved device, after checking `batch_size` (an int ≥ 1 or None), `memory_budget`
    (bytes > 0 or None) and `device` (available here): ConfigError naming the bad one."""
    from .device import resolve_device
    from .memory import resolve_memory_budget

    check_int("batch_size", batch_size, 1, optional=True)
    resolved = resolve_device(device)
    resolve_memory_budget(memory_budget, resolved)
    return resolved


def check_split(split) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split={split!r}; choose one of 'train', 'test'")
    return split


def select_checkpoints(subject, checkpoints: Checkpoints) -> list[int]:
    """The recorded epochs that `checkpoints` names, ascending (see the module docstring)."""
    recorded = sorted(subject.checkpoints)
    if checkpoints is None:
        return []
    if isinstance(checkpoints, str):
        if checkpoints == "all":
            return recorded
        raise ConfigError(f"checkpoints={checkpoints!r}: use 'all', a list of epochs, or None")
    if isinstance(checkpoints, (int, np.integer)) and not isinstance(checkpoints, bool):
        checkpoints = [checkpoints]
    if not isinstance(checkpoints, (Sequence, np.ndarray, Tensor)):
        raise ConfigError(f"checkpoints must be 'all', a list of epochs or None, got {checkpoints!r}")
    epochs = set()
    for c in checkpoints:
        if isinstance(c, Tensor) and c.dim() == 0:
            c = int(c)
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ConfigError(f"checkpoints must be epochs (ints), got {c!r}")
        if int(c) not in subject.checkpoints:
            raise StateError(f"no checkpoint for epoch {c!r}; recorded epochs: {recorded}")
        epochs.add(int(c))
    return sorted(epochs)


def parse_checkpoints(text: str | None) -> Checkpoints:
    """The command line's ``--checkpoints`` value: ``all``, ``none`` or ``0,1,5``."""
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    if text in ("all", "none"):
        return None if text == "none" else "all"
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--checkpoints={text!r}: use 'all', 'none' or comma-separated epochs, "
                          "e.g. 0,1,5") from None


def sample(data: Data, *, num_classes: int, n: int | None = None, per_class: int | None = None,
           seed: int = 0, split: str = "data") -> Tensor:
    """Positions of a seeded, class-balanced sample of `data`, grouped by class (ascending) and
    sorted within each class. ``None`` for both: every position (0..N-1).

    ``per_class``: exactly that many of every class (DataError when a class has fewer).
    ``n``: n in total, spread as evenly as the classes allow (a class with fewer examples than
    its share gives all it has, and the rest is spread over the others).
    """
    if n is not None and per_class is not None:
        raise ConfigError("give n or per_class, not both")
    n = check_int("n", n, 1, optional=True)
    per_class = check_int("per_class", per_class, 1, optional=True)
    if n is None and per_class is None:
        return torch.arange(len(data))
    if len(data) == 0:
        raise DataError(f"the {split} split is empty")
    counts = torch.bincount(data.y, minlength=num_classes)[:num_classes].tolist()
    if per_class is not None:
        short = [c for c in range(num_classes) if counts[c] < per_class]
        if short:
            raise DataError(f"class {short[0]} has only {counts[short[0]]} examples in the {split} "
                            f"split, per_class={per_class} requested; lower per_class or use n")
        wanted = [per_class] * num_classes
    else:
        if n > len(data):
            raise DataError(f"n={n} is larger than the {split} split ({len(data)} examples)")
        wanted = [0] * num_classes
        left = n
        open_ = [c for c in range(num_classes) if counts[c] > 0]
        while left > 0 and open_:  # water-filling: equal shares, capped by what each class has
            share, extra = divmod(left, len(open_))
            for i, c in enumerate(open_):
                take = min(share + (1 if i < extra else 0), counts[c] - wanted[c])
                wanted[c] += take
                left -= take
            open_ = [c for c in open_ if wanted[c] < counts[c]]
    gen = generator(seed, "sample", split)
    out = []
    for c in range(num_classes):
        if wanted[c]:
            pos = (data.y == c).nonzero().flatten()
            out.append(pos[torch.randperm(len(pos), generator=gen)[:wanted[c]]].sort().values)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def split_data(subject, split: str, *, n: int | None, per_class: int | None, seed: int) -> Data:
    """The `split` of `subject`, or its seeded class-balanced subset (:func:`sample`)."""
    data = subject.data(check_split(split))
    if n is None and per_class is None:
        return data
    return data.subset(sample(data, num_classes=subject.num_classes, n=n, per_class=per_class,
                              seed=seed, split=split))


def result_meta(function, options: Mapping[str, Any], *, device, engine: str, self_check: dict,
                **extra: Any) -> dict:
    """A probe result's ``meta``, one shape for every probe: ``options`` (every keyword option of
    the probe `function`, as the probe resolved it: epochs for ``checkpoints``, the grids it
    used, the device it ran on), ``seed``, ``device``, ``engine`` (the engine's route, e.g.
    ``fx`` or ``layerwise``), ``self_check`` (:func:`trained_check`'s shape), then the probe's
    own keys `extra`. (:class:`~genprobe.results.Result` adds ``probe``, ``genprobe_version``
    and ``machine``.) TypeError when `options` lacks an option of `function` or has another:
    a probe records exactly how it was called."""
    accepted = [n for n, p in inspect.signature(function).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    missing = [n for n in accepted if n not in options]
    unknown = [n for n in options if n not in accepted]
    if missing or unknown:
        raise TypeError(f"{function.__name__}: meta options missing {missing}, unknown {unknown}")
    recorded = {n: dict(v) if isinstance(v, Mapping) else v for n, v in options.items()}
    if "device" in recorded:
        recorded["device"] = str(device)
    return {"options": recorded, "seed": int(options["seed"]), "device": str(device),
            "engine": str(engine), "self_check": self_check, **extra}


def trained_check(subject, data: Data, base, *, what: str, batch_size: int | None, device,
                  extra: Sequence[float] = ()) -> dict:
    """A result's ``meta["self_check"]``: the engine's loss and error of the trained network
    (`base`) against a plain :func:`genprobe.evaluate` on the same data, value = |Δloss| + |Δerror|,
    or the largest of the probe's own discrepancies `extra` (e.g. the valley at α = 1, σ = 0
    against the trained loss) when larger; tolerance 1e-4 × max(1, loss)."""
    from .evaluate import evaluate

    plain = evaluate(subject.model, subject.final, data, batch_size=batch_size, device=device)
    value = max([abs(float(base.loss) - plain.loss) + abs(float(base.error) - plain.error), *extra])
    tol = 1e-4 * max(1.0, abs(plain.loss))
    return {"what": what, "value": value, "tolerance": tol, "passed": bool(value <= tol)}


_CHECK_ONLY = contextvars.ContextVar("genprobe_probe_check_only", default=False)


class OptionsChecked(Exception):  # noqa: N818 - a signal, not an error
    """Raised by :func:`options_checked` under :meth:`ProbeSpec.check`: the options passed."""


def check_only(function: Callable[..., Any], subject, options: dict[str, Any], what: str) -> None:
    """Run ``function(subject, **options)`` up to its :func:`options_checked` and stop there
    (see :meth:`ProbeSpec.check`); `what` names it in the TypeError of a function that has no
    such mark."""
    token = _CHECK_ONLY.set(True)
    try:
        function(subject, **options)
    except OptionsChecked:
        return
    finally:
        _CHECK_ONLY.reset(token)
    raise TypeError(f"{what} ran to the end in check-only mode: it must call options_checked() "
                    "once its options are checked")


def options_checked() -> None:
    """Mark the end of a probe's option checks: everything before this call checks the options
    against the subject (types, ranges, module and layer names, checkpoints, samples, memory);
    everything after does the work. Under :meth:`ProbeSpec.check` the probe stops here."""
    if _CHECK_ONLY.get():
        raise OptionsChecked


__all__ = ["OptionsChecked", "SHARED_HELP", "check_only", "options_checked", "SPLITS", "check_int", "check_number", "check_resources", "check_split", "parse_checkpoints", "result_meta", "sample", "select_checkpoints", "split_data", "trained_check"]
