"""Gram matrices of per-example derivatives: the engine under stiffness and the empirical NTK.

For a model f(θ, x) with K outputs and examples x_1..x_N, the engine computes inner products of
per-example derivatives with respect to all parameters θ (P numbers):

- ``of="loss"``: g_i = ∇_θ L(f(θ, x_i), y_i), G_ij = g_iᵀ g_j, a (N1, N2) matrix (stiffness);
- ``of="outputs"``: J_i = ∂f(θ, x_i)/∂θ (K × P), Θ_ij = J_i J_jᵀ, a (N1, N2, K, K) array (the
  empirical NTK, neural-tangents' layout), or with ``trace_outputs=True`` its mean over the
  outputs (1/K) Σ_k Θ_kk (N1, N2) — neural-tangents' convention, comparable with the per-output
  infinite-width kernel — computed directly with one row per example (never the K × K blocks).

Every computation is done at a given state with BatchNorm in eval mode (per-example gradients are
undefined when BatchNorm normalizes with batch statistics), on the engine's own copy of the model
(taken once, in eval mode, on the device): the caller's model is never mutated, moved or cast,
and no hook is ever registered on it. Floating inputs are cast to the state's dtype; integer
inputs (token ids for an ``nn.Embedding``) stay integer.

Implementations (one switch, cross-checked against each other in tests/test_grams.py):

- ``"loop"``: the plain per-example autograd loop (one forward/backward per example). Slow but
  works on every model; the reference.
- ``"vmap"``: ``torch.func.vmap(grad(...))`` (``jacrev`` for outputs) over a block of examples,
  per-parameter gradients multiplied into the Gram matrix. Works on any model whose forward can
  be vmapped (no data-dependent Python control flow); falls back to ``"loop"`` with a warning.
- ``"layerwise"``: one batched forward and backward per block. For the modules that have a
  per-example gradient rule (:mod:`genprobe.engine.rules`: ``nn.Linear``, ``nn.Conv2d``
  (groups=1), eval-mode ``BatchNorm``, ``nn.LayerNorm``, and any layer declaring the
  :class:`~genprobe.engine.rules.ScaledLinearMap` protocol, as NTK-parameterized layers do)
  the per-example gradients follow exactly from each call's input and output gradient (the
  BackPACK / Opacus route: a linear map's per-example weight gradient is Σ over positions of
  b ⊗ a; for a convolution, one grouped convolution backward with the examples as groups).
  Each layer's Gram contribution is then the cheaper of (i) the product of those per-example
  gradients and (ii) a contraction that never forms them: (A Aᵀ) ⊙ (B Bᵀ) for a 2-D linear
  map, Σ_{t,s} (u_it·u_js)(b_it·b_js) over positions for late conv stages and short sequences.
  Every other parameter (attention projections, embeddings, parameters owned by the root, tied
  weights, layers whose output is later modified in place) goes through ``vmap(grad)``
  restricted to those parameters. Guards, checked once at setup: the batched forward must equal
  the vmapped per-example forward on a few examples (examples must not interact), and on one
  example the per-example gradients of every rule must equal autograd's; a module failing that
  (e.g. one declaring the protocol wrongly) moves to the ``vmap`` set with a warning
  (:attr:`GramResult.vmap_params` lists them).
- ``"auto"`` (default): ``"layerwise"``, which degrades by itself to ``"vmap"`` and ``"loop"``
  where the model needs it. ``"vmap"`` is the simplest reliable fast path.

Symmetry: every block's Gram is symmetrized, (G + Gᵀ)/2, since BLAS's f fᵀ need not be bitwise
symmetric; a square Gram, its diagonal blocks and the (N, N, K, K) layout
(Θ[i, j, k, l] == Θ[j, i, l, k]) are therefore exactly symmetric.

Memory: examples are processed in blocks whose size comes from a memory budget (bytes, see
:mod:`genprobe.memory`), so the N × P matrix of per-example gradients never needs to exist. A
square Gram of N examples with block size B > N is one block; otherwise the examples are cut
into chunks of B/2: each chunk's own Gram is one block, and each pair of chunks (I, J) one block
computed on the union I ∪ J that forms only the cross products I × J, so each example's gradient
is recomputed about 2N/B times (cost O(N²/B) per-example gradients, memory O(B) plus the block's
Gram, which the block size accounts for) while the products cost ~N²/2 pairs in all. Rectangular Grams (x1 vs x2, train–test) stream the same way over (chunk of x1, chunk of
x2) pairs; :func:`gram_blocks` yields the blocks one by one for callers that want to reduce them
without holding the whole matrix.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from .. import inputs
from ..device import resolve_device
from ..errors import ConfigError, DataError, check_choice
from ..inputs import Inputs
from ..memory import resolve_memory_budget
from ..params import State, split_state
from .rules import is_dense_rule, module_gram, outer, rule, rule_input, rules_match

logger = logging.getLogger(__name__)

Of = Literal["loss", "outputs"]
Implementation = Literal["auto", "layerwise", "vmap", "loop"]
LossName = Literal["cross_entropy", "mse"]
LossFn = Callable[[Tensor, Tensor], Tensor]
"""A per-example loss: ``loss(outputs (B, K), targets (B, ...)) -> (B,)``, row by row."""

OFS = ("loss", "outputs")
IMPLEMENTATIONS = ("auto", "layerwise", "vmap", "loop")


# ----------------------------------------------------------------------------- losses


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _mse(out: Tensor, y: Tensor) -> Tensor:
    # scatter, not F.one_hot: one_hot reads the labels' values, which vmap cannot batch
    target = y if y.is_floating_point() else torch.zeros_like(out).scatter(-1, y.unsqueeze(-1), 1.0)
    return 0.5 * (out - target).pow(2).flatten(1).sum(1)


LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(loss: LossName | LossFn) -> LossFn:
    """A loss name (``cross_entropy``: nats per example; ``mse``: ½‖f − onehot(y)‖²) or callable."""
    if callable(loss):
        return loss
    check_choice("loss", loss, tuple(LOSSES))
    return LOSSES[loss]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GramResult:
    """A Gram matrix of per-example derivatives and the self inner products of both sets.

    - ``matrix``: (N1, N2) for ``of="loss"`` or traced outputs; (N1, N2, K, K) for outputs.
    - ``diag1``, ``diag2``: the same quantity of each example with itself, (N) or (N, K, K)
      (squared gradient norms for the loss). For a square Gram they equal the diagonal.
    - ``implementation``: the route that actually ran (after any fallback); ``block_size``:
      examples per block; ``blocks``: number of blocks computed; ``vmap_params``: with
      ``"layerwise"``, the parameters that had no exact rule and went through ``vmap(grad)``.
    """

    matrix: Tensor
    diag1: Tensor
    diag2: Tensor
    implementation: str
    block_size: int
    blocks: int
    vmap_params: tuple[str, ...] = ()

    def cosine(self) -> Tensor:
        """Normalized Gram G_ij / √(G_ii G_jj) (scalar Grams only); 0 where a norm is 0."""
        return cosine_from_gram(self.matrix, self.diag1, self.diag2)


def cosine_from_gram(matrix: Tensor, diag1: Tensor, diag2: Tensor) -> Tensor:
    """Cosine similarity from a scalar Gram (N1, N2) and squared norms (N1,), (N2,).

    Pairs where either derivative is exactly zero get cosine 0 (no alignment; their sign is 0
    too). Values are clipped to [-1, 1] against rounding.
    """
    if matrix.dim() != 2:
        raise ConfigError("cosine needs a scalar Gram (N1, N2); trace the outputs first")
    n1 = diag1.clamp_min(0).sqrt()
    n2 = diag2.clamp_min(0).sqrt()
    denom = n1[:, None] * n2[None, :]
    out = torch.where(denom > 0, matrix / denom.where(denom > 0, torch.ones_like(denom)),
                      torch.zeros_like(matrix))
    zero = int((n1 == 0).sum()) + int((n2 == 0).sum())
    if zero:
        logger.warning("%d example(s) have a zero gradient: their cosine is set to 0", zero)
    return out.clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------- setup


@dataclass
class _Setup:
    """Everything fixed across blocks: the model, state on the device, objective, plan."""

    model: nn.Module  # the engine's own copy (eval mode, on the device): hooks go on it
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    of: str
    loss_fn: LossFn
    outputs: int  # K' = derivative rows per example (1 for the loss, K for outputs)
    impl: str
    traced: bool = False  # outputs: one Gram row per example, Σ_k over its K rows
    covered: dict[str, nn.Module] = field(default_factory=dict)  # layerwise modules by name
    keys: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> local -> state key
    residual: list[str] = field(default_factory=list)  # params done by vmap in layerwise
    per_example_bytes: int = 0
    verified: bool = False


def _objectives(s: _Setup, out: Tensor, y: Tensor | None) -> list[Tensor]:
    """Scalars whose gradients give the rows: Σ_i L_i, or Σ_i f_k(x_i) for each output k."""
    if s.of == "loss":
        return [s.loss_fn(out, y).sum()]
    flat = out.reshape(out.shape[0], -1)
    return [flat[:, k].sum() for k in range(flat.shape[1])]


def _rows(s: _Setup, n: int) -> int:
    """Rows of the Gram of a block of n examples: n·K', or n when traced."""
    return n if s.traced else n * s.outputs


def _split_rows(s: _Setup, split: int | None) -> int | None:
    return None if split is None else _rows(s, split)


def _call(s: _Setup, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
    return inputs.call(s.model, x, ({**s.params, **params}, s.buffers))


def _one(xi: Inputs) -> Inputs:
    """One example (as vmap hands it, without the example dimension) as a batch of one."""
    return inputs.apply(lambda v: v.unsqueeze(0), xi)


# ----------------------------------------------------------------------------- loop


def _loop_block(s: _Setup, x: Inputs, y: Tensor | None, keys: list[str], split: int | None) -> Tensor:
    """Gram (R, R) (R = :func:`_rows`), by one autograd call per example and output."""
    rows = []
    n = inputs.count(x)
    for i in range(n):
        leaves = {k: s.params[k].detach().requires_grad_(True) for k in keys}
        with torch.enable_grad():
            out = _call(s, leaves, inputs.take(x, slice(i, i + 1)))
            objs = _objectives(s, out, None if y is None else y[i:i + 1])
            for obj in objs:
                grads = torch.autograd.grad(obj, list(leaves.values()), retain_graph=True,
                                            allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(grads, leaves.values(), strict=True)]))
    feats = torch.stack(rows).reshape(_rows(s, n), -1)  # (n·K', P), or (n, K'·P) traced
    return outer(feats, _split_rows(s, split)).double()


# ----------------------------------------------------------------------------- vmap


def _vmap_block(s: _Setup, x: Inputs, y: Tensor | None, keys: list[str], split: int | None) -> Tensor:
    """Gram (R, R) from vmap(grad) (loss) or vmap(jacrev) (outputs) over parameters `keys`."""
    sub = {k: s.params[k] for k in keys}

    if s.of == "loss":
        def f(p, xi, yi):
            out = _call(s, p, _one(xi))
            return s.loss_fn(out, yi.unsqueeze(0)).sum()

        grads = _quiet_vmap(vmap(grad(f), in_dims=(None, 0, 0)))(sub, x, y)  # {k: (n, *shape)}
    else:
        def f(p, xi):
            return _call(s, p, _one(xi)).reshape(-1)

        grads = _quiet_vmap(vmap(jacrev(f), in_dims=(None, 0)))(sub, x)  # {k: (n, K, *shape)}
    rows = _rows(s, inputs.count(x))
    total = 0
    for g in grads.values():
        total = total + outer(g.reshape(rows, -1), _split_rows(s, split)).double()
    return total


# ----------------------------------------------------------------------------- layerwise


def _plan_layerwise(s: _Setup, x: Inputs) -> bool:
    """Choose the modules with rules and check the model on sample `x` (n ≥ 2 when possible).

    Returns False (layerwise impossible) when examples interact in the batched forward or the
    forward cannot be vmapped.
    """
    key_of = {id(p): k for k, p in s.model.named_parameters()}
    slots: dict[int, int] = defaultdict(int)
    for mod in s.model.modules():
        for _, p in mod.named_parameters(recurse=False):
            slots[id(p)] += 1
    candidates: dict[str, nn.Module] = {}
    keys: dict[str, dict[str, str]] = {}
    for name, mod in s.model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if not own or rule(mod) is None or any(slots[id(p)] > 1 for p in own.values()):
            continue
        candidates[name] = mod
        keys[name] = {local: key_of[id(p)] for local, p in own.items()}
    fired: dict[str, list[tuple[Tensor, int, Tensor, int]]] = defaultdict(list)
    handles = [mod.register_forward_hook(
        lambda mod, args, out, name=name: fired[name].append((args[0], args[0]._version, out, out._version)))
        for name, mod in candidates.items()]
    try:
        with torch.no_grad():
            batched = _call(s, {}, x)
    finally:
        for h in handles:
            h.remove()
    try:
        with torch.no_grad():
            single = _quiet_vmap(vmap(lambda xi: _call(s, {}, _one(xi)).squeeze(0)))(x)
    except Exception as exc:  # noqa: BLE001 - any vmap failure means: not vmappable
        logger.info("layerwise: the forward cannot be vmapped (%s)", _short(exc))
        return False
    scale = float(batched.nan_to_num(0.0, 0.0, 0.0).abs().max()) if batched.numel() else 1.0
    if not torch.allclose(batched, single.reshape(batched.shape), rtol=1e-3,
                          atol=1e-5 * max(scale, 1e-12), equal_nan=True):
        logger.warning("layerwise: the batched forward differs from the per-example forward "
                       "(examples interact); using vmap")
        return False
    s.covered, s.keys = {}, {}
    for name, mod in candidates.items():
        calls = fired.get(name, [])
        if calls and all(a._version == va and o._version == vo for a, va, o, vo in calls):
            s.covered[name], s.keys[name] = mod, keys[name]
    owned = {k for d in s.keys.values() for k in d.values()}
    s.residual = [k for k in s.params if k not in owned]
    return True


def _layerwise_block(s: _Setup, x: Inputs, y: Tensor | None, residual: bool = True,
                     split: int | None = None) -> Tensor:
    """Gram (R, R) (with `split`: its cross block): rules for covered modules from one batched
    backward, vmap for the rest (unless `residual` is False). The first call checks the rules
    against autograd."""
    total = 0
    calls: dict[str, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    handles = [mod.register_forward_hook(
        lambda mod, args, out, name=name: calls[name].append((rule_input(mod, args[0]), out)))
        for name, mod in s.covered.items()]
    leaves = {k: v.detach().requires_grad_(True) for k, v in s.params.items()}
    try:
        with torch.enable_grad():
            out = inputs.call(s.model, x, (leaves, s.buffers))
    finally:
        for h in handles:
            h.remove()
    outs = [o for name in s.covered for _, o in calls[name]]
    if outs:
        with torch.enable_grad():
            objs = _objectives(s, out, y)
            per_obj = [torch.autograd.grad(obj, outs, retain_graph=True, allow_unused=True)
                       for obj in objs]
            verify = not s.verified and split is None and bool(torch.isfinite(sum(objs)))
            batch = {}
            if verify:
                owned = [k for d in s.keys.values() for k in d.values()]
                g = torch.autograd.grad(sum(objs), [leaves[k] for k in owned], allow_unused=True)
                batch = dict(zip(owned, g, strict=True))
        failed = []
        i = 0
        for name, mod in s.covered.items():
            mcalls = calls[name]
            bs = [torch.stack([torch.zeros_like(o) if g[i + c] is None else g[i + c] for g in per_obj], 1)
                  if len(per_obj) > 1 else
                  (torch.zeros_like(o) if per_obj[0][i + c] is None else per_obj[0][i + c]).unsqueeze(1)
                  for c, (_, o) in enumerate(mcalls)]  # (n, K', *out shape) per call
            i += len(mcalls)
            if not mcalls:
                continue
            contrib, sums = module_gram(mod, [a for a, _ in mcalls], bs, verify, s.traced, split)
            total += contrib
            if verify and not rules_match(sums, batch, s.keys[name]):
                failed.append(name)
        if failed:
            logger.warning("layerwise: per-example gradients of %s do not sum to the batch "
                           "gradient (weights used outside their module?); using vmap for them",
                           failed)
            for name in failed:
                s.residual += list(s.keys.pop(name).values())
                s.covered.pop(name)
            s.verified = True
            return _layerwise_block(s, x, y, residual, split)
        s.verified = s.verified or verify
    if s.residual and residual:
        total = total + _vmap_block(s, x, y, s.residual, split)
    if isinstance(total, int):  # no parameter at all
        r = _rows(s, inputs.count(x))
        r1 = r if split is None else _rows(s, split)
        return torch.zeros(r1, r - r1 if split is not None else r, dtype=torch.float64,
                           device=inputs.leaves(x)[0].device)
    return total


def _quiet_vmap(fn):
    """`fn` with torch's "no batching rule, performance drop" warnings silenced (they are about
    speed only, and the fallback is exact)."""

    def wrapped(*args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return fn(*args)

    return wrapped


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


# ----------------------------------------------------------------------------- blocks


def _estimate_bytes(s: _Setup, x: Inputs) -> int:
    """Rough bytes per example of a block under the chosen implementation (documented upper-ish
    estimate: activations ×4 for values, gradients and temporaries)."""
    item = max((v.element_size() for v in s.params.values() if v.is_floating_point()), default=4)
    act = 0
    unfold = 0
    handles = []
    flat_calls: dict[nn.Module, int] = defaultdict(int)  # linear maps called on 2-D inputs
    calls: dict[nn.Module, int] = defaultdict(int)

    def hook(mod, args, out):
        nonlocal act, unfold
        if isinstance(out, Tensor):
            act += out.numel()
        calls[mod] += 1
        if is_dense_rule(mod) and args and isinstance(args[0], Tensor) and args[0].dim() == 2:
            flat_calls[mod] += 1
        weight = getattr(mod, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() == 4 and isinstance(out, Tensor) and out.dim() == 4:
            unfold = max(unfold, weight[0].numel() * out[0, 0].numel())  # a convolution's unfold
    for mod in s.model.modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            _call(s, {}, inputs.take(x, slice(0, 1)))
    except Exception:  # noqa: BLE001 - an unvmappable odd model still gets an estimate
        pass
    finally:
        for h in handles:
            h.remove()
    p_all = sum(p.numel() for p in s.params.values())
    kk = s.outputs
    if s.impl == "loop":
        per = kk * p_all + act
    elif s.impl == "vmap":
        per = 2 * kk * p_all + 4 * act
    else:
        # a linear map called once on 2-D inputs takes (A Aᵀ) ⊙ (B Bᵀ): no per-example gradient
        contracted = {m for m, c in flat_calls.items() if c == calls[m] == 1}
        biggest = max([p.numel() for mod in s.covered.values() if mod not in contracted
                       for p in mod.parameters()] or [0])
        p_res = sum(s.params[k].numel() for k in s.residual)
        per = 4 * act * kk + 2 * kk * biggest + unfold + (2 * kk * p_res + 4 * act if p_res else 0)
    return max(int(per * item), 1)


def _setup(model: nn.Module, state: State, of: str, loss, implementation: str,
           dev: torch.device, sample: Inputs, sample_y: Tensor | None, traced: bool) -> _Setup:
    """Resolve the implementation on a small `sample` of the inputs (vmap gate, layerwise plan
    and its gradient check) and estimate the memory per example."""
    check_choice("of", of, OFS)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    params, buffers = split_state(model, state)
    params = {k: v.detach().to(dev) for k, v in params.items()}
    buffers = {k: v.to(dev) for k, v in buffers.items()}
    loss_fn = resolve_loss(loss)
    s = _Setup(model, params, buffers, of, loss_fn, 1, implementation, traced=traced and of == "outputs")
    with torch.no_grad():
        out = _call(s, {}, inputs.take(sample, slice(0, 1)))
    s.outputs = 1 if of == "loss" else out[0].numel()
    if implementation in ("auto", "layerwise"):
        s.impl = "layerwise" if _plan_layerwise(s, sample) else "vmap"
        if s.impl == "layerwise":
            _layerwise_block(s, inputs.take(sample, slice(0, 1)), _take(sample_y, slice(0, 1)), residual=False)  # checks the rules
    if s.impl == "vmap" and not _vmappable(s, sample):
        s.impl = "loop"
    s.per_example_bytes = _estimate_bytes(s, sample)
    return s


def _vmappable(s: _Setup, x: Inputs) -> bool:
    try:
        with torch.no_grad():
            _quiet_vmap(vmap(lambda xi: _call(s, {}, _one(xi))))(inputs.take(x, slice(0, 2)))
    except Exception as exc:  # noqa: BLE001 - any vmap failure means: not vmappable
        logger.warning("vmap: the forward cannot be vmapped (%s); falling back to the per-example "
                       "loop (correct, slow)", _short(exc))
        return False
    return True


def _block(s: _Setup, x: Inputs, y: Tensor | None, split: int | None = None) -> Tensor:
    """Gram of the rows of block `x`: (n, n) for the loss and traced outputs (the mean over the
    K outputs), (n, n, K, K) for outputs; exactly symmetric (G_ij == G_ji;
    Θ[i, j, k, l] == Θ[j, i, l, k]). With `split`, only the cross block of examples [:split]
    against [split:]: (split, n − split[, K, K])."""
    if s.impl == "layerwise":
        g = _layerwise_block(s, x, y, split=split)
    elif s.impl == "vmap":
        try:
            g = _vmap_block(s, x, y, list(s.params), split)
        except Exception as exc:  # noqa: BLE001 - vmap(grad) can fail where the forward did not
            logger.warning("vmap(grad) failed (%s); falling back to the per-example loop", _short(exc))
            s.impl = "loop"
            return _block(s, x, y, split)
    else:
        g = _loop_block(s, x, y, list(s.params), split)
    if split is None:
        g = (g + g.T) / 2  # exactly symmetric by construction: BLAS's f @ f.T need not be
    n1 = inputs.count(x) if split is None else split
    n2 = inputs.count(x) if split is None else inputs.count(x) - split
    kk = s.outputs
    if s.traced:
        return g / kk
    if s.of == "outputs":
        return g.reshape(n1, kk, n2, kk).permute(0, 2, 1, 3)
    return g


@dataclass(frozen=True)
class GramBlock:
    """One block of a Gram: rows ``rows`` of x1 against columns ``cols`` of x2 (or x1).

    ``matrix`` (len(rows), len(cols)[, K, K]); ``diag_rows`` / ``diag_cols``: the self inner
    products of the rows' and columns' examples, (len, ) or (len, K, K); None for the
    off-diagonal blocks of a square Gram (the diagonal blocks carry them).
    """

    rows: slice
    cols: slice
    matrix: Tensor
    diag_rows: Tensor | None
    diag_cols: Tensor | None


def _diag(g: Tensor) -> Tensor:
    idx = torch.arange(g.shape[0], device=g.device)
    return g[idx, idx]


def _as_targets(y: Tensor | None, n: int, of: str, what: str) -> Tensor | None:
    if of == "outputs":
        return None
    if y is None:
        raise ConfigError(f"of='loss' needs the labels {what} (a tensor of N targets)")
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} inputs")
    return y


def gram_blocks(
    model: nn.Module,
    state: State,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    y1: Tensor | None = None,
    y2: Tensor | None = None,
    of: Of = "loss",
    loss: LossName | LossFn = "cross_entropy",
    trace_outputs: bool = False,
    implementation: Implementation = "auto",
    memory_budget: int | None = None,
    device: str | torch.device = "auto",
    info: dict | None = None,
    block_size: int | None = None,
    skip: Callable[[slice, slice], bool] | None = None,
) -> Iterator[GramBlock]:
    """Yield the blocks of the Gram of x1 (N1, ...) against x2 (N2, ...) (default: x1 itself).

    For a square Gram (x2 None) the blocks cover the upper triangle (rows ≤ cols); the lower
    triangle is the transpose. Its examples are cut into chunks of ``block_size // 2``: each
    diagonal block is computed on its chunk, each off-diagonal one as the cross products of two
    chunks only (so the products cost ~N²/2 pairs in all). Blocks come on the CPU in float64. `info`, when given, receives
    ``implementation``, ``block_size`` and ``blocks`` as they become known.
    ``block_size`` (examples per block) overrides the one the memory budget gives: the blocks'
    layout depends only on it, so a caller resuming a streamed Gram passes the size it started
    with. ``skip(rows, cols)``: blocks it returns True for are not needed; work whose every block
    is skipped is not done at all (a block may still come again when it is computed with one
    that is needed). Other arguments as in :func:`gram`.
    """
    dev = resolve_device(device)
    if inputs.count(x1) == 0 or (x2 is not None and inputs.count(x2) == 0):
        raise DataError("the Gram needs at least one example in each set")
    y1 = _as_targets(y1, inputs.count(x1), of, "y1")
    y2 = _as_targets(y2, inputs.count(x2), of, "y2") if x2 is not None else None
    budget = resolve_memory_budget(memory_budget, dev)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    x1 = inputs.move(inputs.load(x1), dev, dtype)
    x2 = None if x2 is None else inputs.move(inputs.load(x2), dev, dtype)
    y1 = None if y1 is None else y1.to(dev)
    y2 = None if y2 is None else y2.to(dev)
    s = _setup(_working_copy(model, dev), state, of, loss, implementation, dev, inputs.take(x1, slice(0, 4)),
               _take(y1, slice(0, 4)), trace_outputs)
    block = _block_size(s, budget) if block_size is None else int(block_size)
    if block < 2:
        raise ConfigError(f"block_size must be at least 2 examples, got {block_size!r}")
    info = {} if info is None else info
    info.update(block_size=int(block), blocks=0, per_example_bytes=s.per_example_bytes)
    logger.info("grams: %s, %d examples per block (%.1f MB each)", s.impl, block,
                s.per_example_bytes / 2**20)
    info["vmap_params"] = tuple(s.residual) if s.impl == "layerwise" else ()
    yield from _tiles(s, x1, y1, x2, y2, block, info, skip)
    info["implementation"] = s.impl


GRAM_COPIES = 4
"""Float64 (R, R) arrays alive at once while a block's Gram is formed (the running total, one
layer's products and their temporaries): the part of a block's memory that grows as its square."""


def _block_size(s: _Setup, budget: int) -> int:
    """The most examples B per block with B · (bytes per example) + the block's Gram,
    GRAM_COPIES · 8 · (B · rows per example)², within `budget` (at least 2)."""
    q = GRAM_COPIES * 8 * _rows(s, 1) ** 2
    p = s.per_example_bytes
    return max(2, int((-p + math.sqrt(p * p + 4 * q * budget)) / (2 * q)))


def _working_copy(model: nn.Module, dev: torch.device) -> nn.Module:
    """The engine's own copy of `model`, in eval mode on `dev`: hooks are registered on it and
    its mode set, so the caller's model is never mutated, moved or cast. (Its tensors are never
    read where the state provides them: every call swaps the state in.)"""
    return copy.deepcopy(model).eval().to(dev)


def _take(y: Tensor | None, sl: slice) -> Tensor | None:
    return None if y is None else y[sl]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else torch.cat([a, b])


def _tiles(s: _Setup, x1, y1, x2, y2, block: int, info: dict,
           skip: Callable[[slice, slice], bool] | None) -> Iterator[GramBlock]:
    def needed(*pairs: tuple[slice, slice]) -> bool:
        return skip is None or not all(skip(r, c) for r, c in pairs)

    if x2 is None:
        n = inputs.count(x1)
        if n <= block:
            if not needed((slice(0, n), slice(0, n))):
                return
            g = _block(s, x1, y1).cpu()
            info["blocks"] += 1
            d = _diag(g)
            yield GramBlock(slice(0, n), slice(0, n), g, d, d)
            return
        parts = _chunks(n, block // 2)
        for ia in parts:  # the diagonal blocks, each on its own
            if needed((ia, ia)):
                g = _block(s, inputs.take(x1, ia), _take(y1, ia)).cpu()
                info["blocks"] += 1
                d = _diag(g)
                yield GramBlock(ia, ia, g, d, d)
        for a in range(len(parts)):  # the cross blocks: the products of two chunks only
            for b in range(a + 1, len(parts)):
                ia, ib = parts[a], parts[b]
                if not needed((ia, ib)):
                    continue
                g = _block(s, inputs.cat([inputs.take(x1, ia), inputs.take(x1, ib)]), _cat(_take(y1, ia), _take(y1, ib)),
                           split=ia.stop - ia.start).cpu()
                info["blocks"] += 1
                yield GramBlock(ia, ib, g, None, None)
        return
    n1, n2 = inputs.count(x1), inputs.count(x2)
    size = block if n1 + n2 <= block else max(1, block // 2)
    rows = [slice(0, n1)] if n1 + n2 <= block else _chunks(n1, size)
    cols = [slice(0, n2)] if n1 + n2 <= block else _chunks(n2, size)
    for ia in rows:
        for ib in cols:
            if not needed((ia, ib)):
                continue
            g = _block(s, inputs.cat([inputs.take(x1, ia), inputs.take(x2, ib)]), _cat(_take(y1, ia), _take(y2, ib))).cpu()
            info["blocks"] += 1
            na = ia.stop - ia.start
            d = _diag(g)
            yield GramBlock(ia, ib, g[:na, na:], d[:na], d[na:])


def gram(
    model: nn.Module,
    state: State,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    y1: Tensor | None = None,
    y2: Tensor | None = None,
    of: Of = "loss",
    loss: LossName | LossFn = "cross_entropy",
    trace_outputs: bool = False,
    implementation: Implementation = "auto",
    memory_budget: int | None = None,
    device: str | torch.device = "auto",
) -> GramResult:
    """Gram matrix of per-example derivatives of `model` at `state`.

    Args:
        model: the architecture. The engine works on its own copy in eval mode: the caller's
            model is never mutated, moved or cast (see the module docstring).
        state: parameters and buffers (a canonical state, see :mod:`genprobe.params`).
        x1: inputs (N1, ...). x2: inputs (N2, ...) for a rectangular Gram (default: x1).
            Floating inputs are cast to the state's dtype; integer inputs (token ids) are not.
        y1, y2: integer labels (N1,), (N2,) (targets of `loss`); needed for ``of="loss"``.
        of: ``"loss"`` (per-example loss gradients) or ``"outputs"`` (per-example Jacobians).
        loss: ``"cross_entropy"`` (default), ``"mse"`` or a per-example callable
            ``(outputs (B, K), targets (B,)) -> (B,)``.
        trace_outputs: with ``of="outputs"``, return the traced kernel (N1, N2), the **mean** over
            the K outputs (1/K) Σ_k Θ_kk (neural-tangents' convention: comparable with the
            per-output infinite-width kernel), instead of (N1, N2, K, K). Computed directly
            (one row per example), never through the (N1, N2, K, K) array.
        implementation: ``"auto" | "layerwise" | "vmap" | "loop"`` (module docstring).
        memory_budget: bytes for one block of examples (see :mod:`genprobe.memory`; None: its
            default budget).
        device: ``"auto" | "cpu" | "cuda[:N]"``.

    Returns a :class:`GramResult` (float64, on the CPU); a square Gram is exactly symmetric.
    Raises DataError naming the examples
    when a derivative is not finite (e.g. a NaN loss at this state).
    """
    check_choice("of", of, OFS)
    n1 = inputs.count(x1)
    n2 = n1 if x2 is None else inputs.count(x2)
    info: dict = {}
    matrix = diag1 = diag2 = None
    for blk in gram_blocks(model, state, x1, x2, y1=y1, y2=y2, of=of, loss=loss,
                           trace_outputs=trace_outputs, implementation=implementation,
                           memory_budget=memory_budget, device=device, info=info):
        m, dr, dc = blk.matrix, blk.diag_rows, blk.diag_cols
        if matrix is None:
            matrix = torch.zeros(n1, n2, *m.shape[2:], dtype=torch.float64)
            diag1 = torch.zeros(n1, *m.shape[2:], dtype=torch.float64)
            diag2 = torch.zeros(n2, *m.shape[2:], dtype=torch.float64)
        matrix[blk.rows, blk.cols] = m
        if x2 is None and blk.rows != blk.cols:
            matrix[blk.cols, blk.rows] = m.transpose(0, 1) if m.dim() == 2 else m.permute(1, 0, 3, 2)
        if dr is not None:
            diag1[blk.rows] = dr
            diag2[blk.cols] = dc
    if x2 is None:  # the diagonal itself, bit for bit (blocks recompute the self products)
        diag1, diag2 = _diag(matrix), _diag(matrix)
    _check_finite(diag1, "x1")
    _check_finite(diag2, "x2")
    return GramResult(matrix, diag1, diag2, info.get("implementation", implementation),
                      int(info.get("block_size", 0)), int(info.get("blocks", 0)),
                      tuple(info.get("vmap_params", ())))


def _check_finite(diag: Tensor, what: str) -> None:
    bad = ~torch.isfinite(diag.reshape(len(diag), -1)).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:10])) + (" ..." if len(idx) > 10 else "")
        raise DataError(f"the derivatives of {len(idx)} example(s) of {what} are not finite (NaN/inf "
                        f"loss or outputs at this state): positions {shown}")


def parameter_count(model: nn.Module) -> int:
    """P, the number of parameters the Gram differentiates (tied tensors once)."""
    return sum(p.numel() for _, p in model.named_parameters())


__all__ = ["GramBlock", "GramResult", "IMPLEMENTATIONS", "LOSSES", "cosine_from_gram", "gram",
           "gram_blocks", "parameter_count", "resolve_loss"]
