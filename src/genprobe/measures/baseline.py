"""Jiang et al.'s baseline measures of one trained network: :func:`baselines` turns a
:class:`~genprobe.Subject` into the scalars keyed ``"baseline.<name>"`` below.

References: Y. Jiang, B. Neyshabur, H. Mobahi, D. Krishnan, S. Bengio, "Fantastic
generalization measures and where to find them", ICLR 2020 (arXiv:1912.02178) — the measures'
definitions (Appendix C), Kendall's τ and the granulated τ, the conditional
independence test; Y. Jiang, P. Foret, S. Yak, D. M. Roy, H. Mobahi, G. K.
Dziugaite, S. Bengio, S. Gunasekar, I. Guyon, B. Neyshabur, "NeurIPS 2020 competition:
Predicting generalization in deep learning" (arXiv:2012.07976) and its public scoring program
(``conditional_mutual_information`` in the starting kit's scoring code); G. K. Dziugaite, A.
Drouin et al., "In search of robust measures of generalization", NeurIPS 2020, whose PyTorch
implementation of Jiang et al.'s measures (``nitarshan/robust-generalization-measures``,
``measures.py``) settles details the paper leaves open (the σ' search, the margin percentile).

Baseline measures
-----------------
*Layers* are the modules that are linear maps with a weight: ``nn.Linear``, ``nn.Conv1d/2d/3d``
and modules following :class:`genprobe.engine.rules.ScaledLinearMap` (NTK-parameterized layers,
whose *effective* weight ``w_scale · weight`` is what the network applies and what is measured).
W_i is layer i's effective weight as a matrix (C_out, C_in/groups · kernel): a convolution's
kernel reshaped, the usual convention (not the operator norm of the convolution, which depends
on the input size; Dziugaite et al.'s code takes the SVD of the 4-D kernel batched over its two
leading dimensions, which we do not follow); W_i⁰ the same at initialization; d the number of
layers. A weight shared by several modules (tied, or one module called twice) is one layer,
counted once. Biases, BatchNorm / LayerNorm affine parameters and embeddings are not layers:
they are left out of the norm measures (as Dziugaite et al.'s code leaves biases and BatchNorm
out), counted in ``params``, and perturbed by the PAC-Bayes search. BatchNorm runs in eval mode
with its running statistics; a network with BatchNorm has no path norm (NaN, see below).

``baseline.params``
    ω, the number of parameters (tied tensors once): Jiang et al.'s parameter count.
``baseline.log_prod_frobenius``
    log Π_i ‖W_i‖²_F: the product of squared Frobenius norms, in log.
``baseline.sum_frobenius``
    d · (Π_i ‖W_i‖²_F)^(1/d): the sum of squared Frobenius norms after the rescaling of the
    layers that minimizes it (a rescaling that leaves a ReLU network's function unchanged).
``baseline.log_prod_spectral``
    log Π_i ‖W_i‖²_2: the product of squared spectral norms, in log (a grouped convolution's
    ‖W_i‖_2 is the largest of its groups').
``baseline.sum_spectral``
    d · (Π_i ‖W_i‖²_2)^(1/d): the spectral counterpart of ``sum_frobenius``.
``baseline.dist_from_init``
    Σ_i ‖W_i − W_i⁰‖²_F: the Frobenius distance from initialization (Nagarajan & Kolter 2019).
``baseline.log_path_norm``
    log Σ_k f_{w∘w}(𝟏)[k]: the path norm, the network with every parameter squared (the
    effective weights and biases of scaled layers: their effective value squared) run on an
    all-ones input, outputs summed. It is the sum over input→output paths (bias units
    included) of the product of the squared weights on the path only when the forward is a
    ReLU network of linear maps; anything else (BatchNorm, tanh, max-pooling, attention,
    integer inputs, a forward ``torch.fx`` cannot trace) gives NaN and a logged warning naming
    the cause.
``baseline.pacbayes_sharpness``
    ‖θ − θ⁰‖²₂ / (4σ'²) + log(m / σ') + 10: the PAC-Bayes bound with a Gaussian prior centred
    at initialization, at the σ' below (Jiang et al.'s "init" PAC-Bayes measure).
``baseline.pacbayes_flatness``
    1 / σ'²: Jiang et al.'s PAC-Bayes flatness.
``baseline.inverse_margin``
    1 / γ², γ the output margin f(x)[y] − max_{j≠y} f(x)[j] of the ⌊m/10⌋-th smallest example
    (Jiang et al.'s 10th percentile, taken as Dziugaite et al.'s ``kthvalue(m // 10)``). NaN
    with a warning when γ ≤ 0 (over a tenth of the examples misclassified): 1/γ² would rank a
    negative margin like a positive one.

σ' is the largest standard deviation of isotropic Gaussian noise u on all parameters θ (in
effective units; buffers stay) such that the expected 0–1 error on the measured data moves by
``sharpness_target`` (0.1) from the trained network's: |E_u[err(θ + u)] − err(θ)| within
``sharpness_tolerance`` (0.01) of the target. It is found as Jiang et al. / Dziugaite et al. do,
by bisection on σ, each step a Monte-Carlo mean over ``sharpness_samples`` draws, with two
changes: the bracket [0, 1] is doubled until the deviation reaches the target (their fixed
[0, 2] silently returns 2 for networks whose error needs more noise), and the draws are common
random numbers — draw s is u_s = σ · z_s with z_s from :func:`genprobe.seeds.generator`
``(seed, "pacbayes", s)``, the same z at every σ — so the search is reproducible and the
deviation changes with σ alone, not with fresh noise. The perturbed networks are evaluated by
:class:`genprobe.engine.variants.VariantEvaluator` (one stack of draws per σ). θ⁰ and
‖θ − θ⁰‖ are over the perturbed parameters; m is the number of examples of the measured
split (the whole split, also when a subset ``n`` is measured). When no σ up to 2¹⁰ moves the
error that far (a network already at chance), both PAC-Bayes measures are NaN with a warning.

Every baseline is expected to grow with the generalization gap (direction +1), as Jiang et al.
state of complexity measures.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

from .. import inputs, progress
from .. import params as P
from ..engine.edits import Edit, noise_edit, stack_edits
from ..engine.rules import scaled_map
from ..engine.variants import VariantEvaluator
from ..errors import ConfigError, first_line
from ..evaluate import logits as model_logits
from ..options import (
    check_int,
    check_number,
    check_resources,
    check_split,
    options_checked,
    split_data,
)
from ..seeds import generator
from ..subject import check_subject

logger = logging.getLogger(__name__)

BASELINES = ("params", "log_prod_frobenius", "sum_frobenius", "log_prod_spectral", "sum_spectral",
             "dist_from_init", "log_path_norm", "pacbayes_sharpness", "pacbayes_flatness",
             "inverse_margin")
"""The baseline measures, in the order :func:`baselines` returns them (keys ``baseline.NAME``)."""

PREFIX = "baseline."
MARGIN_QUANTILE = 0.1
"""γ is the ⌊m · 0.1⌋-th smallest margin (at least the first): Jiang et al.'s 10th percentile,
less sensitive to a few outliers than the minimum."""
PACBAYES_CONSTANT = 10.0
"""The additive constant of Jiang et al.'s PAC-Bayes measures (log(1/δ)-like terms)."""
SIGMA_START = 1.0
"""Upper end of the first σ bracket (effective weight units); doubled while the error has not
moved far enough."""
SIGMA_DOUBLINGS = 10
"""At most this many doublings of the bracket (σ ≤ 2¹⁰): a network whose 0–1 error does not move
by the target under such noise has no σ' (NaN)."""

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose weight is a layer of the norm measures (plus ScaledLinearMap modules)."""


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """One layer of the norm measures: the module, the state key of its weight (the first
    module owning a shared weight), the weight's scale (``w_scale`` of a ScaledLinearMap,
    else 1) and the convolution's groups."""

    module: str
    key: str
    scale: float
    groups: int = 1

    def matrix(self, state: Mapping[str, Tensor]) -> Tensor:
        """The effective weight as (groups, C_out/groups, rest), float64."""
        w = state[self.key].detach().double() * self.scale
        return w.reshape(self.groups, w.shape[0] // self.groups, -1)


def layers(model: nn.Module) -> list[Layer] | None:
    """The layers of `model` in registration order (see the module docstring); None when a
    layer's weight is not a parameter of the model (e.g. a ``parametrize``d weight), so that it
    cannot be read from a state."""
    keys = {id(p): k for k, p in model.named_parameters()}
    out, seen = [], set()
    for name, m in model.named_modules():
        kind = scaled_map(m)
        if not (kind or isinstance(m, LAYERS)):
            continue
        key = keys.get(id(getattr(m, "weight", None)))
        if key is None:
            return None
        if key not in seen:
            seen.add(key)
            scale = float(m.w_scale) if kind else 1.0
            out.append(Layer(name, key, scale, int(getattr(m, "groups", 1))))
    return out


def parameter_scales(model: nn.Module) -> dict[str, float]:
    """Per parameter key, the factor between the parameter and its effective value in the
    network: ``w_scale`` / ``b_scale`` for the weight / bias of a ScaledLinearMap, else 1."""
    keys = {id(p): k for k, p in model.named_parameters()}
    scales = dict.fromkeys(keys.values(), 1.0)
    for m in model.modules():
        if scaled_map(m):
            scales[keys[id(m.weight)]] = float(m.w_scale)
            bias = getattr(m, "bias", None)
            if bias is not None and id(bias) in keys:
                scales[keys[id(bias)]] = float(m.b_scale)
    return scales


def _log(x: float) -> float:
    """log x, −∞ at 0 (a layer of zeros: the product of norms is 0, a value, not an error)."""
    return math.log(x) if x > 0 else -math.inf


def _norm_measures(model: nn.Module, final: P.State, init: P.State | None) -> dict[str, float]:
    nan = math.nan
    found = layers(model)
    names = ("log_prod_frobenius", "sum_frobenius", "log_prod_spectral", "sum_spectral",
             "dist_from_init")
    if not found:
        why = "it has no nn.Linear / nn.Conv / ScaledLinearMap layer" if found is not None else \
            "a layer's weight is not a parameter of the model (parametrized?)"
        logger.warning("baseline norm measures are NaN: %s", why)
        return dict.fromkeys(names, nan)
    d = len(found)
    log_fro, log_spec, dist = 0.0, 0.0, 0.0
    for layer in found:
        w = layer.matrix(final)
        log_fro += _log(float(w.square().sum()))
        log_spec += 2.0 * _log(float(torch.linalg.matrix_norm(w, ord=2).max()))
        if init is not None:
            dist += float((w - layer.matrix(init)).square().sum())
    return {"log_prod_frobenius": log_fro, "sum_frobenius": d * math.exp(log_fro / d),
            "log_prod_spectral": log_spec, "sum_spectral": d * math.exp(log_spec / d),
            "dist_from_init": dist if init is not None else nan}


# ----------------------------------------------------------------------------- path norm

_PATH_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.Identity,
                 nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d,
                 nn.ZeroPad3d)
"""Modules under which the squared network's forward on non-negative inputs is a sum over paths
of products of non-negative edge weights: linear maps, ReLU (the identity there), and fixed
linear maps with non-negative coefficients (pooling by averages, reshapes, eval-mode dropout)."""
_PATH_FUNCTIONS = {operator.add, operator.getitem, getattr, torch.add, torch.relu, F.relu,
                   torch.flatten, torch.cat, torch.mean, torch.sum, torch.reshape, torch.squeeze,
                   torch.unsqueeze, torch.transpose, torch.permute, F.avg_pool1d, F.avg_pool2d,
                   F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.dropout}
_PATH_METHODS = {"view", "reshape", "flatten", "unflatten", "mean", "sum", "relu", "permute",
                 "transpose", "contiguous", "squeeze", "unsqueeze", "size", "dim", "add", "expand"}
_SCALINGS = {operator.mul, operator.truediv, torch.mul}


class _PathTracer(fx.Tracer):
    """Keeps ScaledLinearMap modules as leaves (decided before tracing: while it traces, fx
    hands out proxies for parameters, which :func:`scaled_map` does not recognize)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.scaled = {id(m) for m in model.modules() if scaled_map(m)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.scaled or super().is_leaf_module(m, qualname)


def _path_norm_obstacle(model: nn.Module) -> str | None:
    """Why the squared-weights forward of `model` is not its path norm, or None when it is."""
    try:
        graph = _PathTracer(model).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: the forward cannot be checked
        return f"torch.fx cannot trace its forward ({first_line(exc, 80)})"
    for node in graph.nodes:
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if not (scaled_map(m) or isinstance(m, _PATH_MODULES)):
                return f"module {node.target!r} is a {type(m).__name__}"
        elif node.op == "get_attr":
            return f"{node.target!r} is used outside a linear layer"
        elif node.op == "call_function":
            f = node.target
            if f in _SCALINGS:
                if not _positive_scaling(node):
                    return f"it multiplies by {node.args!r} (not a positive constant)"
            elif f in (operator.add, torch.add) and not _all_nodes(node):
                return "it adds a constant"
            elif f is F.dropout and node.kwargs.get("training", True) is not False:
                return "it calls F.dropout in training mode"
            elif f not in _PATH_FUNCTIONS:
                return f"it calls {getattr(f, '__name__', f)!s}"
        elif node.op == "call_method":
            if node.target not in _PATH_METHODS:
                return f"it calls .{node.target}()"
            if node.target == "add" and not _all_nodes(node):
                return "it adds a constant"
    return None


def _all_nodes(node: fx.Node) -> bool:
    return all(isinstance(a, fx.Node) for a in node.args)


def _positive_scaling(node: fx.Node) -> bool:
    a, b = node.args[:2]
    if node.target is operator.truediv:
        return isinstance(a, fx.Node) and isinstance(b, (int, float)) and b > 0
    nodes = [x for x in (a, b) if isinstance(x, fx.Node)]
    numbers = [x for x in (a, b) if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return len(nodes) == 1 and len(numbers) == 1 and numbers[0] > 0


def log_path_norm(model: nn.Module, state: Mapping[str, Tensor],
                  input_shape: Sequence[int]) -> float:
    """log Σ_k f_{w∘w}(𝟏)[k] (see the module docstring), computed in float64; NaN with a
    logged warning when it is not defined for `model`. `input_shape`: one example's shape."""
    obstacle = _path_norm_obstacle(model)
    if obstacle is not None:
        logger.warning("baseline.log_path_norm is NaN: the path norm (a forward with squared "
                       "weights) is defined for ReLU networks of linear maps, and %s", obstacle)
        return math.nan
    scales = parameter_scales(model)
    params, buffers = P.split_state(model, dict(state))
    # a scaled layer computes scale·p: storing scale·p² makes it apply (scale·p)²
    squared = {k: scales[k] * v.double().square() for k, v in params.items()}
    squared |= {k: v.double() if v.is_floating_point() else v for k, v in buffers.items()}
    ones = torch.ones((1, *input_shape), dtype=torch.float64)
    with torch.no_grad():
        out = functional_call(model, squared, (ones,))
    return _log(float(out.sum()))


# ----------------------------------------------------------------------------- PAC-Bayes σ'


@dataclass(frozen=True)
class SigmaSearch:
    """Outcome of :func:`sigma_search`: σ' (NaN when not found), the deviation there, whether it
    is within the tolerance of the target, and how many σ were evaluated."""

    sigma: float
    deviation: float
    converged: bool
    evaluations: int


def sigma_search(deviation: Callable[[float], float], *, target: float = 0.1,
                 tolerance: float = 0.01, steps: int = 20, start: float = SIGMA_START,
                 doublings: int = SIGMA_DOUBLINGS) -> SigmaSearch:
    """The σ' of Jiang et al.'s PAC-Bayes measures by bisection (see the module docstring).

    `deviation(σ)`: the mean 0–1 error's deviation from the trained network's under noise of
    standard deviation σ (≥ 0, growing with σ up to Monte-Carlo noise). The bracket [0, start]
    is doubled until deviation(hi) ≥ target − tolerance (at most `doublings` times: otherwise
    σ' is NaN); then up to `steps` bisection steps stop at the first σ whose deviation is within
    `tolerance` of `target`; if none is (a deviation that jumps across the band, as the 0–1
    error of a few examples does), σ' is the last σ tried, within 2^-steps of the jump.
    """
    evaluations = 0

    def at(sigma: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return float(deviation(sigma))

    lo, hi = 0.0, float(start)
    dev = at(hi)
    for _ in range(doublings):
        if dev >= target - tolerance:
            break
        lo, hi = hi, 2.0 * hi
        dev = at(hi)
    else:
        if dev < target - tolerance:
            return SigmaSearch(math.nan, dev, False, evaluations)
    if abs(dev - target) <= tolerance:
        return SigmaSearch(hi, dev, True, evaluations)
    mid = hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        dev = at(mid)
        if abs(dev - target) <= tolerance:
            return SigmaSearch(mid, dev, True, evaluations)
        if dev > target:
            hi = mid
        else:
            lo = mid
    return SigmaSearch(mid, dev, False, evaluations)


def _noise_draws(center: P.State, scales: Mapping[str, float], sigma: float, draws: Sequence[int],
                 seed: int) -> Edit:
    """A stack of the given draws s: θ_k + (σ / scale_k) · z_{s,k} for every perturbed key k (in
    state order), z_s from ``generator(seed, "pacbayes", s)`` (the same z at every σ)."""
    stack = []
    for s in draws:
        g = generator(seed, "pacbayes", s)
        params: dict[str, Tensor] = {}
        for key, scale in scales.items():
            unit = P.Unit(key, (), (key,))
            params |= noise_edit(unit, center, sigma / abs(scale), 1, generator=g).params
        stack.append(Edit(params=params, size=1))
    return stack_edits(stack)


# ----------------------------------------------------------------------------- baselines


def baselines(subject, *, split: str = "train", n: int | None = None, seed: int = 0,
              device: str | torch.device = "auto", batch_size: int | None = None,
              memory_budget: int | None = None, sharpness_samples: int = 8,
              sharpness_target: float = 0.1, sharpness_tolerance: float = 0.01,
              sharpness_steps: int = 20) -> dict[str, float]:
    """Jiang et al.'s baseline measures of `subject`'s trained network (θ^F), keyed
    ``"baseline.<name>"`` in the order of :data:`BASELINES`; definitions, units and references
    in the module docstring. NaN (never a made-up number) with a logged warning where a measure
    is not defined: no θ⁰ (``dist_from_init``, ``pacbayes_sharpness``), a network that is not a
    ReLU network of linear maps (``log_path_norm``), a non-positive margin, no σ'.

    Args:
        subject, split, n, seed, device, batch_size, memory_budget: the shared options
            (:mod:`genprobe.options`); the margin and the PAC-Bayes search use the
            seeded class-balanced subset of `n` examples of `split` (default: all of it).
        sharpness_samples: noise draws per σ in the Monte-Carlo mean (cost: each bisection step
            evaluates this many perturbed networks on the data; ~5–25 steps).
        sharpness_target: the deviation of the 0–1 error that defines σ' (0.1, Jiang et al.).
        sharpness_tolerance: how close to the target the deviation must come (0.01).
        sharpness_steps: the most bisection steps after bracketing.

    The caller's model and the subject are never modified (states are read, networks evaluated
    with ``torch.func.functional_call`` or the variants engine's private copy).
    """
    check_subject(subject, "baselines")
    check_split(split)
    check_int("seed", seed)
    sharpness_samples = check_int("sharpness_samples", sharpness_samples, 1)
    sharpness_steps = check_int("sharpness_steps", sharpness_steps, 1)
    sharpness_target = check_number("sharpness_target", sharpness_target, low=1e-6, high=1.0)
    sharpness_tolerance = check_number("sharpness_tolerance", sharpness_tolerance, low=0.0,
                                       high=sharpness_target)
    model, final, init = subject.model, subject.final, subject.init
    data = split_data(subject, split, n=n, per_class=None, seed=seed)
    if len(data) == 0:
        raise ConfigError(f"the {split} split is empty: the baselines need data")
    check_resources(batch_size=batch_size, memory_budget=memory_budget, device=device)
    options_checked()
    if init is None:
        logger.warning("baseline.dist_from_init and baseline.pacbayes_sharpness are NaN: they need "
                       "the initial state θ⁰ (pass init=<state_dict at init> to Subject)")
    out = {"params": float(sum(final[k].numel() for k in P.state_keys(model)[0]))}
    out |= _norm_measures(model, final, init)
    first = inputs.take(data.x, slice(0, 1))
    if isinstance(first, Tensor) and first.is_floating_point():
        out["log_path_norm"] = log_path_norm(model, final, tuple(first.shape[1:]))
    else:
        out["log_path_norm"] = _nan("log_path_norm", "the inputs are not floating point")
    out |= _pacbayes(subject, data, init, seed=seed, device=device, batch_size=batch_size,
                     memory_budget=memory_budget, samples=sharpness_samples,
                     target=sharpness_target, tolerance=sharpness_tolerance,
                     steps=sharpness_steps, m=len(subject.data(split)))
    out["inverse_margin"] = _inverse_margin(model, final, data, batch_size=batch_size,
                                            device=device)
    return {PREFIX + name: float(out[name]) for name in BASELINES}


def _nan(name: str, why: str) -> float:
    logger.warning("baseline.%s is NaN: %s", name, why)
    return math.nan


def _pacbayes(subject, data, init, *, seed, device, batch_size, memory_budget, samples, target,
              tolerance, steps, m) -> dict[str, float]:
    model, final = subject.model, subject.final
    scales = {k: s for k, s in parameter_scales(model).items()
              if s != 0.0 and final[k].is_floating_point()}
    if not scales:
        why = "the network has no parameter to perturb"
        return {"pacbayes_flatness": _nan("pacbayes_flatness", why),
                "pacbayes_sharpness": _nan("pacbayes_sharpness", why)}
    ev = VariantEvaluator(model, final, data, batch_size=batch_size, device=device,
                          memory_budget=memory_budget)
    base_error = float(ev.evaluate([Edit()])[0].error)
    draws = list(range(samples))
    with progress.task("baselines: PAC-Bayes sigma search") as bar:
        def deviation(sigma: float) -> float:
            errors = ev.evaluate([_noise_draws(final, scales, sigma, draws, seed)])[0].error
            bar.advance()
            return abs(float(errors.double().mean()) - base_error)

        found = sigma_search(deviation, target=target, tolerance=tolerance, steps=steps)
    sigma = found.sigma
    if not math.isfinite(sigma):
        why = (f"no noise level up to σ = {SIGMA_START * 2 ** SIGMA_DOUBLINGS:g} moves the 0–1 "
               f"error by {target:g} from {base_error:.3f} (at most {found.deviation:.3f})")
        return {"pacbayes_flatness": _nan("pacbayes_flatness", why),
                "pacbayes_sharpness": _nan("pacbayes_sharpness", why)}
    flatness = 1.0 / sigma**2
    if init is None:
        return {"pacbayes_flatness": flatness, "pacbayes_sharpness": math.nan}
    distance = sum(s**2 * float((final[k].double() - init[k].double()).square().sum())
                   for k, s in scales.items())
    sharpness = distance / (4.0 * sigma**2) + math.log(m / sigma) + PACBAYES_CONSTANT
    return {"pacbayes_flatness": flatness, "pacbayes_sharpness": sharpness}


def _inverse_margin(model, final, data, *, batch_size, device) -> float:
    out = model_logits(model, final, data.x, batch_size=batch_size, device=device).double()
    if out.dim() != 2 or out.shape[1] < 2:
        return _nan("inverse_margin", f"the outputs have shape {tuple(out.shape)}, not (N, K ≥ 2)")
    rows = torch.arange(len(out))
    correct = out[rows, data.y]
    others = out.clone()
    others[rows, data.y] = -math.inf
    margins = correct - others.max(dim=1).values
    k = max(1, int(len(margins) * MARGIN_QUANTILE))
    gamma = float(margins.kthvalue(k).values)
    if not gamma > 0:
        return _nan("inverse_margin", f"the margin's {MARGIN_QUANTILE:.0%} percentile is "
                    f"{gamma:.4g} ≤ 0 (more than a tenth of the examples are misclassified)")
    return 1.0 / gamma**2


__all__ = ["BASELINES", "LAYERS", "Layer", "PREFIX", "SigmaSearch", "baselines", "layers",
           "log_path_norm", "parameter_scales", "sigma_search"]
