"""Infinite-width NNGP and NTK kernels by the layer recursions (Xiao, Pennington & Schoenholz 2020).

Architectures (``arch``), every layer with the same σ_w², σ_b², in the NTK parameterization,
with exactly the conventions of neural-tangents' ``stax`` (so results compare number for number
with ``stax.serial(..., stax.Dense(K, W_std=σ_w, b_std=σ_b))[2]``):

- ``fcn``: ``depth`` × [Dense, activation], then a Dense readout. Inputs of any rank ≥ 2 are
  flattened to (N, D).
- ``cnn-flatten``: ``depth`` × [stride-1 convolution with ``padding='SAME'`` (zero padding) of
  width ``filter_size`` along every spatial dimension, activation], then Flatten and a Dense
  readout. Inputs (N, C, L) (1-D) or (N, C, H, W) (2-D).
- ``cnn-gap``: the same convolutions, then GlobalAvgPool and a Dense readout.

``depth`` counts hidden layers: ``depth=0`` is the readout applied to the inputs.

The recursion, per pair of inputs (x, x') and per pair of pixels (p, p'):

- input: K⁰(p, p') = x[:, p]·x'[:, p'] / C (a vector input is one pixel of C = D features),
  Θ⁰ = 0;
- Dense / SAME conv: K ← σ_w² A(K) + σ_b², Θ ← σ_w² A(Θ) + K (the new K), where A is the identity
  for Dense and, for a conv, the mean over the k (1-D) or k×k (2-D) filter offsets δ of
  K(p + δ, p' + δ), zero padding counted as zeros (divided by k^d, not by the in-bounds count);
- activation: K ← E[φ(u)φ(v)], Θ ← E[φ'(u)φ'(v)]·Θ, with (u, v) centred Gaussian of covariance
  [[K(x,x)(p,p), K(p,p')], [K(p,p'), K(x',x')(p',p')]], in closed form:
  ReLU (Cho & Saul's arc-cosine kernel): E[φφ] = √(Σ₁₁Σ₂₂)(sin θ + (π − θ) cos θ)/(2π),
  E[φ'φ'] = (π − θ)/(2π), cos θ = Σ₁₂/√(Σ₁₁Σ₂₂) (a zero variance counts as cos θ = 0, i.e.
  φ'(0) = ½); erf: E[φφ] = (2/π) arcsin(2Σ₁₂/√((1 + 2Σ₁₁)(1 + 2Σ₂₂))),
  E[φ'φ'] = (4/π)/√((1 + 2Σ₁₁)(1 + 2Σ₂₂) − 4Σ₁₂²);
- readout: Flatten averages K and Θ over the diagonal pixel pairs (p, p), GlobalAvgPool over all
  pixel pairs, then a Dense layer.

``fcn`` and ``cnn-flatten`` only ever need the diagonal pixel pairs (a SAME conv maps diagonal
pairs to diagonal pairs); ``cnn-gap`` needs all P² pixel pairs of every input pair, so the rows of
`x1` are processed ``batch_size`` at a time, against the columns of `x2` in chunks (each pair's
recursion is independent of the others', so a block of pairs runs through every layer at once).
The default block is as large as the memory budget (:mod:`genprobe.memory`) allows but no larger
than :data:`BLOCK_ELEMENTS` covariance entries, which keeps it in the processor's cache. Every depth of one pass is available at once (:func:`infinite_by_depth`):
the kernel of depth L is the L-th step of the recursion plus the readout. All arithmetic is
float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..device import resolve_device
from ..errors import ConfigError, DataError, check_choice
from ..memory import resolve_memory_budget
from ..options import check_int

Arch = Literal["fcn", "cnn-flatten", "cnn-gap"]
Activation = Literal["relu", "erf"]
ARCHS = ("fcn", "cnn-flatten", "cnn-gap")
ACTIVATIONS = ("relu", "erf")

LIVE_TENSORS = 6
"""How many block-sized float64 tensors the recursion holds at its peak (K, Θ, the conv's
output, two activation temporaries, one spare): a block may hold the memory budget divided by
8 × this many covariance entries."""
BLOCK_ELEMENTS = {"cpu": 2**18, "cuda": 2**25}
"""Covariance entries (block rows × columns × pixel pairs) of the default block per device type.
On a CPU, 2 MiB blocks stay in cache: one layer of an 8×8 cnn-gap took 33 ns per entry in blocks
of 1 × 100 pairs and 101 ns in blocks of 100 × 100 (one thread). On a GPU, larger blocks amortize
the kernel launches."""


@dataclass(frozen=True)
class InfiniteKernels:
    """The infinite-width kernels of one architecture between inputs `x1` and `x2`.

    Attributes:
        nngp: (N1, N2) float64, the NNGP kernel K (covariance of one output at initialization).
        ntk: (N1, N2) float64, the neural tangent kernel Θ of one output.
        arch, depth, activation, sigma_w2, sigma_b2, filter_size: what was computed.
        batch_size: rows of `x1` processed at a time.
        column_batch: columns of `x2` processed at a time, against each row batch.
    """

    nngp: Tensor
    ntk: Tensor
    arch: str
    depth: int
    activation: str
    sigma_w2: float
    sigma_b2: float
    filter_size: int
    batch_size: int
    column_batch: int


# ----------------------------------------------------------------------------- checks


def check_hyperparameters(sigma_w2, sigma_b2, activation) -> tuple[float, float]:
    """σ_w² > 0 and σ_b² ≥ 0 as floats, and a supported activation; ConfigError otherwise."""
    check_choice("activation", activation, ACTIVATIONS)
    for name, value, ok, what in (("sigma_w2", sigma_w2, lambda v: v > 0, "a positive number"),
                                  ("sigma_b2", sigma_b2, lambda v: v >= 0, "a number >= 0")):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{name} must be {what} (a variance), got {value!r}")
    return float(sigma_w2), float(sigma_b2)



def _as_inputs(x, name: str, arch: str, device: torch.device) -> Tensor:
    """`x` (array or tensor) as float64 on `device`: (N, D) for fcn, (N, C, *spatial) for CNNs."""
    try:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name} must be a numeric array or tensor, got {type(x).__name__} "
                        f"({' '.join(str(exc).split())[:80]})") from None
    if t.is_complex() or t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise DataError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if arch == "fcn":
        if t.dim() < 2:
            raise DataError(f"{name} has shape {tuple(t.shape)}; arch 'fcn' needs (N, D) or "
                            "(N, ...) inputs (flattened), with a leading example dimension")
        if t.shape[0] == 0:
            raise DataError(f"{name} has shape {tuple(t.shape)}: no examples")
        t = t.reshape(len(t), -1)
    elif t.dim() not in (3, 4):
        raise DataError(f"{name} has shape {tuple(t.shape)}; arch {arch!r} needs (N, C, L) (1-D) "
                        "or (N, C, H, W) (2-D) inputs")
    if t.shape[0] == 0 or t[0].numel() == 0:
        raise DataError(f"{name} has shape {tuple(t.shape)}: no examples or no features")
    t = t.to(device=device, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise DataError(f"{name} holds NaN or infinite values; clean or drop those inputs")
    return t


# ----------------------------------------------------------------------------- layer maps


@dataclass(frozen=True)
class _Net:
    """What the recursion needs to know about the architecture."""

    arch: str
    spatial: tuple[int, ...]  # () for fcn
    filter_size: int
    sigma_w2: float
    sigma_b2: float
    activation: str

    @property
    def full(self) -> bool:
        """Whether all pixel pairs are tracked (cnn-gap), not only the diagonal."""
        return self.arch == "cnn-gap"


def _shift_mean(t: Tensor, dim_groups: Sequence[Sequence[int]], k: int) -> Tensor:
    """SAME zero-padded stride-1 filter mean: for each group of dims (one spatial dimension, or
    the pair (p, p') of it in a full-spatial covariance), out[i] = (1/k) Σ_t t[i + t − lo] over the
    k offsets, every dim of a group shifted together (lo = (k − 1)//2, as XLA's SAME), values
    outside counted as zeros. Groups are independent (a k×k filter's offsets separate)."""
    lo = (k - 1) // 2
    for dims in dim_groups:
        n = t.shape[dims[0]]
        out = torch.zeros_like(t)
        for u in range(-lo, k - lo):
            if abs(u) >= n:
                continue
            src = [slice(None)] * t.dim()
            dst = [slice(None)] * t.dim()
            for d in dims:
                src[d] = slice(max(u, 0), n + min(u, 0))
                dst[d] = slice(max(-u, 0), n - max(u, 0))
            out[tuple(dst)] += t[tuple(src)]
        t = out.div_(k)
    return t


def _affine(net: _Net, t: Tensor, batch_dims: int, full: bool) -> Tensor:
    """σ_w² A(t) (no bias): A the identity (fcn) or the SAME conv's filter mean over the spatial
    dims after `batch_dims` leading dims (pairs of dims when `full`)."""
    if net.arch == "fcn" or net.filter_size == 1:
        return t * net.sigma_w2
    s = len(net.spatial)
    groups = [(batch_dims + d, batch_dims + s + d) if full else (batch_dims + d,) for d in range(s)]
    return _shift_mean(t, groups, net.filter_size).mul_(net.sigma_w2)


def _self_map(activation: str, var: Tensor) -> Tensor:
    """E[φ(u)²] for u ~ N(0, var), elementwise."""
    if activation == "relu":
        return var / 2
    return torch.asin(2 * var / (1 + 2 * var)).mul_(2 / math.pi)


def _self_deriv(activation: str, var: Tensor) -> Tensor:
    """E[φ'(u)²] for u ~ N(0, var), elementwise (ReLU at var = 0: φ'(0) = ½, as in the pair map)."""
    if activation == "relu":
        return torch.where(var > 0, 0.5, 0.25).to(var.dtype)
    return (1 + 4 * var).rsqrt().mul_(4 / math.pi)


def _pair_map(activation: str, cov: Tensor, var1: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """(E[φ(u)φ(v)], E[φ'(u)φ'(v)]) for (u, v) of variances var1, var2 (broadcast against `cov`)
    and covariance `cov` (see the module docstring for the closed forms)."""
    # in-place where possible: at most four covariance-sized tensors live at once
    if activation == "relu":
        sd1, sd2 = var1.sqrt(), var2.sqrt()
        inv1 = torch.where(sd1 > 0, 1 / sd1, torch.zeros_like(sd1))
        inv2 = torch.where(sd2 > 0, 1 / sd2, torch.zeros_like(sd2))
        cos = (cov * inv1).mul_(inv2).clamp_(-1.0, 1.0)
        deriv = torch.acos(cos).neg_().add_(math.pi).div_(2 * math.pi)  # (π − θ)/(2π)
        value = torch.mul(cos, cos).neg_().add_(1).clamp_(min=0).sqrt_()  # sin θ
        value.addcmul_(deriv, cos, value=2 * math.pi)  # + (π − θ) cos θ
        return value.mul_(sd1).mul_(sd2).div_(2 * math.pi), deriv
    a1, a2 = (1 + 2 * var1).rsqrt(), (1 + 2 * var2).rsqrt()
    s = (cov * a1).mul_(a2).mul_(2).clamp_(-1.0, 1.0)
    deriv = torch.mul(s, s).neg_().add_(1).rsqrt_().mul_(a1).mul_(a2).mul_(4 / math.pi)
    return torch.asin_(s).mul_(2 / math.pi), deriv


def _input_cov(net: _Net, x1: Tensor, x2: Tensor) -> Tensor:
    """K⁰ of every pair: fcn (B, N2); cnn-flatten (B, N2, *S); cnn-gap (B, N2, *S, *S)."""
    if net.arch == "fcn":
        return x1 @ x2.T / x1.shape[1]
    c = x1.shape[1]
    if not net.full:
        return torch.einsum("ic...,jc...->ij...", x1, x2) / c
    s = len(net.spatial)
    a, b = x1.flatten(2), x2.flatten(2)  # (B, C, P), (N2, C, P)
    k = torch.einsum("icp,jcq->ijpq", a, b) / c
    return k.reshape(len(x1), len(x2), *net.spatial, *net.spatial) if s > 1 else k


OVERFLOW = 1e300
"""A kernel entry beyond this is refused: float64 ends at 1.8e308, and the spectrum and the
mean prediction's solve need the margin."""


def overflow_depth(x: Tensor, sigma_w2: float, sigma_b2: float, activation: str,
                   max_depth: int) -> int | None:
    """The first depth (hidden layers, up to `max_depth`) at which the largest diagonal entry of
    the NTK of inputs `x` (as the recursion prepares them: (N, D), or (N, C, *S)) passes
    :data:`OVERFLOW`, or None. The diagonal recursion from the largest x·x/D (per pixel for
    CNNs, an upper bound there): q₁ = σ_w² m + σ_b², θ₁ = q₁;
    q_{l+1} = σ_w² E[φ²](q_l) + σ_b², θ_{l+1} = q_{l+1} + σ_w² E[φ'²](q_l) θ_l; at depth d the
    readout σ_w² E[φ²](q_d) + σ_b² + σ_w² E[φ'²](q_d) θ_d (depth 0: σ_w² m + σ_b²). Scalar
    Python floats: 100,000 layers take milliseconds."""
    m = float((x.double() * x.double()).mean(1).max())
    if activation == "relu":
        def square(q: float) -> float:
            return q / 2

        def slope(q: float) -> float:
            return 0.5
    else:
        def square(q: float) -> float:
            return 2 / math.pi * math.asin(2 * q / (1 + 2 * q)) if math.isfinite(q) else 1.0

        def slope(q: float) -> float:
            return 4 / math.pi / math.sqrt(1 + 4 * q) if math.isfinite(q) else 0.0

    with np.errstate(all="ignore"):
        top = sigma_w2 * m + sigma_b2
        if not top <= OVERFLOW:
            return 0
        q = theta = top  # layer 1
        for depth in range(1, max_depth + 1):  # the readout at depth d is θ_{d+1}
            q, theta = sigma_w2 * square(q) + sigma_b2, \
                sigma_w2 * square(q) + sigma_b2 + sigma_w2 * slope(q) * theta
            if not theta <= OVERFLOW:
                return depth
    return None


def check_depths(x: Tensor, depths: Sequence[int], sigma_w2: float, sigma_b2: float,
                 activation: str) -> None:
    """ConfigError (one line) when the deepest of `depths` takes the NTK of `x` past float64's
    range (:func:`overflow_depth`), naming the depth where it would."""
    at = overflow_depth(x, sigma_w2, sigma_b2, activation, max(depths))
    if at is None:
        return
    if at == 0:
        raise ConfigError(f"sigma_w2 = {sigma_w2:g} overflows float64 already at depth 0 (the "
                          f"kernel passes {OVERFLOW:g}); use a smaller sigma_w2")
    raise ConfigError(f"depth {max(depths)}: with sigma_w2 = {sigma_w2:g}, sigma_b2 = "
                      f"{sigma_b2:g} ({activation}) the NTK overflows float64 from depth {at} on "
                      f"(its largest diagonal entry passes {OVERFLOW:g}, by the recursion); use "
                      f"depths below {at}")


def _self_variances(net: _Net, x: Tensor, depth: int) -> list[Tensor]:
    """The pre-activation variance K(x, x)(p, p) entering each hidden layer's activation, layers
    1..depth: (N,) for fcn, (N, *S) for CNNs."""
    var = (x * x).mean(1)  # x·x/D (fcn), x[:, p]·x[:, p]/C per pixel (CNNs)
    out = []
    for layer in range(depth):
        if layer:
            var = _self_map(net.activation, var)
        var = _affine(net, var, 1, False).add_(net.sigma_b2)
        out.append(var)
    return out


def _broadcast(net: _Net, var1: Tensor, var2: Tensor) -> tuple[Tensor, Tensor]:
    """Views of the rows' variances (B, *S) and the columns' (N2, *S) that broadcast against a
    covariance of (B, N2, ...)."""
    s = len(net.spatial)
    b, n2 = var1.shape[0], var2.shape[0]
    if net.full:
        return var1.reshape(b, 1, *net.spatial, *([1] * s)), var2.reshape(1, n2, *([1] * s), *net.spatial)
    return var1.unsqueeze(1), var2.unsqueeze(0)


def _readout(net: _Net, k: Tensor, theta: Tensor | None) -> tuple[Tensor, Tensor]:
    """Pool (Flatten: diagonal mean; GAP: mean over all pairs) and the Dense readout -> (B, N2)."""
    if net.arch != "fcn":
        k = k.flatten(2).mean(2)
        theta = None if theta is None else theta.flatten(2).mean(2)
    nngp = k * net.sigma_w2 + net.sigma_b2
    ntk = nngp if theta is None else nngp + net.sigma_w2 * theta
    return nngp, ntk.clone()


def _pixel_diagonal(net: _Net, t: Tensor) -> Tensor:
    """A (B, N2, P) view of the same-pixel entries (p, p) of a covariance-shaped tensor."""
    b, n2 = t.shape[:2]
    if net.arch == "fcn":
        return t.unsqueeze(2)
    if not net.full:
        return t.view(b, n2, -1)
    p = math.prod(net.spatial)
    return t.view(b, n2, p, p).diagonal(dim1=2, dim2=3)


def _pin(net: _Net, value: Tensor, deriv: Tensor, pins: tuple[Tensor, Tensor], var: Tensor) -> None:
    """Set the activation's outputs at the same-pixel entries of identical input pairs (rows,
    cols) = `pins` to their exact values from the pre-activation variance `var` (B, ...), i.e.
    correlation exactly 1. Computed as a pair, the correlation of an input with itself carries
    rounding error, and in the chaotic phase (χ₁ > 1) c = 1 is an unstable fixed point: the error
    grows like χ₁ˡ and after ~200 layers would corrupt the kernel's diagonal."""
    rows, cols = pins
    v = var[rows].reshape(len(rows), -1)
    _pixel_diagonal(net, value)[rows, cols] = _self_map(net.activation, v)
    _pixel_diagonal(net, deriv)[rows, cols] = _self_deriv(net.activation, v)


def _block_pass(net: _Net, x1: Tensor, x2: Tensor, var1: list[Tensor], var2: list[Tensor],
               depths: Sequence[int], pins: tuple[Tensor, Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """The recursion for a block of rows against a block of columns; every depth of `depths`
    (ascending) read out on the way. `pins`: (row, column) positions of identical inputs (see :func:`_pin`)."""
    out = {}
    k = _input_cov(net, x1, x2)
    theta = None  # Θ⁰ = 0
    if depths[0] == 0:
        out[0] = _readout(net, k, theta)
    for layer in range(depths[-1]):
        k = _affine(net, k, 2, net.full).add_(net.sigma_b2)
        theta = k.clone() if theta is None else _affine(net, theta, 2, net.full).add_(k)
        v1, v2 = _broadcast(net, var1[layer], var2[layer])
        k, deriv = _pair_map(net.activation, k, v1, v2)
        if len(pins[0]):
            _pin(net, k, deriv, pins, var1[layer])
        theta.mul_(deriv)
        del deriv
        if layer + 1 in depths:
            out[layer + 1] = _readout(net, k, theta)
    return out


def _identical_pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(i, j) of every pair of identical inputs a[i] == b[j] (bitwise), as two long tensors."""
    columns: dict[bytes, list[int]] = {}
    for j, row in enumerate(b.reshape(len(b), -1).cpu().numpy()):
        columns.setdefault(row.tobytes(), []).append(j)
    pairs = [(i, j) for i, row in enumerate(a.reshape(len(a), -1).cpu().numpy())
             for j in columns.get(row.tobytes(), ())]
    index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return index[:, 0], index[:, 1]


# ----------------------------------------------------------------------------- public API


def _block_shape(net: _Net, n1: int, n2: int, batch_size: int | None, memory_budget: int | None,
                 device: torch.device) -> tuple[int, int]:
    """(rows, columns) of a block: see :data:`BLOCK_ELEMENTS` and :data:`LIVE_TENSORS`."""
    p = math.prod(net.spatial) if net.spatial else 1
    per_pair = p * p if net.full else p
    budget = resolve_memory_budget(memory_budget, device) // (8 * LIVE_TENSORS)
    entries = max(per_pair, min(budget, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cpu"])))
    pairs = entries // per_pair
    if batch_size is None:
        batch_size = max(1, min(n1, pairs // n2))
    rows = check_int("batch_size", batch_size, 1)
    return rows, max(1, min(n2, pairs // rows))


def infinite_by_depth(
    arch: Arch,
    x1,
    x2=None,
    *,
    depths: Sequence[int],
    sigma_w2: float,
    sigma_b2: float,
    activation: Activation = "relu",
    filter_size: int = 3,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str | torch.device = "auto",
) -> dict[int, InfiniteKernels]:
    """The kernels of `arch` at every depth of `depths`, from one pass through the recursion.

    Same arguments as :func:`infinite`, with `depths` (integers ≥ 0) instead of one depth.
    Returns ``{depth: InfiniteKernels}`` in ascending depth order.
    """
    check_choice("arch", arch, ARCHS)
    sigma_w2, sigma_b2 = check_hyperparameters(sigma_w2, sigma_b2, activation)
    filter_size = check_int("filter_size", filter_size, 1)
    if isinstance(depths, (int, np.integer)) or not isinstance(depths, Iterable):
        raise ConfigError(f"depths must be a list of integers >= 0, got {depths!r}")
    depths = sorted({check_int("depth", d, 0) for d in depths})
    if not depths:
        raise ConfigError("depths is empty; give at least one depth >= 0")
    dev = resolve_device(device)
    a = _as_inputs(x1, "x1", arch, dev)
    same = x2 is None
    b = a if same else _as_inputs(x2, "x2", arch, dev)
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"x1 inputs have shape {tuple(a.shape[1:])} but x2 inputs "
                        f"{tuple(b.shape[1:])}; both need the same shape")
    for x in (a, b):
        check_depths(x, depths, sigma_w2, sigma_b2, activation)
    net = _Net(arch, tuple(a.shape[2:]), filter_size, sigma_w2, sigma_b2, activation)
    batch_size, column_batch = _block_shape(net, len(a), len(b), batch_size, memory_budget, dev)

    top = depths[-1]
    var1 = _self_variances(net, a, top)
    var2 = var1 if same else _self_variances(net, b, top)
    pin_rows, pin_cols = _identical_pairs(a, b)
    nngp = {d: torch.empty(len(a), len(b), dtype=torch.float64) for d in depths}
    ntk = {d: torch.empty(len(a), len(b), dtype=torch.float64) for d in depths}
    for r0, c0 in product(range(0, len(a), batch_size), range(0, len(b), column_batch)):
        rows = slice(r0, min(r0 + batch_size, len(a)))
        cols = slice(c0, min(c0 + column_batch, len(b)))
        here = (pin_rows >= rows.start) & (pin_rows < rows.stop) & (pin_cols >= cols.start) \
            & (pin_cols < cols.stop)
        pins = ((pin_rows[here] - r0).to(dev), (pin_cols[here] - c0).to(dev))
        got = _block_pass(net, a[rows], b[cols], [v[rows] for v in var1], [v[cols] for v in var2],
                          depths, pins)
        for d, (k, t) in got.items():
            nngp[d][rows, cols], ntk[d][rows, cols] = k.cpu(), t.cpu()
    out = {}
    for d in depths:
        k, t = nngp[d], ntk[d]
        if same:  # the recursion is symmetric; make the result exactly so
            k, t = (k + k.T) / 2, (t + t.T) / 2
        out[d] = InfiniteKernels(k, t, arch, d, activation, sigma_w2, sigma_b2, filter_size,
                                 batch_size, column_batch)
    return out


def infinite(
    arch: Arch,
    x1,
    x2=None,
    *,
    depth: int,
    sigma_w2: float,
    sigma_b2: float,
    activation: Activation = "relu",
    filter_size: int = 3,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    device: str | torch.device = "auto",
) -> InfiniteKernels:
    """Infinite-width NNGP and NTK of `arch` between `x1` and `x2` (see the module docstring).

    Args:
        arch: ``"fcn"``, ``"cnn-flatten"`` or ``"cnn-gap"``.
        x1: inputs (N1, ...) — (N1, D) or any rank ≥ 2 (flattened) for fcn, (N1, C, L) or
            (N1, C, H, W) for the CNNs; a numpy array or a tensor.
        x2: inputs (N2, ...) of the same shape; None: `x1` against itself (the result is then
            exactly symmetric).
        depth: hidden layers (≥ 0) before the readout.
        sigma_w2, sigma_b2: weight and bias variances σ_w² > 0, σ_b² ≥ 0 of every layer.
        activation: ``"relu"`` or ``"erf"``.
        filter_size: the convolutions' width k (k × k in 2-D); SAME zero padding, stride 1.
        batch_size: rows of `x1` per block (default: see the module docstring); the columns
            of `x2` are then taken in chunks that keep a block within `memory_budget` (bytes,
            :mod:`genprobe.memory`; a block of r rows and c columns needs about 6 · 8 · r · c · P²
            bytes for cnn-gap on P pixels, 6 · 8 · r · c · P for the others).
        device: where to compute (``"auto"``: CUDA when available, ``"cpu"``, ``"cuda[:N]"``);
            the results are on the CPU.

    Returns :class:`InfiniteKernels` with ``nngp`` and ``ntk`` (N1, N2) float64 tensors.

    Raises ConfigError for an unknown arch or activation, depth < 0, σ_w² ≤ 0, σ_b² < 0;
    DataError for inputs of the wrong rank or shape, or non-finite inputs.
    """
    depth = check_int("depth", depth, 0)
    return infinite_by_depth(arch, x1, x2, depths=[depth], sigma_w2=sigma_w2, sigma_b2=sigma_b2,
                             activation=activation, filter_size=filter_size, batch_size=batch_size,
                             memory_budget=memory_budget, device=device)[depth]


__all__ = ["ACTIVATIONS", "ARCHS", "Activation", "Arch", "InfiniteKernels", "OVERFLOW",
           "check_depths", "check_hyperparameters", "infinite", "infinite_by_depth",
           "overflow_depth"]
