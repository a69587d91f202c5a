"""Sanity checks of the PGDL scoring reference (tests/pgdl_reference.py) on tiny hand-made tables.

Every expected value below was derived by hand from the conventions in that module's docstring.
Notation: in a cell's 2x2 table, (+,-) means gap sign '+' and measure sign '-'. A tie, a self-pair
included, signs '-'. "eps" is the 1e-12 inside the entropy's log2, so a deterministic cell has
H = -log2(1 + 1e-12), about -1.44e-12.
"""

from __future__ import annotations

import itertools
import math

import pytest

from pgdl_reference import pgdl_cmi

LOG2_3 = math.log2(3)
H_QUARTER = 2 - 0.75 * LOG2_3  # H(1/4) in bits
H_THIRD = LOG2_3 - 2 / 3  # H(1/3) in bits
MI_ANTI_2 = 0.5 * math.log2(32 / 27)  # MI of the cell {(+,-): 1, (-,+): 1, (-,-): 2}
MI_ANTI_3 = math.log2(27 / 16) / 3  # MI of the cell {(+,-): 3, (-,+): 3, (-,-): 3}


def grid(names, seeds, gap_of, measure_of=None):
    """One model per (configuration, seed): hyper-parameters in {0, 1}. ``seeds`` is an int, or
    a function of the configuration giving its number of seeds. The measure defaults to the gap."""
    hps, gaps, measure = [], [], []
    for values in itertools.product([0, 1], repeat=len(names)):
        config = dict(zip(names, values, strict=True))
        for s in range(seeds if isinstance(seeds, int) else seeds(config)):
            hps.append(config)
            gaps.append(gap_of(config, s))
            measure.append((measure_of or gap_of)(config, s))
    return hps, gaps, measure


def f2(c):
    """A distinct integer 0..3 per configuration of (a, b)."""
    return 2 * c["a"] + c["b"]


def generic_gap(c, s):
    """Distinct gaps on a 2x2x2 grid with up to 3 seeds."""
    return 0.37 * c["a"] + 0.11 * c["b"] + 0.05 * c["c"] + 0.013 * s


def test_measure_equal_to_gap_on_2x2x2_with_2_seeds():
    # Equal values give equal signs, ties included, so every cell holds only (+,+) and (-,-):
    # MI = H(gap sign) exactly. The 1e-12 in the entropy makes each H about 1.4e-12 to 2.9e-12
    # smaller. Each diagonal cell holds 4 models, so 16 pairs: 6 '+', 10 '-'. Hence
    # sum(H) >= 4 * H(6/16) > 3, and the ratio is just above 1.
    hps, gaps, _ = grid("abc", 2, generic_gap)
    value = pgdl_cmi(hps, gaps, list(gaps))
    assert 1.0 < value < 1.0 + 1e-10


def test_constant_measure_scores_zero():
    # Every measure sign is '-' (a tie), so in each cell every joint probability equals its
    # gap-row marginal and each MI term is log2(1) = 0 exactly. The mean H is > 0, so the result
    # is +0.0.
    hps, gaps, _ = grid("abc", 2, generic_gap)
    value = pgdl_cmi(hps, gaps, [5.0] * len(gaps))
    assert value == 0.0 and math.copysign(1.0, value) == 1.0


def test_fewer_than_two_hyperparameters_give_inf():
    # Only ordered pairs of distinct names are tried: none exist, so the running min stays inf.
    assert pgdl_cmi([{"a": 0}, {"a": 1}], [0.1, 0.2], [1.0, 2.0]) == math.inf
    assert pgdl_cmi([{}, {}], [0.1, 0.2], [1.0, 2.0]) == math.inf


def test_two_hyperparameters_one_model_each_scores_minus_zero():
    # Each of the 16 cells holds exactly one ordered pair: MI = 0 and H = -log2(1+1e-12) < 0,
    # so the ratio is 0 / negative = -0.0, whatever the measure.
    hps, gaps, _ = grid("ab", 1, lambda c, s: f2(c) / 10)
    value = pgdl_cmi(hps, gaps, list(gaps))
    assert value == 0.0 and math.copysign(1.0, value) == -1.0


def test_gap_explained_by_a_conditioning_pair_scores_minus_zero():
    # The gap depends only on a, so conditioning on (a, b) or (a, c) fixes each cell's gap sign:
    # MI = 0 and H about -1.44e-12 in every cell, giving -0.0. That is below the ~1 of (b, c),
    # even though the measure equals the gap.
    hps, gaps, _ = grid("abc", 2, lambda c, s: 0.1 * c["a"])
    value = pgdl_cmi(hps, gaps, list(gaps))
    assert value == 0.0 and math.copysign(1.0, value) == -1.0


def gap_2x2(c, s):
    """On the (a, b) grid: the configuration decides every cross-configuration comparison and the
    seed decides the comparison within a configuration."""
    return 10 * f2(c) + s


def test_self_pairs_and_ties_make_a_reversed_measure_score_low():
    # Two hyper-parameters, 2 seeds. There are 16 cells, and the 12 whose two configurations
    # differ have a deterministic gap sign (MI = 0, H ~ -1.44e-12). Each of the 4 diagonal cells
    # holds the seed pairs (0,0), (1,1) [ties: (-,-)], (1,0) and (0,1).
    hps, gaps, _ = grid("ab", 2, gap_2x2)
    # measure = gap: (+,+): 1, (-,-): 3, so MI = H(1/4) = H_gap and the ratio is ~1.
    assert pgdl_cmi(hps, gaps, list(gaps)) == pytest.approx(1.0, abs=1e-10)
    # measure = -gap: (+,-): 1, (-,+): 1, (-,-): 2 (self-pairs), so MI = 1/2 log2(32/27), not 1 bit.
    expected = 4 * MI_ANTI_2 / (4 * H_QUARTER)
    assert pgdl_cmi(hps, gaps, [-g for g in gaps]) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.151066, abs=1e-6)


def test_measure_independent_of_gap_within_cells_scores_zero():
    # Two hyper-parameters, 3 seeds. The gap rises with the seed, and the measure is [1, 2, 0] by
    # seed. Each diagonal cell gets (+,+): 1 [seeds (1,0)], (+,-): 2 [(2,0), (2,1)],
    # (-,+): 2 [(0,2), (1,2)], (-,-): 4 [(0,1) and the 3 self-pairs]. Both marginals are 3/9 '+',
    # so the table is a product and MI = 0 up to rounding. The other cells have a deterministic gap.
    hps, gaps, measure = grid("ab", 3, gap_2x2, lambda c, s: [1.0, 2.0, 0.0][s])
    assert pgdl_cmi(hps, gaps, measure) == pytest.approx(0.0, abs=1e-12)


def test_cells_are_averaged_without_weights():
    # As the reversed-measure test, but configuration (0, 0) has 3 seeds: its diagonal cell holds
    # 9 pairs, (+,-): 3, (-,+): 3, (-,-): 3, so MI = 1/3 log2(27/16) and H = H(1/3). The other
    # diagonal cells hold 4 pairs each (MI_ANTI_2, H(1/4)).
    hps, gaps, _ = grid("ab", lambda c: 3 if f2(c) == 0 else 2, gap_2x2)
    value = pgdl_cmi(hps, gaps, [-g for g in gaps])
    unweighted = (MI_ANTI_3 + 3 * MI_ANTI_2) / (H_THIRD + 3 * H_QUARTER)
    by_counts = (9 * MI_ANTI_3 + 4 * 3 * MI_ANTI_2) / (9 * H_THIRD + 4 * 3 * H_QUARTER)
    assert value == pytest.approx(unweighted, rel=1e-9)
    assert abs(unweighted - by_counts) > 0.02


def test_empty_cells_give_nan_and_the_min_keeps_only_a_trailing_nan():
    hps, gaps, _ = grid("abc", 2, generic_gap)
    # c may also be 2, which no model has: every cell that uses c = 2 is empty, so each pair that
    # conditions on c gives NaN. The min keeps a NaN only if no non-NaN pair comes after it.
    values = {"a": [0, 1], "b": [0, 1], "c": [0, 1, 2]}
    # names (a, b, c): the last pair evaluated is (c, b), which is NaN
    assert math.isnan(pgdl_cmi(hps, gaps, list(gaps), possible_values=values))
    # names (c, a, b): the last pair evaluated is (b, a), whose value (~1) replaces the NaN
    reordered = [{k: h[k] for k in "cab"} for h in hps]
    value = pgdl_cmi(reordered, gaps, list(gaps), possible_values=values)
    assert 1.0 < value < 1.0 + 1e-10


def test_colliding_cell_names_leave_an_empty_cell():
    # Values 1 and 11 give the names "1" + "11" == "11" + "1", so the two cells collapse into
    # one (the later index) and the earlier one stays empty: NaN for both orders of (a, b).
    hps = [{"a": a, "b": b} for a in (1, 11) for b in (0, 1)]
    gaps = [0.1, 0.2, 0.3, 0.4]
    assert math.isnan(pgdl_cmi(hps, gaps, list(gaps)))
