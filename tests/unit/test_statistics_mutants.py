"""raymem.audit.statistics against independent computations from the statistical definitions: the textbook Wilson
score interval, Kish's design effect and the delete-one-group jackknife written as explicit loops, the
without-replacement flag probability from binomial coefficients, a stratified bootstrap drawn by hand (no Ray).

Written to pin down behaviour that mutation testing (tools/mutation.sh) found unchecked: edge cases (no trials, one
cluster, shares of 0 or 1, one evaluation patient, no exceedance), the method strings a report shows, and the
constants the documentation states."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from raymem.audit import statistics

Z_975 = 1.959963984540054  # standard normal 97.5 % quantile (printed tables: 1.95996)


def textbook_wilson(successes: float, n: float) -> tuple[float, float]:
    """Wilson (1927) in the form (x + z^2/2) / (n + z^2) +- z / (n + z^2) * sqrt(x (n - x) / n + z^2 / 4)."""
    z2 = Z_975**2
    centre = (successes + z2 / 2) / (n + z2)
    half = Z_975 / (n + z2) * math.sqrt(successes * (n - successes) / n + z2 / 4)
    return centre - half, centre + half


def kish_design_effect(flags, clusters) -> float:
    """Cluster-robust (ratio estimator) variance of mean(flags) over the binomial one, by explicit sums per cluster."""
    n = len(flags)
    p = sum(flags) / n
    names = sorted(set(clusters))
    total = {c: sum(f for f, k in zip(flags, clusters) if k == c) for c in names}
    size = {c: sum(1 for k in clusters if k == c) for c in names}
    robust = len(names) / (len(names) - 1) * sum((total[c] - p * size[c]) ** 2 for c in names) / n**2
    return robust / (p * (1 - p) / n)


# --- wilson_interval --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, n", [(5, 10), (3, 17), (1, 1000), (59, 60)])
def test_wilson_interval_is_the_textbook_score_interval(successes, n):
    assert statistics.wilson_interval(successes, n) == pytest.approx(textbook_wilson(successes, n), rel=1e-12)


def test_wilson_interval_of_5_of_10_matches_the_printed_value():
    """Newcombe (1998), table I: 5 of 10 -> 0.2366 to 0.7634."""
    assert statistics.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)


def test_wilson_interval_of_no_trials_is_the_whole_range():
    assert statistics.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_of_one_trial_is_not_the_whole_range():
    """n = 1 is data, not 'nothing is known': 1 of 1 gives a lower bound above 0."""
    lo, hi = statistics.wilson_interval(1, 1)
    assert (lo, hi) == pytest.approx(textbook_wilson(1, 1), rel=1e-12)


def test_wilson_interval_of_none_or_all_is_clipped_to_zero_and_one():
    """0 of 21 and 16 of 16: the formula's bound lands a rounding error outside 0-1 (-1e-17, 1 + 2e-16); the
    interval is clipped to the range a share can take."""
    none_lo, none_hi = statistics.wilson_interval(0, 21)
    all_lo, all_hi = statistics.wilson_interval(16, 16)
    assert (none_lo, all_hi) == (0.0, 1.0)
    assert (none_hi, all_lo) == pytest.approx((textbook_wilson(0, 21)[1], textbook_wilson(16, 16)[0]), rel=1e-12)


def test_wilson_interval_of_none_or_all_has_the_share_itself_as_its_bound():
    """0 of 24 gives a lower bound of 2.8e-17 by the formula, an interval that misses its own share 0 (the held-out
    copy benchmark's check caught it; 171 of these 398 cases failed before); every n below 200 is tried, with and
    without a design effect."""
    missed = [(n, design_effect) for n in range(1, 200) for design_effect in (1.0, 2.5)
              if statistics.wilson_interval(0, n, design_effect=design_effect)[0] != 0.0
              or statistics.wilson_interval(n, n, design_effect=design_effect)[1] != 1.0]
    assert missed == []


@pytest.mark.parametrize("successes, n", [(0, 24), (24, 24), (1, 3), (7, 9), (0.4, 2)])
def test_wilson_interval_holds_its_share(successes, n):
    lo, hi = statistics.wilson_interval(successes, n, design_effect=1.7)
    assert lo <= successes / n <= hi


def test_a_design_effect_gives_the_interval_at_the_effective_size():
    """12 of 60 with design effect 2.5: Wilson at n = 24 with the same share (4.8 of 24)."""
    got = statistics.wilson_interval(12, 60, design_effect=2.5)
    assert got == pytest.approx(textbook_wilson(4.8, 24), rel=1e-12)


def test_a_design_effect_below_one_does_not_narrow_the_interval():
    assert statistics.wilson_interval(12, 60, design_effect=0.5) == pytest.approx(textbook_wilson(12, 60), rel=1e-12)


def test_share_scaled_gives_percentages():
    assert statistics.Share(0.25, 0.125, 0.5, "m").scaled(100) == (25.0, [12.5, 50.0])


# --- design_effect ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, clusters", [
    ([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], ["a", "a", "a", "b", "b", "b", "c", "c", "d", "d"]),
    ([1, 1, 0, 0], ["a", "a", "b", "b"]),  # two clusters: the smallest number with a variance between clusters
    ([1, 1, 1, 1, 0, 1, 0, 0, 0], [7, 7, 7, 3, 3, 3, 12, 12, 12]),  # numeric labels
])
def test_design_effect_is_kishs_cluster_robust_ratio(flags, clusters):
    expected = kish_design_effect(flags, clusters)
    assert expected > 1  # the example clusters its flags
    assert statistics.design_effect(np.array(flags), np.array(clusters)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("flags, clusters", [
    ([1, 0, 1, 0], ["a", "a", "b", "b"]),  # same share in every cluster: robust variance 0 -> floor at 1
    ([1, 0, 1, 0], ["a", "a", "a", "a"]),  # one cluster
    ([0, 0, 0, 0], ["a", "a", "b", "b"]),  # share 0
    ([1, 1, 1, 1], ["a", "a", "b", "b"]),  # share 1
    ([], []),  # no samples
])
@pytest.mark.filterwarnings("error")  # and without numpy's division or empty-mean warnings in the audit's log
def test_design_effect_is_one_where_clusters_cannot_widen_the_interval(flags, clusters):
    assert statistics.design_effect(np.array(flags, dtype=float), np.array(clusters, dtype=str)) == 1.0


# --- share ------------------------------------------------------------------------------------------------------

def test_an_unclustered_share_is_the_mean_with_its_wilson_interval():
    flags = np.array([True] * 3 + [False] * 9)
    got = statistics.share(flags)
    assert (got.estimate, got.method) == (0.25, "Wilson score interval")
    assert (got.lo, got.hi) == pytest.approx(textbook_wilson(3, 12), rel=1e-12)


def test_an_empty_share_is_zero_with_the_whole_range():
    assert statistics.share(np.array([], dtype=bool)) == statistics.Share(0.0, 0.0, 1.0, "Wilson score interval")


def test_a_share_clustered_by_patient_uses_wilson_at_n_over_the_design_effect():
    flags = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    patients = ["a", "a", "a", "b", "b", "b", "c", "c", "d", "d"]
    deff = kish_design_effect(flags, patients)

    got = statistics.share(np.array(flags), np.array(patients))

    assert (got.estimate, got.lo, got.hi) == pytest.approx((0.4, *textbook_wilson(4 / deff, 10 / deff)), rel=1e-12)
    assert got.method == ("Wilson score interval at the effective sample size n / design effect (clusters: "
                          "patients)")


def test_a_share_clustered_by_the_flagging_sample_counts_each_unflagged_unit_alone():
    """Units 0-2 flagged by generated sample 5, unit 3 by sample 9; the unflagged units 4-7 (whatever flagged_by
    holds for them) are clusters of one."""
    flags = [1, 1, 1, 1, 0, 0, 0, 0]
    flagged_by = [5, 5, 5, 9, 5, 5, 9, 9]
    deff = kish_design_effect(flags, ["5", "5", "5", "9", "u4", "u5", "u6", "u7"])

    got = statistics.share(np.array(flags, dtype=bool), flagged_by=np.array(flagged_by))

    assert (got.lo, got.hi) == pytest.approx(textbook_wilson(4 / deff, 8 / deff), rel=1e-12)
    assert got.method.endswith("(clusters: the generated sample that flags each)")


def test_two_clusterings_add_their_design_effects_minus_one():
    flags = [1, 1, 1, 1, 0, 0, 0, 0]
    patients = ["a", "a", "b", "b", "b", "c", "c", "c"]
    flagged_by = [5, 5, 5, 9, 0, 0, 0, 0]
    deff = (kish_design_effect(flags, patients)
            + kish_design_effect(flags, ["5", "5", "5", "9", "u4", "u5", "u6", "u7"]) - 1)

    got = statistics.share(np.array(flags, dtype=bool), np.array(patients), np.array(flagged_by))

    assert (got.lo, got.hi) == pytest.approx(textbook_wilson(4 / deff, 8 / deff), rel=1e-12)
    assert got.method.endswith("(clusters: patients, the generated sample that flags each)")


# --- flag_probability -------------------------------------------------------------------------------------------

def test_flag_probability_is_one_minus_the_hypergeometric_chance_of_none():
    """4 draws of 10: 1 - C(10 - c, 4) / C(10, 4); c = 6 leaves exactly 4 free samples (1 of 210 subsets misses);
    c = 7 leaves 3, so every 4-subset holds one."""
    counts = np.array([0, 1, 3, 6, 7, 10])
    expected = [1 - math.comb(10 - c, 4) / math.comb(10, 4) for c in counts]

    got = statistics.flag_probability(counts, 10, 4)

    assert got == pytest.approx(expected, rel=1e-12, abs=0) and got[0] == 0.0 and got[4] == 1.0


def test_flag_probability_equals_the_share_of_draw_subsets_that_hold_an_exceedance():
    """Enumerated: of the C(6, 2) = 15 pairs of 6 samples, those holding one of samples {0, 1}: 9."""
    hits = sum(1 for pair in combinations(range(6), 2) if {0, 1} & set(pair))
    assert statistics.flag_probability(np.array([2]), 6, 2)[0] == pytest.approx(hits / 15, rel=1e-12)


def test_flag_probability_takes_one_evaluation_size_per_count():
    got = statistics.flag_probability(np.array([1, 1]), np.array([5, 8]), 3)
    assert got == pytest.approx([1 - math.comb(4, 3) / math.comb(5, 3), 1 - math.comb(7, 3) / math.comb(8, 3)])


def test_flag_probability_refuses_more_draws_than_evaluation_samples():
    with pytest.raises(AssertionError, match=r"^measure at most n_eval draws"):
        statistics.flag_probability(np.array([1, 2]), 4, 5)


def test_flag_probability_accepts_exactly_n_eval_draws():
    assert statistics.flag_probability(np.array([0, 1]), 4, 4) == pytest.approx([0.0, 1.0])


# --- memorized_rate_interval ------------------------------------------------------------------------------------

def jackknife_rate(pairs, n_train, eval_groups, n_draws, train_groups=None):
    """The docstring's estimator by explicit loops: units flagged through distinct (unit, evaluation sample) pairs,
    exact without-replacement rates at n' = min(n_draws, n_eval - largest group) draws, a delete-one-group
    jackknife, Wilson at the effective size est (1 - est) / se^2, estimate and upper end carried to n_draws."""
    unit_of = (lambda row: row) if train_groups is None else (lambda row: train_groups[row])
    units = list(range(n_train)) if train_groups is None else sorted(set(train_groups))
    above = {(unit_of(row), col) for row, col in pairs}
    names = sorted(set(eval_groups))
    n_eval = len(eval_groups)
    draws = min(n_draws, n_eval - max(eval_groups.count(g) for g in names))

    def rate(kept):
        n = len(kept)
        return sum(1 - math.comb(n - sum((u, c) in above for c in kept), draws) / math.comb(n, draws)
                   for u in units) / len(units)

    estimate = rate(range(n_eval))
    replicates = [rate([c for c in range(n_eval) if eval_groups[c] != g]) for g in names]
    mean = sum(replicates) / len(replicates)
    se = math.sqrt((len(names) - 1) / len(names) * sum((r - mean) ** 2 for r in replicates))
    n_effective = estimate * (1 - estimate) / se**2
    lo, hi = textbook_wilson(estimate * n_effective, n_effective)
    power = n_draws / draws
    return 1 - (1 - estimate) ** power, lo, 1 - (1 - hi) ** power


def test_the_memorized_rate_of_a_hand_example():
    """4 evaluation samples of 4 patients, 2 draws; training image 0 above the threshold with samples 0 and 1,
    image 1 with none: image 0 is flagged unless both draws miss them, 1 - C(2, 2) / C(4, 2) = 5/6; rate 5/12."""
    got = statistics.memorized_rate_interval([0, 0], [0, 1], 2, ["a", "b", "c", "d"], 2)
    assert got.estimate == pytest.approx(5 / 12, rel=1e-12)


@pytest.mark.parametrize("n_draws", [1, 3, 4, 9])
def test_the_memorized_rate_and_its_interval_follow_the_jackknife_definition(n_draws):
    """6 evaluation samples of 4 patients (largest 2): measured at min(n_draws, 4) draws, carried beyond."""
    eval_groups = ["p", "p", "q", "r", "r", "s"]
    pairs = [(0, 0), (0, 2), (0, 0), (1, 5), (2, 3), (2, 4), (2, 1), (4, 3)]

    got = statistics.memorized_rate_interval([r for r, _ in pairs], [c for _, c in pairs], 5, eval_groups, n_draws)

    assert (got.estimate, got.lo, got.hi) == pytest.approx(jackknife_rate(pairs, 5, eval_groups, n_draws), rel=1e-9)


def test_the_memorized_rate_of_training_patients_flags_a_patient_through_any_of_its_images():
    eval_groups = ["p", "p", "q", "r", "r", "s", "t"]
    train_groups = ["x", "x", "y", "z", "z"]
    pairs = [(0, 0), (1, 0), (1, 2), (2, 5), (3, 3), (4, 6)]

    got = statistics.memorized_rate_interval([r for r, _ in pairs], [c for _, c in pairs], 5, eval_groups, 3,
                                             train_groups=np.array(train_groups))

    assert (got.estimate, got.lo, got.hi) == pytest.approx(
        jackknife_rate(pairs, 5, eval_groups, 3, train_groups), rel=1e-9)


def test_the_method_says_where_the_rate_was_measured_and_what_was_resampled():
    got = statistics.memorized_rate_interval([0], [2], 3, ["p", "p", "q", "r"], 5, resampled="null samples")
    assert got.method == ("Wilson score interval at the effective size from a delete-one jackknife over null "
                          "samples; measured at 2 draws, estimate and upper end carried to 5 draws by "
                          "1 - (1 - r) ** (m / n') (an upper bound)")


def test_the_method_of_a_rate_measured_at_its_own_number_of_draws_names_no_carrying():
    got = statistics.memorized_rate_interval([0], [2], 3, ["p", "p", "q", "r"], 2)
    assert got.method == ("Wilson score interval at the effective size from a delete-one jackknife over evaluation "
                          "patients")


def test_with_no_exceedance_the_upper_end_is_one_units_worst_case():
    """0 of 8 evaluation samples: single-draw rate at most Wilson's upper bound for 0 of 8, over 5 draws."""
    single = textbook_wilson(0, 8)[1]

    got = statistics.memorized_rate_interval([], [], 4, ["p", "p", "q", "q", "r", "r", "s", "s"], 5)

    assert (got.estimate, got.lo, got.hi) == (0.0, 0.0, pytest.approx(1 - (1 - single) ** 5, rel=1e-12))
    assert got.method.endswith("; none above the threshold: upper bound from the Wilson bound for 0 of n_eval")


@pytest.mark.parametrize("n_train, train_groups", [(3, ["x", "x", "y"]), (0, [])])
def test_with_no_exceedance_a_training_patient_rate_has_the_same_worst_case_bound(n_train, train_groups):
    """Pairs given as plain (empty) lists, patients as units, even with no training image at all."""
    single = textbook_wilson(0, 4)[1]

    got = statistics.memorized_rate_interval([], [], n_train, ["p", "p", "q", "r"], 2, train_groups=train_groups)

    assert (got.estimate, got.lo, got.hi) == (0.0, 0.0, pytest.approx(1 - (1 - single) ** 2, rel=1e-12))


def test_with_two_evaluation_patients_the_rate_is_measured_without_the_larger_one():
    """3 samples of patients p, p, q: every delete-one replicate can hold 3 - 2 = 1 draw, so the rate is measured
    at 1 draw and carried to 3: image 0 above with sample 2 only, single-draw rate 1/3, 1 - (2/3) ** 3."""
    got = statistics.memorized_rate_interval([0], [2], 1, ["p", "p", "q"], 3)
    assert got.estimate == pytest.approx(1 - (2 / 3) ** 3, rel=1e-12)


def test_one_evaluation_patient_gives_no_jackknife_and_so_no_interval():
    """A single group cannot be left out: the rate is measured at all n_draws <= n_eval draws, the interval is 0-1."""
    got = statistics.memorized_rate_interval([0], [0], 2, ["p", "p", "p", "p"], 3)
    assert (got.estimate, got.lo, got.hi) == (pytest.approx(0.5 * (1 - math.comb(3, 3) / math.comb(4, 3))), 0.0,
                                              1.0)


def test_replicates_without_spread_give_the_wilson_interval_over_evaluation_samples():
    """Image 0 is above with one sample of each of two equal patients: every left-out replicate is the same, the
    jackknife's standard error is 0, and the interval falls back to Wilson at n_eval."""
    got = statistics.memorized_rate_interval([0, 0], [0, 2], 1, ["p", "p", "q", "q"], 1)
    assert (got.estimate, got.lo, got.hi) == pytest.approx((0.5, *textbook_wilson(2, 4)), rel=1e-12)


def test_a_unit_flagged_by_every_draw_gives_the_wilson_interval_of_all_successes():
    """Rate 1 (image 0 above with 3 of 4 samples, 2 draws measured): Wilson for 4 of 4, carried to 3 draws."""
    got = statistics.memorized_rate_interval([0, 0, 0], [0, 1, 2], 1, ["p", "p", "q", "r"], 3)
    lo, hi = textbook_wilson(4, 4)
    assert (got.estimate, got.lo, got.hi) == (1.0, pytest.approx(lo, rel=1e-12), 1.0)


# --- auc_interval -----------------------------------------------------------------------------------------------

def mean_difference(positives, negatives):
    return float(np.mean(positives) - np.mean(negatives))


def test_the_auc_interval_resamples_positives_and_negatives_apart():
    """A stratified bootstrap: every draw takes as many positives (negatives) as there are, from the positives
    (negatives) only, BOOTSTRAP_DRAWS = 2000 times."""
    positives, negatives = np.array([10.0, 11.0, 12.0]), np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    seen = []

    def record(pos, neg):
        seen.append((frozenset(pos) <= set(positives), len(pos), frozenset(neg) <= set(negatives), len(neg)))
        return 0.0

    statistics.auc_interval(positives, negatives, record, seed=3)

    assert (len(seen), set(seen)) == (2000, {(True, 3, True, 5)})


def test_the_auc_interval_is_the_2_5_and_97_5_percentiles_of_the_bootstrap():
    """The bootstrap drawn by hand with the same generator (positives' indices, then negatives', per draw)."""
    positives, negatives = np.array([0.9, 0.4, 0.7, 0.8]), np.array([0.1, 0.5, 0.3])
    rng = np.random.default_rng(11)
    values = []
    for _ in range(2000):
        pos = positives[rng.integers(0, 4, 4)]
        neg = negatives[rng.integers(0, 3, 3)]
        values.append(mean_difference(pos, neg))
    values.sort()
    # linear interpolation between order statistics at rank q (n - 1)
    expected = [values[math.floor(r)] + (r - math.floor(r)) * (values[math.floor(r) + 1] - values[math.floor(r)])
                for r in (0.025 * 1999, 0.975 * 1999)]

    got = statistics.auc_interval(positives, negatives, mean_difference, seed=11)

    assert got == pytest.approx(tuple(expected), rel=1e-12)


def test_the_auc_method_string_states_the_number_of_draws():
    assert statistics.AUC_BOOTSTRAP == "stratified percentile bootstrap over positives and negatives (2000 draws)"


# --- seed_interval, verdict -------------------------------------------------------------------------------------

def test_seed_mean_as_dict_names_the_number_of_seeds():
    assert statistics.SeedMean(1.0, 0.5, 1.5, 3, 0.2).as_dict() == {"mean": 1.0, "lo": 0.5, "hi": 1.5,
                                                                    "n_seeds": 3, "sd": 0.2}


def test_seed_interval_reports_the_sample_standard_deviation():
    """Values 2, 4, 9: mean 5, sum of squares 9 + 1 + 16 = 26, sd sqrt(26 / 2) (n - 1 in the denominator)."""
    assert statistics.seed_interval([2.0, 4.0, 9.0]).sd == pytest.approx(math.sqrt(13.0), rel=1e-12)


def test_seed_interval_drops_infinite_values_too():
    got = statistics.seed_interval([1.0, math.inf, 3.0, -math.inf])
    assert (got.n, got.mean) == (2, 2.0)


def test_one_seed_gives_its_value_and_no_spread():
    got = statistics.seed_interval([7.0, math.nan])
    assert (got.mean, got.n, math.isnan(got.sd), math.isnan(got.lo), math.isnan(got.hi)) == (7.0, 1, True, True,
                                                                                                 True)


def test_no_seed_gives_nan_everywhere():
    got = statistics.seed_interval([math.nan])
    assert got.n == 0 and all(math.isnan(x) for x in (got.mean, got.lo, got.hi, got.sd))


def test_seed_interval_takes_a_table_of_values():
    """Values arrive as (levels x seeds) as well: every finite value counts once."""
    assert statistics.seed_interval(np.array([[1.0, 2.0], [3.0, math.nan]])).mean == pytest.approx(2.0)


def test_factor_effect_is_last_minus_first_seed_by_seed_leaving_out_missing_pairs():
    got = statistics.factor_effect([1.0, math.nan, 4.0, 2.0], [5.0, 3.0, 6.0, math.nan])
    assert (got.mean, got.n) == (pytest.approx(3.0), 2)


def test_factor_effect_names_both_shapes_when_they_differ():
    with pytest.raises(ValueError, match=r"got \(2,\) and \(3,\)"):
        statistics.factor_effect([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("mean, lo, hi, direction, expected", [
    (-20.0, -27.5, 0.0, "down", "same direction, not significant"),  # touching 0 from below is not excluding it
    (-20.0, -27.5, -0.5, "down", "shown"),
    (0.0, -1.0, 1.0, "down", "not shown"),
    (-3.0, math.nan, math.nan, "down", "same direction, not significant"),
    (3.0, 1.0, math.inf, "up", "shown"),  # the bound on 0's side decides
    (-3.0, -math.inf, -1.0, "down", "shown"),
    (3.0, -math.inf, 5.0, "up", "same direction, not significant"),
])
def test_verdict_reads_the_bound_on_the_side_of_zero(mean, lo, hi, direction, expected):
    assert statistics.verdict(statistics.SeedMean(mean, lo, hi, 3, 1.0), direction) == expected


@pytest.mark.parametrize("mean, lo, hi, direction, expected", [
    (0.4, 0.1, 0.7, "up", "shown"),
    (-0.4, -0.7, -0.1, "down", "shown"),
    (0.4, -0.1, 0.9, "up", "same direction, not significant"),
])
def test_verdict_judges_effects_below_one_unit_by_their_sign_not_their_size(mean, lo, hi, direction, expected):
    """Figures are percentages: an effect of 0.4 points whose interval excludes 0 is shown."""
    assert statistics.verdict(statistics.SeedMean(mean, lo, hi, 3, 1.0), direction) == expected


def test_verdict_names_the_unknown_direction():
    with pytest.raises(ValueError, match="direction must be 'up' or 'down', got 'flat'"):
        statistics.verdict(statistics.SeedMean(1.0, 0.5, 1.5, 3, 1.0), "flat")


# --- constants the documentation states ---------------------------------------------------------------------------

def test_the_interval_constants_are_the_documented_ones():
    """95 % intervals (z = 1.95996), 2000 bootstrap draws, a warning below 10 evaluation patients (docs/statistics.md)."""
    assert (statistics.CONFIDENCE, statistics.Z, statistics.BOOTSTRAP_DRAWS, statistics.MIN_EVAL_PATIENTS) == (
        0.95, pytest.approx(Z_975, rel=1e-12), 2000, 10)
