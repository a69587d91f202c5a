"""The grams engine against a plain per-example autograd loop, on models not written for it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from foreign import FOREIGN, TokenClassifier, make_subject
from genprobe.engine import rules
from genprobe.engine.grams import GRAM_COPIES, IMPLEMENTATIONS, cosine_from_gram, gram, gram_blocks
from genprobe.errors import ConfigError, DataError
from genprobe.params import state_of

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = [i for i in IMPLEMENTATIONS if i != "auto"] + ["auto"]



def reference_features(model, state, x, y=None, of="loss"):
    """Per-example derivatives by the obvious loop: (N, P) for the loss, (N, K, P) for outputs."""
    names = [k for k, _ in model.named_parameters()]
    rows = []
    for i in range(len(x)):
        params = {k: state[k].clone().requires_grad_(True) for k in names}
        buffers = {k: v for k, v in state.items() if k not in params}
        out = functional_call(model, (params, buffers), (x[i:i + 1],))
        objs = [F.cross_entropy(out, y[i:i + 1])] if of == "loss" else list(out[0])
        per = []
        for obj in objs:
            grads = torch.autograd.grad(obj, list(params.values()), retain_graph=True, allow_unused=True)
            per.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                  for g, p in zip(grads, params.values(), strict=True)]))
        rows.append(torch.stack(per))
    feats = torch.stack(rows)  # (N, K', P)
    return feats[:, 0] if of == "loss" else feats


def reference_gram(model, state, x1, x2=None, y1=None, y2=None, of="loss"):
    f1 = reference_features(model, state, x1, y1, of)
    f2 = f1 if x2 is None else reference_features(model, state, x2, y2, of)
    if of == "loss":
        return f1 @ f2.T
    return torch.einsum("akp,blp->abkl", f1, f2)


def assert_rel(actual, expected, rtol=1e-10):
    """Max error within `rtol` of the largest entry. Every model here is float64, where the
    routes agree with the loop to ~1e-15; 1e-10 leaves room for summation order only."""
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def assert_symmetric(m):
    """Exactly (bitwise) symmetric: G == Gᵀ, or Θ[i, j, k, l] == Θ[j, i, l, k]."""
    assert torch.equal(m, m.T if m.dim() == 2 else m.permute(1, 0, 3, 2))


@pytest.fixture(scope="module")
def subjects():
    return {name: make_subject(name, dtype=torch.float64, n_train=10, n_test=6) for name in FOREIGN}


@pytest.fixture(scope="module")
def references(subjects):
    """Reference Grams per model, computed once: loss (train, 10 examples), outputs (first 5)."""
    cache: dict = {}

    def get(name, of):
        if (name, of) not in cache:
            s = subjects[name]
            cache[name, of] = (reference_gram(s.model, s.final, s.train.x, y1=s.train.y) if of == "loss"
                               else reference_gram(s.model, s.final, s.train.x[:5], of="outputs"))
        return cache[name, of]

    return get


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_loss_gram_equals_loop(subjects, references, name, impl):
    s = subjects[name]
    x, y = s.train.x, s.train.y
    expected = references(name, "loss")
    r = gram(s.model, s.final, x, y1=y, implementation=impl)
    assert r.matrix.dtype == torch.float64
    assert_rel(r.matrix, expected)
    assert_symmetric(r.matrix)
    assert torch.equal(r.diag1, r.matrix.diagonal()) and torch.equal(r.diag2, r.diag1)
    assert_rel(r.diag1, expected.diagonal())
    cos = r.cosine()
    assert_rel(cos, cosine_from_gram(expected, expected.diagonal(), expected.diagonal()))
    assert torch.allclose(cos.diagonal(), torch.ones(len(x), dtype=torch.float64), atol=1e-12)
    assert torch.equal(torch.sign(cos), torch.sign(expected)) or \
        float((torch.sign(cos) != torch.sign(expected)).float().mean()) == 0
    if name == "untraceable":
        assert r.implementation == "loop"
    elif impl in ("auto", "layerwise"):
        assert r.implementation == "layerwise"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["shared", "transformer", "positions"])
def test_mse_loss_gram_equals_loop(subjects, name, impl):
    """loss="mse" (½‖f − onehot(y)‖²) on models with parameters outside the layerwise rules (a
    root-owned scale, attention, embeddings), which go through vmap(grad): the one-hot target
    was built with F.one_hot, which vmap cannot batch (it raised, or fell back to the loop)."""
    s = subjects[name]
    x, y = s.train.x[:6], s.train.y[:6]
    names = [k for k, _ in s.model.named_parameters()]
    rows = []
    for i in range(len(x)):
        params = {k: s.final[k].clone().requires_grad_(True) for k in names}
        out = functional_call(s.model, ({**s.final, **params},), (x[i:i + 1],))
        loss = 0.5 * (out - F.one_hot(y[i:i + 1], out.shape[-1]).to(out.dtype)).pow(2).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params.values(), strict=True)]))
    f = torch.stack(rows)
    r = gram(s.model, s.final, x, y1=y, loss="mse", implementation=impl)
    assert_rel(r.matrix, f @ f.T)
    assert r.implementation == ("loop" if impl == "loop" else impl if impl != "auto" else "layerwise")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_output_ntk_equals_loop(subjects, references, name, impl):
    s = subjects[name]
    x = s.train.x[:5]
    expected = references(name, "outputs")  # (N, N, K, K)
    r = gram(s.model, s.final, x, of="outputs", implementation=impl)
    assert r.matrix.shape == expected.shape
    assert_rel(r.matrix, expected)
    assert_symmetric(r.matrix)
    assert torch.equal(r.diag1, r.matrix[range(5), range(5)])
    traced = gram(s.model, s.final, x, of="outputs", trace_outputs=True, implementation=impl)
    assert_rel(traced.matrix, expected.diagonal(dim1=-2, dim2=-1).mean(-1))  # mean over outputs
    assert_symmetric(traced.matrix)
    assert torch.equal(traced.diag1, traced.matrix.diagonal())


@pytest.mark.parametrize("impl", ["layerwise", "vmap", "loop"])
@pytest.mark.parametrize("name", ["residual_bn", "transformer", "shared"])
def test_chunked_and_rectangular_agree(subjects, name, impl):
    s = subjects[name]
    x1, y1, x2, y2 = s.train.x[:5], s.train.y[:5], s.test.x[:3], s.test.y[:3]
    whole = gram(s.model, s.final, x1, y1=y1, implementation=impl)
    tiny = gram(s.model, s.final, x1, y1=y1, implementation=impl, memory_budget=1)
    assert tiny.blocks > 1 and tiny.block_size == 2
    assert_rel(tiny.matrix, whole.matrix)
    assert_symmetric(tiny.matrix)
    assert torch.equal(tiny.diag1, tiny.matrix.diagonal())
    expected = reference_gram(s.model, s.final, x1, x2, y1, y2)
    for budget in (None, 1):
        rect = gram(s.model, s.final, x1, x2, y1=y1, y2=y2, implementation=impl, memory_budget=budget)
        assert rect.matrix.shape == (5, 3)
        assert_rel(rect.matrix, expected)
        assert_rel(rect.diag1, whole.matrix.diagonal())
    outs = gram(s.model, s.final, x1[:2], x2[:3], of="outputs", implementation=impl, memory_budget=1)
    assert_rel(outs.matrix, reference_gram(s.model, s.final, x1[:2], x2[:3], of="outputs"))
    square = gram(s.model, s.final, x1[:3], of="outputs", implementation=impl, memory_budget=1)
    assert square.blocks == 6  # chunks of 1: 3 diagonal + 3 cross
    assert_rel(square.matrix, reference_gram(s.model, s.final, x1[:3], of="outputs"))
    assert_symmetric(square.matrix)
    traced = gram(s.model, s.final, x1[:4], of="outputs", trace_outputs=True, implementation=impl,
                  memory_budget=1)
    assert traced.blocks > 1
    reference = reference_gram(s.model, s.final, x1[:4], of="outputs").diagonal(dim1=-2, dim2=-1)
    assert_rel(traced.matrix, reference.mean(-1))
    assert_symmetric(traced.matrix)
    traced = gram(s.model, s.final, x1[:2], x2[:3], of="outputs", trace_outputs=True,
                  implementation=impl, memory_budget=1)
    reference = reference_gram(s.model, s.final, x1[:2], x2[:3], of="outputs")
    assert_rel(traced.matrix, reference.diagonal(dim1=-2, dim2=-1).mean(-1))


def test_implementations_agree_on_zoo_models():
    from genprobe.zoo.models import create_model

    torch.manual_seed(0)
    for arch, shape, opts in [("cnn", (1, 6, 6), {"channels": 4, "depth": 3, "batchnorm": True}),
                              ("resnet", (3, 8, 8), {"width": 4}),
                              ("transformer", (1, 4, 4), {"d_model": 8, "heads": 2, "layers": 1, "ff": 8}),
                              ("fcn", (7,), {"width": 6, "depth": 2, "parameterization": "ntk",
                                             "sigma_w": 1.3, "sigma_b": 0.2}),
                              ("cnn", (1, 5, 5), {"channels": 3, "depth": 3, "parameterization": "ntk",
                                                  "sigma_w": 1.5, "sigma_b": 0.3})]:
        model = create_model(arch, shape, 3, **opts).double().eval()
        state = state_of(model)
        x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
        results = {impl: gram(model, state, x, y1=y, implementation=impl) for impl in IMPLS}
        for impl in IMPLS:
            assert_rel(results[impl].matrix, results["loop"].matrix)
        # only attention projections and the root's positions lack an exact rule
        assert all(k == "position" or ".self_attn." in k for k in results["layerwise"].vmap_params)
        if arch != "transformer":
            assert results["layerwise"].vmap_params == ()


def test_gram_blocks_cover_the_upper_triangle(subjects):
    s = subjects["nested"]
    x, y = s.train.x[:7], s.train.y[:7]
    seen = torch.zeros(7, 7, dtype=torch.int64)
    info: dict = {}
    for blk in gram_blocks(s.model, s.final, x, y1=y, memory_budget=1, info=info):
        assert blk.rows.start <= blk.cols.start
        seen[blk.rows, blk.cols] += 1
    assert torch.equal(seen.triu(), torch.ones(7, 7, dtype=torch.int64).triu())
    assert torch.equal(seen.tril(-1), torch.zeros(7, 7, dtype=torch.int64))
    assert info["implementation"] == "layerwise" and info["blocks"] == 28  # 7 chunks of 1: 7 + C(7, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_diagonal_blocks_are_exactly_symmetric(subjects, impl):
    s = subjects["residual_bn"]
    x = s.train.x[:7]
    info: dict = {}
    next(gram_blocks(s.model, s.final, x, of="outputs", implementation=impl, info=info))
    k = s.model(x[:1]).numel()  # blocks of 6 examples: chunks of 3, 3 and 1
    budget = int(6.5 * info["per_example_bytes"] + GRAM_COPIES * 8 * (6.5 * k) ** 2)
    blocks = list(gram_blocks(s.model, s.final, x, of="outputs", implementation=impl, memory_budget=budget))
    diagonal = [blk for blk in blocks if blk.rows == blk.cols]
    assert [(b.rows.start, b.rows.stop) for b in diagonal] == [(0, 3), (3, 6), (6, 7)]
    for blk in diagonal:
        assert_symmetric(blk.matrix)
    r = gram(s.model, s.final, x, of="outputs", implementation=impl, memory_budget=budget)
    assert r.blocks == 6  # 3 diagonal + 3 cross
    assert_symmetric(r.matrix)
    assert_rel(r.matrix, reference_gram(s.model, s.final, x, of="outputs"))


def _linear(d=4, k=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(d, k).double().eval()
    return model, state_of(model)


def test_linear_loss_gram_closed_form():
    model, state = _linear()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    p = torch.softmax(x @ state["weight"].T + state["bias"], -1)
    e = p - F.one_hot(y, 3).double()
    expected = (e @ e.T) * (x @ x.T + 1)
    for impl in IMPLS:
        assert_rel(gram(model, state, x, y1=y, implementation=impl).matrix, expected, 1e-10)


def test_linear_output_ntk_closed_form():
    model, state = _linear(d=5, k=4)
    x1, x2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = (x1 @ x2.T + 1)[:, :, None, None] * torch.eye(4, dtype=torch.float64)
    for impl in IMPLS:
        r = gram(model, state, x1, x2, of="outputs", implementation=impl)
        assert_rel(r.matrix, expected, 1e-10)
        traced = gram(model, state, x1, x2, of="outputs", trace_outputs=True, implementation=impl)
        assert_rel(traced.matrix, x1 @ x2.T + 1, 1e-10)  # a linear model's NTK: X Xᵀ + 1
        assert_rel(r.diag1, ((x1 * x1).sum(1) + 1)[:, None, None] * torch.eye(4, dtype=torch.float64), 1e-10)


class WeightUsedTwice(nn.Module):
    """A Linear's weight also used by hand outside its forward: the layerwise rule alone is wrong."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(x)), self.fc.weight)


class InplaceAfter(nn.Module):
    """A Linear whose output is modified in place afterwards (as ReLU(inplace=True) does)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("cls", [WeightUsedTwice, InplaceAfter])
def test_layerwise_guards_keep_it_exact(cls, caplog):
    torch.manual_seed(0)
    model = cls().double().eval()
    state = state_of(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    k = model(x).shape[1]
    y = torch.randint(0, k, (6,))
    with caplog.at_level(logging.WARNING, logger="genprobe.engine.grams"):
        r = gram(model, state, x, y1=y, implementation="layerwise")
    assert_rel(r.matrix, reference_gram(model, state, x, y1=y))
    if cls is WeightUsedTwice:
        assert "do not sum to the batch gradient" in caplog.text
        assert r.vmap_params == ("fc.weight", "fc.bias")
    else:
        assert r.vmap_params == ("a.weight", "a.bias")


def test_unvmappable_model_falls_back_with_a_warning(subjects, caplog):
    s = subjects["untraceable"]
    with caplog.at_level(logging.WARNING, logger="genprobe.engine.grams"):
        r = gram(s.model, s.final, s.train.x[:4], y1=s.train.y[:4], implementation="vmap")
    assert r.implementation == "loop"
    assert "cannot be vmapped" in caplog.text


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
def test_callers_model_untouched(impl, device):
    """The engine works on its own copy: the caller's model keeps its tensors, mode, device,
    dtype, flags and hooks, and no random number is drawn (a train-mode forward would update
    BatchNorm's statistics and draw dropout masks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1.0, 1.0)
        model[1].running_var.uniform_(0.5, 2.0)
    model[0].weight.requires_grad_(False)
    model.train()
    model[1].eval()  # a frozen BatchNorm in a model in train mode: modes are per module
    # the model stays float32 on the CPU; the state evaluated is float64
    state = {k: v.double() if v.is_floating_point() else v for k, v in state_of(model).items()}
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    tensors = {k: (v.clone(), v.dtype, v.device) for k, v in
               [*model.named_parameters(), *model.named_buffers()]}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    blocks = gram_blocks(model, state, x, y1=y, implementation=impl, device=device, memory_budget=1)
    next(blocks)
    assert {name: m.training for name, m in model.named_modules()} == modes  # while it runs, too
    blocks.close()
    r = gram(model, state, x, y1=y, implementation=impl, device=device)
    o = gram(model, state, x[:3], of="outputs", implementation=impl, device=device)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in [*model.named_parameters(), *model.named_buffers()]:
        value, dtype, dev = tensors[k]
        assert torch.equal(v, value) and v.dtype == dtype and v.device == dev
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for name, m in model.named_modules()} == hooks
    reference = copy.deepcopy(model).eval()  # the quantity the engine defines: eval mode
    assert_rel(r.matrix, reference_gram(reference, state, x, y1=y))
    assert_rel(o.matrix, reference_gram(reference, state, x[:3], of="outputs"))


def test_state_untouched(subjects):
    s = subjects["residual_bn"]
    before = {k: v.clone() for k, v in s.final.items()}
    for impl in IMPLS:
        gram(s.model, s.final, s.train.x[:4], y1=s.train.y[:4], implementation=impl)
    assert all(torch.equal(before[k], s.final[k]) for k in before)


def test_zero_gradient_gets_zero_cosine():
    g = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    cos = cosine_from_gram(g, g.diagonal(), g.diagonal())
    assert torch.equal(cos[1], torch.zeros(3, dtype=torch.float64))
    assert float(cos[0, 2]) == pytest.approx(1.0)


def test_nan_loss_names_the_examples(subjects):
    s = subjects["nested"]
    x = s.train.x[:5].clone()
    x[3] = float("nan")
    with pytest.raises(DataError, match="positions 3"):
        gram(s.model, s.final, x, y1=s.train.y[:5])


def test_bad_options(subjects):
    s = subjects["nested"]
    x, y = s.train.x[:3], s.train.y[:3]
    with pytest.raises(ConfigError, match="implementation"):
        gram(s.model, s.final, x, y1=y, implementation="fast")
    with pytest.raises(ConfigError, match="of="):
        gram(s.model, s.final, x, y1=y, of="hessian")
    with pytest.raises(ConfigError, match="labels"):
        gram(s.model, s.final, x)
    with pytest.raises(DataError, match="labels"):
        gram(s.model, s.final, x, y1=y[:2])
    with pytest.raises(ConfigError, match="memory_budget"):
        gram(s.model, s.final, x, y1=y, memory_budget=0)


@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize("name", ["residual_bn", "transformer", "nested"])
def test_contraction_and_per_example_routes_agree(subjects, references, name, force, monkeypatch):
    """Layerwise computes a conv / sequence-Linear Gram either by contraction over positions or
    from per-example gradients (chosen by cost); both must equal the loop."""
    monkeypatch.setattr(rules, "_FORCE_CONTRACTION", force)
    s = subjects[name]
    r = gram(s.model, s.final, s.train.x, y1=s.train.y, implementation="layerwise")
    assert_rel(r.matrix, references(name, "loss"))
    o = gram(s.model, s.final, s.train.x[:5], of="outputs", implementation="layerwise")
    assert_rel(o.matrix, references(name, "outputs"))
    t = gram(s.model, s.final, s.train.x[:5], of="outputs", trace_outputs=True, implementation="layerwise")
    assert_rel(t.matrix, references(name, "outputs").diagonal(dim1=-2, dim2=-1).mean(-1))
    chunked = gram(s.model, s.final, s.train.x, y1=s.train.y, implementation="layerwise", memory_budget=1)
    assert chunked.blocks > 1
    assert_rel(chunked.matrix, references(name, "loss"))
    chunked = gram(s.model, s.final, s.train.x[:5], of="outputs", implementation="layerwise", memory_budget=1)
    assert_rel(chunked.matrix, references(name, "outputs"))
    chunked = gram(s.model, s.final, s.train.x[:5], of="outputs", trace_outputs=True,
                   implementation="layerwise", memory_budget=1)
    assert_rel(chunked.matrix, references(name, "outputs").diagonal(dim1=-2, dim2=-1).mean(-1))


class OddConvs(nn.Module):
    """Strided, dilated, non-square and bias-free convolutions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=2)
        self.b = nn.Conv2d(3, 4, (2, 3), padding=(1, 0), bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.tanh(self.a(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize("force", [True, False, None])
def test_odd_convolutions(force, monkeypatch):
    monkeypatch.setattr(rules, "_FORCE_CONTRACTION", force)
    torch.manual_seed(0)
    assert_layerwise_exact(OddConvs().double().eval())


def assert_layerwise_exact(model):
    """Every parameter of `model` (inputs (N, 2, 9, 7)) has an exact layerwise rule: no vmap
    fallback, and loss and output Grams equal the reference loop."""
    state = state_of(model)
    x, y = torch.randn(5, 2, 9, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    r = gram(model, state, x, y1=y, implementation="layerwise")
    assert r.implementation == "layerwise" and r.vmap_params == ()
    assert_rel(r.matrix, reference_gram(model, state, x, y1=y))
    o = gram(model, state, x[:3], of="outputs", implementation="layerwise")
    assert o.vmap_params == ()
    assert_rel(o.matrix, reference_gram(model, state, x[:3], of="outputs"))
    t = gram(model, state, x[:3], of="outputs", trace_outputs=True, implementation="layerwise")
    assert_rel(t.matrix, o.matrix.diagonal(dim1=-2, dim2=-1).mean(-1))


def test_state_other_than_the_models_own(subjects, caplog):
    """BatchNorm statistics come from the state being evaluated, not from the model object."""
    s = subjects["residual_bn"]
    state = s.init  # θ⁰: running statistics differ from the model's own (θ^F) buffers
    assert not torch.equal(state["bn1.running_mean"], s.model.bn1.running_mean)
    x, y = s.train.x[:6], s.train.y[:6]
    with caplog.at_level(logging.WARNING, logger="genprobe.engine.grams"):
        r = gram(s.model, state, x, y1=y, implementation="layerwise")
    assert r.vmap_params == () and "do not sum" not in caplog.text
    assert_rel(r.matrix, reference_gram(s.model, state, x, y1=y))


class ScaledLinear(nn.Module):
    """A user's own NTK-style layer (not the zoo's), declaring the ScaledLinearMap protocol."""

    linear_map = "linear"

    def __init__(self, d_in, d_out, w_scale, b_scale, bias=True, forward_scale=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out)) if bias else None
        self.w_scale, self.b_scale = w_scale, b_scale
        self.forward_scale = w_scale if forward_scale is None else forward_scale  # what it really does

    def forward(self, x):
        b = None if self.bias is None else self.bias * self.b_scale
        return F.linear(x, self.weight * self.forward_scale, b)


class ScaledConv(nn.Module):
    """A user's own scaled convolution with stride, padding and dilation, same protocol."""

    linear_map = "conv2d"

    def __init__(self, c_in, c_out, k, w_scale, b_scale):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.randn(c_out))
        self.w_scale, self.b_scale = w_scale, b_scale
        self.stride, self.padding, self.dilation = (2, 1), (1, 0), 2

    def forward(self, x):
        return F.conv2d(x, self.weight * self.w_scale, self.bias * self.b_scale, self.stride,
                        self.padding, self.dilation)


class ScaledNet(nn.Module):
    """Scaled conv → scaled bias-free Linear over positions → scaled 2-D Linear head."""

    def __init__(self, forward_scale=None):
        super().__init__()
        self.conv = ScaledConv(2, 3, 3, w_scale=0.4, b_scale=0.3)
        self.seq = ScaledLinear(3, 5, w_scale=0.6, b_scale=1.0, bias=False)
        self.head = ScaledLinear(5, 3, w_scale=0.45, b_scale=0.2, forward_scale=forward_scale)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # (B, T, 3)
        return self.head(torch.tanh(self.seq(h)).mean(1))


@pytest.mark.parametrize("force", [True, False, None])
def test_scaled_layers_by_protocol(force, monkeypatch):
    """Layers declaring the ScaledLinearMap protocol get the exact layerwise rules, whatever
    their class or module (no vmap fallback), by either contraction route."""
    monkeypatch.setattr(rules, "_FORCE_CONTRACTION", force)
    torch.manual_seed(0)
    model = ScaledNet().double().eval()
    assert type(model.head).__module__ != "genprobe.zoo.models"
    assert_layerwise_exact(model)


def test_wrongly_declared_protocol_stays_exact(caplog):
    """A layer whose declared w_scale is not the one its forward uses fails the setup check
    against autograd and goes through vmap, so the Gram is still exact."""
    torch.manual_seed(0)
    model = ScaledNet(forward_scale=0.7).double().eval()
    state = state_of(model)
    x, y = torch.randn(5, 2, 9, 7, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.WARNING, logger="genprobe.engine.grams"):
        r = gram(model, state, x, y1=y, implementation="layerwise")
    assert "do not sum to the batch gradient" in caplog.text
    assert r.vmap_params == ("head.weight", "head.bias")
    assert_rel(r.matrix, reference_gram(model, state, x, y1=y))


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_inputs(impl):
    """Token ids stay integer (only floating inputs take the state's dtype)."""
    torch.manual_seed(0)
    model = TokenClassifier().double().eval()  # the shared token-id model of tests/foreign.py
    state = state_of(model)
    x, y = torch.randint(0, 20, (7, 5)), torch.randint(0, 3, (7,))
    r = gram(model, state, x, y1=y, implementation=impl)
    assert_rel(r.matrix, reference_gram(model, state, x, y1=y))
    assert_symmetric(r.matrix)
    assert r.implementation == ("layerwise" if impl == "auto" else impl)
    if r.implementation == "layerwise":
        assert r.vmap_params == ("embed.weight",)
    o = gram(model, state, x[:4], of="outputs", implementation=impl)
    assert_rel(o.matrix, reference_gram(model, state, x[:4], of="outputs"))
    rect = gram(model, state, x[:4], x[4:], y1=y[:4], y2=y[4:], implementation=impl, memory_budget=1)
    assert rect.blocks > 1
    assert_rel(rect.matrix, reference_gram(model, state, x[:4], x[4:], y[:4], y[4:]))
