"""One shared tester that every registered probe plugs into (torchmetrics' MetricTester,
captum's test table): run on every model of tests/foreign.py plus a token-id model, each probe
must leave the caller alone, round-trip through save/load exactly, be deterministic under its
seed, pass its own self-check, run from the command line, and give a typed error for each bad
input in its table."""

from __future__ import annotations

import copy
import fnmatch
import math

import pandas as pd
import pytest
import torch
from torch import nn

import genprobe as gp
from foreign import FOREIGN, LIBRARIES, MODELS, STRUCTURED, TOKENS, VISION, make_subject
from genprobe import inputs
from genprobe.device import resolve_device
from genprobe.errors import ConfigError, DataError, GenprobeError, ModuleSelectionError, StateError
from genprobe.probes.registry import get_probe, list_probes

pytestmark = pytest.mark.usefixtures("one_thread")

PROBES = list_probes()
CONTRACT_MODELS = sorted(FOREIGN) + sorted(TOKENS) + sorted(STRUCTURED) + sorted(LIBRARIES) + sorted(VISION)
HEAVY = {("ntk", "tv_resnet18"): 149, ("criticality", "tv_resnet18"): 132, ("selectivity", "tv_resnet18"): 86}
"""Cells measured at more than a minute on 2 cores (seconds): run with ``-m heavy``, not in CI.
ResNet-18's other cells (11 M parameters, 11-19 s each) run with the slow tests."""


def _cells():
    for model in CONTRACT_MODELS:
        for probe in PROBES:
            marks = (pytest.mark.heavy if (probe, model) in HEAVY
                     else pytest.mark.slow if model == "tv_resnet18" else ())
            yield pytest.param(probe, model, marks=marks, id=f"{probe}-{model}")


def _subject(name: str) -> gp.Subject:
    """Four training examples of each class at least: the tiny stiffness options sample 3 per class."""
    return make_subject(name, n_train=max(24, 4 * MODELS[name][2]), n_test=18, checkpoints=2)


def _options(probe: str, **options) -> dict:
    """The probe's tiny options updated by `options`."""
    tiny = dict(get_probe(probe).tiny)
    if {"n", "per_class"} & set(options):  # one way to size the sample at a time
        tiny.pop("n", None)
        tiny.pop("per_class", None)
    return tiny | options


def _run(probe: str, subject: gp.Subject, **options):
    return get_probe(probe).function(subject, **_options(probe, **options))


def _fingerprint(module: nn.Module) -> dict:
    """Everything of a module a probe must not change."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "devices": {p.device for p in module.parameters()},
        "dtypes": [p.dtype for p in module.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in module.modules()],
    }


def _same(a: dict, b: dict) -> bool:
    return (a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
            and all(a[k] == b[k] for k in ("training", "requires_grad", "devices", "dtypes", "hooks")))


def _summary_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def _results_equal(a, b) -> bool:
    try:
        pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
        assert a.tables.keys() == b.tables.keys()
        for name in a.tables:
            pd.testing.assert_frame_equal(a.tables[name], b.tables[name], check_exact=True)
    except AssertionError:
        return False
    return (_summary_equal(a.summary, b.summary) and a.tensors.keys() == b.tensors.keys()
            and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors))


@pytest.mark.parametrize("probe, model", list(_cells()))
def test_probe_contract(probe, model, tmp_path):
    subject = _subject(model)
    # the caller's own model, in train mode with a hook of theirs: a Subject copies it, and
    # nothing a probe does may reach back into it
    caller = copy.deepcopy(subject.model).train()
    handle = caller.register_forward_hook(lambda *args: None)
    subject = gp.Subject(caller, init=subject.init, final=subject.final,
                         checkpoints={e: s for e, s in subject.checkpoints.items() if e},
                         train=subject.train, test=subject.test, num_classes=subject.num_classes)
    caller_before, inner_before = _fingerprint(caller), _fingerprint(subject.model)
    states_before = {k: v.clone() for k, v in subject.final.items()}
    x_before = inputs.clone(subject.train.x)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()

    result = _run(probe, subject, seed=0)

    assert torch.equal(torch.get_rng_state(), rng), "the probe used the global RNG"
    assert _same(caller_before, _fingerprint(caller)), "the caller's model changed"
    assert _same(inner_before, _fingerprint(subject.model)), "the Subject's model changed"
    assert all(torch.equal(states_before[k], subject.final[k]) for k in states_before)
    assert all(torch.equal(a, b) for a, b in zip(inputs.leaves(x_before), inputs.leaves(subject.train.x),
                                                 strict=True))
    handle.remove()

    assert isinstance(result, get_probe(probe).result)
    check = result.self_check
    assert check and check["passed"], f"self-check failed: {check}"
    spec = get_probe(probe)
    assert all(type(v) is float for v in result.summary.values())
    missing = [p for p in spec.measures if not any(fnmatch.fnmatchcase(k, p) for k in result.summary)]
    assert not missing, f"declared measures absent from the summary: {missing}"
    # one shape of meta for every probe: how it was called, where, with which engine
    meta = result.meta
    assert {"probe", "genprobe_version", "machine", "options", "seed", "device", "engine",
            "self_check"} <= set(meta), sorted(meta)
    assert set(meta["options"]) == set(spec.parameters()), sorted(meta["options"])
    assert meta["seed"] == meta["options"]["seed"] == 0 and meta["probe"] == probe
    assert meta["device"] == meta["options"]["device"] == str(resolve_device("auto"))
    assert isinstance(meta["engine"], str) and meta["engine"]
    assert {"what", "value", "tolerance", "passed"} <= set(meta["self_check"])
    assert isinstance(result.brief(), pd.DataFrame) and len(result.brief()) <= len(result.table)

    path = result.save(tmp_path / "result", figure=True)
    assert (path / "figure.png").is_file()
    back = gp.load(path)
    assert type(back) is type(result)
    assert _results_equal(back, result)
    assert back.meta == result.meta

    again = _run(probe, subject, seed=0)
    assert _results_equal(again, result), "the same seed gave a different result"
    other = _run(probe, subject, seed=1)
    assert not _results_equal(other, result), "a different seed changed nothing"


def _cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):  # a repeatable option
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


@pytest.mark.parametrize("probe", PROBES)
def test_cli_runs_and_writes_result_and_figure(probe, tiny_run, tmp_path, capsys):
    from genprobe.cli import main

    out = tmp_path / probe
    main(["--quiet", "probe", probe, str(tiny_run), "--out", str(out), *_cli_args(get_probe(probe).tiny)])
    text = capsys.readouterr().out
    assert f"wrote {out}" in text
    assert (out / "figure.png").is_file() and (out / "meta.json").is_file()
    assert gp.load(out).meta["probe"] == probe


SHARED_BAD = [
    ("modules", "nope*", ModuleSelectionError, "nope"),
    ("modules", 123, ModuleSelectionError, "123"),
    ("checkpoints", [99], StateError, "recorded epochs"),
    ("checkpoints", "some", ConfigError, "checkpoints"),
    ("seed", -1, ConfigError, "seed"),
    ("seed", 1.5, ConfigError, "seed"),
    ("n", 0, ConfigError, "n must be"),
    ("n", 10**6, DataError, "larger than"),
    ("per_class", 0, ConfigError, "per_class"),
    ("split", "val", ConfigError, "split"),
    ("device", "tpu", ConfigError, "device"),
    ("memory_budget", -5, ConfigError, "memory_budget"),
    ("batch_size", 0, ConfigError, "batch_size"),
]
"""Bad values of the shared options, for every probe that accepts the option."""

PROBE_BAD = {
    "ablation": [(dict(mode="max"), ConfigError, "mode"), (dict(order="alpha"), ConfigError, "order"),
                 (dict(orders=0), ConfigError, "orders"), (dict(steps=10**4), ConfigError, "beyond the unit count"),
                 (dict(scope="some"), ConfigError, "scope"), (dict(layers="nope*"), ModuleSelectionError, "nope"),
                 (dict(layers=123), ModuleSelectionError, "123")],
    "activation_noise": [(dict(draws=0), ConfigError, "draws"), (dict(scales=[-1.0]), ConfigError, "scales"),
                         (dict(scales=[]), ConfigError, "scales"),
                         (dict(layers=["*.ff.1", "nope"]), ModuleSelectionError, "nope")],
    "selectivity": [(dict(layers="nope*"), ModuleSelectionError, "nope"),
                    (dict(importance="yes"), ConfigError, "importance"),
                    (dict(negative="abs"), ConfigError, "negative")],
    "robustness": [(dict(draws=0), ConfigError, "draws"), (dict(threshold=-1), ConfigError, "threshold"),
                   (dict(threshold=math.nan), ConfigError, "threshold"),
                   (dict(buffers="move"), ConfigError, "buffers")],
    "criticality": [(dict(samples=0), ConfigError, "samples"), (dict(loss="hinge"), ConfigError, "loss"),
                    (dict(epsilon=-1.0), ConfigError, "epsilon"), (dict(alphas=[2.0]), ConfigError, "alphas"),
                    (dict(sigmas=[0.0]), ConfigError, "sigmas"), (dict(noise="pink"), ConfigError, "noise"),
                    (dict(valley="half"), ConfigError, "valley")],
    "stiffness": [(dict(pairs="train-val"), ConfigError, "pairs"), (dict(bins=0), ConfigError, "bins"),
                  (dict(distance="l1"), ConfigError, "distance"),
                  (dict(implementation="magic"), ConfigError, "implementation"),
                  (dict(per_class=2, n=6), ConfigError, "not both")],
    "ntk": [(dict(ridge=-1.0), ConfigError, "ridge"), (dict(time=-1.0), ConfigError, "time"),
            (dict(n_test=-1), ConfigError, "n_test"), (dict(trace_outputs="yes"), ConfigError, "trace_outputs"),
            (dict(implementation="magic"), ConfigError, "implementation"),
            (dict(memory_budget=100), ConfigError, "memory budget.*out=DIR"),
            (dict(memory_budget=100, trace_outputs=False, out="unused"), ConfigError, "trace_outputs=True")],
}
"""Each probe's own bad inputs: every registered probe must have an entry."""


def _bad_cases():
    for probe in PROBES:
        accepted = get_probe(probe).parameters()
        for name, value, error, message in SHARED_BAD:
            if name in accepted:
                yield pytest.param(probe, {name: value}, error, message, id=f"{probe}-{name}={value!r}")
        for options, error, message in PROBE_BAD.get(probe, []):
            yield pytest.param(probe, options, error, message, id=f"{probe}-{options}")


def test_every_probe_has_a_bad_input_table():
    assert set(PROBE_BAD) == set(PROBES)


@pytest.fixture(scope="module")
def nested():
    return _subject("nested")


@pytest.mark.parametrize("probe, options, error, message", list(_bad_cases()))
def test_bad_input_gives_a_typed_error(probe, options, error, message, nested):
    with pytest.raises(error, match=message) as info:
        _run(probe, nested, **options)
    assert isinstance(info.value, GenprobeError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("probe, options, error, message", list(_bad_cases()))
def test_bad_input_is_caught_by_the_check_alone(probe, options, error, message, nested):
    """What a sweep runs before any training (ProbeSpec.check) catches every bad input of the
    table with the probe's own error."""
    with pytest.raises(error, match=message):
        get_probe(probe).check(nested, _options(probe, **options))


@pytest.mark.parametrize("probe", PROBES)
def test_check_stops_before_the_work(probe, nested):
    """The check-only mode stops at options_checked(): the root model runs on at most 3
    examples at a time (the probe's own shape checks: a layer's output must have one row per
    example, which 3 tells apart from a sequence of 2), never on the probe's data."""
    spec = get_probe(probe)
    batches = []

    def count(module, args):
        if module is not None and type(module) is type(nested.model) and args:
            batches.append(len(args[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        assert spec.check(nested, dict(spec.tiny)) is None
    finally:
        handle.remove()
    assert max(batches, default=0) <= 3, f"{probe} ran its model on {max(batches)} examples"


def test_a_probe_without_the_marker_is_refused(nested):
    from genprobe.probes.registry import ProbeSpec

    spec = ProbeSpec("fake", lambda subject, **options: None, gp.Result, "s", "p")
    with pytest.raises(TypeError, match="options_checked"):
        spec.check(nested, {})


def test_figures_say_what_they_show(nested):
    """The robustness colour bar is in the cells' unit (%); the criticality figure explains its
    line and dots; stiffness-vs-distance bins with few pairs are drawn hollow, not as certain."""
    rob = _run("robustness", nested)
    fig = rob.plot()
    image = fig.axes[0].get_images()[0].get_array()
    assert float(image.max()) == pytest.approx(100 * float(rob.map.to_numpy().max()))
    assert fig.axes[1].get_ylabel().endswith("(%)")
    crit = _run("criticality", nested)
    title = crit.plot()._suptitle.get_text()
    assert "White line: loss = ε" in title and "red dots: σ*(α)" in title
    stiff = _run("stiffness", nested, bins=5)
    assert (stiff.distance_curve["pairs"] < 30).any()
    labels = [t.get_text() for t in stiff.plot().axes[1].get_legend().get_texts()]
    assert any(label.startswith("hollow: bin of < 30 pairs") for label in labels)


def test_result_folders_are_readable_by_others(nested, tmp_path):
    import os
    import stat

    path = _run("stiffness", nested).save(tmp_path / "shared")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
