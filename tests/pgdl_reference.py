"""Reference transcription of the PGDL (NeurIPS 2020) scoring function, for tests only.

Source
------
The competition's public starting kit, as committed in "Add starting_kit code" (2020-07-15) to
the GitHub repository ``cadurosar/pgdl`` (commit 14452c11c038175b25b6bb9d3a11a7de945135fd).
``samiul272/pgdl_proposal`` holds an identical copy (only the indentation differs):

* ``scoring_program/mutual_information.py`` has the arithmetic: ``conditional_mutual_information``
  (the entry point), ``build_mi_table``, ``create_combination_name``, ``make_key_from_models``,
  ``total_mi_from_table``, ``mi_from_table`` and ``entropy``. (``mi_empty_conditioning_set_table``
  exists but is never reached, and it would crash: it uses the undefined names ``all_model_repr``
  and ``all_table``.)
* ``scoring_program/metric.txt`` reads ``mutual_information``. ``scoring_program/my_metric.py``
  defines ``mutual_information(prediction, reference)``, which returns
  ``conditional_mutual_information(prediction, reference)`` unchanged.
* ``scoring_program/score.py`` calls that function once per task with ``prediction`` (model id ->
  complexity measure) and ``model_specs`` (model id -> {"hparams": {name: {"current_value",
  "possible_values"}}, "metrics": {"train_acc", "test_acc"}}).

``pgdl_cmi`` repeats the same steps in the same order and with the same float64 operations. It
uses loops and dicts, and it takes lists where the original takes JSON dicts.

Conventions of that code (this module follows each of them)
------------------------------------------------------------
Notation: a model's gap is ``g`` (the original computes ``train_acc - test_acc``; here the caller
gives it). Its measure is ``mu``.

Cells: conditioning on an ordered pair of hyper-parameter names ``(h1, h2)``, the cell of a pair
    ``(m1, m2)`` is the 4-tuple ``(m1[h1], m2[h1], m1[h2], m2[h2])``. The table's third axis lists
    *every* such tuple over the possible values, ``|V1|**2 * |V2|**2`` cells, including those where
    ``m1`` and ``m2`` share values. Cells are named by string concatenation
    ``str(a)+str(b)+str(c)+str(d)``, in the order built by ``create_combination_name`` (h1 is the
    outer loop; within one hyper-parameter the first model's value is outer). Two caveats follow.
    A name that two tuples share (for example values 1 and 11: "1"+"11" == "11"+"1") maps to the
    later index, which leaves the earlier cell empty. And a pair whose name is not in the list
    (a value not among the possible values) is skipped, like the original's ``except KeyError``.
(a) Averaging over cells: the mean is *unweighted*. For each cell the code computes the MI, H(gap
    sign) and H(measure sign) of its own 2x2 count table. Each of the three is summed over all
    cells and divided by the number of cells, however many pairs a cell holds. The score is the
    ratio of the means, ``mean_cells(MI) / mean_cells(H_gap)``, not a mean of ratios. On a complete
    grid with the same number of models per configuration, every cell holds the same count, so
    this equals the count-weighted I(V_g; V_mu | U) / H(V_g | U). On an unbalanced grid it does
    not. The measure-sign entropy is computed and not used.
(b) Pairing: the code loops over *all ordered pairs* ``(m1, m2)`` of models, ``m1 == m2``
    included: a nested loop over every model id. So each unordered pair is counted twice, once in
    each direction, and every model is also paired with itself.
(c) Signs and ties: the gap sign is ``'+'`` if ``g[m1] > g[m2]`` and ``'-'`` otherwise. The measure
    sign is ``'+'`` if ``mu[m1] > mu[m2]`` and ``'-'`` otherwise. The comparison is strict, so a tie
    (self-pairs included, and any NaN) counts as ``'-'``. This is not symmetric: a self-pair or a
    tie always lands in the (gap '-', measure '-') entry. In each 2x2 table, row 0 is gap '+',
    row 1 is gap '-', column 0 is measure '+' and column 1 is measure '-'.
(d) Logs and normalisation: everything is in base 2. Inside a cell with N pairs:
    ``MI = sum over entries with n_ij > 0 of (n_ij/N) * log2((n_ij/N) / ((r_i/N) * (c_j/N)))``,
    where r and c are the row and column sums. Zero entries are skipped and no epsilon is used.
    ``H_gap = -sum_i (r_i/N) * log2(r_i/N + 1e-12)``: an epsilon of 1e-12 is added *inside* the log
    and nothing else is clipped. So a deterministic cell gives ``H_gap = -log2(1 + 1e-12)``, about
    -1.4427e-12 (slightly negative, not 0), and a cell with both signs gives H(p) minus about
    2.885e-12. The normaliser is the cell-mean of H(gap sign), i.e. H(V_g | U) with uniform cell
    weights. It does not involve the measure.
(e) Minimum: the code takes the min over *ordered* pairs ``(h1, h2)`` with ``h1 != h2``, using the
    hyper-parameter names of the first model in their dict order. Both orders of each unordered
    pair are evaluated; they give the same value up to float summation order. Only conditioning
    sets of size exactly 2 are used: no single hyper-parameters and no empty set. The running
    minimum starts at ``inf`` and is updated as ``min_mi = min(mi, min_mi)`` (Python's builtin).
(f) Degenerate cases, none of them special-cased:
    * fewer than 2 hyper-parameters: there is no pair, so the result is ``inf``;
    * every cell's gap sign is deterministic (e.g. only 2 hyper-parameters and one model per
      configuration, or a gap that depends only on h1, h2): the MI sum is exactly 0 and the
      H mean is about -1.44e-12, so the ratio is ``-0.0``;
    * an empty cell (a possible value never used, a combination missing from the grid, or the name
      collision above): 0/0 gives NaN in that cell and therefore for that ``(h1, h2)``. Under
      ``min(mi, min_mi)`` a NaN becomes the running minimum (``min(nan, x)`` is nan), and the next
      non-NaN pair replaces it (``min(y, nan)`` is y). So a NaN survives only if it comes from the
      last pair(s) evaluated.
    (``score.py``'s ``check_data_validity`` rejects a task whose hyper-parameter grid is not
    complete with each configuration present exactly once, so in the competition there were no
    seeds/duplicates and no empty cells.)
(g) Scaling: ``conditional_mutual_information`` returns the unscaled ratio, which is about in
    [0, 1]. That value is the per-task score ("task_<name>_score" in scores.txt). ``score.py``
    then reports ``task_average_score = 100 * mean over tasks`` (0 if any prediction was
    "EXCEEDED"). ``pgdl_cmi`` returns the unscaled per-task value.

The only departure from the original is the input form. ``hyperparameters[k]``, ``gaps[k]`` and
``measure[k]`` describe model k. The possible values of each hyper-parameter are the distinct
values seen, in order of first appearance, unless ``possible_values`` is given. The original read
them from the first model's spec, and that order changes only the float summation order.
When this file was written, ``pgdl_cmi(..., possible_values=...)`` was checked against the
original ``conditional_mutual_information`` on 300 random tables (2-4 hyper-parameters, 2-3
values, 1-2 seeds, ties, incomplete grids) and gave identical floats every time (NaN and -0.0
included).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

_GAP_ROW = {"+gap": 0, "-gap": 1}
_MEASURE_COL = {"+measure": 0, "-measure": 1}
_LOG_EPS = 1e-12


def _cell_names(conditioning: dict[str, list]) -> list[str]:
    """The names of all cells, in table order (as ``create_combination_name``)."""
    names: list[str] = []
    for values in conditioning.values():
        # every ordered (value of m1, value of m2) for this hyper-parameter, m1's value outer
        own = [str(v) + str(w) for v in values for w in values]
        names = own if not names else [prefix + suffix for prefix in names for suffix in own]
    return names


def _pair_name(hp1: dict, hp2: dict, conditioning: dict[str, list]) -> str:
    """The cell name of the ordered pair (as ``make_key_from_models``)."""
    return "".join(str(hp1[h]) + str(hp2[h]) for h in conditioning)


def _count_table(hparams, gaps, measure, conditioning: dict[str, list]) -> np.ndarray:
    """Counts of (gap sign, measure sign, cell) over all ordered pairs, self-pairs included
    (as ``build_mi_table``)."""
    n_cells = 1
    for values in conditioning.values():
        n_cells *= len(values) ** 2
    names = _cell_names(conditioning)
    assert len(names) == n_cells
    cell_index = {name: i for i, name in enumerate(names)}  # a repeated name keeps its last index
    table = np.zeros((2, 2, n_cells))
    for m1 in range(len(gaps)):
        for m2 in range(len(gaps)):
            gap_sign = "+gap" if gaps[m1] > gaps[m2] else "-gap"  # ties -> '-'
            measure_sign = "+measure" if measure[m1] > measure[m2] else "-measure"  # ties -> '-'
            name = _pair_name(hparams[m1], hparams[m2], conditioning)
            if name not in cell_index:  # the original catches the KeyError and skips the pair
                continue
            table[_GAP_ROW[gap_sign], _MEASURE_COL[measure_sign], cell_index[name]] += 1
    return table


def _entropy_bits(counts: np.ndarray) -> np.floating:
    """-sum p log2(p + 1e-12) with p = counts / counts.sum() (as ``entropy``)."""
    p = counts / counts.sum()
    return -np.sum(p * np.log2(p + _LOG_EPS))


def _cell_scores(cell: np.ndarray) -> tuple[float, np.floating, np.floating]:
    """(MI, H(gap sign), H(measure sign)) of one 2x2 table (as ``mi_from_table``)."""
    n = cell.sum()
    gap_counts = np.sum(cell, axis=1)  # rows: gap sign
    measure_counts = np.sum(cell, axis=0)  # columns: measure sign
    h_gap = _entropy_bits(gap_counts)
    h_measure = _entropy_bits(measure_counts)
    mi = 0.0
    for i in range(2):
        for j in range(2):
            joint = cell[i, j] / n
            if joint == 0:  # NaN (empty cell) is not == 0 and goes on into the sum
                continue
            mi += joint * np.log2(joint / ((gap_counts[i] / n) * (measure_counts[j] / n)))
    return mi, h_gap, h_measure


def _normalized_cmi(table: np.ndarray) -> np.floating:
    """Unweighted cell-means of MI and H(gap sign), and their ratio (as ``total_mi_from_table``)."""
    n_cells = table.shape[-1]
    sum_mi = sum_h_gap = sum_h_measure = 0.0
    for k in range(n_cells):
        mi, h_gap, h_measure = _cell_scores(table[:, :, k])
        sum_mi += mi
        sum_h_gap += h_gap
        sum_h_measure += h_measure  # computed as in the original, never used
    return (sum_mi / n_cells) / (sum_h_gap / n_cells)


def pgdl_cmi(
    hyperparameters: list[dict],
    gaps: list[float],
    measure: list[float],
    *,
    possible_values: dict[str, Sequence[Hashable]] | None = None,
) -> float:
    """The PGDL competition's per-task score of ``measure`` (as ``conditional_mutual_information``).

    ``hyperparameters[k]`` maps each hyper-parameter name to model k's value (the same names for
    every model), ``gaps[k]`` is model k's generalization gap (train minus test accuracy) and
    ``measure[k]`` its complexity measure. ``possible_values`` optionally gives each name's list of
    values, as the original reads them from ``model_specs``. By default they are the distinct values
    seen, in order of first appearance. Returns the min over ordered pairs of distinct names of
    mean-over-cells MI / mean-over-cells H(gap sign), unscaled (see the module docstring).
    """
    if not (len(hyperparameters) == len(gaps) == len(measure)) or not gaps:
        raise ValueError("need one dict of hyper-parameters, one gap and one measure per model")
    names = list(hyperparameters[0])
    if any(set(h) != set(names) for h in hyperparameters):
        raise ValueError("every model must have the same hyper-parameter names")
    values: dict[str, list] = {}
    for name in names:
        if possible_values is not None:
            values[name] = list(possible_values[name])
        else:
            values[name] = []
            for h in hyperparameters:
                if h[name] not in values[name]:
                    values[name].append(h[name])
    with np.errstate(divide="ignore", invalid="ignore"):  # empty cells: 0/0 -> NaN, as the original
        lowest = math.inf
        for h1 in names:
            for h2 in names:
                if h1 == h2:
                    continue
                conditioning = {h1: values[h1], h2: values[h2]}
                table = _count_table(hyperparameters, gaps, measure, conditioning)
                # builtin min, in this argument order: it decides what happens to a NaN
                lowest = min(_normalized_cmi(table), lowest)
    return float(lowest)
