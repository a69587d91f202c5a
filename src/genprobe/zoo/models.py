"""The model zoo: plain, readable PyTorch architectures used in the papers' experiments.

Every architecture is registered with :func:`register_model` and built by
:func:`create_model` from the dataset's input shape and class count. Each model defines
``init_module(module)``, its own initializer, which re-randomization uses so that a fresh draw
comes from the same distribution as the model's initialization.

Initialization (``fcn`` and ``cnn``):
- ``parameterization="standard"`` with ``sigma_w``/``sigma_b`` unset: PyTorch's default init.
- ``parameterization="standard"`` with ``sigma_w`` set: W ~ N(0, σ_w²/fan_in), b ~ N(0, σ_b²).
- ``parameterization="ntk"``: W, b ~ N(0, 1) and the layer computes σ_w/√fan_in · W x + σ_b · b,
  the parameterization in which the infinite-width NNGP/NTK recursions hold.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_choice
from ..options import check_int
from ..params import reset_module
from ..registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: its factory ``f(input_shape, num_classes, **options)`` and an
    input shape (no batch dim) it is built for in the shared architecture tester
    (``tests/test_zoo.py``), as a probe's ``tiny`` options are in the probe tester."""

    factory: Callable[..., nn.Module]
    example_input: tuple[int, ...]


MODELS: Registry[ModelSpec] = Registry("arch")
"""The architectures, by name."""

ACTIVATIONS = ("relu", "tanh", "erf")
PARAMETERIZATIONS = ("standard", "ntk")


def register_model(name: str, *, example_input: Sequence[int] = (1, 8, 8)):
    """Decorator adding an architecture factory ``f(input_shape, num_classes, **options)``;
    `example_input`: an input shape the shared tester builds it for."""

    def wrap(factory):
        MODELS.register(name, ModelSpec(factory, tuple(example_input)))
        return factory

    return wrap


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching an fnmatch `pattern`, in registration order."""
    return MODELS.names(pattern)


def model_options(name: str) -> dict[str, object]:
    """The options an architecture accepts, with their defaults."""
    sig = inspect.signature(MODELS.entry(name).factory)
    return {p.name: p.default for p in list(sig.parameters.values())[2:]}


def create_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> nn.Module:
    """Build architecture `name` for inputs of `input_shape` (no batch dim) and `num_classes` outputs."""
    allowed = model_options(name)
    for key in options:
        if key not in allowed:
            raise ConfigError(f"arch {name!r} has no option {key!r}; its options: {', '.join(allowed)}")
    return MODELS.entry(name).factory(tuple(input_shape), int(num_classes), **options)


# ----------------------------------------------------------------------------- layers


class Erf(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


def activation(name: str) -> nn.Module:
    check_choice("activation", name, ACTIVATIONS)
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "erf": Erf}[name]()


def _after_layer(norm: nn.Module | None, nonlinearity: str, dropout: float) -> list[nn.Module]:
    """What follows each hidden layer of the fcn and the cnn: [norm], activation, [dropout]."""
    return ([norm] if norm is not None else []) + [activation(nonlinearity)] + \
        ([nn.Dropout(dropout)] if dropout else [])


class NTKLinear(nn.Module):
    """Linear layer in the NTK parameterization: y = σ_w/√fan_in · W x + σ_b · b, W, b ~ N(0, 1).

    Follows the engine's ``ScaledLinearMap`` protocol (:mod:`genprobe.engine.rules`): ``weight``,
    ``bias``, ``w_scale``, ``b_scale`` and ``linear_map``.
    """

    linear_map = "linear"

    def __init__(self, fan_in: int, fan_out: int, sigma_w: float, sigma_b: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bias = nn.Parameter(torch.empty(fan_out))
        self.w_scale, self.b_scale = sigma_w / math.sqrt(fan_in), sigma_b
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        nn.init.normal_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.w_scale, self.bias * self.b_scale)


class NTKConv2d(nn.Module):
    """Same-padding conv in the NTK parameterization (fan_in = C_in · k²).

    Follows the engine's ``ScaledLinearMap`` protocol (:mod:`genprobe.engine.rules`), with
    ``stride`` and ``padding`` (dilation 1).
    """

    linear_map = "conv2d"

    def __init__(self, c_in: int, c_out: int, kernel_size: int, sigma_w: float, sigma_b: float,
                 stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(c_out))
        self.w_scale = sigma_w / math.sqrt(c_in * kernel_size**2)
        self.b_scale = sigma_b
        self.padding, self.stride = kernel_size // 2, stride
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        nn.init.normal_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.w_scale, self.bias * self.b_scale, stride=self.stride,
                        padding=self.padding)


class ZooModel(nn.Module):
    """Base of zoo models: ``init_module`` applies the model's own init rule to one module."""

    sigma_w: float | None = None
    sigma_b: float = 0.0

    def init_module(self, module: nn.Module) -> None:
        """Re-draw `module`'s own parameters from this model's initialization distribution."""
        if isinstance(module, (nn.Linear, nn.Conv2d)) and self.sigma_w is not None:
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, std=self.sigma_w / math.sqrt(fan_in))
            if module.bias is not None:
                nn.init.normal_(module.bias, std=self.sigma_b) if self.sigma_b > 0 else nn.init.zeros_(module.bias)
        else:
            reset_module(module)

    def _init_all(self) -> None:
        for module in self.modules():
            if module is not self and any(True for _ in module.parameters(recurse=False)):
                self.init_module(module)


def _dense(fan_in, fan_out, parameterization, sigma_w, sigma_b):
    if parameterization == "ntk":
        return NTKLinear(fan_in, fan_out, 1.0 if sigma_w is None else sigma_w, sigma_b)
    return nn.Linear(fan_in, fan_out)


def _conv(c_in, c_out, k, parameterization, sigma_w, sigma_b, stride=1):
    if parameterization == "ntk":
        return NTKConv2d(c_in, c_out, k, 1.0 if sigma_w is None else sigma_w, sigma_b, stride)
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)


def _positive(name: str, value, minimum: int = 1) -> None:
    check_int(name, value, minimum)


# ----------------------------------------------------------------------------- architectures


@register_model("fcn")
class FCN(ZooModel):
    """Fully-connected network: `depth` hidden layers of `width` units, then a linear readout."""

    def __init__(self, input_shape, num_classes, width: int = 512, depth: int = 3,
                 activation: Literal["relu", "tanh", "erf"] = "relu", dropout: float = 0.0,
                 batchnorm: bool = False, sigma_w: float | None = None, sigma_b: float = 0.0,
                 parameterization: Literal["standard", "ntk"] = "standard"):
        super().__init__()
        _positive("width", width)
        _positive("depth", depth, 0)
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        self.sigma_w, self.sigma_b = sigma_w, sigma_b
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers.append(_dense(fan_in, width, parameterization, sigma_w, sigma_b))
            layers += _after_layer(nn.BatchNorm1d(width) if batchnorm else None, activation, dropout)
            fan_in = width
        layers.append(_dense(fan_in, num_classes, parameterization, sigma_w, sigma_b))
        self.layers = nn.Sequential(*layers)
        self._init_all()

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, K)


@register_model("cnn")
class CNN(ZooModel):
    """Same-padding convolutions (`depth` layers of `channels`), then a readout: ``flatten`` (a
    dense layer over all positions) or ``gap`` (global average pooling, then dense).

    ``downsample``: how many layers, from the second on, have stride 2 (default 2: 28×28 → 7×7,
    which keeps the flatten readout small and training fast). ``downsample=0`` is the stride-1
    CNN family of Xiao et al., for which the infinite-width kernels hold."""

    def __init__(self, input_shape, num_classes, depth: int = 3, channels: int = 32,
                 kernel_size: int = 3, readout: Literal["flatten", "gap"] = "flatten",
                 downsample: int = 2,
                 activation: Literal["relu", "tanh", "erf"] = "relu", dropout: float = 0.0,
                 batchnorm: bool = False, sigma_w: float | None = None, sigma_b: float = 0.0,
                 parameterization: Literal["standard", "ntk"] = "standard"):
        super().__init__()
        _positive("depth", depth)
        _positive("channels", channels)
        _positive("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ConfigError(f"cnn kernel_size={kernel_size} must be odd (same padding keeps the "
                              "image size only for odd kernels)")
        check_choice("readout", readout, ("flatten", "gap"))
        check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        if len(input_shape) != 3:
            raise ConfigError(f"arch 'cnn' needs image inputs (C, H, W), got input shape {input_shape}")
        self.sigma_w, self.sigma_b = sigma_w, sigma_b
        if not isinstance(downsample, int) or not 0 <= downsample < depth:
            raise ConfigError(f"cnn downsample={downsample!r} must be an integer in 0..depth-1 ({depth - 1})")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for i in range(depth):
            stride = 2 if 1 <= i <= downsample else 1
            layers.append(_conv(c, channels, kernel_size, parameterization, sigma_w, sigma_b, stride))
            h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
            layers += _after_layer(nn.BatchNorm2d(channels) if batchnorm else None, activation, dropout)
            c = channels
        self.features = nn.Sequential(*layers)
        self.readout = readout
        fan_in = channels if readout == "gap" else channels * h * w
        self.head = _dense(fan_in, num_classes, parameterization, sigma_w, sigma_b)
        self._init_all()

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # (B, C, H, W)
        h = h.mean(dim=(2, 3)) if self.readout == "gap" else h.flatten(1)
        return self.head(h)


@register_model("vgg")
class VGG(ZooModel):
    """VGG-style CNN: 3×3 conv blocks, max-pooling where the config says "M", then a classifier.

    ``config``: comma-separated channel counts and "M" (default "32,M,64,M,128,128,M"); pooling
    layers are skipped once the resolution reaches 1. ``width``: a factor on every channel count
    (rounded, at least 1), so that depth and width can be swept separately.
    """

    def __init__(self, input_shape, num_classes, config: str = "32,M,64,M,128,128,M",
                 batchnorm: bool = False, dropout: float = 0.0, hidden: int = 256,
                 width: float = 1.0):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ConfigError(f"vgg width must be a positive number (a factor on the channel "
                              f"counts), got {width!r}")
        if len(input_shape) != 3:
            raise ConfigError(f"arch 'vgg' needs image inputs (C, H, W), got input shape {input_shape}")
        items = [s.strip() for s in str(config).split(",") if s.strip()]
        if not items or not all(s == "M" or s.isdigit() for s in items):
            raise ConfigError(f"vgg config={config!r}: use comma-separated channel counts and M, e.g. '32,M,64,M'")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for s in items:
            if s == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            channels = max(1, round(int(s) * width))
            layers.append(nn.Conv2d(c, channels, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU())
            c = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                                        nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """3×3 conv – BN – ReLU (``act1``) – 3×3 conv – BN, plus the shortcut (1×1 conv + BN when the
    shape changes), then ReLU (``act2``). The ReLUs are modules so that their outputs (the
    block's units) can be edited by name; they own no state, so checkpoints are unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.act2(h + self.shortcut(x))


@register_model("resnet", example_input=(3, 8, 8))
class ResNet(ZooModel):
    """CIFAR-style ResNet (He et al. 2016, §4.2): a 3×3 stem, then stages of BasicBlocks, each
    stage after the first halving the resolution and doubling the width, GAP and a linear head.

    ``depth`` = 6n + 2 gives n blocks per stage over 3 stages (8, 14, 20, 32 ...); ``blocks``
    (e.g. "2,2,2,2") overrides it, and with ``width=64`` and "2,2,2,2" this is ResNet-18 (11M).
    """

    def __init__(self, input_shape, num_classes, depth: int = 8, width: int = 16,
                 blocks: str | None = None, batchnorm: bool = True):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"arch 'resnet' needs image inputs (C, H, W), got input shape {input_shape}")
        if not batchnorm:
            raise ConfigError("arch 'resnet' is defined with BatchNorm; use vgg or cnn for batchnorm=False")
        if blocks is None:
            if (depth - 2) % 6 or depth < 8:
                raise ConfigError(f"resnet depth must be 6n+2 >= 8 (8, 14, 20, 32...), got {depth}")
            per_stage = [(depth - 2) // 6] * 3
        else:
            try:
                per_stage = [int(b) for b in str(blocks).split(",")]
            except ValueError:
                raise ConfigError(f"resnet blocks={blocks!r}: use comma-separated counts, e.g. '2,2,2,2'") from None
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages = []
        c_in = width
        for i, n in enumerate(per_stage):
            c_out = width * 2**i
            stages.append(nn.Sequential(*[BasicBlock(c_in if j == 0 else c_out, c_out,
                                                     2 if (i > 0 and j == 0) else 1) for j in range(n)]))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def init_module(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        else:
            super().init_module(module)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))  # (B, C, H', W')
        return self.head(h.mean(dim=(2, 3)))


@register_model("transformer")
class Transformer(ZooModel):
    """A small pre-norm transformer encoder classifier over a sequence of tokens.

    Images (C, H, W) are read as H tokens of C·W features (rows); vectors (D,) as D/`patch` tokens
    of `patch` features (MNIST-1D: 40 → 10 tokens of 4). Learned positions, mean pooling.
    """

    def __init__(self, input_shape, num_classes, d_model: int = 64, heads: int = 4, layers: int = 2,
                 ff: int = 128, dropout: float = 0.0, patch: int = 4):
        super().__init__()
        if len(input_shape) == 3:
            tokens, features = input_shape[1], input_shape[0] * input_shape[2]
        elif len(input_shape) == 1:
            if input_shape[0] % patch:
                raise ConfigError(f"transformer patch={patch} must divide the input length {input_shape[0]}")
            tokens, features = input_shape[0] // patch, patch
        else:
            raise ConfigError(f"arch 'transformer' needs (C, H, W) or (D,) inputs, got {input_shape}")
        if d_model % heads:
            raise ConfigError(f"transformer d_model={d_model} must be divisible by heads={heads}")
        self.tokens, self.features = tokens, features
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.zeros(tokens, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.encoder = nn.ModuleList([
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
            for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def init_module(self, module: nn.Module) -> None:
        if isinstance(module, Transformer):  # the root (or a copy of it) owns `position`
            nn.init.normal_(module.position, std=0.02)
        else:
            super().init_module(module)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        else:  # (B, D) -> (B, D/patch, patch)
            x = x.reshape(x.shape[0], self.tokens, self.features)
        h = self.embed(x) + self.position  # (B, T, d_model)
        for layer in self.encoder:
            h = layer(h)
        return self.head(self.norm(h).mean(dim=1))
