"""gp.robustness against the naive loop: deep-copy, load the edited state dict, evaluate."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import genprobe as gp
import genprobe.params as P
from foreign import make_subject
from genprobe.errors import ConfigError, ModuleSelectionError, StateError
from genprobe.probes.robustness import RobustnessResult, robustness


def naive(subject, state, split="test"):
    model = copy.deepcopy(subject.model)
    model.load_state_dict(state, strict=False)
    model.eval()
    data = subject.data(split)
    with torch.no_grad():
        out = model(data.x)
    return float((out.argmax(-1) != data.y).double().mean()), float(F.cross_entropy(out.double(), data.y))


def naive_table(subject, draws, split="test", seed=0):
    """{(module, target, draw): (error, loss)}, literally per the paper."""
    cells = {}
    for u in subject.units():
        for epoch, state in subject.checkpoints.items():
            cells[u.name, str(epoch), None] = naive(subject, P.replace(subject.final, state, u.params), split)
        for d in range(draws):
            try:
                fresh = P.rerandomize(subject.model, subject.final, u, seed, draw=d)
            except StateError:
                cells[u.name, "rerandomize", d] = (math.nan, math.nan)
                continue
            cells[u.name, "rerandomize", d] = naive(subject, P.replace(subject.final, fresh, u.params), split)
    return cells


def test_every_cell_equals_naive(foreign_subject):
    s = foreign_subject
    r = robustness(s, draws=2)
    ref = naive_table(s, 2)
    base_error, base_loss = naive(s, s.final)
    assert len(r.table) == len(ref)
    for row in r.table.itertuples():
        draw = None if row.target != "rerandomize" else int(row.draw)
        error, loss = ref[row.module, row.target, draw]
        if math.isnan(error):
            assert math.isnan(row.error) and row.module in r.meta["not_rerandomized"]
            continue
        assert abs(row.error - error) < 1e-5 and abs(row.loss - loss) < 1e-5
        assert abs(row.delta_error - (error - base_error)) < 1e-5
        assert row.split == "test"
    assert abs(r.summary["base_error"] - base_error) < 1e-5
    assert abs(r.summary["base_loss"] - base_loss) < 1e-5


def test_columns_summary_and_moved():
    s = make_subject("residual_bn", checkpoints=3)
    r = robustness(s, draws=2, threshold=0.05)
    for col in ("module", "target", "draw", "split", "error", "loss", "delta_error", "robust", "moved"):
        assert col in r.table.columns
    assert list(dict.fromkeys(r.table["module"])) == [u.name for u in s.units()]
    assert list(dict.fromkeys(r.table["target"])) == ["0", "1", "2", "3", "rerandomize"]
    for u in s.units():
        rows = r.table[r.table["module"] == u.name]
        moved = P.distance(s.final, s.init, u.params) / P.norm(s.init, u.params)
        assert rows["moved"].nunique() == 1 and abs(rows["moved"].iloc[0] - moved) < 1e-12
        delta0 = rows.loc[rows["target"] == "0", "delta_error"].iloc[0]
        assert (rows["robust"] == (delta0 < 0.05 - 1e-9)).all()
    per = r.modules
    critical = int((~per["robust"]).sum())
    assert r.summary["critical_modules"] == critical
    assert r.summary["critical_fraction"] == pytest.approx(critical / len(per))
    assert r.summary["mean_delta_error_reinit"] == pytest.approx(per["delta_error"].mean())
    rr = r.table[r.table["target"] == "rerandomize"]
    assert r.summary["mean_delta_error_rerandomize"] == pytest.approx(rr["delta_error"].mean())
    assert r.map.shape == (len(s.units()), 5)


def test_self_checks():
    """Re-init to θ^F (the last checkpoint) and of a module that never moved change nothing."""
    s = make_subject("residual_bn", checkpoints=2)
    u = s.units("conv")[0]
    final = P.replace(s.final, s.init, u.params)
    s2 = gp.Subject(s.model, init=s.init, final=final, checkpoints={1: s.checkpoints[1], 2: final},
                    train=s.train, test=s.test)
    r = robustness(s2, rerandomize=False)
    last = r.table[r.table["target"] == "2"]
    assert (last["delta_error"] == 0).all() and (last["loss"] == r.summary["base_loss"]).all()
    conv = r.table[(r.table["module"] == "conv") & (r.table["target"] == "0")]
    assert float(conv["delta_loss"].iloc[0]) == 0.0 and float(conv["moved"].iloc[0]) == 0.0
    assert bool(conv["robust"].iloc[0])


def test_rerandomize_reproducible_and_seed_dependent():
    s = make_subject("nested")
    a = robustness(s, draws=3, checkpoints=[0])
    b = robustness(s, draws=3, checkpoints=[0])
    assert a.table.equals(b.table)
    rr = a.table[a.table["target"] == "rerandomize"]
    for _, rows in rr.groupby("module"):
        assert rows["loss"].nunique() == 3
    c = robustness(s, draws=3, checkpoints=[0], seed=1)
    assert not c.table["loss"].equals(a.table["loss"])


def test_rerandomization_never_repeats_theta0():
    """A model built right after torch.manual_seed(0) with the default single draw: the
    re-randomized column must differ from re-initialization to θ⁰ (it used to be identical)."""
    torch.manual_seed(0)
    s = make_subject("nested")
    r = robustness(s, checkpoints=[0])
    for _, rows in r.table.groupby("module"):
        reinit = rows[rows["target"] == "0"]["loss"].iloc[0]
        rerand = rows[rows["target"] == "rerandomize"]["loss"].iloc[0]
        assert reinit != rerand


def test_selection_groups_checkpoints_and_split():
    s = make_subject("residual_bn", checkpoints=2)
    r = robustness(s, modules={"body": ["stem", "bn1", "conv", "bn2"], "head": "fc"},
                   checkpoints=[0, 2], rerandomize=False, split="train")
    assert list(r.table["module"]) == ["body", "body", "head", "head"]
    assert list(r.table["target"]) == ["0", "2", "0", "2"]
    body = s.units({"b": ["stem", "bn1", "conv", "bn2"]})[0]
    error, loss = naive(s, P.replace(s.final, s.init, body.params), "train")
    row = r.table.iloc[0]
    assert abs(row.error - error) < 1e-5 and abs(row.loss - loss) < 1e-5 and row.split == "train"
    r = robustness(s, modules="*bn*", checkpoints=[1], rerandomize=False)
    assert set(r.table["module"]) == {"bn1", "bn2"} and set(r.table["target"]) == {"1"}
    assert "robust" in r.modules.columns


def test_does_not_mutate(foreign_subject):
    s = foreign_subject
    model_state = {k: v.clone() for k, v in s.model.state_dict().items()}
    final = {k: v.clone() for k, v in s.final.items()}
    robustness(s, draws=1)
    assert all(torch.equal(v, model_state[k]) for k, v in s.model.state_dict().items())
    assert all(torch.equal(v, final[k]) for k, v in s.final.items())


def test_bad_input():
    s = make_subject("nested")
    with pytest.raises(ModuleSelectionError, match="available: .*blocks.0.ff.0"):
        robustness(s, modules="nope*")
    with pytest.raises(StateError, match=r"epoch 7.*recorded epochs: \[0, 1\]"):
        robustness(s, checkpoints=[0, 7])
    no_init = gp.Subject(s.model, test=s.test)
    with pytest.raises(StateError, match="robustness needs the initial state"):
        robustness(no_init)
    with pytest.raises(ConfigError, match="split"):
        robustness(s, split="val")
    with pytest.raises(ConfigError, match="draws"):
        robustness(s, draws=0)
    with pytest.raises(ConfigError, match="seed"):
        robustness(s, seed=-1)
    with pytest.raises(ConfigError, match="threshold"):
        robustness(s, threshold=-1)


def test_save_load_plot(tmp_path):
    s = make_subject("residual_bn", checkpoints=2)
    r = robustness(s, draws=2)
    back = gp.load(r.save(tmp_path / "rob"))
    assert isinstance(back, RobustnessResult)
    assert back.table.equals(r.table) and back.summary == r.summary
    assert back.modules.equals(r.modules)
    fig = r.plot()
    assert len(fig.axes) == 3
    assert "Int64" in str(r.table["draw"].dtype)


def test_cli(tiny_run, tmp_path, capsys):
    from genprobe.cli import main

    run = tiny_run
    out = tmp_path / "rob"
    main(["probe", "robustness", str(run), "--modules", "layers.1", "--modules", "layers.3",
          "--checkpoints", "0,2", "--draws", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "layers.1" in text and "rerandomize" in text and "critical_modules=" in text
    assert "tau=0" in text and len(text.splitlines()) < 10  # the per-module map, not raw rows
    r = gp.load(out)
    assert list(dict.fromkeys(r.table["target"])) == ["0", "2", "rerandomize"]
    assert (out / "figure.png").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["probe", "robustness", str(run), "--checkpoints", "9", "--out", str(out)])
    assert exc.value.code == 2
    assert "recorded epochs" in capsys.readouterr().err
