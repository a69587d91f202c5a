"""Stiffness probe: matrices against a plain per-example loop, class/distance tables by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import genprobe as gp
from foreign import make_subject
from genprobe.errors import ConfigError, DataError, StateError
from genprobe.probes.stiffness import critical_length
from test_grams import reference_features

pytestmark = pytest.mark.usefixtures("one_thread")



def ref_cosine(subject, state, rows_split, rows, cols_split=None, cols=None):
    d1 = subject.data(rows_split).subset(rows)
    f1 = reference_features(subject.model, state, d1.x, d1.y)
    if cols_split is None:
        f2 = f1
    else:
        d2 = subject.data(cols_split).subset(cols)
        f2 = reference_features(subject.model, state, d2.x, d2.y)
    n1, n2 = f1.norm(dim=1), f2.norm(dim=1)
    return (f1 @ f2.T) / (n1[:, None] * n2[None, :])


@pytest.fixture(scope="module")
def bn64():
    return make_subject("residual_bn", dtype=torch.float64, n_train=30, n_test=24, checkpoints=2)


def assert_close(a, b, rtol=1e-10):  # float64 on both sides
    scale = max(float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rtol * scale


@pytest.mark.parametrize("name", ["residual_bn", "transformer", "shared", "untraceable", "nested"])
def test_matrices_equal_reference_loop(name):
    s = make_subject(name, dtype=torch.float64, n_train=24, n_test=12)
    r = gp.stiffness(s, per_class=3)
    expected = ref_cosine(s, s.final, "train", r.indices)
    assert_close(r.cosine, expected)
    assert torch.equal(r.sign, torch.sign(expected))
    assert torch.allclose(r.cosine, r.cosine.T, atol=1e-12)
    assert torch.allclose(r.cosine.diagonal(), torch.ones(9, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r.labels, s.train.y[r.indices])
    assert torch.equal(torch.bincount(r.labels), torch.tensor([3, 3, 3]))


def test_class_table_and_summary_by_hand(bn64):
    r = gp.stiffness(bn64, per_class=4)
    cos, sign, lab = r.cosine, r.sign, r.labels
    for _, row in r.table.iterrows():
        a, b = int(row["class_a"]), int(row["class_b"])
        mask = (lab[:, None] == a) & (lab[None, :] == b) & ~torch.eye(len(lab), dtype=torch.bool)
        assert row["pairs"] == int(mask.sum())
        assert row["cosine"] == pytest.approx(float(cos[mask].mean()), rel=1e-12)
        assert row["sign"] == pytest.approx(float(sign[mask].mean()), rel=1e-12)
    assert set(r.table["checkpoint"]) == {"final"}
    c = r.class_matrix().to_numpy()
    assert r.summary["within_class"] == pytest.approx(c.diagonal().mean())
    assert r.summary["between_class"] == pytest.approx((c.sum() - c.trace()) / 6)
    off = ~torch.eye(12, dtype=torch.bool)
    assert r.summary["mean_stiffness"] == pytest.approx(float(cos[off].mean()))


def test_train_test_pairs(bn64):
    r = gp.stiffness(bn64, per_class=2, pairs="train-test")
    assert r.cosine.shape == (6, 6)
    expected = ref_cosine(bn64, bn64.final, "train", r.indices, "test", r.col_indices)
    assert_close(r.cosine, expected)
    assert torch.equal(r.col_labels, bn64.test.y[r.col_indices])
    # no i = j exclusion across splits: every (row, column) pair counts
    assert int(r.table["pairs"].sum()) == 36
    assert int(r.distance_curve["pairs"].sum()) == 36
    t = gp.stiffness(bn64, per_class=2, pairs="test-test")
    assert_close(t.cosine, ref_cosine(bn64, bn64.final, "test", t.indices))


def test_checkpoints_follow_training(bn64):
    r = gp.stiffness(bn64, per_class=3, checkpoints="all", bins=4)
    assert r.meta["states"] == ["0", "1", "2", "final"]
    assert list(r.over_training["checkpoint"]) == ["0", "1", "2", "final"]
    assert r.tensors["cosine_over_training"].shape == (4, 9, 9)
    expected = ref_cosine(bn64, bn64.checkpoints[1], "train", r.indices)
    assert_close(r.tensors["cosine_over_training"][1], expected)
    # the final state is the last checkpoint here: same matrices
    assert torch.equal(r.tensors["cosine_over_training"][2], r.cosine)
    assert set(r.table["checkpoint"]) == {"0", "1", "2", "final"}
    assert len(r.distance_curve) == 4 * 4
    fig = r.plot()
    assert len(fig.axes) >= 3


def test_distance_curve_by_hand(bn64):
    r = gp.stiffness(bn64, per_class=4, bins=3, distance="euclidean")
    x = bn64.train.x[r.indices].reshape(12, -1)
    d = torch.cdist(x, x)
    iu = torch.triu_indices(12, 12, 1)
    dv, cv = d[iu[0], iu[1]], r.cosine[iu[0], iu[1]]
    curve = r.distance_curve
    assert int(curve["pairs"].sum()) == 66
    assert curve["bin_low"].iloc[0] == pytest.approx(float(dv.min()))
    assert curve["bin_high"].iloc[-1] == pytest.approx(float(dv.max()))
    first = (dv < curve["bin_high"].iloc[0])
    assert curve["pairs"].iloc[0] == int(first.sum())
    assert curve["cosine"].iloc[0] == pytest.approx(float(cv[first].mean()))


def test_critical_length_interpolates_first_crossing():
    curve = pd.DataFrame({"bin_low": [0.0, 1.0, 2.0, 3.0], "bin_high": [1.0, 2.0, 3.0, 4.0],
                          "cosine": [0.6, 0.2, -0.2, 0.5], "pairs": [3, 3, 3, 3]})
    assert critical_length(curve) == pytest.approx(2.0)  # centres 1.5 (0.2) and 2.5 (-0.2)
    curve.loc[1, "pairs"] = 0  # empty bins are skipped: 0.5 (0.6) to 2.5 (-0.2)
    assert critical_length(curve) == pytest.approx(0.5 + 2.0 * 0.6 / 0.8)
    assert math.isnan(critical_length(curve.assign(cosine=[0.5, 0.4, 0.3, 0.2])))
    assert math.isnan(critical_length(curve.assign(cosine=[-0.5, -0.4, -0.3, -0.2])))


def test_sampling_is_seeded_and_balanced(bn64):
    a = gp.stiffness(bn64, n=8, seed=1)
    b = gp.stiffness(bn64, n=8, seed=1)
    c = gp.stiffness(bn64, n=8, seed=2)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert torch.bincount(a.labels).tolist() == [3, 3, 2]
    assert a.meta["seed"] == 1 and a.meta["options"]["n"] == 8


def test_save_load_roundtrip(bn64, tmp_path):
    r = gp.stiffness(bn64, per_class=2, checkpoints=[1])
    loaded = gp.load(r.save(tmp_path / "s"))
    assert isinstance(loaded, gp.StiffnessResult)
    assert torch.equal(loaded.cosine, r.cosine) and torch.equal(loaded.indices, r.indices)
    pd.testing.assert_frame_equal(loaded.table, r.table)
    pd.testing.assert_frame_equal(loaded.distance_curve, r.distance_curve)
    assert loaded.summary.keys() == r.summary.keys()


def test_subject_untouched(bn64):
    before = {k: v.clone() for k, v in bn64.final.items()}
    gp.stiffness(bn64, per_class=2)
    assert all(torch.equal(before[k], bn64.final[k]) for k in before)
    assert not bn64.model.training


def test_bad_input(bn64):
    with pytest.raises(DataError, match="larger than the train split"):
        gp.stiffness(bn64, n=31)
    with pytest.raises(DataError, match="class 0 has only"):
        gp.stiffness(bn64, per_class=30)
    with pytest.raises(ConfigError, match="pairs"):
        gp.stiffness(bn64, pairs="train-val")
    with pytest.raises(ConfigError, match="not both"):
        gp.stiffness(bn64, per_class=2, n=6)
    with pytest.raises(ConfigError, match="bins"):
        gp.stiffness(bn64, bins=0)
    with pytest.raises(StateError, match="recorded epochs"):
        gp.stiffness(bn64, checkpoints=[7])
    s = make_subject("nested", n_train=12, n_test=6)
    x, y = s.train.x, torch.arange(12) % 2
    missing = gp.Subject(s.model, train=(x, y), test=(s.test.x, s.test.y), num_classes=3)
    with pytest.raises(DataError, match=r"class\(es\) \[2\] have no examples"):
        gp.stiffness(missing, per_class=1)


def test_nan_loss_names_examples():
    s = make_subject("nested", n_train=12, n_test=6)
    x = s.train.x.clone()
    x[5] = float("nan")
    y = torch.arange(12) % 3
    with pytest.raises(DataError, match="position 5"):  # NaN inputs never reach a probe
        gp.Subject(s.model, train=(x, y), test=(s.test.x, s.test.y), num_classes=3)
    linear = torch.nn.Linear(6, 3)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    x[5] = 3e38  # finite, but the logits overflow to inf: the loss is not finite
    bad = gp.Subject(linear, train=(x, y), test=(s.test.x, s.test.y), num_classes=3)
    with pytest.raises(DataError, match="positions 5"):
        gp.stiffness(bad, per_class=4)


def test_cli(tiny_run, tmp_path, capsys):
    from genprobe.cli import main

    run = tiny_run
    out = tmp_path / "st"
    main(["probe", "stiffness", str(run), "--per-class", "2", "--checkpoints", "all",
          "--bins", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert "within_class=" in text and "critical_length=" in text
    r = gp.load(out)
    assert r.cosine.shape == (20, 20) and r.meta["states"][-1] == "final"
    assert (out / "figure.png").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["probe", "stiffness", str(run), "--pairs", "val-val", "--out", str(out)])
    assert exc.value.code == 2
    assert "pairs" in capsys.readouterr().err
