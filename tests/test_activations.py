"""Activation sites and per-unit statistics, against plain forward-hook loops in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import genprobe.params as P
from foreign import make_subject
from genprobe.engine.activations import UnitStats, activation_stats, unit_dim
from genprobe.errors import ConfigError, ModuleSelectionError
from genprobe.values import Data
from genprobe.zoo import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10


class MLP(nn.Module):
    """Two ReLU layers, an unused activation module, and a ReLU module applied twice."""

    def __init__(self, d=5, k=3):
        super().__init__()
        self.fc1 = nn.Linear(d, 7)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(7, 6)
        self.act2 = nn.GELU()
        self.unused = nn.Tanh()
        self.twice = nn.ReLU()
        self.fc3 = nn.Linear(6, 6)
        self.head = nn.Linear(6, k)

    def forward(self, x):
        h = self.act2(self.fc2(self.act1(self.fc1(x))))
        h = self.twice(self.fc3(self.twice(h - 0.1)))
        return self.head(h)


class ConvNet(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act2 = nn.ELU()
        self.fc = nn.Linear(5, k)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.bn(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


class Tokens(nn.Module):
    """Token ids (N, T) → embedding → MLP neurons (N, T, C) → mean over tokens."""

    def __init__(self, vocab=11, d=6, k=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 9)
        self.act = nn.GELU()
        self.head = nn.Linear(9, k)

    def forward(self, ids):
        return self.head(self.act(self.up(self.embed(ids))).mean(dim=1))


def _trained_bn(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


CASES = {
    "mlp": (lambda: MLP().double(), lambda g, n: torch.randn(n, 5, generator=g, dtype=torch.float64),
            ["act1", "act2", "fc2"]),
    "conv": (lambda: ConvNet().double(), lambda g, n: torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
             ["act1", "act2", "conv1"]),
    "tokens": (lambda: Tokens().double(), lambda g, n: torch.randint(0, 11, (n, 4), generator=g), ["act", "up"]),
}


def make_case(name, n=37, k=3):
    factory, inputs, modules = CASES[name]
    g = torch.Generator().manual_seed(1)
    model = factory()
    x = inputs(g, n)
    if name == "conv":
        _trained_bn(model, x)
    y = torch.randint(0, k, (n,), generator=g)
    y[:3] = torch.arange(3)
    return model, Data(x, y), modules


def reference_stats(model, data, module, k):
    """Every activation stored, then the formulas."""
    outs = []
    handle = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: outs.append(o.double()))
    with torch.no_grad():
        for i in range(len(data)):   # one example at a time
            model(data.x[i:i + 1])
    handle.remove()
    h = torch.cat(outs)
    d = 1 if h.dim() == 4 else h.dim() - 1
    moved = h.movedim(d, -1)                                # (N, ..., C)
    a = moved.reshape(h.shape[0], -1, h.shape[d]).mean(1)   # (N, C)
    mean = a.mean(0)
    var = ((a - mean) ** 2).mean(0)
    class_means = torch.stack([a[data.y == c].mean(0) for c in range(k)])
    counts = torch.tensor([(data.y == c).sum() for c in range(k)], dtype=torch.float64)
    flat = moved.reshape(-1, h.shape[d])
    return dict(units=h.shape[d], dim=d, mean=mean, var=var, class_means=class_means,
                class_counts=counts, min=flat.min(0).values, element_mean=flat.mean(0))


def test_unit_dim():
    assert unit_dim(torch.zeros(2, 3)) == 1
    assert unit_dim(torch.zeros(2, 4, 3)) == 2
    assert unit_dim(torch.zeros(2, 3, 4, 5)) == 1
    with pytest.raises(ConfigError, match="no unit dim"):
        unit_dim(torch.zeros(3))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch_size", [None, 5, 1000])
def test_stats_equal_a_plain_loop(name, batch_size):
    model, data, modules = make_case(name)
    before = copy.deepcopy(model.state_dict())
    model.train()   # the caller's mode is theirs: stats are in eval mode on a private copy
    stats = activation_stats(model, P.state_of(model), data, modules, num_classes=3, batch_size=batch_size)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    assert list(stats) == modules
    for m in modules:
        ref = reference_stats(model, data, m, 3)
        s = stats[m]
        assert isinstance(s, UnitStats) and s.units == ref["units"] and s.dim == ref["dim"]
        assert s.count == len(data) and s.calls == 1
        for field in ("mean", "var", "class_means", "class_counts", "min", "element_mean"):
            got = getattr(s, field)
            assert got.dtype == torch.float64 and got.shape == ref[field].shape, field
            torch.testing.assert_close(got, ref[field], atol=TOL, rtol=0, msg=field)


def test_float32_model_and_zoo_resnet_sites():
    torch.manual_seed(0)
    model = create_model("resnet", (3, 6, 6), 4)
    x = torch.randn(20, 3, 6, 6)
    data = Data(x, torch.randint(0, 4, (20,)))
    sites = P.select_sites(model, None, P.forward_order(model, x[:1]))
    assert sites[0] == "stem.2" and "stages.0.0.act1" in sites and "stages.2.0.act2" in sites
    stats = activation_stats(model, P.state_of(model), data, sites, num_classes=4, batch_size=7)
    for m in sites:
        assert (stats[m].min >= 0).all() and stats[m].mean.dtype == torch.float64
        ref = reference_stats(copy.deepcopy(model).double().eval(), Data(x.double(), data.y), m, 4)
        torch.testing.assert_close(stats[m].mean, ref["mean"], atol=1e-5, rtol=1e-5)


def test_module_called_twice_pools_its_calls_and_errors():
    model, data, _ = make_case("mlp")
    stats = activation_stats(model, P.state_of(model), data, ["twice"], num_classes=3, batch_size=8)
    s = stats["twice"]
    assert s.calls == 2 and s.count == 2 * len(data) and float(s.class_counts.sum()) == 2 * len(data)
    outs = []
    handle = model.twice.register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        model(data.x)
    handle.remove()
    torch.testing.assert_close(s.mean, torch.cat(outs).mean(0), atol=TOL, rtol=0)
    with pytest.raises(ModuleSelectionError, match="never called"):
        activation_stats(model, P.state_of(model), data, ["unused"], num_classes=3)
    with pytest.raises(ModuleSelectionError, match="unknown module"):
        activation_stats(model, P.state_of(model), data, ["nope"], num_classes=3)
    with pytest.raises(ConfigError, match="labels"):
        activation_stats(model, P.state_of(model), data, ["act1"], num_classes=2)


def test_token_ids_through_a_foreign_model():
    s = make_subject("tokens", dtype=torch.float64)
    stats = activation_stats(s.model, s.final, s.test, ["fc", "embed"], num_classes=3, batch_size=5)
    ref = reference_stats(copy.deepcopy(s.model).eval(), s.test, "embed", 3)
    assert stats["embed"].dim == 2
    torch.testing.assert_close(stats["embed"].var, ref["var"], atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- select_sites


def test_select_sites_default_is_every_called_activation_in_forward_order():
    model = MLP()
    x = torch.randn(1, 5)
    order = P.forward_order(model, x)
    assert P.select_sites(model, None, order, example=x) == ["act1", "act2", "twice"]
    assert P.select_sites(model, None, order) == ["act1", "act2", "twice"]  # seen by an fx trace
    assert P.select_sites(model, None, list(reversed(order))) == ["twice", "act2", "act1"]
    assert P.select_sites(model, None, ["act2"]) == ["act2", "act1", "twice"]  # unknown names last
    # a model fx cannot trace keeps every activation module, unless an example shows which run
    untraceable = make_subject("untraceable").model
    untraceable.extra = nn.ReLU()
    assert P.select_sites(untraceable, None) == ["extra"]
    assert P.select_sites(untraceable, None, example=torch.randn(1, 5)) == []


def test_select_sites_patterns_match_every_module():
    model = ConvNet()
    assert P.select_sites(model, "act*") == ["act1", "act2"]
    assert P.select_sites(model, ["conv1", "act1", "conv1"]) == ["conv1", "act1"]
    order = P.forward_order(model, torch.randn(1, 2, 5, 5))
    assert P.select_sites(model, "*", order) == ["conv1", "bn", "act1", "conv2", "act2", "fc"]


def test_select_sites_errors():
    model = ConvNet()
    with pytest.raises(ModuleSelectionError, match=r"'act3' matches no module or site.*act1.*gp.units"):
        P.select_sites(model, "act3")
    with pytest.raises(ModuleSelectionError, match="not a site selection"):
        P.select_sites(model, 3)
    with pytest.raises(ModuleSelectionError, match="not a site selection"):
        P.select_sites(model, {"a": "act1"})
    with pytest.raises(ModuleSelectionError, match="empty"):
        P.select_sites(model, [])
