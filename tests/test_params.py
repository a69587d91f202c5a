"""Units and state operations: they act on the chosen unit only, and never on the caller's objects."""

import pytest
import torch
from torch import nn

from foreign import make_subject
from genprobe import ModuleSelectionError, StateError
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
