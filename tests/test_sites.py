"""Functional sites: activation functions a forward calls itself (``F.relu(self.fc1(x))``) are
single-direction sites like activation modules — found, named, read and edited — against
hand-written forwards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genprobe as gp
from genprobe.engine.activations import activation_stats
from genprobe.engine.edits import masks_edit
from genprobe.engine.sites import discover, hooked, is_functional
from genprobe.engine.variants import VariantEvaluator
from genprobe.errors import ModuleSelectionError
from genprobe.values import Data

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return torch.tanh(self.lin(h) + h)  # of a sum: named by the module it is called in


class Functional(nn.Module):
    """Activations as functions (three spellings), one inside a submodule, one module named
    ``relu`` (an nn.ReLU: a module site, its own F.relu call not a functional site), a
    function applied twice to one output, and a data-dependent branch torch.fx cannot trace."""

    def __init__(self, d=6, k=3):
        super().__init__()
        self.fc1 = nn.Linear(d, 8)
        self.block = Block(8)
        self.fc2 = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, k)

    def forward(self, x):
        if float(x.sum()) > 1e9:  # untraceable on purpose
            x = x / 2
        h = F.relu(self.fc1(x))
        h = self.block(h)
        g = self.fc2(h)
        h = g.relu() + torch.sigmoid(g) + torch.relu(h + 1)
        return self.head(self.relu(h))


def hand(model, state, x, zero=None):
    """Functional's forward by hand; `zero`: (site, unit) set to zero after the activation."""
    p = state

    def cut(name, h):
        if zero is not None and zero[0] == name:
            h = h.clone()
            h[:, zero[1]] = 0
        return h

    h = cut("relu(fc1)", F.relu(x @ p["fc1.weight"].T + p["fc1.bias"]))
    h = cut("tanh@block", torch.tanh(h @ p["block.lin.weight"].T + p["block.lin.bias"] + h))
    g = h @ p["fc2.weight"].T + p["fc2.bias"]
    h = cut("relu(fc2)", g.relu()) + cut("sigmoid(fc2)", torch.sigmoid(g)) + cut("relu@forward", torch.relu(h + 1))
    return cut("relu", torch.relu(h)) @ p["head.weight"].T + p["head.bias"]


@pytest.fixture(scope="module")
def subject():
    torch.manual_seed(0)
    model = Functional().double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    return gp.Subject(model, init=init, train=(x, y), test=(x[:30], y[:30]))


def test_sites_are_found_and_named_in_call_order(subject):
    seen = discover(subject.model, subject.train.x[:2])
    assert [s for s in seen if is_functional(s)] == ["relu(fc1)", "tanh@block", "relu(fc2)",
                                                     "sigmoid(fc2)", "relu@forward"]
    assert list(seen) == ["fc1", "relu(fc1)", "block.lin", "tanh@block", "block", "fc2", "relu(fc2)",
                          "sigmoid(fc2)", "relu@forward", "relu", "head"]
    assert not is_functional("relu") and not is_functional("layers.0.act")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            return F.gelu(h) + F.gelu(h)

    assert [s for s in discover(Twice(), torch.randn(2, 3))] == ["fc", "gelu(fc)", "gelu(fc)#2"]


def test_the_default_sites_are_activation_modules_and_functions(subject):
    table = gp.units(subject)
    sites = table[table.site]
    assert list(sites.unit) == ["relu(fc1)", "tanh@block", "relu(fc2)", "sigmoid(fc2)", "relu@forward", "relu"]
    assert list(sites.types) == ["relu", "tanh", "relu", "sigmoid", "relu", "ReLU"]
    r = gp.ablation(subject, orders=1, steps=2)
    assert list(r.table.layer.unique()) == list(sites.unit)
    picked = gp.activation_noise(subject, layers="relu(*)", scales=[0.0, 0.5], draws=1)
    assert list(picked.table.layer.unique()) == ["relu(fc1)", "relu(fc2)"]
    with pytest.raises(ModuleSelectionError, match=r"layer pattern 'relu\(fc3\)' matches no module or "
                                                   r"site \(closest names: relu\(fc2\), relu\(fc1\), relu\); "
                                                   r"list them with gp.units\(subject\)"):
        gp.activation_noise(subject, layers="relu(fc3)")


@pytest.mark.parametrize("site", ["relu(fc1)", "tanh@block", "sigmoid(fc2)", "relu@forward", "relu"])
def test_ablating_a_unit_of_a_site_equals_the_hand_written_forward(subject, site):
    x, y = subject.test.x, subject.test.y
    c = 8
    edit = masks_edit({site: (torch.eye(c, dtype=torch.bool)[[2, 5]], torch.zeros(c, dtype=torch.float64))})
    ev = VariantEvaluator(subject.model, subject.final, subject.test)
    (res,) = ev.evaluate([edit], logits=True)
    assert ev.route == "full" or not is_functional(site)
    for row, unit in enumerate((2, 5)):
        expected = hand(subject.model, subject.final, x, zero=(site, unit))
        torch.testing.assert_close(res.logits[row].double(), expected.float().double(), rtol=1e-6, atol=1e-6)
        assert float(res.loss[row]) == pytest.approx(float(F.cross_entropy(expected, y)), rel=1e-9)


def test_activation_statistics_of_functional_sites_equal_the_hand_computed(subject):
    x, y = subject.train.x, subject.train.y
    stats = activation_stats(subject.model, subject.final, subject.train, ["relu(fc1)", "sigmoid(fc2)"],
                             num_classes=3, batch_size=7)
    p = subject.final
    h = F.relu(x @ p["fc1.weight"].T + p["fc1.bias"])
    expected = torch.stack([h[y == k].mean(0) for k in range(3)])
    torch.testing.assert_close(stats["relu(fc1)"].class_means, expected, rtol=1e-12, atol=1e-12)
    assert stats["sigmoid(fc2)"].units == 8


def test_hooks_are_gone_after_the_block_even_when_the_forward_raises(subject):
    model = copy.deepcopy(subject.model)
    with pytest.raises(RuntimeError, match="stop"):
        with hooked(model, {"relu(fc1)": lambda out: (_ for _ in ()).throw(RuntimeError("stop")),
                            "relu": lambda out: None}):
            model(subject.train.x[:2])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(subject.train.x[:3]), hand(model, subject.final, subject.train.x[:3]))


def test_a_transformer_layers_activation_function_is_a_site():
    """nn.TransformerEncoderLayer applies its activation as a function (F.relu by default)."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True, dropout=0.0)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(32, 3)).eval()
    seen = discover(model, torch.randn(2, 4, 8))
    assert [s for s in seen if is_functional(s)] == ["relu(0.linear1)"]
    assert seen["relu(0.linear1)"] == (2, 4, 12)


class Layouts(nn.Module):
    """Units on different dims: a Conv1d map (n, C, L), a channels-last Linear (n, H, W, C),
    a Linear on (n, T, C), a parameter-free reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 5, 3, padding=1)       # (n, 5, 7): units on dim 1
        self.act = nn.ReLU()
        self.fc = nn.Linear(7, 6)                        # (n, 5, 6) as a (n, T, C) sequence: last
        self.mix = nn.Linear(6, 9)                       # on (n, 5, 1, 6): channels-last (n, H, W, C)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        h = self.act(self.conv(x))
        h = F.gelu(self.fc(h))
        h = torch.relu(self.mix(h.unsqueeze(2)))         # (n, 5, 1, 9)
        return self.head(h.mean(dim=(1, 2)))


def test_a_sites_unit_dim_is_the_one_its_producing_layer_indexes():
    model, dims = Layouts(), {}
    shapes = discover(model, torch.randn(2, 2, 7), dims=dims)
    assert shapes["act"] == (2, 5, 7) and dims["act"] == 1            # a shape rule would say 2
    assert dims["gelu(fc)"] == 2 and dims["fc"] == 2
    assert shapes["relu(mix)"] == (2, 5, 1, 9) and dims["relu(mix)"] == 3  # a shape rule: 1
    x, y = torch.randn(12, 2, 7), torch.arange(12) % 3
    stats = activation_stats(model, model.state_dict(), Data(x, y), ["act", "relu(mix)"],
                              num_classes=3, dims=dims)
    assert stats["act"].units == 5 and stats["relu(mix)"].units == 9
    with torch.no_grad():
        h = torch.relu(model.mix(F.gelu(model.fc(torch.relu(model.conv(x)))).unsqueeze(2)))
    torch.testing.assert_close(stats["relu(mix)"].mean, h.double().mean(dim=(0, 1, 2)))
