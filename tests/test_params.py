"""Units and state operations: they act on the chosen unit only, and never on the caller's objects."""

import pytest
import torch
from torch import nn

from foreign import TransformerClassifier, make_subject
from genprobe import ConfigError, ModuleSelectionError, StateError
from genprobe import params as P


def _others_identical(a, b, keys):
    return all(torch.equal(a[k], b[k]) for k in a if k not in keys)


def test_default_units_are_param_owning_modules_in_forward_order():
    s = make_subject("residual_bn")
    assert [u.name for u in s.units()] == ["stem", "bn1", "conv", "bn2", "fc"]
    bn = s.units("bn1")[0]
    assert bn.params == ("bn1.weight", "bn1.bias")
    assert bn.buffers == ("bn1.running_mean", "bn1.running_var")  # num_batches_tracked is integer


def test_forward_order_differs_from_registration_order():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.last = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)

        def forward(self, x):
            return self.last(self.first(x))

    order = P.forward_order(Backwards(), torch.randn(1, 3))
    assert [u.name for u in P.default_units(Backwards(), order)] == ["first", "last"]


def test_forward_order_places_modules_used_by_their_parent_at_first_use():
    """MultiheadAttention never calls out_proj (F.multi_head_attention_forward takes its weight):
    out_proj still comes right after self_attn, before the layer's norm and feed-forward."""
    torch.manual_seed(0)
    model = TransformerClassifier()
    order = P.forward_order(model, torch.randn(1, 4, 8))
    assert [u.name for u in P.default_units(model, order)] == [
        "(root)", "embed", "block.self_attn", "block.self_attn.out_proj", "block.norm1",
        "block.linear1", "block.linear2", "block.norm2", "head"]
    assert order.index("block.self_attn.out_proj") == order.index("block.self_attn") + 1


def test_forward_order_counts_a_parameter_used_before_its_module_is_called():
    class Peek(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 1)
            self.early = nn.Linear(3, 4)
            self.mid = nn.Linear(4, 4)

        def forward(self, x):
            h = self.early(x)
            gate = torch.sigmoid(self.late.bias)  # used here, called last
            return self.late(self.mid(h) * gate)

    order = P.forward_order(Peek(), torch.randn(1, 3))
    assert [u.name for u in P.default_units(Peek(), order)] == ["early", "late", "mid"]


def _no_hooks(model):
    return all(not m._forward_pre_hooks for m in model.modules())


def test_forward_order_restores_flags_and_removes_hooks_and_mode_even_when_forward_raises():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(3, 3)
            self.a = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

        def forward(self, x):
            self.b(self.a(x))
            raise RuntimeError("odd model")

    model = Fails()
    model.train()
    model.a[1].eval()  # mixed flags: a frozen BatchNorm inside a training model
    flags = [m.training for m in model.modules()]
    assert P.forward_order(model, torch.randn(1, 3)) == ["", "b", "a", "a.0", "a.1"]  # registration order
    assert [m.training for m in model.modules()] == flags
    assert _no_hooks(model)
    assert not torch.overrides.has_torch_function((torch.zeros(1),))  # no mode left active

    ok = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    before = P.state_of(ok)
    P.forward_order(ok, torch.randn(1, 3))
    assert ok.training and ok[1].training and _no_hooks(ok)
    assert not torch.overrides.has_torch_function((torch.zeros(1),))
    assert all(torch.equal(before[k], v) for k, v in P.state_of(ok).items())  # no BatchNorm update


def test_forward_order_of_a_model_that_refuses_a_function_mode_uses_calls_alone():
    class NoModes(nn.Module):
        def __init__(self):
            super().__init__()
            self.last = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)

        def forward(self, x):
            if torch.overrides.has_torch_function((x,)):
                raise RuntimeError("no torch function modes here")
            return self.last(self.first(x))

    model = NoModes()
    assert P.forward_order(model, torch.randn(1, 3)) == ["", "first", "last"]
    assert _no_hooks(model)


def test_patterns_and_groups():
    s = make_subject("nested")
    assert [u.name for u in s.units("blocks.0.*")] == ["blocks.0.ff.0", "blocks.0.out"]
    assert [u.name for u in s.units(["head*", "*out"])] == ["blocks.0.out", "blocks.1.out", "head.0.0"]
    (g,) = s.units({"block1": "blocks.1"})
    assert g.params == ("blocks.1.ff.0.weight", "blocks.1.ff.0.bias", "blocks.1.out.weight", "blocks.1.out.bias")
    groups = s.units({"late": ["head"], "early": "blocks.0"})
    assert [u.name for u in groups] == ["early", "late"]  # forward order, not dict order


@pytest.mark.parametrize("selection, message", [
    ("nope*", "matches no module"),
    ([], "empty module selection"),
    ({"g": "zzz"}, "match no module"),
    ({"a": "blocks.0", "b": "blocks.0.out"}, "in both unit"),
])
def test_bad_selections_name_the_problem(selection, message):
    s = make_subject("nested")
    with pytest.raises(ModuleSelectionError, match=message) as info:
        s.units(selection)
    if "no module" in message:
        assert "blocks.0.ff.0" in str(info.value)  # lists what is available


def test_state_ops_touch_only_the_unit():
    s = make_subject("residual_bn")
    unit = s.units("conv")[0]
    for edited in (P.replace(s.final, s.init, unit.params),
                   P.interpolate(s.init, s.final, 0.3, unit.params),
                   P.rerandomize(s.model, s.final, unit, seed=1)):
        assert _others_identical(edited, s.final, unit.params)
        assert not torch.equal(edited["conv.weight"], s.final["conv.weight"])
    assert torch.equal(P.interpolate(s.init, s.final, 0.0, unit.params)["conv.weight"], s.init["conv.weight"])
    assert torch.equal(P.interpolate(s.init, s.final, 1.0, unit.params)["conv.weight"], s.final["conv.weight"])
    mid = P.interpolate(s.init, s.final, 0.25, unit.params)["conv.weight"]
    torch.testing.assert_close(mid, 0.75 * s.init["conv.weight"] + 0.25 * s.final["conv.weight"])


def test_buffer_policy():
    s = make_subject("residual_bn")
    bn = s.units("bn1")[0]
    kept = P.replace(s.final, s.init, bn.keys("keep"))
    assert torch.equal(kept["bn1.running_mean"], s.final["bn1.running_mean"])
    followed = P.replace(s.final, s.init, bn.keys("follow"))
    assert torch.equal(followed["bn1.running_mean"], s.init["bn1.running_mean"])
    assert not torch.equal(s.init["bn1.running_mean"], s.final["bn1.running_mean"])
    fresh = P.rerandomize(s.model, s.final, bn, seed=0, buffers="follow")
    assert torch.equal(fresh["bn1.running_var"], torch.ones(4))


def test_rerandomize_is_seeded_and_leaves_global_rng_alone():
    s = make_subject("shared")
    unit = s.units("mid")[0]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = P.rerandomize(s.model, s.final, unit, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = P.rerandomize(s.model, s.final, unit, seed=5)
    c = P.rerandomize(s.model, s.final, unit, seed=6)
    assert torch.equal(a["mid.weight"], b["mid.weight"])
    assert not torch.equal(a["mid.weight"], c["mid.weight"])
    bound = 1 / 7 ** 0.5  # nn.Linear's default init is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a["mid.weight"].abs().max() <= bound


def test_rerandomize_root_parameter_and_attention():
    s = make_subject("transformer")
    root, *units = s.units()
    assert root.name == "(root)" and root.params == ("pos",)
    with pytest.raises(StateError, match="cannot re-randomize module ''"):  # it has no initializer
        P.rerandomize(s.model, s.final, root, seed=0)
    for unit in units:
        fresh = P.rerandomize(s.model, s.final, unit, seed=0)
        changed = [k for k in unit.params if not torch.equal(fresh[k], s.final[k])]
        assert changed, f"re-randomizing {unit.name} changed nothing"


def test_ops_do_not_mutate_inputs_or_the_model():
    s = make_subject("nested")
    before = {k: v.clone() for k, v in s.final.items()}
    model_before = {k: v.clone() for k, v in s.model.state_dict().items()}
    unit = s.units()[0]
    P.interpolate(s.init, s.final, 0.5, unit.params)
    P.rerandomize(s.model, s.final, unit, seed=0)
    assert all(torch.equal(before[k], s.final[k]) for k in before)
    assert all(torch.equal(model_before[k], v) for k, v in s.model.state_dict().items())


def test_module_without_reset_cannot_be_rerandomized():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.g

    m = nn.Sequential(Scale(), nn.Linear(3, 2))
    unit = P.default_units(m)[0]
    with pytest.raises(StateError, match="init_module"):
        P.rerandomize(m, P.state_of(m), unit, seed=0)


def test_rerandomize_never_replays_the_init_stream():
    """A model built right after torch.manual_seed(0): re-randomizing its first module with seed 0
    must not reproduce θ⁰ (it would if the draw were seeded with the user's seed itself)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    init = P.state_of(model)
    first = P.default_units(model)[0]
    fresh = P.rerandomize(model, init, first, seed=0)  # draw 0, the default
    for k in first.params:
        assert not torch.equal(fresh[k], init[k]), k
    s = make_subject("nested")  # also built right after torch.manual_seed(0)
    unit = s.units()[0]
    fresh = P.rerandomize(s.model, s.init, unit, seed=0)
    for k in unit.params:
        assert not torch.equal(fresh[k], s.init[k]), k


def test_rerandomize_draws_depend_on_seed_unit_and_draw():
    s = make_subject("nested")
    u0, u1 = s.units("blocks.0.ff.0")[0], s.units("blocks.1.ff.0")[0]  # same shapes
    k0, k1 = "blocks.0.ff.0.weight", "blocks.1.ff.0.weight"
    assert s.final[k0].shape == s.final[k1].shape

    def draw(unit, key, seed, d):
        return P.rerandomize(s.model, s.final, unit, seed, draw=d)[key]

    assert torch.equal(draw(u0, k0, 3, 2), draw(u0, k0, 3, 2))
    assert not torch.equal(draw(u0, k0, 3, 0), draw(u0, k0, 3, 1))
    assert not torch.equal(draw(u0, k0, 3, 0), draw(u0, k0, 4, 0))
    assert not torch.equal(draw(u0, k0, 3, 0), draw(u1, k1, 3, 0))
    # the documented derivation: the unit's modules reset under torch.manual_seed(rerandomize_seed(...))
    reference = nn.Linear(6, 8)
    torch.manual_seed(P.rerandomize_seed(3, "blocks.0.ff.0", 2))
    reference.reset_parameters()
    torch.testing.assert_close(draw(u0, k0, 3, 2), reference.weight.detach(), rtol=0, atol=0)


def test_rerandomize_leaves_global_rng_state_and_model_unchanged():
    s = make_subject("residual_bn")
    model_before = {k: v.clone() for k, v in s.model.state_dict().items()}
    base_before = {k: v.clone() for k, v in s.final.items()}
    rng = torch.get_rng_state()
    for unit in s.units():
        P.rerandomize(s.model, s.final, unit, seed=7, buffers="follow", draw=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model_before[k], v) for k, v in s.model.state_dict().items())
    assert all(torch.equal(base_before[k], v) for k, v in s.final.items())


@pytest.mark.parametrize("options", [{"seed": -1}, {"seed": 1.5}, {"seed": 0, "draw": -2}, {"seed": True}])
def test_rerandomize_rejects_bad_seeds(options):
    s = make_subject("shared")
    with pytest.raises(ConfigError, match="must be an integer >= 0"):
        P.rerandomize(s.model, s.final, s.units("mid")[0], **options)
