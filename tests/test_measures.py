"""Generalization measures (genprobe.measures): each baseline against a literal computation on a
tiny hand-built network, the measure registry and user-defined measures, bad inputs, and the
`genprobe measures` command (the ranking itself: tests/test_ranking.py)."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import genprobe as gp
import genprobe.measures as M
from foreign import make_subject
from genprobe.errors import ConfigError
from genprobe.probes.registry import get_probe, list_probes
from genprobe.seeds import generator
from genprobe.zoo.models import NTKLinear
from invoke import call
from test_ranking import _sweep_like

pytestmark = pytest.mark.usefixtures("one_thread")

MARK = ".genprobe-sweep"


# ----------------------------------------------------------------------------- helpers


def _sign(v: float) -> int:
    return int(v > 0) - int(v < 0)


def _trained_subject(model: nn.Module, x: torch.Tensor, *, init: dict | None, steps: int = 150,
                     lr: float = 0.3, seed: int = 0, **kwargs) -> gp.Subject:
    """`model` (float64) trained by full-batch SGD on labels from a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(x[0].numel(), 3, generator=g, dtype=x.dtype)
    y = (x.flatten(1) @ teacher).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return gp.Subject(model, init=init, train=(x, y), test=(x[:10], y[:10]), num_classes=3, **kwargs)


def _mlp_subject(seed: int = 0) -> gp.Subject:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return _trained_subject(model, x, init=init, seed=seed)


def _numpy(state: dict, key: str) -> np.ndarray:
    return state[key].detach().double().numpy()


def _literal_deviation(subject: gp.Subject, sigma: float, samples: int, seed: int) -> float:
    """|mean over draws of the perturbed 0–1 error − the trained error|, by a plain loop over
    draws: draw s adds sigma · z to every parameter, z drawn key by key (state order) from
    generator(seed, "pacbayes", s)."""
    x, y = subject.train
    params, buffers = gp.params.split_state(subject.model, subject.final)

    def error(state):
        out = torch.func.functional_call(subject.model, state | buffers, (x,))
        return float((out.argmax(1) != y).double().mean())

    errors = []
    for s in range(samples):
        g = generator(seed, "pacbayes", s)
        noisy = {k: v + sigma * torch.randn((1, *v.shape), generator=g, dtype=v.dtype)[0]
                 for k, v in params.items()}
        errors.append(error(noisy))
    return abs(float(np.mean(errors)) - error(params))


# ----------------------------------------------------------------------------- baselines


def test_baselines_of_a_2_2_3_mlp_match_literal_computations():
    subject = _mlp_subject()
    b = M.baselines(subject, seed=0, sharpness_samples=8)
    final, init = subject.final, subject.init
    w1, b1, w2, b2 = (_numpy(final, k) for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    assert b["baseline.params"] == 2 * 2 + 2 + 3 * 2 + 3
    fro = [np.linalg.norm(w, "fro") ** 2 for w in (w1, w2)]
    spec = [np.linalg.norm(w, 2) ** 2 for w in (w1, w2)]
    assert b["baseline.log_prod_frobenius"] == pytest.approx(math.log(fro[0] * fro[1]), rel=1e-12)
    assert b["baseline.sum_frobenius"] == pytest.approx(2 * math.sqrt(fro[0] * fro[1]), rel=1e-12)
    assert b["baseline.log_prod_spectral"] == pytest.approx(math.log(spec[0] * spec[1]), rel=1e-12)
    assert b["baseline.sum_spectral"] == pytest.approx(2 * math.sqrt(spec[0] * spec[1]), rel=1e-12)
    dist = sum(np.sum((_numpy(final, k) - _numpy(init, k)) ** 2) for k in ("0.weight", "2.weight"))
    assert b["baseline.dist_from_init"] == pytest.approx(dist, rel=1e-12)
    paths = 0.0  # every input→hidden→output path, and the paths from the bias units
    for k in range(3):
        paths += b2[k] ** 2
        for h in range(2):
            paths += w2[k, h] ** 2 * b1[h] ** 2
            for i in range(2):
                paths += w2[k, h] ** 2 * w1[h, i] ** 2
    assert b["baseline.log_path_norm"] == pytest.approx(math.log(paths), rel=1e-12)
    x, y = (t.numpy() for t in subject.train)
    logits = np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2
    margins = []
    for row, label in zip(logits, y, strict=True):
        margins.append(row[label] - max(v for j, v in enumerate(row) if j != label))
    gamma = sorted(margins)[len(margins) // 10 - 1]  # the 4th smallest of 40
    assert gamma > 0
    assert b["baseline.inverse_margin"] == pytest.approx(1 / gamma**2, rel=1e-5)
    sigma = 1.0 / math.sqrt(b["baseline.pacbayes_flatness"])
    assert abs(_literal_deviation(subject, sigma, 8, 0) - 0.1) <= 0.01
    moved = sum(np.sum((_numpy(final, k) - _numpy(init, k)) ** 2) for k in final)
    assert b["baseline.pacbayes_sharpness"] == pytest.approx(
        moved / (4 * sigma**2) + math.log(40 / sigma) + 10, rel=1e-12)
    assert list(b) == [f"baseline.{name}" for name in M.BASELINES]


def test_baselines_of_a_conv_net_match_literal_computations():
    torch.manual_seed(1)
    conv, head = nn.Conv2d(1, 2, 2), nn.Linear(8, 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(30, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    subject = _trained_subject(model, x, init=init, steps=20)
    b = M.baselines(subject, sharpness_samples=2)
    wc, bc, wl, bl = (_numpy(subject.final, k) for k in ("0.weight", "0.bias", "3.weight", "3.bias"))
    spec = np.linalg.norm(wc.reshape(2, 4), 2) ** 2 * np.linalg.norm(wl, 2) ** 2
    assert b["baseline.log_prod_spectral"] == pytest.approx(math.log(spec), rel=1e-12)
    fro = np.sum(wc**2) * np.sum(wl**2)
    assert b["baseline.log_prod_frobenius"] == pytest.approx(math.log(fro), rel=1e-12)
    unrolled = np.zeros((8, 9))  # the convolution as a matrix: unit (c, oy, ox) ← pixel (y, x)
    for c, oy, ox, ky, kx in itertools.product(range(2), range(2), range(2), range(2), range(2)):
        unrolled[c * 4 + oy * 2 + ox, (oy + ky) * 3 + ox + kx] = wc[c, 0, ky, kx]
    paths = 0.0
    for k in range(3):
        paths += bl[k] ** 2
        for u in range(8):
            paths += wl[k, u] ** 2 * bc[u // 4] ** 2
            for pixel in range(9):
                paths += wl[k, u] ** 2 * unrolled[u, pixel] ** 2
    assert b["baseline.log_path_norm"] == pytest.approx(math.log(paths), rel=1e-12)


def test_grouped_convolution_spectral_norm_is_the_largest_group():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 3)).double()
    layers = M.layers(model)
    assert [(la.key, la.groups) for la in layers] == [("0.weight", 2), ("3.weight", 1)]
    w = model[0].weight.detach().numpy()
    blocks = [np.linalg.norm(w[2 * g:2 * g + 2].reshape(2, 9), 2) for g in range(2)]
    got = torch.linalg.matrix_norm(layers[0].matrix(model.state_dict()), ord=2).max()
    assert float(got) == pytest.approx(max(blocks), rel=1e-12)


def test_ntk_parameterized_layers_are_measured_by_their_effective_weights():
    torch.manual_seed(4)
    ntk = nn.Sequential(NTKLinear(2, 4, 1.5, 0.3), nn.ReLU(), NTKLinear(4, 3, 1.2, 0.5)).double()
    init = {k: v.clone() for k, v in ntk.state_dict().items()}
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    subject = _trained_subject(ntk, x, init=init, lr=1.0)
    standard = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).double()

    def effective(state):
        return {k: v * (ntk[int(k[0])].w_scale if k.endswith("weight") else ntk[int(k[0])].b_scale)
                for k, v in state.items()}

    standard.load_state_dict(effective(subject.final))
    twin = gp.Subject(standard, init=effective(subject.init), train=subject.train,
                      test=subject.test, num_classes=3)
    got, expected = M.baselines(subject, sharpness_samples=4), M.baselines(twin, sharpness_samples=4)
    assert math.isfinite(got["baseline.pacbayes_flatness"])
    assert got == pytest.approx(expected, rel=1e-9)


class _Tied(nn.Module):
    """fc2 shares fc1's weight: one parameter applied twice."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 3)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_shared_weight_is_one_layer_and_its_paths_use_it_twice():
    torch.manual_seed(6)
    model = _Tied().double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    subject = _trained_subject(model, x, init=init, steps=30)
    b = M.baselines(subject, sharpness_samples=2)
    w, b1, b2, w3, b3 = (_numpy(subject.final, k) for k in
                         ("fc1.weight", "fc1.bias", "fc2.bias", "fc3.weight", "fc3.bias"))
    assert [la.key for la in M.layers(model)] == ["fc1.weight", "fc3.weight"]
    assert b["baseline.params"] == 4 + 2 + 2 + 6 + 3
    fro = np.sum(w**2) * np.sum(w3**2)
    assert b["baseline.log_prod_frobenius"] == pytest.approx(math.log(fro), rel=1e-12)
    assert b["baseline.sum_frobenius"] == pytest.approx(2 * math.sqrt(fro), rel=1e-12)
    paths = 0.0
    for k in range(3):
        paths += b3[k] ** 2
        for h2 in range(2):
            paths += w3[k, h2] ** 2 * b2[h2] ** 2
            for h1 in range(2):
                paths += w3[k, h2] ** 2 * w[h2, h1] ** 2 * b1[h1] ** 2
                for i in range(2):
                    paths += w3[k, h2] ** 2 * w[h2, h1] ** 2 * w[h1, i] ** 2
    assert b["baseline.log_path_norm"] == pytest.approx(math.log(paths), rel=1e-12)


@pytest.mark.parametrize("name, module, cause", [
    ("batchnorm", lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)),
     "BatchNorm1d"),
    ("tanh", lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), "Tanh"),
    ("maxpool", lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3)), "MaxPool2d"),
])
def test_path_norm_is_nan_with_a_warning_where_it_is_not_defined(name, module, cause, caplog):
    model = module().double()
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    subject = _trained_subject(model, x, init=None, steps=10)
    with caplog.at_level(logging.WARNING, logger="genprobe.measures"):
        b = M.baselines(subject, sharpness_samples=2)
    assert math.isnan(b["baseline.log_path_norm"])
    assert any("log_path_norm is NaN" in r.message and cause in r.message for r in caplog.records)
    assert math.isfinite(b["baseline.log_prod_frobenius"]) and math.isfinite(b["baseline.params"])
    assert math.isnan(b["baseline.dist_from_init"]) and math.isnan(b["baseline.pacbayes_sharpness"])


@pytest.mark.parametrize("name, cause", [("untraceable", "torch.fx cannot trace"),
                                         ("tokens", "not floating point"), ("residual_bn", "BatchNorm")])
def test_foreign_models_give_numbers_or_nan_with_a_reason(name, cause, caplog):
    subject = make_subject(name, n_train=20, n_test=10)
    with caplog.at_level(logging.WARNING, logger="genprobe.measures"):
        b = M.baselines(subject, sharpness_samples=2, sharpness_steps=4)
    assert list(b) == [f"baseline.{m}" for m in M.BASELINES]
    assert math.isnan(b["baseline.log_path_norm"]) and any(cause in r.message for r in caplog.records)
    assert b["baseline.dist_from_init"] > 0 and math.isfinite(b["baseline.sum_spectral"])


def test_baselines_leave_the_subject_alone_and_repeat_under_a_seed():
    subject = _mlp_subject(seed=2)
    model_state = {k: v.clone() for k, v in subject.model.state_dict().items()}
    final = {k: v.clone() for k, v in subject.final.items()}
    first = M.baselines(subject, seed=3, sharpness_samples=4)
    assert all(torch.equal(v, model_state[k]) for k, v in subject.model.state_dict().items())
    assert all(torch.equal(v, final[k]) for k, v in subject.final.items())
    assert not subject.model.training
    assert M.baselines(subject, seed=3, sharpness_samples=4) == first
    subset = M.baselines(subject, seed=3, n=20, sharpness_samples=4)
    assert subset["baseline.log_prod_frobenius"] == first["baseline.log_prod_frobenius"]


def test_sigma_search_on_analytic_deviations():
    found = M.sigma_search(lambda s: min(1.0, s * s), target=0.1, tolerance=1e-4)
    assert found.converged and abs(found.sigma**2 - 0.1) <= 1e-4
    far = M.sigma_search(lambda s: s / 100.0, target=0.1, tolerance=1e-3)  # needs the bracket doubled
    assert far.converged and far.sigma == pytest.approx(10.0, abs=0.1) and far.evaluations < 30
    step = M.sigma_search(lambda s: 0.0 if s < 0.3 else 0.5, target=0.1, tolerance=0.01, steps=30)
    assert not step.converged and step.sigma == pytest.approx(0.3, abs=1e-6)
    never = M.sigma_search(lambda s: 0.02, target=0.1, tolerance=0.01)
    assert math.isnan(never.sigma) and not never.converged


def test_no_sigma_when_the_error_cannot_move_gives_nan(caplog):
    subject = make_subject("nested", n_train=20, n_test=10)  # random labels: near chance already
    with caplog.at_level(logging.WARNING, logger="genprobe.measures"):
        b = M.baselines(subject, sharpness_samples=2, sharpness_target=0.9, sharpness_tolerance=0.01)
    assert math.isnan(b["baseline.pacbayes_flatness"]) and math.isnan(b["baseline.pacbayes_sharpness"])
    assert any("no noise level" in r.message for r in caplog.records)


@pytest.mark.parametrize("options, message", [
    ({"sharpness_samples": 0}, "sharpness_samples must be an integer >= 1"),
    ({"split": "validation"}, "unknown split='validation'"),
    ({"sharpness_tolerance": 0.5}, "sharpness_tolerance must be a finite number"),
])
def test_baselines_bad_options(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        M.baselines(_mlp_subject(), **options)


def test_a_nan_state_is_refused_by_the_subject():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(gp.StateError, match="NaN"):
        gp.Subject(model, train=(torch.randn(4, 2), torch.tensor([0, 1, 2, 0])))


# ----------------------------------------------------------------------------- compute


def test_compute_gathers_baselines_and_probe_summaries():
    subject = make_subject("nested", n_train=20, n_test=12, checkpoints=2)
    tiny = get_probe("robustness").tiny
    measures = M.compute(subject, probes={"robustness": tiny}, baselines={"sharpness_samples": 2},
                         seed=1)
    summary = gp.robustness(subject, seed=1, **tiny).summary
    assert [k for k in measures if k.startswith("baseline.")] == [f"baseline.{m}" for m in M.BASELINES]
    assert {k: v for k, v in measures.items() if k.startswith("robustness.")} == pytest.approx(
        {f"robustness.{k}": v for k, v in summary.items()}, nan_ok=True)
    assert M.compute(subject, baselines=False) == {}


@pytest.mark.parametrize("kwargs, message", [
    ({"probes": {"nope": {}}}, "unknown probe='nope'; choose one of"),
    ({"probes": {"robustness": {"colour": 1}}}, "probe 'robustness' has no option 'colour'"),
    ({"baselines": {"samples": 3}}, "baselines has no option 'samples'"),
    ({"probes": ["robustness"]}, "probes must map probe names"),
    ({"baselines": "yes"}, "baselines must be True, False or a mapping"),
])
def test_compute_bad_inputs(kwargs, message):
    with pytest.raises(ConfigError) as info:
        M.compute(_mlp_subject(), **kwargs)
    assert message in str(info.value)
    if "choose one of" in message:
        assert all(repr(name) in str(info.value) for name in list_probes())


# ----------------------------------------------------------------------------- command line


def _sweep(tmp_path, *, table: bool = True):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / MARK).write_text("written by genprobe: a sweep directory\n")
    if table:
        grid = _sweep_like(24)
        grid.loc[3, "status"] = "failed"
        grid.attrs["hyperparameters"] = ["lr", "width"]
        grid.to_parquet(sweep / "table.parquet")
    return sweep


def test_cli_prints_the_ranking_and_writes_the_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    sweep = _sweep(tmp_path)
    code, out, err = call(["measures", sweep], capsys)
    assert code == 0, err
    assert "baseline.dist_from_init" in out and "criticality.network_criticality" in out
    assert "granulated τ" in out and "95% bootstrap intervals" in out and "lr, width" in out
    assert "23 models" in out and "r3: status failed" in out
    assert "criticality.evaluations" not in out.split("not measures")[0]  # not ranked
    assert "not scored: stiffness.critical_length: defined on 3 of 23 models" in out
    assert (sweep / "measures.png").stat().st_size > 0 and (sweep / "measures.svg").is_file()
    code, _, err = call(["measures", sweep], capsys)  # its own figure: replaced
    assert code == 0, err
    custom = tmp_path / "ranking.png"
    code, _, err = call(["measures", sweep, "--out", custom], capsys)
    assert code == 0 and custom.is_file() and custom.with_suffix(".svg").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("unmarked", "is not a sweep directory"),
    ("no_table", "has no table.parquet yet"),
    ("foreign_out", "genprobe did not write it"),
    ("bad_suffix", "must name a .png file"),
    ("bad_target", "unknown target column 'accuracy'"),
    ("bad_level", "level must be a number strictly between 0 and 1"),
    ("too_few", "min_models must be an integer >= 2"),
])
def test_cli_bad_inputs_exit_2_with_one_line(case, message, tmp_path, capsys):
    args = ["measures"]
    if case == "missing":
        args.append(tmp_path / "nowhere")
    elif case == "unmarked":
        (tmp_path / "plain").mkdir()
        args.append(tmp_path / "plain")
    elif case == "no_table":
        args.append(_sweep(tmp_path, table=False))
    else:
        args.append(_sweep(tmp_path))
    mine = tmp_path / "mine.png"
    mine.write_text("not genprobe's")
    if case == "foreign_out":
        args += ["--out", mine]
    elif case == "bad_suffix":
        args += ["--out", tmp_path / "figure.jpg"]
    elif case == "bad_target":
        args += ["--target", "accuracy"]
    elif case == "bad_level":
        args += ["--level", "1.5"]
    elif case == "too_few":
        args += ["--min-models", "1"]
    code, _, err = call(args, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("genprobe: error:")
    if case in ("missing", "unmarked", "no_table"):
        assert "genprobe sweep" in err
    assert mine.read_text() == "not genprobe's"


# ----------------------------------------------------------------------------- the registry


def test_a_registered_measure_is_computed_and_ranked():
    subject = _mlp_subject()
    gp.register_measure("first_weight", lambda s: float(s.final["0.weight"].abs().sum()),
                        direction=-1)
    gp.register_measure("broken", lambda s: torch.tensor(1.0))
    try:
        values = M.compute(subject, baselines=False)
        assert values["user.first_weight"] == pytest.approx(
            float(subject.final["0.weight"].abs().sum()))
        assert math.isnan(values["user.broken"])
        ranked, skipped = M.classify(["user.first_weight", "user.other", "baseline.params",
                                      "baseline.nope", "criticality.epsilon"])
        assert ranked == {"user.first_weight": -1, "baseline.params": 1}
        assert "not registered" in skipped["user.other"]
        assert "not one of the registered baselines" in skipped["baseline.nope"]
        assert "not a measure" in skipped["criticality.epsilon"]
    finally:
        M.unregister_measure("first_weight")
        M.unregister_measure("broken")
    assert "user.first_weight" not in M.compute(subject, baselines=False)


def test_every_probe_declares_its_measures_and_they_are_summary_keys():
    for name in list_probes():
        spec = get_probe(name)
        assert spec.measures, name
        assert all(d in (-1, 0, 1) for d in spec.measures.values())
    assert get_probe("robustness").data_split({}) == "test"
    assert get_probe("robustness").data_split({"split": "train"}) == "train"
    assert get_probe("stiffness").data_split({"pairs": "train-test"}) == "test"
    assert get_probe("criticality").data_split({}) == "train"
    assert get_probe("ntk").measure_direction("mean_prediction_accuracy") is None
    assert get_probe("ablation").measure_direction("auc:layers.3") == -1


@pytest.mark.parametrize("call, message", [
    (lambda: gp.register_measure("a b", lambda s: 0.0), "must be a simple identifier"),
    (lambda: gp.register_measure("a", 3.0), "must be callable"),
    (lambda: gp.register_measure("a", lambda s: 0.0, direction=2), "direction must be -1, 0 or +1"),
    (lambda: M.import_measure("a", "math"), "is not an import path"),
    (lambda: M.import_measure("a", "no_such_module_here:f"), "cannot import module"),
    (lambda: M.import_measure("a", "math:nothing"), "has no 'nothing'"),
    (lambda: M.import_measure("a", "math:pi"), "is a float, not a function"),
])
def test_measure_registration_bad_inputs(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)
