"""The variants engine against the naive evaluation: deep-copy, load the edited state, full forward."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import genprobe.params as P
from foreign import FOREIGN, make_subject
from genprobe.engine.edits import (
    ActivationContext,
    Edit,
    PathParams,
    activation_noise_edit,
    interpolate_edit,
    mask_edit,
    noise_edit,
    noise_std,
    path_edit,
    replace_edit,
    stack_edits,
)
from genprobe.engine.variants import VariantEvaluator
from genprobe.errors import ConfigError, ModuleSelectionError, StateError

# a module per foreign model whose output activations get masked / noised, and the unit dim
ACT = {"nested": ("blocks.0.ff", 1, 8), "residual_bn": ("bn1", 1, 4), "shared": ("mid", 1, 7),
       "transformer": ("embed", -1, 16), "untraceable": ("a", 1, 6), "positions": ("embed", -1, 10),
       "returns_object": ("fc", 1, 8), "returns_scores": ("fc", 1, 8)}

TOL = 1e-5


def naive_logits(subject, state, hooks=None, data=None):
    """The obviously-right evaluation: a fresh deep copy, load_state_dict, a full forward."""
    model = copy.deepcopy(subject.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k not in state for k in missing)
    model.eval()
    data = data or subject.test
    modules = dict(model.named_modules())
    for name, fn in (hooks or {}).items():
        modules[name].register_forward_hook(lambda m, i, o, fn=fn: fn(o))
    with torch.no_grad():
        return model(data.x)


def metrics(logits, y):
    return float(F.cross_entropy(logits.double(), y)), float((logits.argmax(-1) != y).double().mean())


def assert_matches(result, logits, y, b=None):
    loss, error = metrics(logits, y)
    got_loss = result.loss if b is None else result.loss[b]
    got_err = result.error if b is None else result.error[b]
    assert abs(float(got_loss) - loss) < TOL
    assert abs(float(got_err) - error) < TOL
    if result.logits is not None:
        got = result.logits if b is None else result.logits[b]
        torch.testing.assert_close(got, logits.float(), atol=TOL, rtol=TOL)


def name_of(subject):
    return {factory.__name__: name for name, (factory, _, _) in FOREIGN.items()}[type(subject.model).__name__]


def test_replace_every_unit(foreign_subject):
    s = foreign_subject
    ev = VariantEvaluator(s.model, s.final, s.test)
    units = s.units()
    out = ev.evaluate([Edit()] + [replace_edit(u, s.init) for u in units], logits=True)
    assert_matches(out[0], naive_logits(s, s.final), s.test.y)
    for u, r in zip(units, out[1:], strict=True):
        assert_matches(r, naive_logits(s, P.replace(s.final, s.init, u.params)), s.test.y)


@pytest.mark.parametrize("stack", ["vmap", "loop"])
def test_interpolate_and_noise_stacks(foreign_subject, stack):
    s = foreign_subject
    chunk = None if name_of(s) == "untraceable" else 7   # several chunks (see below)
    ev = VariantEvaluator(s.model, s.final, s.test, batch_size=chunk, stack=stack)
    alphas = [0.0, 0.3, 1.0]
    for u in s.units()[::2]:
        inter = interpolate_edit(u, s.init, s.final, alphas)
        noise = noise_edit(u, s.final, 0.05, 3, seed=1)
        rel = noise_edit(u, s.final, 0.1, 2, seed=2, scale="relative")
        out = ev.evaluate([inter, noise, rel], logits=True, per_example=True)
        assert out[0].loss.shape == (3,) and out[0].losses.shape == (3, len(s.test))
        for b, a in enumerate(alphas):
            assert_matches(out[0], naive_logits(s, P.interpolate(s.init, s.final, a, u.params)),
                           s.test.y, b)
        for edit, res in ((noise, out[1]), (rel, out[2])):
            for b in range(edit.size):
                state = {**s.final, **{k: v[b] for k, v in edit.params.items()}}
                assert_matches(res, naive_logits(s, state), s.test.y, b)


def test_noise_draws_reproducible_and_scaled():
    s = make_subject("nested")
    u = s.units()[0]
    a, b = noise_edit(u, s.final, 0.1, 4, seed=3), noise_edit(u, s.final, 0.1, 4, seed=3)
    c = noise_edit(u, s.final, 0.1, 4, seed=4)
    k = u.params[0]
    assert torch.equal(a.params[k], b.params[k]) and not torch.equal(a.params[k], c.params[k])
    big = noise_edit(u, s.final, 1.0, 2000, seed=0)
    std = (big.params[k] - s.final[k]).std()
    assert abs(float(std) - 1.0) < 0.02
    rel = noise_edit(u, s.final, 1.0, 2000, seed=0, scale="relative")
    expect = float(s.final[k].norm()) / s.final[k].numel() ** 0.5
    assert abs(float((rel.params[k] - s.final[k]).std()) / expect - 1) < 0.02
    with pytest.raises(ConfigError):
        noise_edit(u, s.final, 0.1, 2, scale="weird")


@pytest.mark.parametrize("stack", ["vmap", "loop"])
def test_activation_masks_and_noise(foreign_subject, stack):
    s = foreign_subject
    module, dim, c = ACT[name_of(s)]
    # Untraceable branches on a whole-batch sum: only the one-chunk evaluation equals the naive one
    chunk = None if name_of(s) == "untraceable" else 10
    ev = VariantEvaluator(s.model, s.final, s.test, batch_size=chunk, stack=stack)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(c, generator=g) < 0.5
    means = torch.randn(c, generator=g)
    masks = torch.rand(3, c, generator=g) < 0.4

    def view(t, h):
        sh = [1] * h.dim()
        sh[dim] = -1
        return t.view(sh)

    noise = torch.randn(len(s.test), *([c] if dim == 1 else [4, c]), generator=g)
    if name_of(s) == "residual_bn":
        noise = torch.randn(len(s.test), 4, 6, 6, generator=g)
    fixed = Edit(activations={module: lambda h, ctx: h + 0.3 * noise[ctx.index]})
    edits = [mask_edit(module, mask, dim=dim), mask_edit(module, mask, means, dim=dim),
             mask_edit(module, masks, dim=dim), fixed,
             stack_edits([replace_edit(s.units()[-1], s.init)])]
    out = ev.evaluate(edits, logits=True)
    y = s.test.y
    assert_matches(out[0], naive_logits(s, s.final, {module: lambda h: torch.where(view(mask, h), 0.0, h)}), y)
    assert_matches(out[1], naive_logits(s, s.final, {module: lambda h: torch.where(view(mask, h), view(means, h), h)}), y)
    for b in range(3):
        m = masks[b]
        assert_matches(out[2], naive_logits(s, s.final, {module: lambda h, m=m: torch.where(view(m, h), 0.0, h)}), y, b)
    assert_matches(out[3], naive_logits(s, s.final, {module: lambda h: h + 0.3 * noise}), y)


def test_activation_noise_edit_reproducible():
    s = make_subject("nested")
    ev = VariantEvaluator(s.model, s.final, s.test, batch_size=8)
    e1 = activation_noise_edit("blocks.0.ff", torch.full((8,), 0.5), seed=1)
    e2 = activation_noise_edit("blocks.0.ff", torch.full((8,), 0.5), seed=1)
    e3 = activation_noise_edit("blocks.0.ff", 0.5, seed=2)
    r = ev.evaluate([Edit(), e1, e2, e3], per_example=True)
    assert torch.equal(r[1].losses, r[2].losses)
    assert not torch.equal(r[1].losses, r[3].losses)
    assert not torch.equal(r[0].losses, r[1].losses)


def test_self_checks_change_nothing(foreign_subject):
    """Re-init to θ^F, and re-init of a module whose θ^F = θ⁰, give the trained model's result."""
    s = foreign_subject
    u = s.units()[0]
    final = P.replace(s.final, s.init, u.params)           # unit 0 never moved
    ev = VariantEvaluator(s.model, final, s.test)
    out = ev.evaluate([Edit(), replace_edit(u, s.init)] + [replace_edit(v, final) for v in s.units()],
                      per_example=True)
    for r in out[1:]:
        assert torch.equal(r.losses, out[0].losses)
    assert_matches(out[0], naive_logits(s, final), s.test.y)


def test_fx_used_for_traceable_and_fallback_warns(foreign_subject, caplog):
    s = foreign_subject
    with caplog.at_level(logging.WARNING, logger="genprobe.engine.variants"):
        ev = VariantEvaluator(s.model, s.final, s.test)
        mode = ev.mode
    if name_of(s) == "untraceable":
        assert mode == "full" and "TraceError" in ev.fallback_reason
        assert any("TraceError" in r.getMessage() and "falling back" in r.getMessage()
                   for r in caplog.records)
        assert ev.recomputed(replace_edit(s.units()[-1], s.init)) is None
    else:
        assert mode == "fx" and ev.fallback_reason is None
        assert not caplog.records
        # prefix reuse: editing the last unit recomputes fewer nodes than editing the first
        first = ev.recomputed(replace_edit(s.units()[0], s.init))
        last = ev.recomputed(replace_edit(s.units()[-1], s.init))
        assert len(last) < len(first)
        assert ev.recomputed(Edit()) == []


def test_downstream_includes_residual_and_shared_sites():
    s = make_subject("residual_bn")
    ev = VariantEvaluator(s.model, s.final, s.test)
    nodes = ev.recomputed(replace_edit(s.units("stem")[0], s.init))
    assert "stem" in nodes and "add" in nodes and "conv" in nodes   # both branches of the sum
    assert ev.recomputed(replace_edit(s.units("fc")[0], s.init)) == ["fc", "output"]
    s = make_subject("shared")
    ev = VariantEvaluator(s.model, s.final, s.test)
    nodes = ev.recomputed(replace_edit(s.units("mid")[0], s.init))
    assert "inp" not in nodes and sum(n.startswith("mid") for n in nodes) == 2


def test_memory_budget_and_chunks_do_not_change_results():
    s = make_subject("residual_bn", n_test=23)
    u = s.units("conv")[0]
    edits = [replace_edit(u, s.init), interpolate_edit(u, s.init, s.final, [0.2, 0.7, 0.9])]
    big = VariantEvaluator(s.model, s.final, s.test).evaluate(edits, per_example=True)
    tiny = VariantEvaluator(s.model, s.final, s.test, memory_budget=1).evaluate(edits, per_example=True)
    full = VariantEvaluator(s.model, s.final, s.test, use_fx=False).evaluate(edits, per_example=True)
    for a, b, c in zip(big, tiny, full, strict=True):
        torch.testing.assert_close(a.losses, b.losses, atol=TOL, rtol=TOL)
        torch.testing.assert_close(a.losses, c.losses, atol=TOL, rtol=TOL)


def test_caller_model_and_states_unchanged(foreign_subject):
    s = foreign_subject
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    final = {k: v.clone() for k, v in s.final.items()}
    u = s.units()[0]
    ev = VariantEvaluator(s.model, s.final, s.test)
    ev.evaluate([replace_edit(u, s.init), noise_edit(u, s.final, 0.1, 2),
                 mask_edit(ACT[name_of(s)][0], torch.ones(ACT[name_of(s)][2], dtype=torch.bool),
                           dim=ACT[name_of(s)][1])])
    for k, v in s.model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in s.final.items():
        assert torch.equal(v, final[k])
    assert all(not m._forward_hooks for m in s.model.modules())
    # an edit carries only its unit's keys: every other parameter is the base's, bit for bit
    assert set(replace_edit(u, s.init).params) == set(u.params)


def test_float64_tight():
    s = make_subject("residual_bn", dtype=torch.float64)
    ev = VariantEvaluator(s.model, s.final, s.test)
    for u in s.units():
        r = ev.evaluate([replace_edit(u, s.init)], logits=True)[0]
        ref = naive_logits(s, P.replace(s.final, s.init, u.params))
        loss, _ = metrics(ref, s.test.y)
        assert abs(float(r.loss) - loss) < 1e-12


def test_bad_edits():
    s = make_subject("nested")
    ev = VariantEvaluator(s.model, s.final, s.test)
    k = s.units()[0].params[0]
    with pytest.raises(StateError, match="unknown state key"):
        ev.evaluate([Edit(params={"nope.weight": torch.zeros(1)})])
    with pytest.raises(StateError, match="shape"):
        ev.evaluate([Edit(params={k: torch.zeros(1)})])
    with pytest.raises(StateError, match="shape"):
        ev.evaluate([Edit(params={k: s.final[k]}, size=2)])
    with pytest.raises(ModuleSelectionError, match="blocks.0.ff"):
        ev.evaluate([mask_edit("nope", torch.ones(3, dtype=torch.bool))])
    with pytest.raises(ConfigError):
        VariantEvaluator(s.model, s.final, s.test, batch_size=0)
    with pytest.raises(ConfigError):
        stack_edits([])


def test_context_has_indices():
    s = make_subject("nested", n_test=10)
    seen = []

    def fn(h, ctx: ActivationContext):
        seen.append(ctx.index.clone())
        return h

    VariantEvaluator(s.model, s.final, s.test, batch_size=4).evaluate(
        [Edit(activations={"blocks.1.out": fn})])
    assert torch.equal(torch.cat(seen), torch.arange(10))


def test_repeated_variants_computed_once_and_filled():
    s = make_subject("residual_bn")
    u = s.units("conv")[0]
    e = stack_edits([replace_edit(u, s.init), replace_edit(u, s.final), replace_edit(u, s.init),
                     interpolate_edit(u, s.init, s.final, [0.5])])
    ev = VariantEvaluator(s.model, s.final, s.test)
    r = ev.evaluate([e, Edit()], per_example=True)[0]
    assert torch.equal(r.losses[0], r.losses[2])
    assert abs(float(r.loss[1]) - float(ev.evaluate([Edit()])[0].loss)) == 0
    assert_matches(r, naive_logits(s, P.interpolate(s.init, s.final, 0.5, u.params)), s.test.y, 3)
    assert_matches(r, naive_logits(s, P.replace(s.final, s.init, u.params)), s.test.y, 2)


class ConvView(torch.nn.Module):
    """A conv net whose forward `.view`s a conv output: fine contiguous, fails channels-last."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.view(h.size(0), -1))


def test_fast_path_equals_plain_path():
    from genprobe.zoo import create_model

    torch.manual_seed(0)
    model = create_model("resnet", input_shape=(3, 8, 8), num_classes=4, depth=8, width=4).eval()
    s = moved_subject(model, (3, 8, 8), 4, n=16, step=0.05)
    fast = VariantEvaluator(s.model, s.final, s.test, batch_size=8)
    plain = VariantEvaluator(s.model, s.final, s.test, batch_size=8, fast=False)
    assert fast.channels_last and not plain.channels_last
    units = s.units()[::4]
    edits = [replace_edit(u, s.init) for u in units] + [mask_edit("stages.1.0.bn1", torch.arange(8) < 3)]
    fused = {n.target for n in fast._nodes(edits[0], fast._program(frozenset()))[1]}
    assert units[0].name == "stem.0" and "stem.0" in fused       # the edited conv, BN folded
    assert len(fused) > 1                                           # and convs downstream
    a = fast.evaluate(edits, logits=True)
    b = plain.evaluate(edits, logits=True)
    for u, x, y in zip(units + ["mask"], a, b, strict=True):
        torch.testing.assert_close(x.logits, y.logits, atol=1e-5, rtol=1e-5, msg=str(u))
    for u, x in zip(units, a, strict=False):
        assert_matches(x, naive_logits(s, P.replace(s.final, s.init, u.params)), s.test.y)


def moved_subject(model, shape, k, n, step):
    """A Subject of `model` with non-trivial BatchNorm running statistics, θ⁰ its current state
    and θ^F = θ⁰ + step · N(0, 1) noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    init = P.state_of(model)
    final = {key: v + step * torch.randn_like(v) if v.is_floating_point() else v for key, v in init.items()}
    model.load_state_dict(final)
    return gp_subject(model, init, shape, k, n=n)


def gp_subject(model, init, shape, k, n=40):
    import genprobe as gp

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g)
    return gp.Subject(model, init=init, test=(x, y), train=(x, y))


def test_channels_last_rejected_when_forward_needs_contiguous():
    torch.manual_seed(0)
    s = moved_subject(ConvView().eval(), (1, 6, 6), 3, n=40, step=0.05)
    ev = VariantEvaluator(s.model, s.final, s.test)
    assert not ev.channels_last and ev.mode == "fx"
    r = ev.evaluate([replace_edit(s.units("conv")[0], s.init)], logits=True)[0]
    assert_matches(r, naive_logits(s, P.replace(s.final, s.init, s.units("conv")[0].params)), s.test.y)


def test_stack_mode_auto_loops_on_the_cpu_and_is_validated():
    s = make_subject("nested")
    assert VariantEvaluator(s.model, s.final, s.test, device="cpu").stack == "loop"
    assert VariantEvaluator(s.model, s.final, s.test, device="cpu", stack="vmap").stack == "vmap"
    with pytest.raises(ConfigError, match="stack"):
        VariantEvaluator(s.model, s.final, s.test, stack="threads")


class AliasTraps(torch.nn.Module):
    """Every way an in-place ReLU or addition could clobber a value something else still reads:
    a conv output used twice, an identity that returns its input, a view, a broadcasting sum
    whose first operand is the smaller one, an in-place ReLU module of the model's own."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.same = torch.nn.Identity()
        self.act = torch.nn.ReLU(inplace=True)
        self.gate = torch.nn.Linear(4, 1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn1(self.conv1(x))            # fresh, but used by relu and by the sum below
        a = torch.relu(h)
        b = self.conv2(a)
        b = b + h                              # first operand fresh and used once
        c = torch.relu(self.same(b))           # identity: relu's operand is b itself
        p = c.mean(dim=(2, 3))
        g = self.gate(p)                       # (n, 1)
        s = g + p                              # broadcasts: cannot overwrite g
        s = self.act(s)                        # the model's own in-place ReLU
        flat = s.view(s.size(0), -1)
        return self.fc(torch.relu(flat) + flat)


def test_in_place_elementwise_never_clobbers_a_value_in_use():
    torch.manual_seed(0)
    s = moved_subject(AliasTraps().eval(), (2, 5, 5), 3, n=24, step=0.1)
    fast = VariantEvaluator(s.model, s.final, s.test, batch_size=8)
    plain = VariantEvaluator(s.model, s.final, s.test, batch_size=8, fast=False)
    assert fast.mode == "fx" and fast._program(frozenset()).elementwise   # the in-place path runs
    edits = [replace_edit(u, s.init) for u in s.units()]
    for _ in range(2):   # a second pass would see any cached base value that was overwritten
        a, b = fast.evaluate(edits, logits=True), plain.evaluate(edits, logits=True)
        for u, x, y in zip(s.units(), a, b, strict=True):
            torch.testing.assert_close(x.logits, y.logits, atol=1e-5, rtol=1e-5, msg=u.name)
            assert_matches(x, naive_logits(s, P.replace(s.final, s.init, u.params)), s.test.y)


@pytest.mark.parametrize("hidden, chunk", [(32768, 64), (4096, 200), (1 << 20, 16)])
def test_cpu_chunks_keep_the_largest_activation_small(hidden, chunk):
    """A network whose largest activation is `hidden` float32 values per example: a CPU chunk
    holds as many examples as keep that activation within 8 MiB (128 KiB each: 64), all 200
    when they fit, and never fewer than 16 (4 MiB each)."""
    from genprobe.values import Data

    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    data = Data(torch.randn(200, 4), torch.randint(0, 3, (200,)))
    ev = VariantEvaluator(model, model.state_dict(), data, device="cpu", memory_budget=1 << 34)
    assert ev._chunking(ev._program(frozenset()))[0] == chunk


# ----------------------------------------------------------------------------- caller's objects


class WritesInput(torch.nn.Module):
    """BatchNorm (buffers a train-mode forward would update) and an in-place ReLU on the input
    itself: the forward writes the tensor it is given."""

    def __init__(self):
        super().__init__()
        self.act = torch.nn.ReLU(inplace=True)
        self.fc1 = torch.nn.Linear(5, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(self.act(x)))))


def _snapshot(model, data):
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
            "device": [t.device for t in list(model.parameters()) + list(model.buffers())],
            "ptr": [t.data_ptr() for t in model.state_dict().values()],
            "data": (data.x.clone(), data.y.clone()), "rng": torch.get_rng_state()}


def _assert_unchanged(before, model, data):
    after = _snapshot(model, data)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]) and v.dtype == after["state"][k].dtype, k
    for what in ("training", "requires_grad", "hooks", "device", "ptr"):
        assert before[what] == after[what], what
    assert torch.equal(before["data"][0], data.x) and torch.equal(before["data"][1], data.y)
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("use_fx", [True, False])
def test_caller_model_data_and_rng_untouched(use_fx):
    """evaluate() and the engine leave the caller's model (values, train flag, requires_grad,
    hooks, device), its data (even for a model that writes its input) and the global RNG alone."""
    import genprobe as gp
    from genprobe.values import Data

    torch.manual_seed(0)
    model = WritesInput()
    model.fc1.weight.requires_grad_(False)
    seen = []
    model.fc2.register_forward_hook(lambda m, i, o: seen.append(1))
    model.train()                       # a train-mode model: BatchNorm would update its buffers
    init = P.state_of(model)
    final = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in init.items()}
    final["bn.running_var"] = final["bn.running_var"].abs() + 0.5
    g = torch.Generator().manual_seed(1)
    data = Data(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))
    before = _snapshot(model, data)
    state_before = {k: v.clone() for k, v in final.items()}

    plain = gp.evaluate(model, final, data, batch_size=16)
    ev = VariantEvaluator(model, final, data, batch_size=16, use_fx=use_fx)
    u = [u for u in P.select_units(model, None) if u.name == "fc1"][0]
    out = ev.evaluate([Edit(), replace_edit(u, init), interpolate_edit(u, init, final, [0.5, 1.0]),
                       noise_edit(u, final, 0.1, 2)], per_example=True)
    _assert_unchanged(before, model, data)
    for k, v in state_before.items():
        assert torch.equal(v, final[k])

    ref = copy.deepcopy(model).eval()
    ref.load_state_dict(final)
    with torch.no_grad():
        expect = ref(data.x.clone())
    loss, error = metrics(expect, data.y)
    assert abs(plain.loss - loss) < TOL and abs(plain.error - error) < TOL
    assert abs(float(out[0].loss) - loss) < TOL and abs(float(out[2].loss[1]) - loss) < TOL
    assert seen  # the caller's hook is the model's: the private copies run it too


def test_evaluate_copies_a_model_on_another_device():
    from genprobe.evaluate import _private_model

    model = WritesInput().eval()
    assert _private_model(model, torch.device("cpu")) is model       # runnable as it is
    moved = _private_model(model, torch.device("meta"))
    assert moved is not model and next(moved.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"
    trained = WritesInput().train()
    copy_ = _private_model(trained, torch.device("cpu"))
    assert copy_ is not trained and not copy_.training and trained.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_leaves_a_cpu_model_on_the_cpu():
    import genprobe as gp

    s = make_subject("nested")
    before = _snapshot(s.model, s.test)
    on_gpu = gp.evaluate(s.model, s.final, s.test, device="cuda")
    ev = VariantEvaluator(s.model, s.final, s.test, device="cuda")
    r = ev.evaluate([replace_edit(s.units()[0], s.init)], logits=True)[0]
    _assert_unchanged(before, s.model, s.test)
    on_cpu = gp.evaluate(s.model, s.final, s.test, device="cpu")
    assert abs(on_gpu.loss - on_cpu.loss) < 1e-5
    assert_matches(r, naive_logits(s, P.replace(s.final, s.init, s.units()[0].params)), s.test.y)


# ----------------------------------------------------------------------------- input dtypes


@pytest.mark.parametrize("use_fx", [True, False])
@pytest.mark.parametrize("stack", ["vmap", "loop"])
def test_token_ids_end_to_end(use_fx, stack):
    """Integer (N, T) inputs through an nn.Embedding text classifier: never cast to float."""
    import genprobe as gp

    s = make_subject("tokens", steps=5)
    assert s.test.x.dtype == torch.int64
    ev = VariantEvaluator(s.model, s.final, s.test, batch_size=10, use_fx=use_fx, stack=stack)
    assert ev.mode == ("fx" if use_fx else "full")
    embed, head = s.units("embed")[0], s.units("head")[0]
    edits = [Edit(), replace_edit(embed, s.init), replace_edit(head, s.init),
             interpolate_edit(embed, s.init, s.final, [0.0, 0.4, 1.0]),
             interpolate_edit(head, s.init, s.final, [0.3, 0.9]),
             noise_edit(embed, s.final, 0.2, 3, seed=1), noise_edit(head, s.final, 0.2, 2, seed=2,
                                                                   scale="relative")]
    out = ev.evaluate(edits, logits=True)
    y = s.test.y
    assert_matches(out[0], naive_logits(s, s.final), y)
    for u, r in ((embed, out[1]), (head, out[2])):
        assert_matches(r, naive_logits(s, P.replace(s.final, s.init, u.params)), y)
    for u, r, alphas in ((embed, out[3], [0.0, 0.4, 1.0]), (head, out[4], [0.3, 0.9])):
        for b, a in enumerate(alphas):
            assert_matches(r, naive_logits(s, P.interpolate(s.init, s.final, a, u.params)), y, b)
    for e, r in ((edits[5], out[5]), (edits[6], out[6])):
        for b in range(e.size):
            assert_matches(r, naive_logits(s, {**s.final, **{k: v[b] for k, v in e.params.items()}}), y, b)
    plain = gp.evaluate(s.model, s.final, s.test)
    assert abs(plain.loss - float(out[0].loss)) < TOL


def test_floating_inputs_take_the_models_dtype():
    """A float64 model given float32 inputs runs in float64 (not the global default dtype)."""
    import genprobe as gp
    from genprobe.values import Data

    s = make_subject("nested", dtype=torch.float64)
    x32 = Data(s.test.x.float(), s.test.y)
    expect, _ = metrics(naive_logits(s, s.final, data=Data(x32.x.double(), x32.y)), x32.y)
    ev = VariantEvaluator(s.model, s.final, x32)
    assert ev.input_dtype == torch.float64
    assert abs(float(ev.evaluate([Edit()])[0].loss) - expect) < 1e-12
    assert abs(gp.evaluate(s.model, s.final, x32).loss - expect) < 1e-6   # float32 logits
    assert x32.x.dtype == torch.float32


# ----------------------------------------------------------------------------- memory budget


def test_default_memory_budget_is_the_shared_estimator():
    from genprobe.memory import resolve_memory_budget

    s = make_subject("nested")
    ev = VariantEvaluator(s.model, s.final, s.test, device="cpu")
    assert ev.memory_budget == resolve_memory_budget(None, torch.device("cpu"))
    assert VariantEvaluator(s.model, s.final, s.test, memory_budget=12345).memory_budget == 12345
    for bad in (0, -1, "1GB", True):
        with pytest.raises(ConfigError, match="memory_budget"):
            VariantEvaluator(s.model, s.final, s.test, memory_budget=bad)


class Recorded(PathParams):
    """A PathParams that records how many variants each build held."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pieces = []

    def take(self, index):
        self.pieces.append(len(list(index)))
        return super().take(index)


@pytest.mark.parametrize("stack", ["vmap", "loop"])
def test_stacks_split_to_the_memory_budget_give_the_same_results(stack):
    """A tiny budget runs each stack one variant at a time: results equal the unsplit run (and
    the naive loop); the default budget runs it whole."""
    s = make_subject("residual_bn", n_test=23)
    u = s.units("conv")[0]
    z = {k: torch.randn(3, *s.final[k].shape, generator=torch.Generator().manual_seed(int(k == u.params[0])))
         for k in u.params}
    points = [(0.0, 0.0), (0.5, 0.1), (1.0, 0.0), (1.0, 0.3)]

    def edits():
        alphas, sigmas, draws = [], [], []
        for a, sg in points:
            count = 1 if sg == 0 else 3
            alphas += [a] * count
            sigmas += [sg] * count
            draws += list(range(count))
        lazy = Recorded(u.params, s.init, s.final, alphas, sigmas, draws, z, "relative")
        eager = interpolate_edit(u, s.init, s.final, [0.2, 0.7, 0.9])
        return [Edit(params=lazy, size=lazy.size), eager, Edit()]

    whole, split = edits(), edits()
    ev = VariantEvaluator(s.model, s.final, s.test, stack=stack, batch_size=8)
    a = ev.evaluate(whole, per_example=True)
    # the same chunks of 8 examples, but room for one variant at a time
    total = ev._estimate_bytes(ev._program(frozenset()) if ev.route == "fx" else None)[0]
    tight = VariantEvaluator(s.model, s.final, s.test, stack=stack, batch_size=8,
                             memory_budget=int(16 * total + 1))
    b = tight.evaluate(split, per_example=True)
    tiny = VariantEvaluator(s.model, s.final, s.test, stack=stack, memory_budget=1).evaluate(
        edits(), per_example=True)
    assert tight.route == ev.route and tight._chunking(None)[0] == 8
    # after the scan for repeats, each of the 3 chunks builds the 7 variants that are not the
    # base: all at once, or one at a time
    assert whole[0].params.pieces[-3:] == [7, 7, 7]
    assert split[0].params.pieces[-21:] == [1] * 21
    for x, y, t in zip(a, b, tiny, strict=True):
        if stack == "loop":
            assert torch.equal(x.losses, y.losses)
        torch.testing.assert_close(x.losses, y.losses, atol=TOL, rtol=TOL)
        torch.testing.assert_close(x.losses, t.losses, atol=TOL, rtol=TOL)
    dense = whole[0].params
    for i in range(dense.size):
        state = {**s.final, **{k: dense[k][i] for k in u.params}}
        assert_matches(b[0], naive_logits(s, state), s.test.y, i)


# ----------------------------------------------------------------------------- path edits


@pytest.mark.parametrize("scale", ["absolute", "relative"])
def test_path_edit_is_the_literal_formula(scale):
    """θ = lerp(θ⁰, θ^F, α) + σ · std · z with the given draws, bit for bit; σ = 0 gives one
    variant; noise_std is σ or σ ‖center‖ / √numel."""
    s = make_subject("nested", dtype=torch.float64)
    u = s.units()[0]
    g = torch.Generator().manual_seed(0)
    z = {k: torch.randn(4, *s.final[k].shape, generator=g, dtype=torch.float64) for k in u.params}
    points = [(0.3, 0.0), (0.3, 0.2), (1.0, 0.05)]
    edit, sizes = path_edit(u, s.init, s.final, points, z, scale=scale)
    assert sizes == [1, 4, 4] and edit.size == 9 and set(edit.params) == set(u.params)
    row = 0
    for (a, sg), count in zip(points, sizes, strict=True):
        for d in range(count):
            for k in u.params:
                center = (1 - a) * s.init[k] + a * s.final[k]
                if sg == 0:
                    expect = center
                else:
                    rms = float(center.norm()) / center.numel() ** 0.5 if scale == "relative" else 1.0
                    assert noise_std(center, sg, scale) == pytest.approx(sg * rms, rel=1e-12)
                    expect = center + sg * rms * z[k][d]
                torch.testing.assert_close(edit.params[k][row], expect, rtol=1e-13, atol=1e-15)
            row += 1
    built = edit.params.take(range(edit.size))
    for k in u.params:
        assert torch.equal(built[k], edit.params[k])
    ev = VariantEvaluator(s.model, s.final, s.test)
    res = ev.evaluate([edit])[0]
    for b in range(edit.size):
        ref, _ = metrics(naive_logits(s, {**s.final, **{k: built[k][b] for k in u.params}}), s.test.y)
        assert abs(float(res.loss[b]) - ref) < 1e-12
    with pytest.raises(ConfigError):
        path_edit(u, s.init, s.final, [(0.5, 0.1)], None)
    with pytest.raises(ConfigError):
        noise_std(s.final[u.params[0]], 0.1, "weird")


def test_repeated_and_base_equal_variants_of_a_lazy_stack():
    """Variants equal to the base are not computed; repeated ones are computed once."""
    s = make_subject("nested")
    u = s.units()[1]
    z = {k: torch.randn(2, *s.final[k].shape) for k in u.params}
    edit, _ = path_edit(u, s.init, s.final, [(1.0, 0.0), (0.5, 0.1), (0.5, 0.0), (0.5, 0.1),
                                             (0.5, 0.0)], z)
    ev = VariantEvaluator(s.model, s.final, s.test)
    keep, same = ev._distinct(edit, 2)
    assert keep == [1, 2, 3] and same == {4: 1, 5: 2, 6: 3}
    r = ev.evaluate([edit, Edit()], per_example=True)
    assert torch.equal(r[0].losses[0], r[1].losses)
    for b, a in same.items():
        assert torch.equal(r[0].losses[b], r[0].losses[a])


# ----------------------------------------------------------------------------- the route rule


def _fcn_subject(n=128):
    """A 784-64-64-64-4 MLP: the first layer holds most of the compute."""
    from genprobe.zoo import create_model

    torch.manual_seed(0)
    model = create_model("fcn", input_shape=(1, 28, 28), num_classes=4, depth=3, width=64).eval()
    init = P.state_of(model)
    final = {k: v + 0.05 * torch.randn_like(v) for k, v in init.items()}
    model.load_state_dict(final)
    return gp_subject(model, init, (1, 28, 28), 4, n=n)


def test_route_rule_picks_the_cheaper_path_and_both_are_right():
    """Prefix reuse when the suffixes save more than the base run costs (free when the base
    result is needed anyway); a full forward for a single variant, or for edits of the first
    layer alone. Every case is checked against the full path and the naive loop."""
    s = _fcn_subject()
    units = s.units()
    first, middle, last = units[0], units[1], units[-1]
    cases = [
        ([replace_edit(middle, s.init)], "full"),                      # one variant
        ([stack_edits([replace_edit(first, s.init),
                       interpolate_edit(first, s.init, s.final, [0.5])])], "full"),  # first layer
        ([stack_edits([replace_edit(last, s.init), interpolate_edit(last, s.init, s.final, [0.5])])],
         "fx"),                                                        # the head: tiny suffix
        ([Edit(), replace_edit(middle, s.init)], "fx"),                # the base is needed anyway
        ([interpolate_edit(middle, s.init, s.final, [0.0, 0.5, 1.0])], "fx"),  # α = 1 is the base
    ]
    for edits, route in cases:
        ev = VariantEvaluator(s.model, s.final, s.test)
        out = ev.evaluate(edits, logits=True)
        assert ev.route == route, [e.params.keys() for e in edits]
        forced = VariantEvaluator(s.model, s.final, s.test, use_fx=False)
        again = forced.evaluate(edits, logits=True)
        assert forced.route == "full"
        for e, r, q in zip(edits, out, again, strict=True):
            torch.testing.assert_close(r.logits, q.logits, atol=TOL, rtol=TOL)
            for b in range(e.variants):
                state = {**s.final, **{k: (v if e.size is None else v[b]) for k, v in e.params.items()}}
                assert_matches(r, naive_logits(s, state), s.test.y, None if e.size is None else b)


def test_on_progress_reports_every_example_once():
    s = make_subject("nested", n_test=23)
    seen = []
    VariantEvaluator(s.model, s.final, s.test, batch_size=10).evaluate(
        [Edit()], on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(10, 23), (10, 23), (3, 23)]


# ----------------------------------------------------------------------------- unit edits (Morcos et al.)

ACT_TOL = 1e-10


def reference_z(seed, draw, index, shape):
    """The documented draw, written out: one generator per (seed, draw, example)."""
    import numpy as np

    rows = [np.random.default_rng(np.random.SeedSequence([seed, draw, int(i)])).standard_normal(shape)
            for i in index]
    return torch.from_numpy(np.stack(rows))


def unit_shape(t, h):
    d = 1 if h.dim() == 4 else h.dim() - 1
    sh = [1] * h.dim()
    sh[d] = -1
    return t.reshape(sh)


def test_activation_noise_independent_of_chunking():
    s = make_subject("residual_bn", dtype=torch.float64, n_test=23)
    e = activation_noise_edit("bn1", torch.linspace(0.1, 0.8, 4), seed=3, draws=2)
    results = [VariantEvaluator(s.model, s.final, s.test, batch_size=b).evaluate([e], per_example=True)[0]
               for b in (3, 7, None)]
    for r in results[1:]:
        assert torch.equal(r.losses, results[0].losses)
        # the mean sums the chunks' sums: other chunks, another order of float additions
        torch.testing.assert_close(r.loss, results[0].loss, rtol=1e-14, atol=0)
    # the noise itself, chunk by chunk, is the same tensor whatever the chunks
    fn = e.activations["bn1"]
    h = torch.zeros(23, 4, 6, 6, dtype=torch.float64)
    args = {k: v[1] for k, v in e.args.items()}
    whole = fn(h, ActivationContext(torch.arange(23), args))
    pieces = torch.cat([fn(h[i:i + 5], ActivationContext(torch.arange(i, min(i + 5, 23)), args))
                        for i in range(0, 23, 5)])
    assert torch.equal(whole, pieces)


@pytest.mark.parametrize("shape", [(6,), (6, 5, 5), (4, 6)])
def test_activation_noise_has_the_requested_per_unit_std(shape):
    n = 3000
    std = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    e = activation_noise_edit("m", std, seed=7)
    h = torch.randn(n, *shape, dtype=torch.float64)
    out = e.activations["m"](h, ActivationContext(torch.arange(n), e.args))
    d = 1 if len(shape) == 3 else len(shape)
    delta = (out - h).movedim(d, -1).reshape(-1, 6)     # h' − h of every example and position
    got = delta.std(0)
    se = std / (2 * (len(delta) - 1)) ** 0.5
    assert torch.all((got - std).abs() <= 4 * se + 1e-15)
    assert torch.all(delta.mean(0).abs() <= 4 * std / len(delta) ** 0.5 + 1e-15)


@pytest.mark.parametrize("stack", ["vmap", "loop"])
def test_activation_noise_stack_equals_the_individual_edits(stack):
    s = make_subject("nested", dtype=torch.float64)
    ev = VariantEvaluator(s.model, s.final, s.test, batch_size=10, stack=stack)
    per_unit = torch.rand(2, 8, dtype=torch.float64)
    edits = [activation_noise_edit("blocks.1.ff", [0.2, 0.7, 0.0], seed=1, draws=3),
             activation_noise_edit("blocks.1.ff", per_unit, seed=1, draws=2)]
    singles = [activation_noise_edit("blocks.1.ff", sd, seed=1, draws=3) for sd in (0.2, 0.7, 0.0)]
    singles += [activation_noise_edit("blocks.1.ff", per_unit[i], seed=1, draws=2) for i in range(2)]
    firsts = [activation_noise_edit("blocks.1.ff", sd, seed=1) for sd in (0.2, 0.7)]
    out = ev.evaluate(edits + singles + firsts + [Edit()], per_example=True)
    assert ev.route == "fx" and ev._vmap_ok == (stack == "vmap")   # vmap really ran
    assert edits[0].size == 9 and edits[1].size == 4 and firsts[0].size is None
    whole = torch.cat([out[2].losses, out[3].losses, out[4].losses])
    torch.testing.assert_close(out[0].losses, whole, atol=ACT_TOL, rtol=0)
    torch.testing.assert_close(out[1].losses, torch.cat([out[5].losses, out[6].losses]), atol=ACT_TOL, rtol=0)
    for i in range(2):   # draw 0 of a stack is the single edit; std 0 is the base network
        torch.testing.assert_close(out[7 + i].losses, out[0].losses[3 * i], atol=ACT_TOL, rtol=0)
    for d in range(3):
        torch.testing.assert_close(out[0].losses[6 + d], out[-1].losses, atol=ACT_TOL, rtol=0)
    assert not torch.allclose(out[0].losses[0], out[0].losses[1])   # draws differ


@pytest.mark.parametrize("name", ["nested", "residual_bn", "transformer", "shared"])
@pytest.mark.parametrize("use_fx", [True, False])
def test_activation_noise_equals_a_plain_hook_loop(name, use_fx):
    s = make_subject(name, dtype=torch.float64)
    module, _, c = ACT[name]
    seed, draws = 5, 2
    scales = torch.rand(2, c, dtype=torch.float64) + 0.1
    e = activation_noise_edit(module, scales, seed=seed, draws=draws)
    ev = VariantEvaluator(s.model, s.final, s.test, batch_size=7, use_fx=use_fx)
    out = ev.evaluate([Edit(), e], logits=True)[1]
    # the cost rule runs first-layer edits as plain forwards; later sites reuse the prefix
    assert ev.route == ("fx" if use_fx and name in ("residual_bn", "shared") else "full")
    n = len(s.test)
    for v in range(4):
        sd, draw = scales[v // draws], v % draws

        def add(h, sd=sd, draw=draw):
            return h + unit_shape(sd, h) * reference_z(seed, draw, range(n), h.shape[1:])

        ref = naive_logits(s, s.final, {module: add})
        loss = F.cross_entropy(ref, s.test.y)
        assert abs(float(out.loss[v]) - float(loss)) < ACT_TOL
        torch.testing.assert_close(out.logits[v].double(), ref.float().double(), atol=1e-6, rtol=0)


def test_activation_noise_bad_arguments():
    for bad in (dict(std=-1.0), dict(std=float("nan")), dict(std=torch.zeros(2, 2, 2)), dict(std=[]),
                dict(std=0.1, draws=0), dict(std=0.1, seed=-1), dict(std=0.1, seed=1.5)):
        with pytest.raises(ConfigError):
            activation_noise_edit("m", **bad)
    s = make_subject("nested")
    with pytest.raises(ConfigError, match="3 per-unit values"):
        VariantEvaluator(s.model, s.final, s.test).evaluate([activation_noise_edit("blocks.0.ff", torch.ones(3))])


class _MaskMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = torch.nn.Linear(5, 9), torch.nn.ReLU()
        self.fc2, self.act2 = torch.nn.Linear(9, 9), torch.nn.ReLU()
        self.head = torch.nn.Linear(9, 3)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


class _MaskConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act1 = torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU()
        self.conv2, self.act2 = torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.bn(self.conv1(x))))).mean(dim=(2, 3)))


class _MaskTwice(torch.nn.Module):
    """One ReLU module called at two sites."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = torch.nn.Linear(5, 9), torch.nn.Linear(9, 9), torch.nn.ReLU()
        self.head = torch.nn.Linear(9, 3)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)) - 0.1)))


@pytest.mark.parametrize("net,shape,site", [(_MaskMLP, (5,), "act1"), (_MaskConv, (2, 5, 5), "act1"),
                                            (_MaskTwice, (5,), "act")])
@pytest.mark.parametrize("use_fx", [True, False])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_stacked_masks_equal_a_plain_hook_loop(net, shape, site, use_fx, kind):
    from genprobe.engine.activations import activation_stats
    from genprobe.values import Data

    g = torch.Generator().manual_seed(2)
    model = net().double()
    x = torch.randn(30, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    if net is _MaskConv:
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    state = P.state_of(model)
    c = 9 if net is not _MaskConv else 6
    masks = torch.rand(5, c, generator=g) < 0.4
    masks[0] = False
    masks[1] = True
    value = 0.0 if kind == "zero" else \
        activation_stats(model, state, Data(x, y), [site], num_classes=3)[site].element_mean
    ev = VariantEvaluator(model, state, Data(x, y), batch_size=8, use_fx=use_fx)
    out = ev.evaluate([Edit(), mask_edit(site, masks, value)], per_example=True)
    assert ev.route == ("fx" if use_fx else "full")
    v = torch.as_tensor(value, dtype=torch.float64)
    for b in range(5):
        ref_model = copy.deepcopy(model)
        ref_model.get_submodule(site).register_forward_hook(
            lambda mod, i, h, m=masks[b]: torch.where(unit_shape(m, h), v if v.dim() == 0 else unit_shape(v, h), h))
        with torch.no_grad():
            ref = F.cross_entropy(ref_model(x), y, reduction="none")
        torch.testing.assert_close(out[1].losses[b], ref, atol=ACT_TOL, rtol=0)
    torch.testing.assert_close(out[1].losses[0], out[0].losses, atol=0, rtol=0)
