"""The empirical NTK probe against plain computations: a Jacobian loop, closed forms, literal
solves, and a streamed kernel that survives SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.func import functional_call

import genprobe as gp
from foreign import FOREIGN, LIBRARIES, STRUCTURED, TOKENS, make_subject
from genprobe.engine import lapack
from genprobe.errors import ConfigError, DataError, OutputError
from invoke import call


def pick(x, index):
    """Examples `index` of inputs `x`: a tensor, a tuple of tensors or a dict of them."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return tuple(v[index] for v in x) if isinstance(x, tuple) else x[index]


def forward(model: nn.Module, state: dict, x):
    """`model` under `state` on inputs `x`, unpacked by hand: model(x), model(*x), model(**x)."""
    if isinstance(x, dict):
        return functional_call(model, state, (), x)
    return functional_call(model, state, x if isinstance(x, tuple) else (x,))


def jacobians(model: nn.Module, state: dict, x) -> torch.Tensor:
    """(N, K, P): one autograd call per example and output (the obviously-right loop)."""
    names = [k for k, _ in model.named_parameters()]
    rows = []
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x[0]) if isinstance(x, tuple) else len(x)
    for i in range(n):
        params = {k: state[k].detach().clone().requires_grad_(True) for k in names}
        out = forward(model, {**state, **params}, pick(x, slice(i, i + 1))).reshape(-1)
        per_k = []
        for k in range(len(out)):
            grads = torch.autograd.grad(out[k], list(params.values()), retain_graph=True, allow_unused=True)
            per_k.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                    for g, p in zip(grads, params.values(), strict=True)]))
        rows.append(torch.stack(per_k))
    return torch.stack(rows).double()


def plain_ntk(model, state, x1, x2=None) -> torch.Tensor:
    j1 = jacobians(model, state, x1)
    j2 = j1 if x2 is None else jacobians(model, state, x2)
    return torch.einsum("akp,blp->abkl", j1, j2)  # (N1, N2, K, K)


def assert_rel(actual, expected, rtol=1e-10):
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rtol * scale


@pytest.mark.parametrize("name", sorted(FOREIGN | TOKENS | STRUCTURED) + sorted(
    {"hf_bert_masked"} & set(LIBRARIES)))
def test_kernel_equals_jacobian_loop(name):
    s = make_subject(name, dtype=torch.float64, n_train=12, n_test=8, checkpoints=1)
    full = gp.ntk(s, n=6, n_test=4, trace_outputs=False, checkpoints="all")
    idx, test_idx = full.tensors["indices"], full.tensors["test_indices"]
    x, xt = pick(s.train.x, idx), pick(s.test.x, test_idx)
    expected = plain_ntk(s.model, s.final, x)
    assert full.kernel.shape == expected.shape
    assert_rel(full.kernel, expected)
    assert_rel(full.kernel_test, plain_ntk(s.model, s.final, xt, x))
    traced = gp.ntk(s, n=6, n_test=4)
    assert_rel(traced.kernel, expected.diagonal(dim1=-2, dim2=-1).mean(-1))  # the mean over outputs
    assert torch.equal(traced.kernel, traced.kernel.T)
    assert traced.self_check["passed"] and full.self_check["passed"]
    # the spectrum is the kernel's, descending, at the final state and each checkpoint
    ev = np.linalg.eigvalsh(traced.kernel.numpy())[::-1]
    np.testing.assert_allclose(traced.eigenvalues.numpy(), ev, rtol=1e-9, atol=1e-12 * ev[0])
    at_epoch_1 = gp.ntk(s, n=6, n_test=4, checkpoints=[1])
    first = at_epoch_1.tables["spectrum"].query("state == '1'")["eigenvalue"].to_numpy()
    plain_1 = plain_ntk(s.model, s.checkpoints[1], x).diagonal(dim1=-2, dim2=-1).mean(-1)
    np.testing.assert_allclose(first, np.linalg.eigvalsh(plain_1.numpy())[::-1], rtol=1e-9,
                               atol=1e-12 * ev[0])


def test_linear_model_kernel_is_x_xt_plus_one():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.arange(20) % 3
    s = gp.Subject(model, train=(x[:12], y[:12]), test=(x[12:], y[12:]))
    r = gp.ntk(s, n_test=0)
    xs = x[:12][r.tensors["indices"]]
    assert_rel(r.kernel, xs @ xs.T + 1)
    full = gp.ntk(s, n_test=0, trace_outputs=False)
    assert_rel(full.kernel, (xs @ xs.T + 1)[:, :, None, None] * torch.eye(3, dtype=torch.float64))


@pytest.fixture(scope="module")
def subject():
    return make_subject("residual_bn", dtype=torch.float64, n_train=40, n_test=30, checkpoints=2)


def test_summary_follows_the_definitions(subject):
    r = gp.ntk(subject, n=24, n_test=20, time=50.0, ridge=1e-8)
    k = r.kernel.numpy()
    ev = np.linalg.eigvalsh(k)
    s = r.summary
    assert s["lambda_max"] == pytest.approx(ev[-1], rel=1e-10)
    assert s["lambda_min"] == pytest.approx(ev[0], rel=1e-6)
    assert s["condition_number"] == pytest.approx(ev[-1] / ev[0], rel=1e-6)
    assert s["max_learning_rate"] == pytest.approx(2 * 24 / ev[-1], rel=1e-10)
    # the mean prediction, literally: Θ(x, X) (Θ + r·mean(diag)·I)⁻¹ (one-hot − 1/C)
    y = np.eye(3)[r.tensors["labels"].numpy()] - 1 / 3
    alpha = np.linalg.solve(k + 1e-8 * np.mean(np.diag(k)) * np.eye(24), y)
    pred = r.kernel_test.numpy() @ alpha
    assert s["mean_prediction_accuracy"] == pytest.approx(
        float((pred.argmax(1) == r.tensors["test_labels"].numpy()).mean()))
    # finite time: Θ(x, X) Θ⁻¹ (I − e^{−(ηt/N)Θ}) Y, with scipy's matrix exponential
    flow = np.linalg.solve(k, (np.eye(24) - scipy.linalg.expm(-50.0 / 24 * k)) @ y)
    pred_t = r.kernel_test.numpy() @ flow
    assert s["mean_prediction_accuracy_t"] == pytest.approx(
        float((pred_t.argmax(1) == r.tensors["test_labels"].numpy()).mean()))
    row = r.table.iloc[-1]
    assert row["state"] == "final" and row["mean_eigenvalue"] == pytest.approx(np.trace(k) / 24)


def test_max_learning_rate_is_the_stability_edge(subject):
    """Gradient descent on the linearized network's MSE (mean over examples) converges just below
    2N/λ_max and diverges just above."""
    r = gp.ntk(subject, n=24, n_test=0)
    k, n = r.kernel.numpy(), 24
    y = np.eye(3)[r.tensors["labels"].numpy()] - 1 / 3

    def residual_after(eta, steps=3000):
        f = np.zeros_like(y)
        for _ in range(steps):
            f = f - eta / n * k @ (f - y)
        return np.abs(f - y).max()

    eta = r.summary["max_learning_rate"]
    assert residual_after(0.98 * eta) < residual_after(0.0, 1)
    assert residual_after(1.02 * eta) > 1e3


def test_over_checkpoints(subject):
    r = gp.ntk(subject, n=12, n_test=6, checkpoints="all")
    assert list(r.table["state"]) == ["0", "1", "2", "final"]
    first, final = r.table.iloc[0], r.table.iloc[-1]
    assert r.summary["lambda_max_ratio"] == pytest.approx(final["lambda_max"] / first["lambda_max"])
    assert r.summary["condition_number_ratio"] == pytest.approx(
        final["condition_number"] / first["condition_number"])
    fig = r.plot()
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "λ_max and κ over training"


def test_streamed_equals_in_memory_exactly(subject, tmp_path):
    budget = 750_000  # blocks of 10 examples: chunks of 5
    mem = gp.ntk(subject, n=30, n_test=10, memory_budget=budget)
    disk = gp.ntk(subject, n=30, n_test=10, memory_budget=budget, out=tmp_path / "k")
    assert torch.equal(disk.kernel, mem.kernel) and torch.equal(disk.kernel_test, mem.kernel_test)
    record = json.loads((tmp_path / "k" / "kernel.json").read_text())
    assert len(record["done"]) > 3 and record["complete"]
    assert "kernel" not in disk.tensors and disk.meta["kernel_files"]["kernel"].endswith("kernel.npy")
    assert disk.summary == mem.summary
    again = gp.ntk(subject, n=30, n_test=10, memory_budget=budget, out=tmp_path / "k")  # reuses the files
    assert torch.equal(again.kernel, mem.kernel)


def test_streamed_per_output_kernel_equals_in_memory(subject, tmp_path):
    mem = gp.ntk(subject, n=12, n_test=6, trace_outputs=False)
    disk = gp.ntk(subject, n=12, n_test=6, trace_outputs=False, out=tmp_path / "k")
    assert torch.equal(disk.kernel, mem.kernel) and disk.kernel.dim() == 4
    assert disk.summary == pytest.approx(mem.summary, rel=1e-12)


def test_lanczos_when_the_dense_spectrum_does_not_fit(tmp_path):
    subject = make_subject("nested", dtype=torch.float64, n_train=60, n_test=30)
    dense = gp.ntk(subject, n=40, n_test=0)
    small = gp.ntk(subject, n=40, n_test=10, memory_budget=lapack.resident_bytes(40) - 1, out=tmp_path / "k")
    assert small.table["spectrum"].iloc[-1] == "lanczos"
    ev = dense.eigenvalues.numpy()
    top, bottom = small.eigenvalues[:10].numpy(), small.eigenvalues[10:].numpy()
    np.testing.assert_allclose(top, ev[:10], rtol=1e-8)
    np.testing.assert_allclose(bottom, ev[-10:], rtol=1e-6, atol=1e-9 * ev[0])
    assert math.isnan(small.summary["mean_prediction_accuracy"])


def test_a_dense_spectrum_needs_half_a_copy_in_place_and_two_copies_without(tmp_path, monkeypatch):
    subject = make_subject("nested", dtype=torch.float64, n_train=60, n_test=30)
    budget = lapack.resident_bytes(40)
    one = gp.ntk(subject, n=40, n_test=10, memory_budget=budget, out=tmp_path / "k")
    assert one.table["spectrum"].iloc[-1] == "dense"
    assert one.summary == gp.ntk(subject, n=40, n_test=10, memory_budget=budget).summary
    monkeypatch.setattr(lapack, "_routines", lambda: None)  # torch.linalg: a second copy
    two = gp.ntk(subject, n=40, n_test=10, memory_budget=budget, out=tmp_path / "k")
    assert two.table["spectrum"].iloc[-1] == "lanczos"
    both = gp.ntk(subject, n=40, n_test=10, memory_budget=16 * 40 * 40, out=tmp_path / "k")
    assert both.summary["lambda_min"] == pytest.approx(one.summary["lambda_min"], rel=1e-9)
    assert both.summary["mean_prediction_accuracy"] == one.summary["mean_prediction_accuracy"]


KILLED = textwrap.dedent("""
    import json, sys, time, torch
    sys.path.insert(0, {tests!r})
    from foreign import make_subject
    import genprobe as gp
    from genprobe import outputs
    torch.set_num_threads(1)
    written = outputs.write_text_atomic

    def stall(path, text, *args, **kwargs):  # once 3 blocks are recorded, wait to be killed
        written(path, text, *args, **kwargs)
        if len(json.loads(text).get("done", [])) >= 3:
            time.sleep(600)

    outputs.write_text_atomic = stall
    s = make_subject("residual_bn", dtype=torch.float64, n_train=40, n_test=30, checkpoints=2)
    gp.ntk(s, n=40, n_test=0, memory_budget=750_000, out={out!r})
""")


def test_sigkill_then_resume_gives_the_same_kernel(subject, tmp_path):
    out = tmp_path / "k"
    script = KILLED.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record = out / "kernel.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if len(json.loads(record.read_text())["done"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(record.read_text())
    assert len(done["done"]) == 3 and not done["complete"]
    resumed = gp.ntk(subject, n=40, n_test=0, memory_budget=750_000, out=out)
    whole = gp.ntk(subject, n=40, n_test=0, memory_budget=750_000, out=tmp_path / "whole")
    assert torch.equal(resumed.kernel, whole.kernel)


def test_bad_outputs(subject, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    with pytest.raises(OutputError, match="did not write"):
        gp.ntk(subject, n=6, out=mine)
    assert (mine / "notes.txt").read_text() == "my own file"
    gp.ntk(subject, n=6, n_test=0, out=tmp_path / "k")
    with pytest.raises(OutputError, match="another computation"):
        gp.ntk(subject, n=8, n_test=0, out=tmp_path / "k")


def test_not_positive_definite_suggests_ridge():
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()  # a rank-3 kernel on 10 examples
    x, y = torch.randn(16, 2, dtype=torch.float64), torch.arange(16) % 2
    s = gp.Subject(model, train=(x[:10], y[:10]), test=(x[10:], y[10:]))
    with pytest.raises(DataError, match="not positive definite.*ridge"):
        gp.ntk(s, ridge=0.0)
    assert math.isfinite(gp.ntk(s, ridge=1e-3).summary["mean_prediction_accuracy"])
    assert gp.ntk(s, ridge=1e-3).summary["condition_number"] > 1e8  # λ_min ~ rounding


def test_too_large_without_out_says_the_budget(subject):
    with pytest.raises(ConfigError, match=r"N=40 examples needs 12\.5 KiB, more than the memory budget \(1000 bytes\).*out=DIR"):
        gp.ntk(subject, n=40, memory_budget=1000)


def test_cli_kernel_dir(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, _ = call(["train", "--arch", "fcn", "--dataset", "digits", "--epochs", "1", "--opt",
                       "width=16", "--opt", "depth=1", "--out", run], capsys)
    assert code == 0
    code, out, err = call(["probe", "ntk", run, "--n", "30", "--kernel-dir", tmp_path / "k",
                           "--time", "100"], capsys)
    assert code == 0, err
    back = gp.load(run / "probes" / "ntk")
    assert back.kernel.shape == (30, 30) and (tmp_path / "k" / "kernel.npy").is_file()
    assert "mean_prediction_accuracy_t=" in out
    code, out, err = call(["probe", "ntk", run, "--ridge", "-1"], capsys)
    assert code == 2 and "ridge" in err and len(err.strip().splitlines()) == 1
