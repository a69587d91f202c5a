"""How well each measure ranks a family of models by generalization gap, and how sure that is.

:func:`rank_correlation` scores every measure of a table with one row per model (a sweep's
``table.parquet``) against the gap: Kendall's τ-b, Jiang et al.'s granulated τ (with each
hyper-parameter's ψ_i), and the conditional mutual information (CMI) score of the PGDL
competition — each with a bootstrap interval over models, and a paired bootstrap comparison
with a reference measure. :func:`plot_rank_correlation` draws it.

What is ranked, and over which models:

- **Measures** are the registered ones (:func:`genprobe.measures.classify`): Jiang et al.'s
  baselines, each probe's declared measures computed from the training data, and user-defined
  measures. The run's own training error and loss, counts, sizes, self-check quantities and
  anything computed from the test split are reported, never ranked, unless named in
  ``measures=[...]`` (a user's plain DataFrame: any numeric column). Columns identical over the
  models are scored once, the others listed as its ``aliases``.
- **Models** are the runs that finished (``status == "done"``), fitted their training target
  where they had one (``converged`` is not False) and did not collapse (``train_error`` at most
  ``max_train_error``); the others are left out and listed in ``attrs["excluded"]``.
- A measure defined (not NaN) on fewer than ``min_models`` models, or on less than
  ``min_share`` of them, is not scored; its ``note`` says why.

Uncertainty: the models are resampled with replacement ``bootstrap`` times (seeded) and every
score recomputed on each resample (bias-corrected percentile intervals at ``level``). Where a grid repeats a
configuration over seeds (a ``seed`` column that varies within configurations of the
hyper-parameters), whole configurations are resampled, so that the interval reflects how many
distinct configurations the family has, not how many seeds. A resample is a vector of
counts (how often each model was drawn), and each score is computed with pair weights
count_i · count_j over pairs of distinct models: a model drawn twice is not paired with its own
copy. Measured coverage (``tests/test_ranking.py``): on bivariate-normal families with a known τ,
the 95% interval of τ-b covers it in 94–98% of families of 12 to 48 models.

Comparison: each measure's score (``compare``, default Kendall's τ-b, oriented by the sign of
its own point estimate so that a measure that falls with the gap counts as well as one that
grows) minus the reference's (``reference``, default ``baseline.dist_from_init``, the PGDL
organisers' baseline), on the same resamples: the difference, its interval, a two-sided
bootstrap p-value and the p-value adjusted over all scored measures by Holm's step-down
(Holm–Bonferroni) method. ``attrs["leader"]`` says whether the best measure is separated from
the next one (their paired difference's interval excludes 0), and, when not, about how many
models would separate them at the observed spread (the interval's half-width shrinks as
1/√models).

The CMI score has two conventions (``cmi=``):

- ``"paper"`` (default), Jiang et al.'s definition: over ordered pairs of distinct models,
  V_g = sign(g_i − g_j), V_μ = sign(μ_i − μ_j) ∈ {−1, 0, +1} (a tie is its own sign),
  U_S = the values of hyper-parameters S of both models; Î(S) = I(V_μ; V_g | U_S) / H(V_g | U_S),
  the conditional quantities expectations over U_S weighted by each cell's share of the pairs;
  the score is min over pairs of hyper-parameters S of Î(S). A set whose cells leave no
  uncertainty in V_g has no score and is skipped; when no pair scores (or there are fewer than
  two hyper-parameters) single hyper-parameters are tried, then the empty set.
- ``"pgdl"``, the competition's scoring program (``scoring_program/mutual_information.py``,
  ``conditional_mutual_information``, of the PGDL starting kit), exactly on a complete grid:
  over *all* ordered pairs of models, each model also paired with itself; a tie counts as "−"
  (V = "+" only when strictly greater), so a tie in the gap agrees with a tie in the measure;
  per cell of (both models' values of the two hyper-parameters), the mutual information and the
  gap sign's entropy in bits (the entropy's log of p + 1e-12, as the code has it), each
  averaged over the cells *without* weights, their ratio minimized over pairs of
  hyper-parameters only. Where genprobe departs from that code, on inputs the competition never
  had (its data were complete grids with one model per configuration): a cell with no pair (an
  incomplete grid, or a bootstrap resample) is left out of the cell means, where the code turns
  that pair of hyper-parameters into NaN; with fewer than two hyper-parameters the score is NaN
  (the code returns ∞); cells are keyed by values, not by concatenated strings (the code merges
  the values 1, 11 of "1"+"11" and "11"+"1"). It is not symmetric: −gap does not score 1.

The paper's score is blind to the sign: a measure and its negation score the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .scores import (
    cell_codes,
    cmi_paper,
    cmi_pgdl,
    granulated,
    holm,
    interval,
    p_value,
    resample,
    signs,
    tau_b,
)

NOT_HYPERPARAMETERS = ("run", "status", "error", "gap", "loss_gap", "seed", "seconds",
                       "wall_seconds", "converged", "epochs_run")
"""Columns never taken as hyper-parameters by default, besides measures (names with a ".") and
``train_*`` / ``test_*`` metrics and ``seconds_*`` / ``peak_mib_*`` costs. The seed is the randomness a ranking averages over, not a
hyper-parameter axis: pass ``hyperparameters=`` naming it to make it one."""
SCORES = ("kendall_tau", "granulated_tau", "cmi")
RANKING_COLUMNS = ("measure", "direction", "kendall_tau", "kendall_tau_low", "kendall_tau_high",
                   "granulated_tau", "granulated_tau_low", "granulated_tau_high", "cmi",
                   "cmi_low", "cmi_high", "vs_reference", "vs_reference_low",
                   "vs_reference_high", "p_value", "p_holm", "n_models", "aliases", "note")
"""The columns of :func:`rank_correlation`'s table."""
CMI_CONVENTIONS = ("paper", "pgdl")
MIN_INTERVAL_MODELS = 8
"""Below this many models a measure gets its scores but no interval: the bootstrap of a rank
correlation over so few models is degenerate (four models in the same order as their gaps give
τ = 1 on every resample, an interval [1, 1] that claims a certainty four models cannot give)."""
CORRECTION = "Holm–Bonferroni (Holm's step-down), over the scored measures"


@dataclass(frozen=True)
class RankingOptions:
    """The options of :func:`rank_correlation` that a sweep config's ``ranking:`` may set."""

    bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0
    reference: str | None = "baseline.dist_from_init"
    compare: str = "kendall_tau"
    min_models: int = 8
    min_share: float = 0.5
    cmi: str = "paper"
    max_train_error: float = 0.5

    def checked(self) -> RankingOptions:
        from ..options import check_int, check_number

        check_int("bootstrap", self.bootstrap, 0)
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) \
                or not 0.0 < self.level < 1.0:
            raise ConfigError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), got "
                              f"{self.level!r}")
        check_int("seed", self.seed)
        check_int("min_models", self.min_models, 2)
        check_number("min_share", self.min_share, low=0.0, high=1.0)
        check_number("max_train_error", self.max_train_error, low=0.0, high=1.0)
        if self.cmi not in CMI_CONVENTIONS:
            raise ConfigError(f"cmi must be one of {', '.join(CMI_CONVENTIONS)}, got {self.cmi!r}")
        if self.compare not in SCORES:
            raise ConfigError(f"compare must be one of {', '.join(SCORES)}, got {self.compare!r}")
        if self.reference is not None and not isinstance(self.reference, str):
            raise ConfigError(f"reference must be a measure column or None, got {self.reference!r}")
        return self

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None, source: str = "ranking") -> RankingOptions:
        """Checked options from a mapping like a sweep config's ``ranking:`` (ConfigError, one
        line, naming an unknown key)."""
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        unknown = [k for k in options if k not in known]
        if unknown:
            raise ConfigError(f"{source}: unknown option {unknown[0]!r}; options: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        try:
            return cls(**options).checked()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


# ----------------------------------------------------------------------------- which rows, columns


def eligible_models(table: pd.DataFrame, *, max_train_error: float = 0.5
                    ) -> tuple[np.ndarray, dict[str, str]]:
    """Which rows of `table` a ranking uses, and why each other row is left out: ``(mask,
    {run: reason})`` — finished runs (``status`` "done", where the column exists) that did not
    collapse or under-fit (``train_error`` ≤ `max_train_error`) and reached their training
    target (``converged`` not False); each run left out gets the first reason in that order. The same rule for ``genprobe measures``, the report
    and :func:`rank_correlation`."""
    n = len(table)
    keep = np.ones(n, dtype=bool)
    reasons: dict[str, str] = {}
    names = (table["run"].astype(str).tolist() if "run" in table.columns
             else [f"row {i}" for i in range(n)])

    def leave_out(mask: np.ndarray, why) -> None:
        for i in np.flatnonzero(mask & keep):
            reasons[names[i]] = why(i)
        keep[mask] = False

    if "status" in table.columns:
        status = table["status"].astype(str).to_numpy()
        errors = table["error"].astype(str).tolist() if "error" in table.columns else [""] * n
        leave_out(status != "done", lambda i: f"status {status[i]}"
                  + (f": {errors[i]}" if errors[i] not in ("", "None", "nan") else ""))
    if "train_error" in table.columns:
        train = pd.to_numeric(table["train_error"], errors="coerce").to_numpy(dtype=np.float64)
        leave_out(train > max_train_error, lambda i: f"collapsed or under-fit: train error "
                  f"{train[i]:.3f} > max_train_error {max_train_error:g}")
    if "converged" in table.columns:
        converged = table["converged"].to_numpy(dtype=object)
        epochs = table["epochs_run"].tolist() if "epochs_run" in table.columns else [None] * n
        leave_out(np.array([not pd.isna(c) and not bool(c) for c in converged], dtype=bool),
                  lambda i: "did not reach its training target"
                  + (f" in {int(epochs[i])} epochs" if epochs[i] is not None
                     and not pd.isna(epochs[i]) else ""))
    return keep, reasons


def _columns(table: pd.DataFrame, names, what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    missing = [c for c in names if c not in table.columns]
    if missing:
        raise ConfigError(f"unknown {what} column {missing[0]!r}; the table has: "
                          f"{', '.join(map(str, table.columns))}")
    return names


def _numeric(table: pd.DataFrame, column: str) -> np.ndarray:
    try:
        values = pd.to_numeric(table[column], errors="raise")
    except (ValueError, TypeError):
        raise ConfigError(f"column {column!r} is not numeric (dtype {table[column].dtype}); a "
                          "measure and the target must be numbers") from None
    return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _hyperparameters(table, rows, target, measures, given) -> list[str]:
    if given is not None:
        names = _columns(table, given, "hyper-parameter")
    else:
        listed = table.attrs.get("hyperparameters")
        if listed is not None:
            names = _columns(table, listed, "hyper-parameter (from table.attrs)")
        else:
            names = [str(c) for c in table.columns if "." not in str(c) and c != target
                     and c not in measures and c not in NOT_HYPERPARAMETERS
                     and not str(c).startswith(("train_", "test_", "seconds_", "peak_mib_"))]
        names = [h for h in names if h != "seed"]
    clash = [h for h in names if h == target or h in measures]
    if clash:
        raise ConfigError(f"column {clash[0]!r} cannot be both a hyper-parameter and the target "
                          "or a measure")
    return [h for h in names if _axis_values(table, h)[rows].nunique(dropna=False) > 1]


def _axis_values(table: pd.DataFrame, column: str) -> pd.Series:
    """A hyper-parameter column with unhashable values (lists, dicts) as their repr."""
    values = table[column]
    if values.dtype != object:
        return values
    return values.map(lambda v: repr(v) if isinstance(v, (list, dict, set)) else v)


# ----------------------------------------------------------------------------- the ranking


def rank_correlation(table: pd.DataFrame, *, target: str = "gap",
                     measures: Sequence[str] | None = None,
                     hyperparameters: Sequence[str] | None = None,
                     bootstrap: int = 1000, level: float = 0.95, seed: int = 0,
                     reference: str | None = "baseline.dist_from_init",
                     compare: str = "kendall_tau", min_models: int = 8, min_share: float = 0.5,
                     cmi: str = "paper", max_train_error: float = 0.5) -> pd.DataFrame:
    """How well each measure ranks the models of `table` by `target` (the generalization gap),
    with bootstrap intervals and a comparison with a reference measure (module docstring).

    `table`: one row per model — hyper-parameter columns, ``gap`` (test error − train error, as
    fractions), other metrics, and measure columns; a sweep's table also has ``status``,
    ``converged`` and ``train_error``, which choose the models (:func:`eligible_models`).
    `measures`: default, the registered measures among the columns
    (:func:`genprobe.measures.classify`, using the probe options in ``table.attrs["probes"]``
    that a sweep writes); any numeric columns when given. `hyperparameters`: default, the list
    in ``table.attrs["hyperparameters"]`` (a sweep writes it), else every other column that is
    not a metric (:data:`NOT_HYPERPARAMETERS`, ``train_*``, ``test_*``); either way without
    ``seed`` unless named, and without columns that take one value over the models.

    Returns one row per measure (:data:`RANKING_COLUMNS`), the scored ones first by |`compare`|
    (largest first), then those not scored: ``direction`` (expected sign: +1 a larger value
    should go with a larger gap, −1 the reverse, 0 no stated expectation), each score with
    ``_low`` / ``_high`` bounds, ``vs_reference`` (oriented `compare` score minus the
    reference's) with its bounds, ``p_value`` and ``p_holm``, ``n_models`` (models where the
    measure is defined), ``aliases`` (columns identical to it over the models, not listed
    again) and ``note`` (why a measure is not scored). ``.attrs``: ``target``,
    ``hyperparameters``, ``granulated_by_axis`` ({measure: {h: ψ_h}}) with
    ``granulated_by_axis_interval`` ({measure: {h: [low, high]}}), ``cmi_conditioning``,
    ``excluded`` ({run: reason}), ``not_ranked`` ({column: reason}), ``leader``, ``n_models``,
    ``resampling`` and ``options``.
    """
    if not isinstance(table, pd.DataFrame):
        raise ConfigError(f"rank_correlation takes a pandas DataFrame, got {type(table).__name__}")
    opts = RankingOptions(bootstrap, level, seed, reference, compare, min_models, min_share, cmi,
                          max_train_error).checked()
    columns = [str(c) for c in table.columns]
    if target not in table.columns:
        raise ConfigError(f"unknown target column {target!r}; the table has: {', '.join(columns)}")
    directions, not_ranked = _measures(table, target, measures)
    measures = list(directions)
    keep, excluded = eligible_models(table, max_train_error=opts.max_train_error)
    target_all = _numeric(table, target)
    keep &= ~np.isnan(target_all)
    data = table[keep].reset_index(drop=True)
    values = {m: _numeric(data, m) for m in measures}
    g = target_all[keep]
    n = len(g)
    hp = _hyperparameters(data, np.ones(n, dtype=bool), target, measures, hyperparameters) if n \
        else []
    codes = {h: pd.factorize(_axis_values(data, h), use_na_sentinel=False)[0] for h in hp}
    cell = cell_codes(list(codes.values()), n)
    seeds = "seed" in data.columns and "seed" not in hp and n > 0
    repeated = seeds and len(codes) > 0 and len(np.unique(cell)) < n and bool(
        pd.Series(_axis_values(data, "seed").to_numpy()).groupby(cell).nunique().gt(1).any())
    clusters = cell if repeated else np.arange(n)
    W = resample(n, clusters, opts.bootstrap, opts.seed)
    sy = signs(g)
    cmi_score = cmi_paper if opts.cmi == "paper" else cmi_pgdl

    rows: dict[str, dict[str, Any]] = {}
    replicates: dict[str, np.ndarray] = {}
    by_axis, by_axis_interval, conditioning = {}, {}, {}
    aliases: dict[str, list[str]] = {}
    seen: dict[bytes, str] = {}
    needed = max(opts.min_models, math.ceil(opts.min_share * n))
    for name in measures:
        mu = values[name]
        defined = ~np.isnan(mu)
        row = {c: math.nan for c in RANKING_COLUMNS}
        row.update(measure=name, direction=directions.get(name, 0), n_models=int(defined.sum()),
                   aliases="", note="")
        rows[name] = row
        fingerprint = np.where(defined, mu, np.inf).tobytes() + defined.tobytes()
        if fingerprint in seen and defined.any():
            aliases.setdefault(seen[fingerprint], []).append(name)
            row["note"] = f"identical to {seen[fingerprint]} over the models"
            continue
        seen[fingerprint] = name
        if row["n_models"] < needed:
            row["note"] = (f"defined on {row['n_models']} of {n} models; scoring needs at least "
                           f"{needed} (min_models {opts.min_models}, min_share {opts.min_share:g})")
            continue
        if len(np.unique(mu[defined])) < 2 or len(np.unique(g[defined])) < 2:
            row["note"] = ("constant over the models" if len(np.unique(mu[defined])) < 2 else
                           f"the {target} is constant over these models")
            continue
        psi, chosen, replicates[name] = _score(row, mu, sy, codes, W, opts, cmi_score)
        by_axis[name] = {h: float(v[0]) for h, v in psi.items() if np.isfinite(v[0])}
        by_axis_interval[name] = {h: list(interval(v[1:], opts.level, v[0])) for h, v in psi.items()
                                  if np.isfinite(v[0])}
        conditioning[name] = chosen
    for name, names in aliases.items():
        rows[name]["aliases"] = ", ".join(names)
    _compare_with_reference(rows, replicates, opts)

    order = sorted(rows, key=lambda m: (m not in replicates,
                                        -replicates[m][0] if m in replicates else 0.0))
    ranking = pd.DataFrame([rows[m] for m in order], columns=list(RANKING_COLUMNS))
    ranking["direction"] = ranking["direction"].astype(int)
    ranking["n_models"] = ranking["n_models"].astype(int)
    ranking.attrs = {
        "target": target, "hyperparameters": hp, "n_models": n,
        "granulated_by_axis": by_axis, "granulated_by_axis_interval": by_axis_interval,
        "cmi_conditioning": conditioning, "excluded": excluded, "not_ranked": not_ranked,
        "resampling": (f"whole configurations of ({', '.join(hp)})" if repeated else "models"),
        "leader": _leader(order, replicates, opts, n), "options": asdict(opts),
        "correction": CORRECTION}
    return ranking


def _measures(table: pd.DataFrame, target: str, measures: Sequence[str] | None
              ) -> tuple[dict[str, int], dict[str, str]]:
    """({measure: expected direction}, {column: why it is not ranked}): the registered measures
    among the columns (:func:`genprobe.measures.classify`, with the probe options in
    ``table.attrs``), or the columns `measures` names (direction 0 when not registered)."""
    from .registry import classify

    if measures is None:
        attrs = table.attrs
        directions, not_ranked = classify([str(c) for c in table.columns if c != target],
                                          probes=attrs.get("probes"),
                                          baselines=attrs.get("baselines"),
                                          user=attrs.get("user_measures"))
        if not directions:
            raise ConfigError("the table has no registered measure columns ('baseline.*', a "
                              "probe's measures, 'user.*'); pass measures=[...] to rank others")
        return directions, not_ranked
    measures = _columns(table, measures, "measure")
    if not measures:
        raise ConfigError("measures=[] names no measure column; pass at least one")
    known, _ = classify(measures)
    return {m: known.get(m, 0) for m in measures}, {}


def _score(row: dict[str, Any], mu: np.ndarray, sy: np.ndarray, codes, W: np.ndarray,
           opts: RankingOptions, cmi_score) -> tuple[dict[str, np.ndarray], Any, np.ndarray]:
    """Fill `row` with the measure `mu`'s three scores and their intervals over the resamples
    `W` (none below :data:`MIN_INTERVAL_MODELS` models); return its per-axis granulated
    replicates, the CMI's conditioning, and the replicates of the oriented `compare` score."""
    defined = ~np.isnan(mu)
    resampled = row["n_models"] >= MIN_INTERVAL_MODELS
    Wm = (W if resampled else W[:1]) * defined[None, :]
    sx = signs(np.where(defined, mu, 0.0))
    tau = _padded(tau_b(sx, sy, Wm), len(W))
    gran, psi = granulated(sx, sy, codes, Wm)
    gran, psi = _padded(gran, len(W)), {h: _padded(v, len(W)) for h, v in psi.items()}
    score, chosen = cmi_score(sx, sy, codes, Wm)
    score = _padded(score, len(W))
    if not resampled:
        row["note"] = (f"no interval: {row['n_models']} models (a bootstrap interval of a rank "
                       f"correlation needs at least {MIN_INTERVAL_MODELS})")
    for key, rep in (("kendall_tau", tau), ("granulated_tau", gran), ("cmi", score)):
        row[key] = float(rep[0])
        row[f"{key}_low"], row[f"{key}_high"] = interval(rep[1:], opts.level, rep[0])
    point = {"kendall_tau": tau, "granulated_tau": gran, "cmi": score}[opts.compare]
    sign = 1.0 if opts.compare == "cmi" or not point[0] < 0 else -1.0
    return psi, chosen, sign * point


def _compare_with_reference(rows: dict[str, dict[str, Any]], replicates: dict[str, np.ndarray],
                            opts: RankingOptions) -> None:
    """Each scored measure's paired difference from the reference's oriented score, its
    interval, p-value and Holm-adjusted p-value, into `rows`."""
    ref = opts.reference
    if ref is not None and ref in replicates:
        p = {}
        for name, rep in replicates.items():
            diff = rep - replicates[ref]
            row = rows[name]
            row["vs_reference"] = float(diff[0])
            row["vs_reference_low"], row["vs_reference_high"] = interval(diff[1:], opts.level,
                                                                          diff[0])
            p[name] = p_value(diff[1:], diff[0]) if name != ref else math.nan
        adjusted = holm(list(p.values()))
        for (name, value), q in zip(p.items(), adjusted, strict=True):
            rows[name]["p_value"], rows[name]["p_holm"] = value, float(q)
    elif ref is not None and ref in rows:
        rows[ref]["note"] = rows[ref]["note"] or "the reference, not scored"


def _padded(scores: np.ndarray, rows: int) -> np.ndarray:
    """Scores of the point estimate alone (no resamples) padded with NaN to `rows`."""
    return np.concatenate([scores, np.full(rows - len(scores), np.nan)])


def _leader(order: list[str], replicates: Mapping[str, np.ndarray], opts: RankingOptions,
            n: int) -> dict[str, Any]:
    """Whether the best-scored measure is separated from the next one: their paired bootstrap
    difference of the oriented `compare` score, its interval, and when it includes 0, about how
    many models would separate them at the observed spread."""
    scored = [m for m in order if m in replicates]
    if not scored:
        return {}
    out: dict[str, Any] = {"best": scored[0], "score": opts.compare,
                           "value": float(replicates[scored[0]][0])}
    if len(scored) < 2:
        out["separated"] = None
        return out
    diff = replicates[scored[0]] - replicates[scored[1]]
    low, high = interval(diff[1:], opts.level, diff[0])
    out |= {"second": scored[1], "difference": float(diff[0]), "low": low, "high": high,
            "separated": bool(math.isfinite(low) and low > 0)}
    if not math.isfinite(low):
        out["models_needed"] = MIN_INTERVAL_MODELS if n < MIN_INTERVAL_MODELS else None
    if not out["separated"] and diff[0] > 0 and math.isfinite(high):
        half = (high - low) / 2.0
        out["models_needed"] = int(math.ceil(n * (half / diff[0]) ** 2))
    return out


def rank_sweep(table: pd.DataFrame, **overrides: Any) -> pd.DataFrame:
    """:func:`rank_correlation` of a sweep's table with the sweep's own ``ranking`` options
    (``table.attrs["ranking"]``, from its config) updated by `overrides` (None values ignored):
    the one rule ``genprobe measures`` and the report share."""
    options = RankingOptions.from_mapping(table.attrs.get("ranking"), "the sweep's ranking")
    return rank_correlation(table, **(asdict(options) | {k: v for k, v in overrides.items()
                                                         if v is not None}))


_SCORE_NAMES = {"kendall_tau": "Kendall's τ", "granulated_tau": "granulated τ", "cmi": "CMI"}


def _finite(value) -> bool:
    """A finite number (NaN comes back from a JSON document as None)."""
    return isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def format_score(row: Mapping[str, Any], score: str, missing: str = "–") -> str:
    """A ranking row's `score` as ``"+0.42 [+0.21, +0.63]"`` (CMI without a sign; no brackets
    without an interval; `missing` when the score is NaN or None) — the headline's, the CLI's and
    the report's one format."""
    value, low, high = row[score], row[f"{score}_low"], row[f"{score}_high"]
    if not _finite(value):
        return missing
    fmt = "{:.2f}" if score == "cmi" else "{:+.2f}"
    bounds = f" [{fmt.format(low)}, {fmt.format(high)}]" if _finite(low) and _finite(high) else ""
    return fmt.format(value) + bounds


def headline(ranking: pd.DataFrame) -> str:
    """One paragraph that says what the ranking supports: the best measure when its interval
    separates it from the next one, and otherwise that the family is too small to separate them
    (with about how many models would at the observed spread)."""
    attrs = ranking.attrs
    n, target = attrs.get("n_models", 0), attrs.get("target", "gap")
    options = attrs.get("options", {})
    level = options.get("level", 0.95)
    excluded = attrs.get("excluded", {})
    kinds: dict[str, int] = {}
    for why in excluded.values():
        kind = ("collapsed or under-fit" if why.startswith("collapsed") else
                "did not reach the training target" if why.startswith("did not reach") else
                "did not finish")
        kinds[kind] = kinds.get(kind, 0) + 1
    left = (f" ({len(excluded)} run{'s' if len(excluded) != 1 else ''} left out: "
            + ", ".join(f"{k} {kind}" for kind, k in kinds.items()) + ")") if excluded else ""
    scored = ranking.dropna(subset=[options.get("compare", "kendall_tau")])
    leader = attrs.get("leader", {})
    if scored.empty or not leader:
        notes = ranking["note"].replace("", np.nan).dropna()
        why = f" ({notes.iloc[0]})" if len(notes) else ""
        return (f"Over {n} models{left}, no measure could be scored against the {target}{why}.")
    score = leader.get("score", "kendall_tau")
    best = scored.iloc[0]
    name = _SCORE_NAMES[score]
    interval = (f" ({level:.0%} bootstrap interval, resampling "
                f"{attrs.get('resampling', 'models')})" if math.isfinite(best[f"{score}_low"])
                else "")
    text = (f"Over {n} models{left}, {best['measure']} has the strongest {name} with the "
            f"{target}: {format_score(best, score)}{interval}.")
    if leader.get("separated") is None:
        return text + " It is the only measure scored."
    second = scored.iloc[1]
    difference = (f"{leader['difference']:+.2f} [{leader['low']:+.2f}, {leader['high']:+.2f}]"
                  if math.isfinite(leader.get("low", math.nan)) else f"{leader['difference']:+.2f}")
    if leader["separated"]:
        return text + (f" It is separated from the next, {second['measure']} "
                       f"({format_score(second, score)}): the paired difference "
                       f"is {difference}.")
    if not math.isfinite(leader.get("low", math.nan)):
        return text + (f" The next is {second['measure']} "
                       f"({format_score(second, score)}). With {n} models no "
                       f"interval can be drawn (a bootstrap interval of a rank correlation needs "
                       f"at least {MIN_INTERVAL_MODELS}): this family is too small to call any "
                       f"measure the best.")
    text += (f" Its interval does not separate it from the next, {second['measure']} "
             f"({format_score(second, score)}; paired difference "
             f"{difference}): this family is too small to tell them apart")
    needed = leader.get("models_needed")
    if needed:
        text += f"; at the observed spread about {needed:,} models would"
    return text + "."



__all__ = ["CMI_CONVENTIONS", "NOT_HYPERPARAMETERS", "RANKING_COLUMNS", "RankingOptions",
           "SCORES", "eligible_models", "format_score", "headline",
           "rank_correlation", "rank_sweep"]
