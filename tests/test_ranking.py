"""The ranking of measures (genprobe.measures.ranking): each score against scipy and plain loops over
models and pairs (ties included), the bootstrap intervals' coverage on families with a known τ,
the paired comparison, the CMI conventions (the competition's against a literal transcription of
its scoring program, tests/pgdl_reference.py), what is ranked and over which models, bad inputs."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import genprobe as gp
import genprobe.measures as R
import genprobe.measures.scores as S
from genprobe.errors import ConfigError


def _sign(v: float) -> int:
    return int(v > 0) - int(v < 0)


def rank(table: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """rank_correlation of every column with a "." as a measure, no minimum, no bootstrap, in
    the table's column order (the point estimates the loops below check)."""
    kwargs.setdefault("measures", [c for c in table.columns if "." in str(c)])
    kwargs.setdefault("min_models", 2)
    kwargs.setdefault("min_share", 0.0)
    kwargs.setdefault("bootstrap", 0)
    kwargs.setdefault("reference", None)
    out = R.rank_correlation(table, **kwargs)
    order = [m for m in kwargs["measures"] if m in set(out["measure"])] \
        if not isinstance(kwargs["measures"], str) else [kwargs["measures"]]
    ranked = out.set_index("measure").loc[order].reset_index()
    ranked.attrs = out.attrs
    return ranked


# ----------------------------------------------------------------------------- Kendall τ-b


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    table = pd.DataFrame({"gap": rng.integers(0, 4, n) / 10,
                          "m.ties": rng.integers(0, 3, n).astype(float),
                          "m.smooth": rng.normal(size=n),
                          "m.infinite": np.where(rng.random(n) < 0.3, -np.inf, rng.normal(size=n))})
    ranking = rank(table).set_index("measure")
    for name in ("m.ties", "m.smooth", "m.infinite"):
        expected = scipy.stats.kendalltau(table[name], table["gap"]).statistic
        got = ranking.loc[name, "kendall_tau"]
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, abs=1e-12), name


def test_constant_columns_give_nan_never_an_exception():
    table = pd.DataFrame({"lr": [0.1, 0.1, 0.2, 0.2], "width": [8, 16, 8, 16],
                          "gap": [0.1, 0.2, 0.3, 0.4], "m.const": [1.0] * 4,
                          "m.x": [1.0, 2.0, 3.0, 5.0]})
    ranking = rank(table).set_index("measure")
    assert ranking.loc["m.const", ["kendall_tau", "granulated_tau", "cmi"]].isna().all()
    assert math.isnan(scipy.stats.kendalltau(table["m.const"], table["gap"]).statistic)
    assert ranking.loc["m.x", "kendall_tau"] == pytest.approx(1.0)
    flat = table.assign(gap=0.2)
    assert rank(flat)[["kendall_tau", "granulated_tau", "cmi"]].isna().all().all()


# ----------------------------------------------------------------------------- granulated τ


def _grid(seeds: int = 1, seed: int = 0) -> pd.DataFrame:
    """A 2×2×2 grid over (lr, width, noise) × seeds, gaps and measures with ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for lr, width, noise, s in itertools.product([0.1, 0.01], [8, 32], [0.0, 0.2], range(seeds)):
        rows.append({"run": f"run{len(rows)}", "lr": lr, "width": width, "noise": noise, "seed": s,
                     "train_error": 0.0, "test_error": 0.0, "gap": rng.integers(0, 3) / 10,
                     "baseline.m": float(rng.integers(0, 3)), "probe.z": rng.normal()})
    table = pd.DataFrame(rows)
    table["test_error"] = table["gap"]
    return table


def test_granulated_tau_by_hand_on_a_2x2x2_grid():
    table = _grid(seeds=1, seed=3)
    axes = ["lr", "width", "noise"]
    ranking = rank(table)
    assert ranking.attrs["hyperparameters"] == axes
    for measure in ("baseline.m", "probe.z"):
        psi = {}
        for axis in axes:  # 4 groups of the 2 models differing in `axis` alone
            signs = []
            for _, group in table.groupby([a for a in axes if a != axis]):
                (m1, g1), (m2, g2) = group[[measure, "gap"]].to_numpy()
                signs.append(_sign(m1 - m2) * _sign(g1 - g2))  # τ of two models; 0 on a tie
            psi[axis] = np.mean(signs)
        row = ranking.set_index("measure").loc[measure]
        assert row["granulated_tau"] == pytest.approx(np.mean(list(psi.values())), abs=1e-12)
        assert ranking.attrs["granulated_by_axis"][measure] == pytest.approx(psi, abs=1e-12)


def test_granulated_tau_with_seeds_and_a_missing_model_against_a_loop():
    table = _grid(seeds=3, seed=5).drop(index=[4]).reset_index(drop=True)
    axes = ["lr", "width", "noise"]
    ranking = rank(table, hyperparameters=axes).set_index("measure")
    for measure in ("baseline.m", "probe.z"):
        psi = []
        for axis in axes:
            taus = []
            for _, group in table.groupby([a for a in axes if a != axis]):
                if group[axis].nunique() < 2:
                    continue
                tau = scipy.stats.kendalltau(group[measure], group["gap"]).statistic
                taus.append(0.0 if math.isnan(tau) else tau)
            psi.append(np.mean(taus))
        assert ranking.loc[measure, "granulated_tau"] == pytest.approx(np.mean(psi), abs=1e-12)


# ----------------------------------------------------------------------------- CMI


def _literal_cmi(table: pd.DataFrame, measure: str, axes: list[str], size: int = 2) -> float:
    """Jiang et al.'s normalized CMI by a plain loop over ordered pairs of distinct models,
    minimized over conditioning sets of `size` hyper-parameters."""
    mu, g = table[measure].to_numpy(), table["gap"].to_numpy()
    hp = table[axes].to_numpy()
    n = len(table)
    best = math.inf
    for subset in itertools.combinations(range(len(axes)), size):
        counts = defaultdict(float)
        for i in range(n):
            for j in range(n):
                if i != j:
                    cell = (tuple(hp[i, list(subset)]), tuple(hp[j, list(subset)]))
                    counts[cell, _sign(g[i] - g[j]), _sign(mu[i] - mu[j])] += 1
        total = sum(counts.values())
        mi = entropy = 0.0
        for cell in {c for c, _, _ in counts}:
            n_cell = sum(v for (c, _, _), v in counts.items() if c == cell)
            p_gap = {a: sum(v for (c, b, _), v in counts.items() if c == cell and b == a) / n_cell
                     for a in (-1, 0, 1)}
            p_mu = {a: sum(v for (c, _, b), v in counts.items() if c == cell and b == a) / n_cell
                    for a in (-1, 0, 1)}
            for a in (-1, 0, 1):
                for b in (-1, 0, 1):
                    p = counts.get((cell, a, b), 0.0) / n_cell
                    if p > 0:
                        mi += n_cell / total * p * math.log(p / (p_gap[a] * p_mu[b]))
            entropy -= n_cell / total * sum(p * math.log(p) for p in p_gap.values() if p > 0)
        if entropy > 1e-12:
            best = min(best, mi / entropy)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_cmi_matches_a_literal_loop_over_pairs(seed):
    rng = np.random.default_rng(seed)
    rows = [{"a": a, "b": b, "c": c, "gap": rng.integers(0, 4) / 10,
             "m.ties": float(rng.integers(0, 3)), "m.smooth": rng.normal()}
            for a, b, c, _ in itertools.product([0, 1], [1, 2, 3], ["x", "y"], range(2))]
    table = pd.DataFrame(rows).drop(index=rng.choice(24, 3, replace=False)).reset_index(drop=True)
    ranking = rank(table).set_index("measure")
    for measure in ("m.ties", "m.smooth"):
        expected = _literal_cmi(table, measure, ["a", "b", "c"])
        assert ranking.loc[measure, "cmi"] == pytest.approx(expected, abs=1e-12)
        assert 0.0 <= expected <= 1.0


def test_cmi_of_the_gap_itself_is_one_and_blind_to_direction():
    table = _grid(seeds=2, seed=1)
    table["m.same"] = 3.0 * table["gap"] + 1.0
    table["m.reversed"] = -table["gap"]
    ranking = rank(table, measures=["m.same", "m.reversed"]).set_index("measure")
    assert ranking.loc["m.same", "cmi"] == pytest.approx(1.0, abs=1e-12)
    assert ranking.loc["m.reversed", "cmi"] == pytest.approx(1.0, abs=1e-12)
    assert ranking.loc["m.reversed", "kendall_tau"] == pytest.approx(-1.0)


def test_cmi_with_one_hyperparameter_conditions_on_it():
    rng = np.random.default_rng(7)
    table = pd.DataFrame({"lr": np.repeat([0.1, 0.01, 0.001], 4), "gap": rng.integers(0, 3, 12) / 10,
                          "m.x": rng.integers(0, 3, 12).astype(float)})
    ranking = rank(table)
    assert ranking.attrs["cmi_conditioning"]["m.x"] == ["lr"]
    assert ranking["cmi"][0] == pytest.approx(_literal_cmi(table, "m.x", ["lr"], size=1), abs=1e-12)


def test_cmi_falls_back_to_single_hyperparameters_when_no_pair_scores():
    rng = np.random.default_rng(11)  # one model per configuration: a pair leaves one pair per cell
    table = pd.DataFrame([{"lr": lr, "width": w, "gap": rng.integers(0, 4) / 10,
                           "m.x": float(rng.integers(0, 4))}
                          for lr, w in itertools.product([0.1, 0.01, 0.001], [8, 16, 32])])
    assert _literal_cmi(table, "m.x", ["lr", "width"], size=2) == math.inf
    ranking = rank(table)
    expected = _literal_cmi(table, "m.x", ["lr", "width"], size=1)
    assert ranking["cmi"][0] == pytest.approx(expected, abs=1e-12) and math.isfinite(expected)
    assert len(ranking.attrs["cmi_conditioning"]["m.x"]) == 1


# ----------------------------------------------------------------------------- table handling


def test_nan_measures_drop_those_models_only():
    table = _grid(seeds=2, seed=2)
    table.loc[[1, 6, 11], "probe.z"] = np.nan
    table.loc[[3], "gap"] = np.nan
    ranking = rank(table).set_index("measure")
    assert ranking.loc["baseline.m", "n_models"] == 15
    assert ranking.loc["probe.z", "n_models"] == 12
    kept = table.drop(index=[1, 3, 6, 11])
    alone = rank(kept, measures=["probe.z"], hyperparameters=["lr", "width", "noise"])
    assert ranking.loc["probe.z", ["kendall_tau", "granulated_tau", "cmi"]].to_numpy() == \
        pytest.approx(alone.iloc[0][["kendall_tau", "granulated_tau", "cmi"]].to_numpy(dtype=float))


def test_default_columns():
    table = _grid(seeds=2)
    table["loss_gap"] = 0.1
    table["status"] = "done"
    table["error"] = ""
    table["constant_hp"] = 5
    ranking = rank(table)
    assert list(ranking["measure"]) == ["baseline.m", "probe.z"]
    assert ranking.attrs["hyperparameters"] == ["lr", "width", "noise"]  # not run, seed, metrics
    table.attrs["hyperparameters"] = ["width", "seed", "lr"]
    assert rank(table).attrs["hyperparameters"] == ["width", "lr"]
    explicit = rank(table, hyperparameters=["width", "seed"])
    assert explicit.attrs["hyperparameters"] == ["width", "seed"]
    assert list(explicit.columns) == list(R.RANKING_COLUMNS)


def test_unhashable_hyperparameter_values_are_compared_by_value():
    table = pd.DataFrame({"blocks": [[1, 2], [1, 2], [2, 2], [2, 2]], "lr": [0.1, 0.2, 0.1, 0.2],
                          "gap": [0.1, 0.2, 0.3, 0.4], "m.x": [1.0, 2.0, 4.0, 3.0]})
    as_text = table.assign(blocks=table["blocks"].map(str))
    got, expected = rank(table), rank(as_text)
    assert got.attrs["hyperparameters"] == ["blocks", "lr"]
    pd.testing.assert_frame_equal(got, expected)


@pytest.mark.parametrize("call, message", [
    (lambda t: rank(t, target="generalization"), "unknown target column 'generalization'"),
    (lambda t: R.rank_correlation(t.drop(columns=["baseline.m", "probe.z"])), "no registered measure columns"),
    (lambda t: rank(t, measures=["baseline.nope"]), "unknown measure column 'baseline.nope'"),
    (lambda t: rank(t, measures=[]), "measures=[]"),
    (lambda t: rank(t, hyperparameters=["depth"]), "unknown hyper-parameter column 'depth'"),
    (lambda t: rank(t, measures=["run"]), "column 'run' is not numeric"),
    (lambda t: rank(t, hyperparameters=["gap"]), "cannot be both"),
    (lambda t: R.rank_correlation(t.to_dict()), "takes a pandas DataFrame"),
])
def test_rank_correlation_bad_inputs(call, message):
    with pytest.raises(ConfigError) as info:
        call(_grid())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plot_has_the_bars_and_one_scatter_per_measure():
    table = _grid(seeds=2)
    figure = R.plot_rank_correlation(table, rank(table))
    titles = [ax.get_title() for ax in figure.axes]
    assert len(figure.axes) == 3 and titles[0].startswith("how well each measure ranks 16 models")
    assert any(t.startswith("baseline.m") for t in titles) and any(t.startswith("probe.z") for t in titles)


# ----------------------------------------------------------------------------- the competition's CMI


def _pgdl_table(seed: int, seeds: int, axes: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = [[0.1, 0.01], [8, 32, 64], ["x", "y"], [0, 1]][:axes]
    rows = []
    for point in itertools.product(*values, range(seeds)):
        gap = float(rng.integers(0, 4)) / 10
        rows.append({**{f"h{k}": v for k, v in enumerate(point[:-1])}, "seed": point[-1],
                     "gap": gap, "m.ties": float(rng.integers(0, 3)),
                     "m.noisy": gap + rng.normal(scale=0.2), "m.smooth": rng.normal()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed, seeds, axes", [(0, 1, 3), (1, 2, 3), (2, 1, 4), (3, 3, 2), (4, 2, 4)])
def test_pgdl_cmi_equals_the_literal_transcription_of_the_scoring_program(seed, seeds, axes):
    from pgdl_reference import pgdl_cmi

    table = _pgdl_table(seed, seeds, axes)
    axes_names = [f"h{k}" for k in range(axes)]
    ranking = rank(table, cmi="pgdl", hyperparameters=axes_names).set_index("measure")
    for measure in ("m.ties", "m.noisy", "m.smooth"):
        expected = pgdl_cmi(table[axes_names].to_dict("records"), table["gap"].tolist(),
                            table[measure].tolist())
        assert ranking.loc[measure, "cmi"] == pytest.approx(expected, abs=1e-12, rel=1e-12), measure


def test_the_two_cmi_conventions_differ_where_the_competition_pairs_a_model_with_itself():
    table = _pgdl_table(1, 2)
    table["m.reversed"] = -table["gap"]
    paper = rank(table, measures=["m.reversed"]).iloc[0]
    pgdl = rank(table, measures=["m.reversed"], cmi="pgdl").iloc[0]
    assert paper["cmi"] == pytest.approx(1.0, abs=1e-12)  # blind to the sign
    assert pgdl["cmi"] < 0.9  # ties count as "−": −gap is not a perfect score there


# ----------------------------------------------------------------------------- intervals


def _normal_family(n: int, rho: float, rng) -> pd.DataFrame:
    x = rng.standard_normal(n)
    y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal(n)
    return pd.DataFrame({"gap": y, "m.x": x})


@pytest.mark.parametrize("n, rho", [(16, 0.0), (24, 0.6), (40, 0.85)])
def test_bootstrap_intervals_cover_the_true_tau_at_about_their_nominal_rate(n, rho):
    """Bivariate normal families of n models: the population τ is (2/π) arcsin ρ. Measured
    coverage of the 95% interval over 200 families (seeded): 0.94–0.98 here."""
    rng = np.random.default_rng(int(100 * rho) + n)
    truth = 2 / math.pi * math.asin(rho)
    hits = 0
    families = 200
    for k in range(families):
        row = rank(_normal_family(n, rho, rng), bootstrap=400, seed=k).iloc[0]
        assert row["kendall_tau_low"] <= row["kendall_tau"] <= row["kendall_tau_high"]
        hits += row["kendall_tau_low"] <= truth <= row["kendall_tau_high"]
    assert 0.90 <= hits / families <= 0.995


def test_intervals_narrow_with_more_models_and_widen_with_the_level():
    rng = np.random.default_rng(5)
    small, large = _normal_family(12, 0.6, rng), _normal_family(120, 0.6, rng)

    def width(table, level=0.95):
        row = rank(table, bootstrap=500, level=level).iloc[0]
        return row["kendall_tau_high"] - row["kendall_tau_low"]

    assert width(large) < 0.5 * width(small)
    assert width(small, 0.5) < width(small, 0.95)


def test_a_grid_with_seeds_resamples_whole_configurations():
    table = _grid(seeds=3, seed=4)
    ranking = rank(table, bootstrap=50)
    assert ranking.attrs["resampling"] == "whole configurations of (lr, width, noise)"
    assert rank(_grid(seeds=1), bootstrap=50).attrs["resampling"] == "models"


def test_the_bootstrap_is_seeded():
    table = _grid(seeds=2, seed=8)
    a, b = rank(table, bootstrap=100, seed=3), rank(table, bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = rank(table, bootstrap=100, seed=4)
    assert not a["kendall_tau_low"].equals(c["kendall_tau_low"])


def test_weighted_scores_equal_the_scores_of_the_resampled_table():
    """A resample drawn as counts scores like the table with those models repeated (pairs of a
    model with its own copy left out: ties in both, which τ-b ignores)."""
    table = _grid(seeds=1, seed=6)
    counts = np.array([2, 0, 1, 3, 1, 0, 1, 2], dtype=float)
    mu, g = table["probe.z"].to_numpy(), table["gap"].to_numpy()
    got = S.tau_b(S.signs(mu), S.signs(g), counts[None, :])[0]
    repeated = np.repeat(np.arange(8), counts.astype(int))
    expected = scipy.stats.kendalltau(mu[repeated], g[repeated]).statistic
    assert got == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- the comparison


def _planted(n: int, seed: int) -> pd.DataFrame:
    """A family where baseline.dist_from_init is a noisy copy of the gap; a measure with half
    its noise (better), and one with the same noise drawn again (equal)."""
    rng = np.random.default_rng(seed)
    gap = rng.standard_normal(n)
    return pd.DataFrame({"gap": gap,
                         "baseline.dist_from_init": gap + 1.0 * rng.standard_normal(n),
                         "m.better": gap + 0.25 * rng.standard_normal(n),
                         "m.equal": gap + 1.0 * rng.standard_normal(n)})


def test_the_paired_comparison_detects_a_planted_better_measure_and_not_an_equal_one():
    detected = false_alarms = 0
    for seed in range(20):
        ranking = rank(_planted(60, seed), bootstrap=400, reference="baseline.dist_from_init",
                       seed=seed).set_index("measure")
        better, equal = ranking.loc["m.better"], ranking.loc["m.equal"]
        assert better["vs_reference"] > 0
        detected += better["vs_reference_low"] > 0 and better["p_holm"] < 0.05
        false_alarms += equal["p_holm"] < 0.05
    assert detected >= 18 and false_alarms <= 2


def test_the_p_value_agrees_with_the_interval():
    """0 lies outside the bias-corrected interval at level 1 − α exactly when p < α."""
    rng = np.random.default_rng(3)
    for shift, skew in [(0.3, 0.0), (0.1, 0.5), (0.05, -0.4), (0.0, 0.0), (-0.2, 0.3)]:
        reps = shift + 0.1 * rng.standard_normal(2000) + skew * rng.exponential(0.1, 2000)
        point = shift + 0.02
        p = S.p_value(reps, point)
        for level in (0.8, 0.9, 0.95, 0.99):
            low, high = S.interval(reps, level, point)
            outside = low > 0 or high < 0
            if abs(p - (1 - level)) > 0.01:  # away from the boundary, where quantiles are coarse
                assert outside == (p < 1 - level), (shift, skew, level, p, low, high)


def test_holm_adjusts_step_down():
    p = [0.01, 0.04, 0.03, math.nan, 0.5]
    assert S.holm(p)[[0, 2, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert math.isnan(S.holm(p)[3])


def test_the_leader_is_named_only_when_separated():
    clear = rank(_planted(80, 1), measures=["m.better", "baseline.dist_from_init"], bootstrap=300)
    assert clear.attrs["leader"]["best"] == "m.better" and clear.attrs["leader"]["separated"]
    assert "separated from the next" in R.headline(clear)
    close = _planted(12, 2)
    close["m.twin"] = close["m.equal"] + 0.05 * np.random.default_rng(0).standard_normal(12)
    vague = rank(close, measures=["m.equal", "m.twin"], bootstrap=300)
    leader = vague.attrs["leader"]
    assert not leader["separated"] and leader["models_needed"] > 12
    assert "too small to tell them apart" in R.headline(vague)
    assert f"about {leader['models_needed']} models" in R.headline(vague)


# ----------------------------------------------------------------------------- what is ranked


def _sweep_like(n: int = 16, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gap = rng.uniform(0, 0.4, n)
    table = pd.DataFrame({
        "run": [f"r{i}" for i in range(n)], "lr": np.repeat([0.1, 0.01], n // 2),
        "width": np.tile([8, 32], n // 2), "train_error": rng.uniform(0, 0.05, n),
        "test_error": 0.0, "gap": gap, "status": "done",
        "baseline.dist_from_init": gap + rng.normal(0, 0.1, n),
        "baseline.params": rng.normal(size=n),
        "criticality.network_criticality": gap + rng.normal(0, 0.2, n),
        "criticality.trained_error": rng.uniform(0, 0.05, n),
        "criticality.evaluations": rng.integers(100, 200, n).astype(float),
        "criticality.bound": np.nan,
        "robustness.mean_delta_error_reinit": gap + rng.normal(0, 0.05, n),
        "robustness.base_error": gap,
        "ntk.lambda_max": rng.normal(size=n),
        "ntk.max_learning_rate": rng.normal(size=n),
        "stiffness.critical_length": np.where(np.arange(n) < 3, np.arange(n) + 1.0, np.nan),
        "ablation.auc:layers.1": rng.normal(size=n),
        "ablation.base_accuracy": 1 - gap})
    table["criticality.bound"] = np.sqrt(table["criticality.network_criticality"].abs())
    table["test_error"] = table["train_error"] + gap
    return table


def test_the_registry_decides_what_is_ranked():
    table = _sweep_like()
    ranking = R.rank_correlation(table, bootstrap=0)
    ranked = set(ranking["measure"])
    assert ranked == {"baseline.dist_from_init", "baseline.params", "criticality.network_criticality",
                      "ntk.lambda_max", "stiffness.critical_length"}
    not_ranked = ranking.attrs["not_ranked"]
    for column in ("criticality.trained_error", "criticality.evaluations", "criticality.bound",
                   "ntk.max_learning_rate", "robustness.base_error", "ablation.base_accuracy"):
        assert "not a measure" in not_ranked[column], column
    # robustness and ablation measure on the test split by default: the target's data
    for column in ("robustness.mean_delta_error_reinit", "ablation.auc:layers.1"):
        assert "test split" in not_ranked[column], column
    table.attrs["probes"] = {"robustness": {"split": "train"}, "ablation": {"split": "train"}}
    ranked = set(R.rank_correlation(table, bootstrap=0)["measure"])
    assert {"robustness.mean_delta_error_reinit", "ablation.auc:layers.1"} <= ranked
    explicit = R.rank_correlation(table, measures=["robustness.base_error"], bootstrap=0,
                                  reference=None)
    assert explicit["measure"].tolist() == ["robustness.base_error"]
    assert explicit.loc[0, "kendall_tau"] == pytest.approx(1.0)


def test_expected_directions_come_from_the_registrations():
    ranking = R.rank_correlation(_sweep_like(), bootstrap=0).set_index("measure")
    assert ranking.loc["baseline.dist_from_init", "direction"] == 1
    assert ranking.loc["criticality.network_criticality", "direction"] == 1
    assert ranking.loc["stiffness.critical_length", "direction"] == -1
    assert ranking.loc["ntk.lambda_max", "direction"] == 0


def test_a_measure_defined_on_too_few_models_is_not_scored():
    table = _sweep_like()
    ranking = R.rank_correlation(table, bootstrap=0).set_index("measure")
    row = ranking.loc["stiffness.critical_length"]
    assert math.isnan(row["kendall_tau"]) and math.isnan(row["cmi"])
    assert "defined on 3 of 16 models" in row["note"] and "min_models 8" in row["note"]
    share = R.rank_correlation(table, bootstrap=0, min_models=2, min_share=0.5)
    assert "min_share 0.5" in share.set_index("measure").loc["stiffness.critical_length", "note"]
    loose = R.rank_correlation(table, bootstrap=0, min_models=2, min_share=0.1)
    assert math.isfinite(loose.set_index("measure").loc["stiffness.critical_length", "kendall_tau"])
    few = R.rank_correlation(table.iloc[:6], bootstrap=0)
    assert few["kendall_tau"].isna().all()
    assert "no measure could be scored" in R.headline(few)


def test_identical_columns_are_scored_once_with_their_aliases():
    table = _sweep_like()
    table["user.copy"] = table["baseline.params"]
    gp.register_measure("copy", lambda subject: 0.0)
    try:
        ranking = R.rank_correlation(table, bootstrap=0).set_index("measure")
    finally:
        gp.measures.unregister_measure("copy")
    assert ranking.loc["baseline.params", "aliases"] == "user.copy"
    assert "identical to baseline.params" in ranking.loc["user.copy", "note"]
    assert math.isnan(ranking.loc["user.copy", "kendall_tau"])


def test_unfinished_unconverged_and_collapsed_runs_are_left_out_and_listed():
    table = _sweep_like()
    table.loc[0, "status"] = "failed"
    table.loc[0, "error"] = "training: diverged"
    table["converged"] = pd.array([True] * 16, dtype="boolean")
    table.loc[1, "converged"] = False
    table["epochs_run"] = pd.array([30] * 16, dtype="Int64")
    table.loc[2, "train_error"] = 0.888
    ranking = R.rank_correlation(table, bootstrap=0)
    excluded = ranking.attrs["excluded"]
    assert sorted(excluded) == ["r0", "r1", "r2"]
    assert excluded["r0"] == "status failed: training: diverged"
    assert excluded["r1"] == "did not reach its training target in 30 epochs"
    assert "collapsed or under-fit: train error 0.888 > max_train_error 0.5" == excluded["r2"]
    assert ranking.attrs["n_models"] == 13
    assert ranking.set_index("measure").loc["baseline.params", "n_models"] == 13
    kept = R.rank_correlation(table, bootstrap=0, max_train_error=0.9).attrs["excluded"]
    assert list(kept) == ["r0", "r1"]
    assert "3 runs left out: 1 did not finish, 1 collapsed or under-fit, 1 did not reach the training target" in R.headline(ranking)


@pytest.mark.parametrize("kwargs, message", [
    ({"level": 1.0}, "level must be a number strictly between 0 and 1"),
    ({"level": 0}, "level must be a number strictly between 0 and 1"),
    ({"bootstrap": -1}, "bootstrap must be an integer >= 0"),
    ({"min_models": 1}, "min_models must be an integer >= 2"),
    ({"min_share": 1.5}, "min_share must be a finite number in [0, 1]"),
    ({"cmi": "nips"}, "cmi must be one of paper, pgdl"),
    ({"compare": "spearman"}, "compare must be one of"),
])
def test_bad_ranking_options_are_one_line(kwargs, message):
    with pytest.raises(ConfigError) as info:
        R.rank_correlation(_sweep_like(), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_registered_measure_says_how_to_rank_other_columns():
    with pytest.raises(ConfigError, match=r"pass measures=\[\.\.\.\]"):
        R.rank_correlation(_grid(seeds=2))


def test_below_eight_models_there_is_no_interval_and_no_best_measure():
    """Four models in the order of their gaps: τ = 1 on every resample, so a bootstrap interval
    would read [1, 1]; the ranking gives the points, no interval, and names no best measure."""
    table = pd.DataFrame({"gap": [0.1, 0.2, 0.3, 0.4], "m.a": [1.0, 2.0, 3.0, 4.0],
                          "m.b": [1.0, 3.0, 2.0, 4.0]})
    ranking = R.rank_correlation(table, measures=["m.a", "m.b"], min_models=4, reference="m.a")
    first = ranking.iloc[0]
    assert first["measure"] == "m.a" and first["kendall_tau"] == pytest.approx(1.0)
    assert ranking[["kendall_tau_low", "kendall_tau_high", "cmi_low", "vs_reference_low",
                    "p_value"]].isna().all().all()
    assert "no interval: 4 models" in first["note"]
    text = R.headline(ranking)
    assert "With 4 models no interval can be drawn" in text and "too small to call any" in text
    assert "[" not in text  # no interval is printed


def test_the_report_table_reads_nan_back_from_json_as_none():
    from genprobe.report.sweeps import _ranking_table

    ranking = R.rank_correlation(_sweep_like(), bootstrap=20)
    records = pd.DataFrame(ranking.astype(object).where(ranking.notna(), None).to_dict("records"))
    shown = _ranking_table(records)
    assert len(shown) == ranking["kendall_tau"].notna().sum()
    assert (shown["Kendall τ-b"] != "–").all()
