"""Per-example gradient rules: the layerwise route of :mod:`genprobe.engine.grams`.

A rule turns what one call of a module saw, its input ``a`` (n, ...) and the gradients ``b``
(n, K', ...) of K' objectives with respect to its output, into the exact per-example gradients
of the module's own parameters, {local name: (n, K', *param shape)} (the BackPACK / Opacus
route). Rules exist for ``nn.Linear``, ``nn.Conv2d`` (groups=1, zero padding), eval-mode
``BatchNorm`` and ``nn.LayerNorm``, and for any module that follows the
:class:`ScaledLinearMap` protocol (layers with an NTK scaling, e.g. the zoo's). The engine
checks every rule against autograd on one example before using it, so a module that matches a
rule's description but computes something else is moved to ``vmap(grad)``, never computed wrong.

:func:`module_gram` turns a module's calls into its Gram contribution, by the cheaper of the
product of per-example gradients and a contraction that never forms them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rule = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
"""``rule(module, a (n, ...), b (n, K', ...)) -> {local name: (n, K', *param shape)}``."""

LINEAR_MAPS = ("linear", "conv2d")


class ScaledLinearMap(Protocol):
    """A linear map whose parameters are scaled in the forward (the NTK parameterization).

    A module follows the protocol when it has these attributes and its forward is exactly

    - ``linear_map == "linear"``: ``F.linear(x, w_scale * weight, b_scale * bias)``, with
      ``weight`` of shape (out, in);
    - ``linear_map == "conv2d"``: ``F.conv2d(x, w_scale * weight, b_scale * bias, stride,
      padding, dilation)``, with ``weight`` (C_out, C_in, kH, kW) and the optional attributes
      ``stride``, ``padding`` (an int or a pair, not a string), ``dilation`` (an int or a pair;
      defaults 1, 0, 1) and ``groups`` (default 1; any other value has no rule).

    ``bias`` may be ``None`` or absent; ``w_scale`` and ``b_scale`` are real numbers (not
    tensors); the module owns no parameters but ``weight`` and ``bias``. Nothing is imported or
    subclassed: declaring the attributes is enough, and the engine checks the rule against
    autograd at setup, so a module declaring the protocol wrongly is still computed exactly
    (through ``vmap(grad)``).
    """

    weight: Tensor
    bias: Tensor | None
    w_scale: float
    b_scale: float
    linear_map: Literal["linear", "conv2d"]


def scaled_map(m: nn.Module) -> str | None:
    """The ``linear_map`` of a module following :class:`ScaledLinearMap`, else None."""
    kind = getattr(m, "linear_map", None)
    if not isinstance(kind, str) or kind not in LINEAR_MAPS:
        return None
    weight = getattr(m, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != (2 if kind == "linear" else 4):
        return None
    scales = (getattr(m, "w_scale", None), getattr(m, "b_scale", None))
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scales):
        return None
    if any(name not in ("weight", "bias") for name, _ in m.named_parameters(recurse=False)):
        return None
    if kind == "conv2d" and (getattr(m, "groups", 1) != 1 or isinstance(getattr(m, "padding", 0), str)):
        return None
    return kind


def _bias(m: nn.Module) -> Tensor | None:
    return getattr(m, "bias", None)


def _scales(m: nn.Module) -> tuple[float, float]:
    """(weight, bias) multipliers between the parameters and the effective linear map."""
    return (float(m.w_scale), float(m.b_scale)) if scaled_map(m) else (1.0, 1.0)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _geometry(m: nn.Module) -> tuple[tuple, tuple, tuple, tuple]:
    """(kernel_size, stride, padding, dilation) of a convolution."""
    if isinstance(m, nn.Conv2d):
        return m.kernel_size, m.stride, m.padding, m.dilation
    return (tuple(m.weight.shape[2:]), _pair(getattr(m, "stride", 1)), _pair(getattr(m, "padding", 0)),
            _pair(getattr(m, "dilation", 1)))


def _scaled(t: Tensor, scale: float) -> Tensor:
    return t if scale == 1.0 else t * scale


# ----------------------------------------------------------------------------- linear maps


def _linear_grads(m: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:  # bilinear in (a, b)
    n, kk = b.shape[:2]
    a3 = a.reshape(n, -1, a.shape[-1])  # (n, T, in)
    b4 = b.reshape(n, kk, -1, b.shape[-1])  # (n, K', T, out)
    ws, bs = _scales(m)
    out = {"weight": _scaled(torch.einsum("nkto,nti->nkoi", b4, a3), ws)}
    if _bias(m) is not None:
        out["bias"] = _scaled(b4.sum(2), bs)
    return out


def _conv_grads(m: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Per-example weight gradients as one grouped convolution backward (groups = examples):
    the same arithmetic as the batch weight gradient, without unfolding the input."""
    n, kk = b.shape[:2]
    c_out = m.weight.shape[0]
    _, stride, padding, dilation = _geometry(m)
    a_g = a.reshape(1, n * a.shape[1], *a.shape[2:])
    shape = torch.empty(n * c_out, *m.weight.shape[1:], dtype=a.dtype, device=a.device)
    per_k = []
    for k in range(kk):  # an output Jacobian: one grouped backward per output
        b_g = b[:, k].reshape(1, n * c_out, *b.shape[3:])
        _, gw, _ = torch.ops.aten.convolution_backward(
            b_g, a_g, shape, None, list(stride), list(padding), list(dilation), False,
            [0, 0], n, [False, True, False])
        per_k.append(gw.reshape(n, *m.weight.shape))
    ws, bs = _scales(m)
    out = {"weight": _scaled(per_k[0].unsqueeze(1) if kk == 1 else torch.stack(per_k, 1), ws)}
    if _bias(m) is not None:
        out["bias"] = _scaled(b.flatten(3).sum(-1), bs)
    return out


def _unfold(m: nn.Module, a: Tensor) -> Tensor:
    """The inputs a linear map sees at each position: (n, T, features)."""
    if rule(m) is _conv_grads:
        kernel, stride, padding, dilation = _geometry(m)
        u = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
        return u.transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def outer(f: Tensor, split: int | None = None) -> Tensor:
    """f fᵀ for rows f (R, D), or with `split` only its cross block f[:split] f[split:]ᵀ."""
    return f @ f.T if split is None else f[:split] @ f[split:].T


def _linear_gram(m: nn.Module, a: Tensor, b: Tensor, traced: bool, split: int | None) -> Tensor:
    """(A Aᵀ) ⊙ (B Bᵀ) (+ B Bᵀ for the bias): a 2-D Linear's Gram without forming g_i. Traced:
    Σ_k B_k B_kᵀ is one product of the rows (n, K'·out). `split`: examples [:split] against
    [split:] only."""
    n, kk = b.shape[:2]
    if traced:
        gb = outer(b.reshape(n, -1), split)  # (n, n)
        ga = outer(a, split)
    else:
        gb = outer(b.reshape(n * kk, -1), None if split is None else split * kk)  # (R, R)
        ga = outer(a, split).repeat_interleave(kk, 0).repeat_interleave(kk, 1)
    ws, bs = _scales(m)
    return (ga * gb * ws**2 + (gb * bs**2 if _bias(m) is not None else 0)).double()


def _contracted_gram(m: nn.Module, a: Tensor, b: Tensor, traced: bool, split: int | None) -> Tensor:
    """Gram of a weight-shared linear map (conv, or Linear over positions) without per-example
    gradients: G_(ik),(jl) = Σ_{t,s} (u_it · u_js)(b_ikt · b_jls), (+ bias term). Traced:
    G_ij = Σ_k G_(ik),(jk), with the sum over k inside the products. `split`: examples
    [:split] against [split:] only."""
    n, kk = b.shape[:2]
    n1 = n if split is None else split
    n2 = n if split is None else n - split
    u = _unfold(m, a)  # (n, T, F)
    t = u.shape[1]
    if rule(m) is _conv_grads:
        bt = b.flatten(3).transpose(2, 3)  # (n, K', T, C_out)
    else:
        bt = b.reshape(n, kk, t, -1)
    rows_t = None if split is None else split * t
    uu = outer(u.reshape(n * t, -1), rows_t).reshape(n1, 1, t, n2, 1, t)
    ws, bscale = _scales(m)
    if traced:
        bf = bt.transpose(1, 2).reshape(n * t, -1)  # (n T, K' C_out)
        g = (uu.reshape(n1, t, n2, t) * outer(bf, rows_t).reshape(n1, t, n2, t)).sum((1, 3)) * ws**2
        if _bias(m) is not None:
            g = g + outer(bt.sum(2).reshape(n, -1), split) * bscale**2
        return g.double()
    bf = bt.reshape(n * kk * t, -1)
    bb = outer(bf, None if split is None else split * kk * t).reshape(n1, kk, t, n2, kk, t)
    g = (uu * bb).sum((2, 5)) * ws**2  # (n1, K', n2, K')
    if _bias(m) is not None:
        bs = bt.sum(2).reshape(n * kk, -1)
        g = g + outer(bs, None if split is None else split * kk).reshape(n1, kk, n2, kk) * bscale**2
    return g.reshape(n1 * kk, n2 * kk).double()


def _contract_is_cheaper(m: nn.Module, a: Tensor, b: Tensor) -> bool:
    """Compare the work of the contraction, ~(n K' T)² (F + C_out), with per-example gradients,
    ~n K' P_l (T + n K'); the contraction wins when T² is small against C_out (late conv
    stages, short sequences)."""
    if _FORCE_CONTRACTION is not None:
        return _FORCE_CONTRACTION
    n, kk = b.shape[:2]
    p = m.weight.numel()
    features = p // m.weight.shape[0]
    t = b[0, 0].numel() // m.weight.shape[0]
    if t == 1:
        return True
    contract = (n * kk * t) ** 2 * (features + m.weight.shape[0])
    materialize = n * kk * p * (t + n * kk)
    return contract < materialize


_FORCE_CONTRACTION: bool | None = None
"""Tests set this to force (True) or forbid (False) the contraction route; None: by cost."""


# ----------------------------------------------------------------------------- norm layers


def _norm_grads(xhat: Tensor, b: Tensor, m: nn.Module, channel_dim: int | None) -> dict[str, Tensor]:
    n, kk = b.shape[:2]
    if channel_dim is not None:  # BatchNorm: sum over every dim but the channel
        dims = [d for d in range(2, b.dim()) if d != channel_dim + 1]
        gw = (b * xhat.unsqueeze(1)).sum(dims) if dims else b * xhat.unsqueeze(1)
        gb = b.sum(dims) if dims else b
    else:  # LayerNorm: sum over the leading positions, keep the normalized shape
        shape = m.normalized_shape
        bw = b.reshape(n, kk, -1, *shape)
        gw = (bw * xhat.reshape(n, 1, -1, *shape)).sum(2)
        gb = bw.sum(2)
    out = {}
    if m.weight is not None:
        out["weight"] = gw
    if m.bias is not None:
        out["bias"] = gb
    return out


def _batchnorm_xhat(m: nn.Module, a: Tensor) -> Tensor:
    shape = [1, -1] + [1] * (a.dim() - 2)
    return (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)


def _layernorm_xhat(m: nn.Module, a: Tensor) -> Tensor:
    dims = tuple(range(a.dim() - len(m.normalized_shape), a.dim()))
    mean = a.mean(dims, keepdim=True)
    var = a.var(dims, keepdim=True, unbiased=False)
    return (a - mean) / torch.sqrt(var + m.eps)


def _batchnorm_grads(m: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """`a` is the normalized input x̂ (see :func:`rule_input`)."""
    return _norm_grads(a, b, m, channel_dim=1)


def _layernorm_grads(m: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    return _norm_grads(_layernorm_xhat(m, a), b, m, channel_dim=None)


# ----------------------------------------------------------------------------- dispatch


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def rule(m: nn.Module) -> Rule | None:
    """The per-example gradient rule of a module, or None when it has none (→ vmap)."""
    kind = scaled_map(m)
    if kind is not None:
        return _linear_grads if kind == "linear" else _conv_grads
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return _linear_grads
    if (isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
        return _conv_grads
    if type(m) in _BN and m.affine and m.track_running_stats and not m.training:
        return _batchnorm_grads
    if isinstance(m, nn.LayerNorm) and type(m) is nn.LayerNorm and m.elementwise_affine:
        return _layernorm_grads
    return None


def is_dense_rule(m: nn.Module) -> bool:
    """Whether `m` takes the linear-map rule (an ``nn.Linear`` or a ScaledLinearMap "linear"):
    on 2-D inputs its Gram is (A Aᵀ) ⊙ (B Bᵀ), with no per-example gradient formed."""
    return rule(m) is _linear_grads


def rule_input(m: nn.Module, a: Tensor) -> Tensor:
    """What a rule needs from a call's input, taken while the call runs: BatchNorm's x̂ uses the
    running statistics of the state being evaluated, which are only swapped in during the call."""
    a = a.detach()
    return _batchnorm_xhat(m, a) if rule(m) is _batchnorm_grads else a


def _magnitudes(m: nn.Module, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Per-example gradients with every product term replaced by its magnitude (|b|·|a| for a
    linear map, |b|·|x̂| for a norm layer): the scale of the rounding error of the gradients."""
    r = rule(m)
    if r is _batchnorm_grads:
        return _norm_grads(a.abs(), b.abs(), m, channel_dim=1)
    if r is _layernorm_grads:
        return _norm_grads(_layernorm_xhat(m, a).abs(), b.abs(), m, channel_dim=None)
    return {k: g.abs() for k, g in r(m, a.abs(), b.abs()).items()}


def module_gram(mod: nn.Module, inputs: list[Tensor], bs: list[Tensor], verify: bool,
                traced: bool = False, split: int | None = None
                ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """One module's Gram contribution over all its calls (`inputs` from :func:`rule_input`,
    `bs` (n, K', *out shape) per call): (R, R) with R = n·K' rows, or (n, n) summed over the
    K' rows of each example when `traced`; with `split`, only the cross block of examples
    [:split] against [split:]; when verifying (never with `split`), also per parameter
    the sum of its per-row gradients and the sum of the magnitudes of every term that went into
    it (the scale of rounding errors). Verification takes the per-example route."""
    r = rule(mod)
    n, kk = bs[0].shape[:2]
    rows = n if traced else n * kk
    split_rows = None if split is None else (split if traced else split * kk)
    if not verify and len(inputs) == 1 and r in (_linear_grads, _conv_grads):
        a, b = inputs[0], bs[0]
        if r is _linear_grads and a.dim() == 2:
            return _linear_gram(mod, a, b, traced, split), {}
        if _contract_is_cheaper(mod, a, b):
            return _contracted_gram(mod, a, b, traced, split), {}
    grads: dict[str, Tensor] = {}
    for a, b in zip(inputs, bs, strict=True):  # a shared module: sum its calls per example
        for local, g in r(mod, a, b).items():
            grads[local] = grads[local] + g if local in grads else g
    total = 0
    for g in grads.values():  # (n, K', *shape): traced rows concatenate an example's K' rows
        total = total + outer(g.reshape(rows, -1), split_rows).double()
    if not verify:
        return total, {}
    scale: dict[str, Tensor] = {}
    for a, b in zip(inputs, bs, strict=True):
        for local, g in _magnitudes(mod, a, b).items():
            g = g.sum((0, 1))
            scale[local] = scale[local] + g if local in scale else g
    return total, {local: (g.sum((0, 1)), scale[local]) for local, g in grads.items()}


def rules_match(ours: dict[str, tuple[Tensor, Tensor]], batch: dict[str, Tensor | None],
                keys: dict[str, str]) -> bool:
    """Whether the summed per-row gradients of :func:`module_gram` equal autograd's batch
    gradient `batch` ({state key: gradient}), parameter by parameter (`keys`: local name →
    state key), up to rounding (relative to the summed magnitudes of the terms, which bounds
    cancellation)."""
    for local, key in keys.items():
        ref = batch[key]
        if local not in ours:
            if ref is not None and float(ref.abs().max()) > 0:
                return False
            continue
        got, scale = ours[local]
        if ref is None:
            ref = torch.zeros_like(got)
        tol = 1e-9 if got.dtype == torch.float64 else 1e-4
        if float((got - ref).norm()) > tol * float(scale.norm()) + 1e-30:
            return False
    return True


__all__ = ["LINEAR_MAPS", "Rule", "ScaledLinearMap", "is_dense_rule", "module_gram", "outer", "rule", "rule_input",
           "rules_match", "scaled_map"]
