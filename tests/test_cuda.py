"""Every engine route and every registered probe on a device, against the same call on the CPU.

The device comes from ``GENPROBE_TEST_DEVICE`` (default ``cuda``; ``cuda:1``, ``cpu`` ...). When
it is not available the tests skip, saying so, which is what the default ``python -m pytest``
does on a CPU-only machine. ``GENPROBE_TEST_DEVICE=cpu python -m pytest -m cuda
tests/test_cuda.py`` runs the same code end to end on the CPU, so that the tests cannot rot
where no GPU is lent (``benchmarks/gpu_check.py --dry-run`` does exactly that).

What is checked, on the device against the CPU:

- equal results within float32 tolerances: the grams engine (every implementation, the loss and
  output Jacobians, traced, square and rectangular, one block and many), the variants engine
  (fx prefix reuse and full forwards, stacks by vmap and by loop, fast and plain execution,
  chunks and pieces, every kind of edit) and activation statistics on every model of
  tests/foreign.py, and every registered probe (a new one is covered by registering it) on a
  conv net with BatchNorm and on a token-id model, with the tester's tiny options. The engines run
  in float32 (TF32 off: cuDNN turns it on for convolutions by default, ~1e-3 relative error)
  and are compared on continuous values (logits, losses, Grams), 0–1 errors only where the
  CPU's top-two logit margin is not within rounding. The probes run in float64, so that their
  discrete steps (argmax errors, the criticality bisection's accept/reject, ranks, bins) are the
  same on both devices: in float32 one tie within rounding could change a table's shape;
- the caller's model and the global CPU and CUDA RNG states untouched;
- no host–device copy inside the engines' inner loops (see :class:`Transfers`).
"""

from __future__ import annotations

import copy
import json
import os
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import genprobe as gp
from foreign import FOREIGN, TOKENS, make_subject
from genprobe.engine.activations import activation_stats
from genprobe.engine.edits import (
    Edit,
    activation_noise_edit,
    interpolate_edit,
    mask_edit,
    noise_edit,
    path_edit,
    replace_edit,
    stack_edits,
)
from genprobe.engine.grams import gram, gram_blocks
from genprobe.engine.variants import VariantEvaluator
from genprobe.probes.registry import get_probe, list_probes
from test_probe_contract import _fingerprint, _options, _same

DEVICE_VARIABLE = "GENPROBE_TEST_DEVICE"
REPORT_VARIABLE = "GENPROBE_TEST_REPORT_DIR"
"""When set, the transfer tests write what they saw there (benchmarks/gpu_check.py reads it)."""


def _device() -> tuple[torch.device | None, str]:
    """(the device under test, "") or (None, why it is unavailable)."""
    name = os.environ.get(DEVICE_VARIABLE, "cuda")
    hint = f"set {DEVICE_VARIABLE}=cpu to run these tests on the CPU"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        return None, f"{DEVICE_VARIABLE}={name!r} is not a device name ({exc})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None, (
                f"{DEVICE_VARIABLE}={name!r} but CUDA is not available (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda}); {hint}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            return (
                None,
                f"{DEVICE_VARIABLE}={name!r} but only {torch.cuda.device_count()} CUDA device(s); {hint}",
            )
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
        return (
            None,
            f"{DEVICE_VARIABLE}={name!r} cannot hold a tensor here ({type(exc).__name__}); {hint}",
        )
    return device, ""


DEVICE, UNAVAILABLE = _device()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason=UNAVAILABLE),
    pytest.mark.usefixtures("one_thread", "full_float32"),
]

MODELS = sorted(FOREIGN) + sorted(TOKENS)
PROBE_MODELS = ["residual_bn", "tokens"]
"""The probes' small models: convolutions and BatchNorm (cuDNN, channels-last, folded
BatchNorms), and integer token ids (inputs that must not be cast). Every model of
tests/foreign.py goes through the engines below, and through every probe on the CPU in
tests/test_probe_contract.py."""
PROBES = list_probes()

RTOL = 1e-4
ATOL = 1e-5
"""Float32 tolerances of the engines: relative, and absolute as a fraction of the largest value
compared. Rounding differs between devices by ~1e-6 here (tiny models); a real mistake (a stale
buffer, an edit not applied, the state of an epoch before) moves values by 1e-3 or more relative
(see the control test, test_the_tolerance_sees_one_sgd_step)."""

PROBE_RTOL = 1e-5
PROBE_ATOL = 1e-7
"""The probes' tolerances, of float32's order (relative, and of each column's largest value): the
probes run in float64, where the two devices agree to ~1e-13."""


@pytest.fixture(scope="module")
def full_float32():
    """Full float32 on the device, as on the CPU: TF32 off for matmuls and convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- comparisons


def assert_close(actual, expected, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    """`actual` (from the device) equals `expected` (from the CPU): floats within `rtol` and
    `atol` × the largest finite |expected| (NaN and ±inf where the CPU has them), others exactly."""
    assert isinstance(actual, Tensor) and isinstance(expected, Tensor), what
    assert actual.device.type == "cpu", f"{what}: the result is on {actual.device}, not on the CPU"
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: differs"
        return
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=rtol,
        atol=max(atol * scale, 1e-300),
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def assert_errors_close(errors, expected, logits: Tensor, what: str) -> None:
    """0–1 errors equal to the CPU's, except for examples whose top-two logit margin on the CPU
    is within rounding (there the argmax may fall either way)."""
    top = logits.double().topk(2, dim=-1).values
    margin = top[..., 0] - top[..., 1]
    tie = margin <= 10 * ATOL * max(float(logits.abs().max()), 1.0)
    differ = (errors != expected) & ~tie
    assert not bool(differ.any()), f"{what}: {int(differ.sum())} errors differ away from a tie"


def _frames_close(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b), f"{what}: shape differs"
    for column in b.columns:
        x, y = a[column], b[column]
        if pd.api.types.is_float_dtype(y.dtype):
            assert_close(
                torch.tensor(x.to_numpy(dtype=float)),
                torch.tensor(y.to_numpy(dtype=float)),
                f"{what}[{column!r}]",
                PROBE_RTOL,
                PROBE_ATOL,
            )
        else:
            pd.testing.assert_series_equal(x, y, check_exact=True, obj=f"{what}[{column!r}]")


def assert_results_close(dev, cpu, what: str) -> None:
    """Two probe results equal: every table, tensor and summary value."""
    assert type(dev) is type(cpu)
    _frames_close(dev.table, cpu.table, f"{what}.table")
    assert dev.tables.keys() == cpu.tables.keys()
    for name in cpu.tables:
        _frames_close(dev.tables[name], cpu.tables[name], f"{what}.tables[{name!r}]")
    assert dev.tensors.keys() == cpu.tensors.keys()
    for name in cpu.tensors:
        assert_close(
            dev.tensors[name],
            cpu.tensors[name],
            f"{what}.tensors[{name!r}]",
            PROBE_RTOL,
            PROBE_ATOL,
        )
    assert dev.summary.keys() == cpu.summary.keys()
    keys = list(cpu.summary)
    assert_close(
        torch.tensor([dev.summary[k] for k in keys], dtype=torch.float64),
        torch.tensor([cpu.summary[k] for k in keys], dtype=torch.float64),
        f"{what}.summary {keys}",
        PROBE_RTOL,
        PROBE_ATOL,
    )


def _rng_states() -> tuple:
    cuda = tuple(torch.cuda.get_rng_state_all()) if DEVICE.type == "cuda" else ()
    return torch.get_rng_state(), cuda


@contextmanager
def untouched(what: str, model: torch.nn.Module | None = None):
    """The block leaves the global CPU and CUDA RNG states, and `model`, as they were."""
    before = _fingerprint(model) if model is not None else None
    cpu, cuda = _rng_states()
    yield
    cpu_after, cuda_after = _rng_states()
    assert torch.equal(cpu, cpu_after), f"{what} used the global CPU RNG"
    assert len(cuda) == len(cuda_after) and all(
        torch.equal(a, b) for a, b in zip(cuda, cuda_after, strict=True)
    ), f"{what} used the global CUDA RNG"
    if model is not None:
        assert _same(before, _fingerprint(model)), f"{what} changed the caller's model"


# ----------------------------------------------------------------------------- probes


def _float64_subject(model: str) -> tuple[gp.Subject, torch.nn.Module]:
    """The shared tester's subject, in float64, and the caller's model it was made from: in
    train mode, carrying a hook of theirs (a Subject copies it; nothing may reach back into it)."""
    subject = make_subject(model, n_train=24, n_test=18, checkpoints=2, dtype=torch.float64)
    caller = copy.deepcopy(subject.model).train()
    caller.register_forward_hook(lambda *args: None)
    return gp.Subject(
        caller,
        init=subject.init,
        final=subject.final,
        checkpoints={e: s for e, s in subject.checkpoints.items() if e},
        train=subject.train,
        test=subject.test,
        num_classes=subject.num_classes,
    ), caller


def _probe(probe: str, subject: gp.Subject, device: str, **options):
    spec = get_probe(probe)
    assert "device" in spec.parameters(), f"probe {probe!r} takes no device= option"
    return spec.function(subject, **_options(probe, seed=0, device=device, **options))


@pytest.mark.parametrize("model", PROBE_MODELS)
@pytest.mark.parametrize("probe", PROBES)
def test_probe_on_the_device_equals_the_cpu(probe, model):
    subject, caller = _float64_subject(model)
    expected = _probe(probe, subject, "cpu")
    with (
        untouched(f"probe {probe!r} on {DEVICE}", caller),
        untouched(f"probe {probe!r} (the Subject's own copy)", subject.model),
    ):
        result = _probe(probe, subject, str(DEVICE))
    assert result.meta["device"] == str(DEVICE)
    assert result.self_check["passed"], result.self_check
    assert_results_close(result, expected, f"{probe} on {model}")


def test_ntk_streamed_to_disk_on_the_device(tmp_path):
    """The NTK probe's streamed route (the Gram written block by block to `out`)."""
    subject, caller = _float64_subject("residual_bn")
    expected = _probe("ntk", subject, "cpu", out=tmp_path / "cpu", trace_outputs=True)
    with untouched(f"the streamed NTK on {DEVICE}", caller):
        result = _probe("ntk", subject, str(DEVICE), out=tmp_path / "device", trace_outputs=True)
    assert_results_close(result, expected, "streamed ntk")


# ----------------------------------------------------------------------------- grams engine


IMPLEMENTATIONS = ("loop", "vmap", "layerwise")
"""The routes ("auto" is "layerwise", which degrades to "vmap" and "loop" by itself)."""
OBJECTIVES = {  # name: gram() options
    "loss": dict(of="loss"),
    "loss-mse": dict(of="loss", loss="mse"),
    "outputs": dict(of="outputs"),
    "traced": dict(of="outputs", trace_outputs=True),
}


def _gram(subject, device, x1, y1, x2=None, y2=None, **options):
    return gram(subject.model, subject.final, x1, x2, y1=y1, y2=y2, device=device, **options)


def _gram_cases():
    for model in MODELS:
        for implementation in IMPLEMENTATIONS:
            for objective in ("loss", "outputs", "traced"):
                yield pytest.param(
                    model, implementation, objective, id=f"{model}-{implementation}-{objective}"
                )
    for model in ("residual_bn", "shared"):  # the mse loss: its target is built on the device
        for implementation in IMPLEMENTATIONS:
            yield pytest.param(
                model, implementation, "loss-mse", id=f"{model}-{implementation}-loss-mse"
            )


@pytest.mark.parametrize("model, implementation, objective", list(_gram_cases()))
def test_gram_on_the_device_equals_the_cpu(model, implementation, objective):
    """One block of 6 examples (x1 vs x2 and many blocks: the next test)."""
    subject = make_subject(model, n_train=6)
    x, y = subject.train
    options = OBJECTIVES[objective] | {"implementation": implementation}
    expected = _gram(subject, "cpu", x, y, **options)
    with untouched(f"gram on {DEVICE}", subject.model):
        result = _gram(subject, DEVICE, x, y, **options)
    assert result.implementation == expected.implementation, "the route differs by device"
    assert result.vmap_params == expected.vmap_params
    what = f"gram({model}, {implementation}, {objective})"
    assert_close(result.matrix, expected.matrix, what)
    assert_close(result.diag1, expected.diag1, f"{what}.diag1")


def _blocks(subject, device, x1, y1, x2, y2, **options) -> dict:
    info: dict = {}
    out = {
        (b.rows.start, b.cols.start): b
        for b in gram_blocks(
            subject.model,
            subject.final,
            x1,
            x2,
            y1=y1,
            y2=None if x2 is None else y2,
            device=device,
            info=info,
            block_size=4,
            **options,
        )
    }
    return out | {"info": info}


BLOCK_CASES = [("residual_bn", i, o) for i in IMPLEMENTATIONS for o in ("loss", "outputs")]
BLOCK_CASES += [("transformer", i, "outputs") for i in IMPLEMENTATIONS]


@pytest.mark.parametrize("model, implementation, objective", BLOCK_CASES)
def test_gram_blocks_on_the_device_equal_the_cpu(model, implementation, objective):
    """Many blocks: the square Gram's diagonal blocks and cross blocks of two chunks, and a
    rectangular Gram streamed over pairs of chunks."""
    subject = make_subject(model, n_train=12)
    x, y = subject.train
    options = OBJECTIVES[objective] | {"implementation": implementation}
    for x1, y1, x2, y2 in [(x[:8], y[:8], None, None), (x[:5], y[:5], x[8:], y[8:])]:
        expected = _blocks(subject, "cpu", x1, y1, x2, y2, **options)
        with untouched(f"gram_blocks on {DEVICE}", subject.model):
            result = _blocks(subject, DEVICE, x1, y1, x2, y2, **options)
        assert result.pop("info") == expected.pop("info") and result.keys() == expected.keys()
        assert len(result) > 2
        for key, block in expected.items():
            what = f"gram_blocks({model}, {implementation}, {objective}) block {key}"
            assert_close(result[key].matrix, block.matrix, what)
            for side in ("diag_rows", "diag_cols"):
                if getattr(block, side) is None:
                    assert getattr(result[key], side) is None
                else:
                    assert_close(getattr(result[key], side), getattr(block, side), f"{what}.{side}")


def test_the_tolerance_sees_one_sgd_step():
    """The control: two states one epoch of SGD apart (three steps) differ by far more than the
    tolerance, in the Gram and in an edit's losses."""
    subject = make_subject("residual_bn", n_train=10, checkpoints=2)
    x, y = subject.train
    a = gram(subject.model, subject.checkpoints[1], x, y1=y, device="cpu").matrix
    b = gram(subject.model, subject.checkpoints[2], x, y1=y, device="cpu").matrix
    assert float((a - b).abs().max()) > 100 * (
        ATOL * float(b.abs().max()) + RTOL * float(b.abs().min())
    )
    ev = VariantEvaluator(subject.model, subject.final, subject.train, device="cpu")
    unit = subject.units()[2]
    one, two = ev.evaluate([replace_edit(unit, subject.checkpoints[1]), Edit()], per_example=True)
    assert float((one.losses - two.losses).abs().max()) > 10 * (ATOL + RTOL) * float(
        two.losses.abs().max()
    )


# ----------------------------------------------------------------------------- variants engine


SAMPLE = 3
"""Examples of the forward that finds the modules with per-example outputs."""


def _outputs(subject, modules=None) -> dict[str, object]:
    """Each module's first output on SAMPLE examples, in the order of first calls."""
    outputs: dict[str, object] = {}

    def record(name):
        def hook(module, args, out):
            outputs.setdefault(name, out)

        return hook

    named = dict(subject.model.named_modules())
    handles = [
        named[n].register_forward_hook(record(n)) for n in (modules or [n for n in named if n])
    ]
    try:
        with torch.no_grad():
            subject.model(subject.train.x[:SAMPLE])
    finally:
        for h in handles:
            h.remove()
    return outputs


def _has_units(out) -> bool:
    """A per-example output with units: (n, C, ...), n the examples (not, e.g., the (T, C) of
    position embeddings, which no example owns)."""
    return isinstance(out, Tensor) and out.dim() >= 2 and out.shape[0] == SAMPLE


def _activation_module(subject) -> tuple[str, int]:
    """A module in the middle of the network whose output has units, and its unit count."""
    outputs = _outputs(subject)
    names = [n for n, o in outputs.items() if _has_units(o)]
    name = names[(len(names) - 1) // 2]
    h = outputs[name]
    return name, h.shape[1] if h.dim() == 4 else h.shape[-1]


def _edits(subject) -> list[Edit]:
    """One of each kind of edit the engine takes, built from the subject's states on the host
    as the probes build them."""
    units = subject.units()
    first, mid, last = units[0], units[len(units) // 2], units[-1]
    g = torch.Generator().manual_seed(0)
    z = {k: torch.randn((2, *subject.final[k].shape), generator=g) for k in mid.params}
    module, c = _activation_module(subject)
    with_buffers = next((u for u in units if u.buffers), first)
    path, _ = path_edit(mid, subject.init, subject.final, [(0.5, 0.0), (0.5, 0.1), (1.0, 0.05)], z)
    return [
        Edit(label="base"),
        replace_edit(mid, subject.init, label="replace"),
        replace_edit(with_buffers, subject.init, buffers="follow", label="replace+buffers"),
        interpolate_edit(last, subject.init, subject.final, [0.0, 0.5, 1.0], label="interpolate"),
        noise_edit(first, subject.final, 0.05, 3, seed=0, label="noise"),
        path,
        stack_edits(
            [replace_edit(mid, subject.init), replace_edit(mid, subject.checkpoints[1])],
            label="stack",
        ),
        mask_edit(module, torch.arange(c) % 2 == 0, label="mask"),
        mask_edit(
            module, torch.rand((3, c), generator=g) < 0.5, torch.linspace(-1, 1, c), label="masks"
        ),
        activation_noise_edit(module, 0.3, seed=0, label="activation noise"),
        activation_noise_edit(module, [0.0, 0.5], seed=1, draws=2, label="activation noise stack"),
    ]


VARIANT_CONFIGS = {  # name: VariantEvaluator options (the default stack: loop on the CPU, vmap elsewhere)
    "stack-vmap": dict(stack="vmap"),
    "stack-loop": dict(stack="loop"),
    "full-forward": dict(use_fx=False),
    "plain-execution": dict(fast=False),
    "chunks-and-pieces": dict(batch_size=5, memory_budget=4096),
}


def _evaluate(subject, device, config: str, edits):
    ev = VariantEvaluator(
        subject.model, subject.final, subject.train, device=device, **VARIANT_CONFIGS[config]
    )
    return ev, ev.evaluate(edits, per_example=True, logits=True)


VARIANT_CASES = [(m, c) for m in MODELS for c in ("stack-vmap", "stack-loop")]
VARIANT_CASES += [
    (m, c)
    for m in ("residual_bn", "tokens", "transformer")
    for c in ("full-forward", "plain-execution", "chunks-and-pieces")
]


@pytest.mark.parametrize("model, config", VARIANT_CASES)
def test_variants_on_the_device_equal_the_cpu(model, config):
    subject = make_subject(model, n_train=24, checkpoints=2)
    edits = _edits(subject)
    ev_cpu, expected = _evaluate(subject, "cpu", config, edits)
    with untouched(f"the variants engine on {DEVICE}", subject.model):
        ev, results = _evaluate(subject, DEVICE, config, edits)
    assert (ev.mode, ev.route) == (ev_cpu.mode, ev_cpu.route), "the route differs by device"
    for edit, got, want in zip(edits, results, expected, strict=True):
        what = f"variants({model}, {config}) edit {edit.label!r}"
        assert got.label == want.label
        assert_close(got.logits, want.logits, f"{what}.logits")
        assert_close(got.losses, want.losses, f"{what}.losses")
        assert_close(got.loss, want.loss, f"{what}.loss")
        assert_errors_close(got.errors, want.errors, want.logits, f"{what}.errors")
        assert_close(got.error, got.errors.mean(dim=-1), f"{what}.error")


# ----------------------------------------------------------------------------- activations


def _stats(subject, device, modules):
    return activation_stats(
        subject.model,
        subject.final,
        subject.train,
        modules,
        num_classes=subject.num_classes,
        batch_size=5,
        device=device,
    )


@pytest.mark.parametrize("model", MODELS)
def test_activation_stats_on_the_device_equal_the_cpu(model):
    subject = make_subject(model, n_train=24)
    modules = [u.modules[0] for u in subject.units() if u.modules[0]]
    outputs = _outputs(subject, modules)
    modules = [m for m in modules if _has_units(outputs.get(m))]
    expected = _stats(subject, "cpu", modules)
    with untouched(f"activation_stats on {DEVICE}", subject.model):
        result = _stats(subject, DEVICE, modules)
    for m in modules:
        for field in ("mean", "var", "class_means", "class_counts", "min", "element_mean"):
            assert_close(
                getattr(result[m], field), getattr(expected[m], field), f"{model} {m}.{field}"
            )
        assert (result[m].count, result[m].calls, result[m].units) == (
            expected[m].count,
            expected[m].calls,
            expected[m].units,
        )


# ----------------------------------------------------------------------------- everything on the device


@pytest.mark.parametrize("model", ["residual_bn", "tokens"])
def test_engines_take_a_model_and_data_already_on_the_device(model):
    """A caller whose model, states and data all live on the device gets the same results, and
    keeps its model where and as it was."""
    subject = make_subject(model, n_train=12, checkpoints=2)
    x, y = subject.train
    final = {k: v.to(DEVICE) for k, v in subject.final.items()}
    there = copy.deepcopy(subject.model).to(DEVICE)
    on_device = gp.values.Data(x.to(DEVICE), y.to(DEVICE))
    edits = _edits(subject)[:4]
    module, _ = _activation_module(subject)
    with untouched(f"the engines on {DEVICE}", there):
        g = gram(there, final, on_device.x[:6], y1=on_device.y[:6], device=DEVICE)
        results = VariantEvaluator(there, final, on_device, device=DEVICE).evaluate(
            edits, per_example=True
        )
        stats = activation_stats(
            there,
            final,
            on_device,
            [module],
            num_classes=subject.num_classes,
            batch_size=5,
            device=DEVICE,
        )
    assert_close(
        g.matrix, gram(subject.model, subject.final, x[:6], y1=y[:6], device="cpu").matrix, "gram"
    )
    expected = VariantEvaluator(subject.model, subject.final, subject.train, device="cpu").evaluate(
        edits, per_example=True
    )
    for got, want in zip(results, expected, strict=True):
        assert_close(got.losses.cpu(), want.losses, f"variants edit {want.label!r}")
    want = activation_stats(
        subject.model,
        subject.final,
        subject.train,
        [module],
        num_classes=subject.num_classes,
        batch_size=5,
        device="cpu",
    )[module]
    assert_close(stats[module].mean.cpu(), want.mean, "activation mean")
    assert next(there.parameters()).device.type == DEVICE.type


# ----------------------------------------------------------------------------- transfers


COPIES = frozenset(
    {
        torch.ops.aten._to_copy.default,
        torch.ops.aten.copy_.default,
        torch.ops.aten._copy_from.default,
        torch.ops.aten._copy_from_and_resize.default,
    }
)
SCALAR_READS = frozenset({torch.ops.aten._local_scalar_dense.default})
DATA_DEPENDENT = frozenset(
    {
        "nonzero",
        "nonzero_static",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
    }
)


class Transfers(TorchDispatchMode):
    """Records what makes the host and the device wait for each other, op by op.

    A dispatch mode sees every aten op with its tensors (under ``vmap`` and ``grad`` too, and on
    any device, so the same code runs on the CPU): a copy between devices, classed as ``data``
    when it reads the caller's data tensors (the one copy per chunk that streaming data needs),
    ``to_host`` when it lands on the CPU, ``other`` otherwise; a scalar read of a device tensor
    (``.item()``, ``bool()``, ``int()``); an op whose output shape depends on device values
    (``nonzero``, boolean-mask indexing); an op mixing devices (a CPU index into a CUDA tensor).
    It cannot see copies inside tensor factories (``torch.tensor(list, device=...)``) or syncs
    inside kernels, so on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` also counts every
    synchronizing call (``syncs``). The profiler was not used: its memcpy events do not say which
    tensor was copied (the data's own copies could not be told apart), and it needs CUPTI.
    Counts are compared between two sizes of the same problem: see :func:`growth`. On the CPU
    (``GENPROBE_TEST_DEVICE=cpu``) there is no second device and the counts are zero: the tests
    run, but only a device can fail them; the guard's own test uses the meta device instead.
    """

    def __init__(self, device: torch.device, data=()):
        super().__init__()
        self.device = device
        self.data = {t.untyped_storage().data_ptr() for t in data}
        self.events: list[tuple[str, str, str]] = []  # (category, what, where)
        self.syncs: list[str] = []  # where each CUDA sync was called from
        self._log = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            self._sync_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._log is not None:
            torch.cuda.set_sync_debug_mode(self._sync_mode)
            self.syncs = [
                f"{_short_path(w.filename)}:{w.lineno}"
                for w in self._log
                if "synchroniz" in str(w.message)
            ]
            self._catch.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._inspect(func, args, kwargs, out)
        return out

    def _inspect(self, func, args, kwargs, out) -> None:
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
        name = func.overloadpacket.__name__
        on_device = [t for t in ins if t.device.type != "cpu"]
        if func in SCALAR_READS and on_device:
            self._record("other", f"{name}: a scalar read from {on_device[0].device}")
        elif name in DATA_DEPENDENT and on_device:
            self._record("other", f"{name}: an output shape that depends on device values")
        elif (
            name in ("index", "index_put", "index_put_")
            and on_device
            and any(t.dtype == torch.bool for t in ins[1:])
        ):
            self._record("other", f"{name}: boolean-mask indexing (a nonzero inside)")
        if func in COPIES:
            devices = {t.device for t in ins + outs}
        else:  # a 0-dim CPU tensor in a device op is a scalar argument, not a copy
            devices = {
                t.device for t in ins + outs if not (t.device.type == "cpu" and t.dim() == 0)
            }
        if len(devices) < 2:
            return
        source = sorted({str(t.device) for t in ins})
        target = sorted({str(t.device) for t in outs})
        what = f"{name}: {'+'.join(source)} -> {'+'.join(target)}"
        if any(t.device.type == "cpu" and t.untyped_storage().data_ptr() in self.data for t in ins):
            self._record("data", what)
        elif func in COPIES and target == ["cpu"]:
            self._record("to_host", what)
        else:
            self._record("other", what)

    def _record(self, category: str, what: str) -> None:
        self.events.append((category, what, _caller()))

    def counts(self) -> dict[str, int]:
        counts = {"data": 0, "to_host": 0, "other": 0}
        for category, _, _ in self.events:
            counts[category] += 1
        return counts | {"syncs": len(self.syncs)}


def _short_path(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    for root in ("/genprobe/", "/torch/", "/tests/"):
        if root in path:
            return root.strip("/") + "/" + path.split(root, 1)[1]
    return path


GUARD_FRAMES = frozenset({"_caller", "_record", "_inspect", "__torch_dispatch__"})


def _caller() -> str:
    """The innermost frame in genprobe's own code, else the innermost outside torch and the guard."""
    stack = [
        f
        for f in traceback.extract_stack()
        if not (f.name in GUARD_FRAMES and f.filename == __file__)
    ]
    for frame in reversed(stack):
        path = frame.filename.replace(os.sep, "/")
        if "/genprobe/" in path and "/tests/" not in path:
            return f"{_short_path(frame.filename)}:{frame.lineno} ({frame.name})"
    for frame in reversed(stack):
        if "/torch/" not in frame.filename.replace(os.sep, "/"):
            return f"{_short_path(frame.filename)}:{frame.lineno} ({frame.name})"
    return "?"


def growth(small: Transfers, large: Transfers, units: int, *, data: int, to_host: int) -> dict:
    """What the larger problem adds, checked: it runs `units` more inner-loop units (blocks,
    chunks) and may add `data` copies of the data and `to_host` copies of results per unit;
    nothing else (no other copy, scalar read or data-dependent shape), and on CUDA no sync but
    those of the allowed copies. Returns the report for the failure message and the report dir."""
    a, b = small.counts(), large.counts()
    delta = {k: b[k] - a[k] for k in a}
    report = {
        "units_added": units,
        "allowed_per_unit": {"data": data, "to_host": to_host},
        "small": a,
        "large": b,
        "added": delta,
        "events_of_the_larger_run": _tally(large.events),
        "syncs_of_the_larger_run": _tally([("sync", "", s) for s in large.syncs]),
    }
    return report | {
        "ok": delta["other"] == 0
        and delta["data"] <= data * units
        and delta["to_host"] <= to_host * units
        and delta["syncs"] <= delta["data"] + delta["to_host"]
    }


def _tally(events) -> list[str]:
    counts: dict[str, int] = {}
    for category, what, where in events:
        key = f"{category}: {what} at {where}" if what else f"{category} at {where}"
        counts[key] = counts.get(key, 0) + 1
    return [f"{n}x {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def _check_growth(request, report: dict) -> None:
    folder = os.environ.get(REPORT_VARIABLE)
    if folder:
        path = Path(folder) / "transfers.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(
                json.dumps({"test": request.node.nodeid, "device": str(DEVICE)} | report) + "\n"
            )
    assert report["ok"], "host-device traffic grows with the inner loop:\n" + json.dumps(
        report, indent=1
    )


def test_the_transfer_guard_sees_copies_and_scalar_reads():
    """The guard itself, on any machine: the meta device stands in for an accelerator."""
    x = torch.ones(3)
    with Transfers(torch.device("meta"), data=[x]) as seen:
        x.to("meta")
        torch.zeros(2).to("meta")
        torch.zeros(2, device="meta") + torch.zeros((), device="cpu")  # a CPU scalar: no copy
    assert [e[:2] for e in seen.events] == [
        ("data", "_to_copy: cpu -> meta"),
        ("other", "_to_copy: cpu -> meta"),
    ]
    assert seen.events[0][2].startswith("tests/test_cuda.py:")
    guard = Transfers(torch.device("meta"))
    guard._inspect(
        torch.ops.aten._local_scalar_dense.default, (torch.zeros((), device="meta"),), {}, 0.0
    )
    assert guard.counts()["other"] == 1


KNOWN_VARIANTS_TRAFFIC = pytest.mark.xfail(
    DEVICE is not None and DEVICE.type != "cpu",
    strict=True,
    reason="known from reading: per data chunk and edit, the variants engine copies results to the "
    "host (variants.py _Acc.add: .cpu()), edited parameters built on the host to the device "
    "(_run_plan, _run_one: v.to(self.device); PathParams.take builds on the host), stack indices "
    "(_run_plan, _variants: torch.tensor(idx).to(...)) and activation-edit arguments (edits.py "
    "_mask_fn, activation_noise_edit: .to(h.device))",
)

KNOWN_ACTIVATION_TRAFFIC = pytest.mark.xfail(
    DEVICE is not None and DEVICE.type != "cpu",
    strict=True,
    reason="known from reading: activation_stats copies four statistics per module and data chunk "
    "to the host (activations.py _Running.add: .cpu())",
)


TRANSFER_GRAMS = [
    ("residual_bn", i, o) for i in IMPLEMENTATIONS for o in ("loss", "outputs", "traced")
]
TRANSFER_GRAMS += [
    ("transformer", "layerwise", o) for o in ("loss", "traced")
]  # with vmap(grad) for attention


@pytest.mark.parametrize("model, implementation, objective", TRANSFER_GRAMS)
def test_no_transfer_inside_the_gram_blocks(model, implementation, objective, request):
    """Blocks of 4 examples (6 blocks: 3 diagonal, 3 cross) against one block of 6: only each
    block's result comes back to the host, once."""
    subject = make_subject(model, n_train=6)
    x, y = subject.train
    options = OBJECTIVES[objective] | {"implementation": implementation}
    seen = {}
    for size in (6, 4):
        blocks = gram_blocks(
            subject.model, subject.final, x, y1=y, device=DEVICE, block_size=size, **options
        )
        first = next(blocks)  # the setup (route, checks) and the first block, outside the count
        with Transfers(DEVICE, data=[x, y]) as seen[size]:
            rest = list(blocks)
        seen[size].blocks = 1 + len(rest)
        del first
    units = seen[4].blocks - seen[6].blocks
    assert units == 5
    _check_growth(request, growth(seen[6], seen[4], units, data=0, to_host=1))


@KNOWN_VARIANTS_TRAFFIC
@pytest.mark.parametrize("use_fx", [True, False], ids=["fx", "full-forward"])
@pytest.mark.parametrize("model", ["residual_bn", "tokens"])
def test_no_transfer_inside_the_variants_loop(model, use_fx, request):
    """One data chunk of 24 against four of 6: per chunk only the data's inputs and labels go to
    the device; every edit's parameters, arguments and results stay where they are."""
    subject = make_subject(model, n_train=24, checkpoints=2)
    edits = _edits(subject)
    seen = {}
    for batch in (24, 6):
        ev = VariantEvaluator(
            subject.model,
            subject.final,
            subject.train,
            device=DEVICE,
            batch_size=batch,
            use_fx=use_fx,
        )
        with Transfers(DEVICE, data=subject.train) as seen[batch]:
            ev.evaluate(edits)
    _check_growth(request, growth(seen[24], seen[6], 3, data=2, to_host=0))


@KNOWN_ACTIVATION_TRAFFIC
@pytest.mark.parametrize("model", ["residual_bn", "tokens"])
def test_no_transfer_inside_activation_stats(model, request):
    """One chunk of 24 examples against four of 6: per chunk only the inputs go to the device."""
    subject = make_subject(model, n_train=24)
    outputs = _outputs(subject)
    modules = [u.modules[0] for u in subject.units()[:-1] if _has_units(outputs.get(u.modules[0]))]
    seen = {}
    for batch in (24, 6):
        with Transfers(DEVICE, data=subject.train) as seen[batch]:
            activation_stats(
                subject.model,
                subject.final,
                subject.train,
                modules,
                num_classes=subject.num_classes,
                batch_size=batch,
                device=DEVICE,
            )
    _check_growth(request, growth(seen[24], seen[6], 3, data=1, to_host=0))
