"""The shared architecture tester: every registered architecture, built for the example input of
its registry entry, runs forward and backward without NaN and re-randomizes with its own init
rule (timm-style); a new architecture is tested by registering it."""

import math

import pytest
import torch

from genprobe import ConfigError
from genprobe import params as P
from genprobe.zoo import create_model, list_models, model_options
from genprobe.zoo.models import MODELS


def example(name: str) -> tuple[int, ...]:
    """The input shape the architecture's registry entry gives the shared tester."""
    return MODELS.entry(name).example_input


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_no_nan(name):
    model = create_model(name, example(name), 10)
    x = torch.randn(4, *example(name))
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_rerandomize_draws_from_the_models_own_init(name):
    model = create_model(name, example(name), 10)
    state = P.state_of(model)
    x = torch.randn(2, *example(name))
    for unit in P.default_units(model, P.forward_order(model, x[:1])):
        fresh = P.rerandomize(model, state, unit, seed=12345)  # not the seed the model was built under
        assert any(not torch.equal(fresh[k], state[k]) or state[k].std() == 0 for k in unit.params)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="unknown arch='nope'"):
        create_model("nope", (4,), 2)
    with pytest.raises(ConfigError, match="has no option 'widht'"):
        create_model("fcn", (4,), 2, widht=3)
    with pytest.raises(ConfigError, match="activation"):
        create_model("fcn", (4,), 2, activation="gelu")
    with pytest.raises(ConfigError, match="6n\\+2"):
        create_model("resnet", (3, 8, 8), 2, depth=9)
    with pytest.raises(ConfigError, match="image inputs"):
        create_model("cnn", (40,), 2)
    with pytest.raises(ConfigError, match="kernel_size=2 must be odd"):
        create_model("cnn", (1, 8, 8), 2, kernel_size=2)  # same padding would grow the image
    assert "readout" in model_options("cnn")


def test_ntk_parameterization_matches_its_definition():
    torch.manual_seed(0)
    sigma_w, sigma_b = 1.7, 0.3
    model = create_model("fcn", (5,), 3, depth=1, width=4, activation="erf", sigma_w=sigma_w,
                         sigma_b=sigma_b, parameterization="ntk")
    w0, b0 = model.layers[1].weight, model.layers[1].bias
    w1, b1 = model.layers[3].weight, model.layers[3].bias
    x = torch.randn(2, 5)
    h = torch.erf(x @ w0.T * sigma_w / math.sqrt(5) + sigma_b * b0)
    expected = h @ w1.T * sigma_w / math.sqrt(4) + sigma_b * b1
    torch.testing.assert_close(model(x), expected)


def test_standard_parameterization_with_sigma_has_the_right_variance():
    torch.manual_seed(0)
    model = create_model("fcn", (400,), 2, width=2000, depth=1, sigma_w=2.0, sigma_b=0.5)
    w, b = model.layers[1].weight, model.layers[1].bias
    assert w.var().item() == pytest.approx(4.0 / 400, rel=0.02)
    assert b.var().item() == pytest.approx(0.25, rel=0.15)


def test_cnn_downsampling():
    assert create_model("cnn", (1, 28, 28), 10).head.in_features == 32 * 7 * 7
    assert create_model("cnn", (1, 28, 28), 10, downsample=0).head.in_features == 32 * 28 * 28
    assert create_model("cnn", (1, 28, 28), 10, readout="gap").head.in_features == 32
    with pytest.raises(ConfigError, match="downsample"):
        create_model("cnn", (1, 28, 28), 10, depth=2, downsample=2)


def test_resnet18_configuration_has_11m_parameters():
    model = create_model("resnet", (3, 32, 32), 10, width=64, blocks="2,2,2,2")
    assert 11.0e6 < sum(p.numel() for p in model.parameters()) < 11.3e6


def _resnet_keys(depth_blocks=(1, 1, 1)):
    """The state_dict keys of create_model("resnet", ...) before its ReLUs became modules."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["stem.0.weight"] + [f"stem.1.{b}" for b in bn]
    for i, n in enumerate(depth_blocks):
        for j in range(n):
            p = f"stages.{i}.{j}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{b}" for b in bn]
            keys += [f"{p}.conv2.weight"] + [f"{p}.bn2.{b}" for b in bn]
            if i > 0 and j == 0:
                keys += [f"{p}.shortcut.0.weight"] + [f"{p}.shortcut.1.{b}" for b in bn]
    return keys + ["head.weight", "head.bias"]


def _functional_resnet(model, x):
    """The ResNet forward as written before (F.relu, no activation modules), same weights."""
    import torch.nn.functional as F

    h = model.stem(x)
    for stage in model.stages:
        for block in stage:
            out = F.relu(block.bn1(block.conv1(h)))
            out = block.bn2(block.conv2(out))
            h = F.relu(out + block.shortcut(h))
    return model.head(h.mean(dim=(2, 3)))


def test_resnet_relus_are_named_modules_and_checkpoints_unchanged():
    torch.manual_seed(0)
    model = create_model("resnet", (3, 8, 8), 10)
    assert list(model.state_dict()) == _resnet_keys()
    for i in range(3):
        block = model.stages[i][0]
        assert isinstance(block.act1, torch.nn.ReLU) and isinstance(block.act2, torch.nn.ReLU)
    assert isinstance(model.stem[2], torch.nn.ReLU)
    sites = P.select_sites(model, None, P.forward_order(model, torch.randn(1, 3, 8, 8)))
    assert sites == ["stem.2"] + [f"stages.{i}.0.act{a}" for i in range(3) for a in (1, 2)]
    # a checkpoint of the same weights loads strictly and gives bit-identical outputs
    other = create_model("resnet", (3, 8, 8), 10)
    other.load_state_dict(model.state_dict(), strict=True)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8))   # BatchNorm statistics away from their init
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), _functional_resnet(model, x))


def test_vgg_width_scales_every_channel_count():
    narrow = create_model("vgg", (1, 8, 8), 10, config="8,M,16", width=1)
    wide = create_model("vgg", (1, 8, 8), 10, config="8,M,16", width=2)
    channels = [m.out_channels for m in wide.modules() if isinstance(m, torch.nn.Conv2d)]
    assert channels == [16, 32]
    assert [m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16]
    assert wide(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="vgg width must be a positive number"):
        create_model("vgg", (1, 8, 8), 10, width=0)
