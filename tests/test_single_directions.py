"""Single-direction probes (ablation, activation noise, selectivity) against plain forward-hook
implementations, closed forms and hand-built activations, in float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import genprobe as gp
from foreign import FOREIGN, TOKENS, make_subject
from genprobe.engine.activations import activation_stats, unit_dim
from genprobe.engine.edits import standard_normal_draws
from genprobe.errors import ConfigError, ModuleSelectionError
from genprobe.probes.single_directions import selectivity_index

pytestmark = pytest.mark.usefixtures("one_thread")


class _Functional(TorchFunctionMode):
    """The plain way to edit a functional site ``kind(producer)[#k]`` or ``kind@forward[#k]``:
    the k-th call of that activation function on `producer`'s output (of the model's forward)
    in a forward pass, its output replaced by fn(output)."""

    NAMES = {"relu": (F.relu, torch.relu, torch.Tensor.relu), "tanh": (torch.tanh, torch.Tensor.tanh)}

    def __init__(self, model, site, fn):
        super().__init__()
        base, _, k = site.partition("#")
        self.k, self.fn, self.seen = int(k or 1), fn, 0
        if "@" in base:
            kind, producer = base.split("@")[0], None
        else:
            kind, producer = base[:-1].split("(")
        self.funcs = self.NAMES[kind]
        self.outputs = {}  # module name -> its output in this forward
        self.handles = [m.register_forward_hook(lambda m, a, out, n=n: self.outputs.__setitem__(n, out))
                        for n, m in model.named_modules() if n]
        self.producer = producer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.producer is None:
            match = all(args[0] is not o for o in self.outputs.values())
        else:
            match = args[0] is self.outputs.get(self.producer)
        if func in self.funcs and match:
            self.seen += 1
            if self.seen == self.k:
                return self.fn(out.clone())
        return out


def hooked_accuracy(subject, site, fn, split="test"):
    """Accuracy and mean loss with `site`'s output replaced by fn(output), by a forward hook on a
    copy of the model (or, for a functional site, the matching call of the function): one full
    forward, the obviously-right way."""
    model = copy.deepcopy(subject.model)
    data = subject.data(split)
    if "(" in site or "@" in site:
        mode = _Functional(model, site, fn)
        try:
            with torch.no_grad(), mode:
                logits = torch.func.functional_call(model, subject.final, (data.x,))
        finally:
            for h in mode.handles:
                h.remove()
    else:
        handle = dict(model.named_modules())[site].register_forward_hook(lambda m, a, out: fn(out.clone()))
        try:
            with torch.no_grad():
                logits = torch.func.functional_call(model, subject.final, (data.x,))
        finally:
            handle.remove()
    acc = float((logits.argmax(-1) == data.y).double().mean())
    loss = float(nn.functional.cross_entropy(logits.double(), data.y))
    return acc, loss


def set_units(out, units, value):
    """`out` with `units` (along the unit dim) set to `value` (a scalar or per-unit tensor)."""
    index = torch.as_tensor(units, dtype=torch.long)
    if len(index):
        v = value[index] if torch.is_tensor(value) else torch.tensor(value)
        out.movedim(unit_dim(out), -1)[..., index] = v.to(out.dtype)
    return out


@pytest.fixture(scope="module", params=sorted(FOREIGN) + sorted(TOKENS))
def subject64(request):
    return make_subject(request.param, dtype=torch.float64, n_train=24, n_test=18, checkpoints=1)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_every_ablation_point_equals_a_forward_hook(subject64, mode):
    r = gp.ablation(subject64, mode=mode, orders=2, steps=3)
    for row in r.table.itertuples():
        rank = r.tensors[f"rank/{row.layer}/{row.order_id}"]
        value = 0.0 if mode == "zero" else r.tensors[f"mean/{row.layer}"]
        units = rank[:int(row.k)]
        acc, loss = hooked_accuracy(subject64, row.layer,
                                    lambda out, units=units, value=value: set_units(out, units, value))
        assert abs(row.accuracy - acc) <= 1e-10 and abs(row.loss - loss) <= 1e-10 * max(1, loss)
    base = r.table[r.table["k"] == 0]
    trained = gp.evaluate(subject64.model, subject64.final, subject64.test)
    assert (base["accuracy"] - (1 - trained.error)).abs().max() <= 1e-12


def _mlp_subject(dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4, bias=bias)).to(dtype)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 6, generator=g, dtype=dtype), torch.randint(0, 4, (40,), generator=g)
    return gp.Subject(model, init=init, train=(x[:24], y[:24]), test=(x[24:], y[24:]))


def test_ablating_every_unit_feeding_the_classifier_leaves_the_bias():
    s = _mlp_subject()
    r = gp.ablation(s, layers="1", orders=1, steps=2)
    full = r.table[r.table["k"] == 10]["accuracy"].iloc[0]
    bias = s.final["2.bias"]
    assert full == pytest.approx(float((s.test.y == bias.argmax()).double().mean()), abs=1e-12)


def test_mean_ablation_uses_the_training_set_mean():
    s = _mlp_subject()
    h = torch.relu(s.train.x @ s.final["0.weight"].T + s.final["0.bias"])  # the ReLU's output
    r = gp.ablation(s, layers="1", mode="mean", orders=1, steps=10)
    assert torch.allclose(r.tensors["mean/1"], h.mean(0), rtol=0, atol=1e-12)
    rank = r.tensors["rank/1/0"]
    row = r.table[r.table["k"] == 10].iloc[0]
    logits = h.mean(0)[None, :].expand(len(s.test.y), -1) @ s.final["2.weight"].T + s.final["2.bias"]
    assert row.accuracy == pytest.approx(float((logits.argmax(-1) == s.test.y).double().mean()), abs=1e-12)
    assert set(rank.tolist()) == set(range(10))


def test_scope_all_and_orders():
    s = make_subject("nested", dtype=torch.float64, n_train=24, n_test=18)
    r = gp.ablation(s, scope="all", orders=2, steps=4)
    assert set(r.table["layer"]) == {"all"} and len(r.table) == 2 * 5
    assert r.summary["auc_all"] == r.summary["auc:all"]
    end = r.table[r.table["fraction"] == 1.0]["accuracy"]
    assert end.nunique() == 1  # every unit of every layer ablated: the order no longer matters
    sel = gp.ablation(s, order="selectivity", orders=5, steps=2)
    assert sel.meta["options"]["orders"] == 1


def test_activation_noise_equals_a_forward_hook_and_ignores_chunking():
    s = _mlp_subject()
    a = gp.activation_noise(s, layers="1", scales=[0.0, 1.0, 3.0], draws=2, batch_size=5)
    b = gp.activation_noise(s, layers="1", scales=[0.0, 1.0, 3.0], draws=2, batch_size=16)
    assert a.table["accuracy"].equals(b.table["accuracy"])  # the same draws per example
    assert (a.table["loss"] - b.table["loss"]).abs().max() <= 1e-12  # summation order only
    zero = a.table[a.table["scale"] == 0.0]
    assert (zero["accuracy"] == a.summary["base_accuracy"]).all()
    assert 0.0 <= a.summary["auc:1"] <= 1.0
    h = torch.relu(s.test.x @ s.final["0.weight"].T + s.final["0.bias"])
    std = torch.relu(s.train.x @ s.final["0.weight"].T + s.final["0.bias"]).var(0, unbiased=False).sqrt()
    z = standard_normal_draws(a.meta["noise_seed"]["1"], 1, torch.arange(len(h)), (10,))  # draw 1
    logits = (h + 3.0 * std * z.to(h.dtype)) @ s.final["2.weight"].T + s.final["2.bias"]
    row = a.table[(a.table["scale"] == 3.0) & (a.table["draw"] == 1)].iloc[0]
    assert row.accuracy == pytest.approx(float((logits.argmax(-1) == s.test.y).double().mean()), abs=1e-12)
    assert row.loss == pytest.approx(float(nn.functional.cross_entropy(logits, s.test.y)), rel=1e-10)


def test_selectivity_formula_and_a_unit_for_one_class():
    means = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    sel = selectivity_index(means)
    assert sel.tolist() == [1.0, 0.0, 0.0]  # one class only; no preference; never active
    # a network whose hidden unit c fires for inputs of class c only
    k = 3  # a 4th output, never a label, wins when a unit is zeroed: each unit matters for its class
    model = nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Linear(k, k + 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(k))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.eye(k + 1, k))
        model[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    init = {n: v + 1 for n, v in model.state_dict().items()}
    y = torch.arange(12) % k
    x = nn.functional.one_hot(y, k).double()
    s = gp.Subject(model, init=init, train=(x, y), test=(x, y), num_classes=k)
    r = gp.selectivity(s, layers="1")
    assert r.table["selectivity"].tolist() == [1.0, 1.0, 1.0]
    assert r.table["preferred_class"].tolist() == [0, 1, 2]
    assert r.table["importance"].tolist() == pytest.approx([1 / 3] * 3, abs=1e-12)
    assert r.self_check["passed"]


def test_selectivity_importance_equals_single_unit_hooks(subject64):
    r = gp.selectivity(subject64, negative="shift")  # the importance does not depend on it
    for row in r.table.sample(n=min(6, len(r.table)), random_state=0).itertuples():
        acc, _ = hooked_accuracy(subject64, row.layer, lambda out, unit=row.unit: set_units(out, [unit], 0.0))
        assert row.importance == pytest.approx(r.summary["base_accuracy"] - acc, abs=1e-12)


class Summed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.total = Total()

    def forward(self, x):
        h = self.fc(x)
        return h + self.total(h)[:, None]


class Total(nn.Module):
    def forward(self, h):
        return h.sum(1)


def test_bad_layers():
    s = _mlp_subject()
    with pytest.raises(ModuleSelectionError, match="'relu'.*close|close.*"):
        gp.ablation(s, layers="relu")
    with pytest.raises(ConfigError, match="steps=11 is beyond the unit count"):
        gp.ablation(s, layers="1", steps=11)
    torch.manual_seed(0)
    m = Summed()
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    bad = gp.Subject(m, init={k: v + 1 for k, v in m.state_dict().items()}, train=(x, y), test=(x, y))
    with pytest.raises(ModuleSelectionError, match="'total'.*no unit dimension"):
        gp.ablation(bad, layers="total")


def test_selectivity_on_negative_activations_is_an_error_or_a_chosen_variant():
    """A tanh layer's class means can be negative, where the index leaves [0, 1]: an error naming
    the layer by default; "skip" leaves it out; "shift" moves each unit's least-preferred class
    mean to 0 (a variant), which keeps [0, 1] and leaves non-negative units as they were."""
    s = make_subject("nested", n_train=40, n_test=30)  # Tanh sites: blocks.{0,1}.ff.1
    with pytest.raises(gp.ConfigError, match=r"layer 'blocks.0.ff.1' has negative activations"):
        gp.selectivity(s, importance=False)
    shifted = gp.selectivity(s, importance=False, negative="shift")
    assert shifted.table.selectivity.between(0.0, 1.0).all()
    assert shifted.meta["negative_layers"] == ["blocks.0.ff.1", "blocks.1.ff.1"]
    assert "blocks.0.ff.1 and blocks.1.ff.1 (negative activations) it is the shifted variant" \
        in shifted.reading()
    stats = activation_stats(s.model, s.final, s.test, ["blocks.0.ff.1"], num_classes=3)
    means = stats["blocks.0.ff.1"].class_means
    expected = selectivity_index(means - means.min(0).values.clamp(max=0.0))
    got = shifted.table[shifted.table.layer == "blocks.0.ff.1"].selectivity.to_numpy()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    plain = selectivity_index(means)  # what the formula gives unshifted: outside [0, 1] here
    assert ((plain < 0) | (plain > 1)).any()
    with pytest.raises(ModuleSelectionError, match="every chosen layer has negative"):
        gp.selectivity(s, importance=False, negative="skip")
    torch.manual_seed(0)  # a ReLU site: non-negative, the same under every choice
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].weight.add_(0.3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    relu = gp.Subject(model, init=init, train=(x, y), test=(x, y), num_classes=3)
    base = gp.selectivity(relu, importance=False)
    assert base.meta["negative_layers"] == [] and base.table.selectivity.between(0, 1).all()
    assert "shifted" not in base.reading()
    assert base.table.selectivity.equals(
        gp.selectivity(relu, importance=False, negative="shift").table.selectivity)
