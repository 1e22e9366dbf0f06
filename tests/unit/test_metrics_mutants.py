"""raymem.audit.metrics piece by piece, each against an independent computation: numpy's own percentile, quantile and
interpolation, brute-force loops over patients and over positive-negative pairs, hand-computed values on small
inputs (no Ray).

Written from the survivors of a mutation run (docs/testing.md, "Mutation testing with a tool"): the audit as a
whole is tested against a float64 reference in test_metrics.py and test_audit_reference.py; these pin what a
wrong figure could hide in there: which rows the float64 recheck recomputes (and that it recomputes each once),
the two order statistics a threshold interpolates, the pairs a search must keep, strict "above" at equal scores,
the halves of the validation split, the per-patient tables and the ground-truth figures with their intervals."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from raymem.audit import metrics, simulation, statistics

Z_975 = 1.959963984540054  # standard normal 97.5 % quantile


# --- independent references ------------------------------------------------------------------------------------


def textbook_wilson(successes: float, n: float) -> list[float]:
    """Wilson (1927): (x + z^2/2) / (n + z^2) +- z / (n + z^2) * sqrt(x (n - x) / n + z^2 / 4), clipped to 0-1."""
    z2 = Z_975**2
    centre = (successes + z2 / 2) / (n + z2)
    half = Z_975 / (n + z2) * math.sqrt(successes * (n - successes) / n + z2 / 4)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def pairwise_auc(positives, negatives) -> float:
    """P(positive scores above negative) + P(tie) / 2, over every positive-negative pair."""
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


class Recorded:
    """A float64 recompute over known exact values that records what it was asked for."""

    def __init__(self, exact: np.ndarray, exact_indices: np.ndarray | None = None):
        self.exact, self.exact_indices, self.calls = np.asarray(exact, dtype=np.float64), exact_indices, []

    def rows(self, rows):
        """RowRecompute: (scores (r, k), indices (r, k)) of the given query rows."""
        self.calls.append(np.asarray(rows).tolist())
        return self.exact[rows], self.exact_indices[rows]

    def pairs(self, rows, cols):
        """PairRecompute: scores (t,) of the pairs (rows[i], cols[i]) of an exact matrix."""
        self.calls.append(sorted(zip(np.asarray(rows).tolist(), np.asarray(cols).tolist())))
        return self.exact[rows, cols]


def neighbours(approximate, exact) -> tuple[metrics.Neighbours, Recorded]:
    """k = 1 Neighbours over approximate best scores (q,), recomputing to exact (q,); query i's match is i + 100
    before and i + 200 after a recompute (so a test sees which rows were replaced)."""
    q = len(approximate)
    recorded = Recorded(np.asarray(exact, dtype=np.float64)[:, None], np.arange(200, 200 + q)[:, None])
    return metrics.Neighbours(np.asarray(approximate)[:, None], np.arange(100, 100 + q)[:, None], recorded.rows), recorded


# --- Neighbours ------------------------------------------------------------------------------------------------


def test_neighbours_hold_float64_scores_and_int64_indices_so_a_recompute_is_not_rounded_back():
    exact = np.array([0.1 + 1e-12, 0.3])  # 0.1 + 1e-12 has no float32 form
    recorded = Recorded(exact[:, None], np.array([[7], [8]]))
    held = metrics.Neighbours(exact.astype(np.float32)[:, None], np.array([[3], [4]], dtype=np.int32), recorded.rows)

    held.refine([0])

    assert (held.best[0], held.best.dtype, held.best_index.dtype) == (exact[0], np.float64, np.int64)


def test_neighbours_refine_their_own_copy_and_leave_the_search_results_untouched():
    scores, indices = np.array([[0.5, 0.4], [0.3, 0.2]]), np.array([[1, 2], [3, 4]])
    recorded = Recorded(np.array([[0.51, 0.41], [0.31, 0.21]]), np.array([[5, 6], [7, 8]]))
    held = metrics.Neighbours(scores, indices, recorded.rows)

    held.refine([0, 1])

    assert (scores.tolist(), indices.tolist(), held.scores.tolist(), held.indices.tolist()) == (
        [[0.5, 0.4], [0.3, 0.2]], [[1, 2], [3, 4]], [[0.51, 0.41], [0.31, 0.21]], [[5, 6], [7, 8]])


def test_refine_recomputes_each_requested_row_once_in_one_sorted_call():
    held, recorded = neighbours([0.1, 0.2, 0.3, 0.4], [0.15, 0.25, 0.35, 0.45])

    held.refine([2, 0, 2])
    held.refine([0, 2])  # already exact: nothing to recompute
    held.refine([])
    held.refine([3])

    assert (recorded.calls, held.best.tolist(), held.best_index.tolist(), held.exact.tolist()) == (
        [[0, 2], [3]], [0.15, 0.2, 0.35, 0.45], [200, 101, 202, 203], [True, False, True, True])


def test_refine_near_takes_every_row_within_the_band_of_any_value_band_edges_included():
    # dyadic scores: every distance below is exact in float64
    held, recorded = neighbours([0.125, 0.5, 0.75, 0.875, 0.3125], [0.0] * 5)

    held.refine_near([0.25, 0.875], band=0.125)

    assert recorded.calls == [[0, 2, 3, 4]]  # 0.125 and 0.75 lie exactly one band away; 0.5 is farther


def test_refine_near_uses_the_decision_band_by_default():
    held, recorded = neighbours([0.5, 0.5009, 0.4992, 0.5011, 0.4989], [0.0] * 5)

    held.refine_near([0.5])

    assert (metrics.DECISION_BAND, recorded.calls) == (1e-3, [[0, 1, 2]])


def test_exceeds_is_strictly_above_and_decided_on_float64_scores_near_the_threshold():
    approximate = [0.6, 0.5004, 0.4996, 0.5, 0.2]
    exact = [0.6, 0.4999, 0.5001, 0.5, 0.2]  # rows 1 and 2 cross the threshold when recomputed; row 3 ties it
    held, _ = neighbours(approximate, exact)

    assert held.exceeds(0.5).tolist() == [True, False, True, False, False]


# --- percentile_threshold ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, percentile", [(40, 90.0), (23, 37.5), (101, 99.5), (57, 5.0)])
def test_percentile_threshold_recomputes_both_order_statistics_it_interpolates(n, percentile):
    """Scores 1.8 / n apart, float32-like errors of at most 4e-4 (no rank changes): the provisional percentile is
    more than a band from both order statistics, so only reading the right two ranks makes the result exact."""
    rng = np.random.default_rng(n)
    exact = rng.permutation(np.linspace(-0.9, 0.9, n) + rng.uniform(0, 1e-4, n))
    held, _ = neighbours(exact + rng.choice([-4e-4, 4e-4], n), exact)

    assert metrics.percentile_threshold(held, percentile) == np.percentile(exact, percentile)


def test_percentile_threshold_recomputes_only_the_two_rows_that_decide_it():
    """A recompute is a float64 search of the row: 40 scores 0.045 apart, percentile 90 at rank 35.1."""
    rng = np.random.default_rng(40)
    exact = rng.permutation(np.linspace(-0.9, 0.9, 40))
    held, recorded = neighbours(exact + rng.choice([-4e-4, 4e-4], 40), exact)

    metrics.percentile_threshold(held, 90.0)

    assert recorded.calls == [sorted(np.argsort(exact)[[35, 36]].tolist())]


def test_percentile_threshold_of_one_score_is_that_score_in_float64():
    held, _ = neighbours([0.7004], [0.7])

    assert metrics.percentile_threshold(held, 95.0) == 0.7


def test_percentile_threshold_of_no_scores_is_refused():
    held, _ = neighbours([], [])

    with pytest.raises(AssertionError):
        metrics.percentile_threshold(held, 95.0)


# --- TopPairs ------------------------------------------------------------------------------------------------------

KEPT = [0.9, 0.1, 0.5, 0.7, 0.3]  # pair scores a search kept, in no particular order


@pytest.mark.parametrize("n_pairs, requested, complete_above", [
    (100, 3, 0.5),  # the 3rd largest kept score: every pair above it (and a band below) is held
    (100, 5, 0.1),  # exactly as many kept as requested: the smallest of them
    (100, 6, -math.inf),  # fewer kept than requested: the search held every pair there is above its floor
    (5, 5, -math.inf),  # every pair requested
])
def test_a_searchs_pairs_are_complete_above_the_smallest_of_the_requested_largest(n_pairs, requested,
                                                                                   complete_above):
    pairs = metrics.TopPairs.from_search(KEPT, np.arange(5), np.arange(5), n_pairs, requested, lambda r, c: None)

    assert pairs.complete_above == complete_above


def test_pairs_from_a_search_answer_above_with_their_rows_columns_and_float64_scores():
    exact = np.array([[0.9, 0.1, 0.5], [0.59999, 0.3, 0.0]])
    rows, cols = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1])
    recorded = Recorded(exact)
    pairs = metrics.TopPairs.from_search([0.9, 0.1, 0.5, 0.6004, 0.3], rows, cols, 6, 3, recorded.pairs)

    above = pairs.above(0.6)  # the pair at 0.6004 is 0.59999 in float64

    assert ([a.tolist() for a in above], pairs.n_pairs, recorded.calls) == ([[0], [0]], 6, [[(1, 0)]])


def test_pairs_cover_a_threshold_at_or_above_their_complete_floor_only():
    pairs = metrics.TopPairs.from_search(KEPT, np.arange(5), np.arange(5), 100, 3, lambda r, c: None)

    assert [pairs.covers(t) for t in (0.6, 0.5, 0.4999)] == [True, True, False]


def test_above_a_threshold_the_pairs_do_not_cover_is_refused():
    pairs = metrics.TopPairs.from_search(KEPT, np.arange(5), np.arange(5), 100, 3, lambda r, c: None)

    with pytest.raises(AssertionError):
        pairs.above(0.4)


def test_above_and_count_above_are_strictly_above_on_float64_scores():
    exact = np.array([[0.75, 0.5, 0.49995], [0.50005, 0.25, 0.5]])
    rows, cols = np.indices(exact.shape)
    approximate = exact.ravel() + np.array([0, 0, 3e-4, -3e-4, 0, 0])  # two pairs cross 0.5 when recomputed
    pairs = metrics.TopPairs(approximate, rows.ravel(), cols.ravel(), 6, Recorded(exact).pairs)

    kept_rows, kept_cols = pairs.above(0.5)

    assert (list(zip(kept_rows.tolist(), kept_cols.tolist())), pairs.count_above(0.5)) == ([(0, 0), (1, 0)], 2)


def test_pairs_keep_float32_scores_as_float64_and_leave_the_callers_array_untouched():
    exact = np.array([[0.1 + 1e-12, 0.5]])
    given32, given64 = exact.ravel().astype(np.float32), exact.ravel() + 1e-4
    pairs32 = metrics.TopPairs(given32, np.array([0, 0]), np.array([0, 1]), 2, Recorded(exact).pairs)
    pairs64 = metrics.TopPairs(given64, np.array([0, 0]), np.array([0, 1]), 2, Recorded(exact).pairs)

    pairs32.refine_near([0.1])
    pairs64.refine_near([0.1])

    assert (pairs32.scores[0], given64.tolist()) == (exact[0, 0], (exact.ravel() + 1e-4).tolist())


def test_pair_refine_near_recomputes_each_pair_within_a_band_of_any_value_once():
    exact = np.array([[0.125, 0.5, 0.75], [0.875, 0.3125, 0.0]])
    rows, cols = np.indices(exact.shape)
    recorded = Recorded(exact)
    pairs = metrics.TopPairs(exact.ravel(), rows.ravel(), cols.ravel(), 6, recorded.pairs)

    pairs.refine_near([0.25, 0.875], band=0.125)
    pairs.refine_near([0.875, 0.0], band=0.0)

    assert recorded.calls == [[(0, 0), (0, 2), (1, 0), (1, 1)], [(1, 2)]]


# --- the max-of-draws threshold ----------------------------------------------------------------------------------


def test_the_single_pair_quantile_raised_to_the_draws_is_the_percentile():
    assert [metrics.max_of_draws_quantile(25.0, 2), metrics.max_of_draws_quantile(12.5, 3),
            metrics.max_of_draws_quantile(64.0, 1)] == [0.5, 0.5, 0.64]


@pytest.mark.parametrize("n_pairs, needed", [(11, 6), (10, 6), (5, 3), (2, 2)])
def test_pairs_needed_reach_down_to_the_lower_interpolated_order_statistic(n_pairs, needed):
    """Percentile 25 over 2 draws: the single-pair quantile 0.5, at rank 0.5 (n_pairs - 1) from the bottom; the
    pairs from the lower of its two order statistics up: n_pairs - floor(0.5 (n_pairs - 1))."""
    assert metrics.top_pairs_needed(n_pairs, 25.0, 2) == needed


def spaced_pair_scores(n_train: int, n_other: int, rng) -> np.ndarray:
    """An (n_train, n_other) matrix of distinct scores at least 1.8 / (n_train n_other) apart."""
    n = n_train * n_other
    return rng.permutation(np.linspace(-0.9, 0.9, n) + rng.uniform(0, 1e-5, n)).reshape(n_train, n_other)


@pytest.mark.parametrize("n_train, n_other, percentile, n_draws", [
    (13, 7, 95.0, 3), (9, 11, 90.0, 17), (6, 5, 50.0, 1), (20, 15, 99.0, 40)])
def test_max_of_draws_threshold_from_only_the_needed_pairs_is_numpys_quantile_of_all_pairs(n_train, n_other,
                                                                                           percentile, n_draws):
    """Errors of 4e-4 on every kept score, scores far more than a band apart: the result is exact only when the
    two interpolated order statistics are the ones recomputed."""
    rng = np.random.default_rng(n_train)
    exact = spaced_pair_scores(n_train, n_other, rng)
    n_pairs = exact.size
    kept = np.argsort(-exact.ravel())[:metrics.top_pairs_needed(n_pairs, percentile, n_draws)]
    rows, cols = np.unravel_index(kept, exact.shape)
    pairs = metrics.TopPairs(exact.ravel()[kept] + rng.choice([-4e-4, 4e-4], len(kept)), rows, cols, n_pairs,
                             Recorded(exact).pairs)

    threshold = metrics.max_of_draws_threshold(pairs, percentile, n_draws)

    assert threshold == np.quantile(exact.ravel(), (percentile / 100) ** (1 / n_draws))


def test_max_of_draws_threshold_refuses_pairs_that_stop_short_of_its_order_statistics():
    exact = spaced_pair_scores(13, 7, np.random.default_rng(0))
    kept = np.argsort(-exact.ravel())[:metrics.top_pairs_needed(91, 95.0, 3) - 1]
    rows, cols = np.unravel_index(kept, exact.shape)
    pairs = metrics.TopPairs(exact.ravel()[kept], rows, cols, 91, Recorded(exact).pairs)

    with pytest.raises(AssertionError):
        metrics.max_of_draws_threshold(pairs, 95.0, 3)


def test_lerp_is_numpys_linear_interpolation_bit_for_bit():
    """numpy interpolates from the upper end for fractions of at least one half; the two forms differ in the last
    bit for about half of these pairs."""
    rng = np.random.default_rng(7)
    ends = np.sort(rng.uniform(-1, 1, (60, 2)) * 10.0 ** rng.integers(-4, 1, (60, 2)), axis=1)
    fractions = [0.0, 0.1, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0]  # np.quantile of two values: virtual index = fraction

    got = [[metrics._lerp(low, high, f) for f in fractions] for low, high in ends]

    assert got == [[float(np.quantile([low, high], f)) for f in fractions] for low, high in ends]


def test_the_generator_calibration_without_generator_null_samples_is_refused():
    rng = np.random.default_rng(3)
    searches = simulation.searches_from_scores(
        train=rng.standard_normal((12, 8)), calibrate=rng.standard_normal((9, 8)), evaluate=rng.standard_normal((7, 8)),
        synthetic=rng.standard_normal((10, 8)), train_patients=np.repeat(["a", "b", "c", "d"], 3),
        eval_patients=np.array([f"e{i}" for i in range(7)]))

    with pytest.raises(AssertionError):
        metrics.thresholds("generator", searches, 95.0)


def test_a_calibrations_figures_name_how_each_interval_was_made():
    """n_train 12 (4 patients of 3 images), n_val 9, n_eval 7, n_synthetic 10, n_null 8: the memorized rates
    resample evaluation patients, or the generator-null samples; the shares state their clusters."""
    rng = np.random.default_rng(4)
    searches = simulation.searches_from_scores(
        train=rng.standard_normal((12, 8)), calibrate=rng.standard_normal((9, 8)), evaluate=rng.standard_normal((7, 8)),
        synthetic=rng.standard_normal((10, 8)), train_patients=np.repeat(["a", "b", "c", "d"], 3),
        eval_patients=np.array([f"e{i}" for i in range(7)]), null=rng.standard_normal((8, 8)))

    calibration = metrics.calibrate("matched", searches, 95.0)

    methods = calibration.figures()["ci_method"]
    assert (calibration.name, methods["pct_copies"], methods["measured_fpr_copies"].endswith("(clusters: patients)"),
            methods["pct_memorized_train"].endswith("(clusters: patients, the generated sample that flags each)"),
            [methods[key].startswith("Wilson score interval at the effective size from a delete-one jackknife over "
                                     f"{resampled}")
             for key, resampled in (("measured_fpr_memorized", "evaluation patients;"),
                                    ("measured_fpr_memorized_patients", "evaluation patients;"),
                                    ("generator_fpr_memorized", "generator-null samples;"))]) == (
        "matched", statistics.WILSON, True, True, [True, True, True])


def test_an_unknown_calibration_is_refused_with_the_names_it_takes():
    with pytest.raises(ValueError, match=re.escape("calibration must be one of ('paper', 'matched', 'generator'), "
                                                   "got 'best'")):
        metrics.calibrate("best", None, 95.0)


# --- summary, percent ----------------------------------------------------------------------------------------------


def test_summary_is_the_mean_and_linear_percentiles():
    assert metrics.summary(np.array([4, 1, 3, 2])) == pytest.approx(
        {"mean": 2.5, "p50": 2.5, "p75": 3.25, "p90": 3.7, "p95": 3.85, "p99": 3.97}, abs=1e-12)


def test_summary_of_float32_scores_is_computed_in_float64():
    scores = np.array([0.1, 0.2, 0.3, 0.7], dtype=np.float32)
    wide = scores.astype(np.float64)

    assert metrics.summary(scores) == {"mean": wide.mean(), **{f"p{p}": np.percentile(wide, p)
                                                              for p in (50, 75, 90, 95, 99)}}


def test_percent_of_a_total_and_of_nothing():
    assert [metrics.percent(3, 12), metrics.percent(np.int64(5), 8), metrics.percent(0, 0), metrics.percent(4, 0)] == [
        25.0, 62.5, 0.0, 0.0]


# --- split_by_patient ----------------------------------------------------------------------------------------------


class FixedOrder:
    """A generator stand-in whose permutation is a given patient order (indices into the sorted patient ids)."""

    def __init__(self, order):
        self.order = order

    def permutation(self, n):
        assert n == len(self.order)
        return np.array(self.order)


def halves_by_hand(patient_ids, order) -> tuple[list[int], list[int]]:
    """Patients in order join the first half until it holds at least half the rows; the last patient never does."""
    patients = sorted(set(patient_ids))
    first, rows = [], 0
    for index in order[:-1]:
        if rows >= len(patient_ids) / 2:
            break
        first.append(patients[index])
        rows += patient_ids.count(patients[index])
    return ([i for i, p in enumerate(patient_ids) if p in first], [i for i, p in enumerate(patient_ids) if p not in first])


# a: 3 rows, b: 1, c: 2, d: 4, interleaved
INTERLEAVED = ["d", "a", "c", "b", "d", "a", "d", "c", "a", "d"]


@pytest.mark.parametrize("patient_ids, order", [
    (INTERLEAVED, [3, 0, 1, 2]),  # d (4), a (7 >= 5): two patients
    (INTERLEAVED, [0, 2, 1, 3]),  # a (3), c (5 = half): two patients
    (INTERLEAVED, [1, 2, 0, 3]),  # b, c, a: 1, 3, 6
    (["a", "b", "c", "d"] + ["d"] * 9, [0, 1, 2, 3]),  # d's 10 rows would be needed: the second half keeps d
    (["x", "y", "y"], [1, 0]),
])
def test_validation_split_fills_the_first_half_with_whole_patients_in_random_order(patient_ids, order):
    first, second = metrics.split_by_patient(np.array(patient_ids), FixedOrder(order))

    assert (first.tolist(), second.tolist()) == halves_by_hand(patient_ids, order)


def test_validation_split_of_one_patient_says_why_it_needs_two():
    message = ("the validation set needs at least 2 patients: the false-positive rates are measured on held-out "
               "patients (validation split in two by patient)")

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        metrics.split_by_patient(np.array(["p1", "p1", "p1"]), np.random.default_rng(0))


# --- per-patient figures -------------------------------------------------------------------------------------------

TRAIN_PATIENTS = np.array(["p2", "p0", "p1", "p2", "p0", "p3", "p1", "p2", "p3", "p0", "p3"])
TRAIN_SCORES = np.array([0.4, 0.9, 0.3, 0.8, 0.9, 0.2, 0.95, 0.8, 0.25, 0.5, 0.7])
TRAIN_MEMORIZED = np.array([False, True, False, True, True, False, True, True, False, False, False])


def test_best_per_patient_is_each_patients_highest_row_with_ties_to_the_lower_row():
    by_hand = []
    for patient in sorted(set(TRAIN_PATIENTS)):
        rows = [i for i, p in enumerate(TRAIN_PATIENTS) if p == patient]
        by_hand.append(max(rows, key=lambda i: (TRAIN_SCORES[i], -i)))

    assert metrics.best_per_patient(TRAIN_PATIENTS, TRAIN_SCORES).tolist() == by_hand == [1, 6, 3, 10]


def test_a_patient_is_memorized_when_any_of_their_images_is():
    patients, memorized = metrics.patients_memorized(TRAIN_PATIENTS, TRAIN_MEMORIZED)

    by_hand = [any(m for p, m in zip(TRAIN_PATIENTS, TRAIN_MEMORIZED) if p == patient) for patient in patients]
    assert (patients.tolist(), memorized.dtype, memorized.tolist()) == (["p0", "p1", "p2", "p3"], bool, by_hand)


def test_patient_rows_count_images_and_memorized_and_sort_most_memorized_then_best_score_first():
    by_hand = []
    for patient in sorted(set(TRAIN_PATIENTS)):
        rows = TRAIN_PATIENTS == patient
        by_hand.append({"patient_id": patient, "n_train_images": int(rows.sum()),
                        "n_memorized": int(TRAIN_MEMORIZED[rows].sum()), "best_score": float(TRAIN_SCORES[rows].max())})
    by_hand.sort(key=lambda row: (-row["n_memorized"], -row["best_score"]))

    rows = metrics.patient_rows(TRAIN_PATIENTS, TRAIN_MEMORIZED, TRAIN_SCORES)

    assert rows == by_hand and [row["patient_id"] for row in rows] == ["p0", "p2", "p1", "p3"]


# --- ground truth: roc_auc, detection_figures, label_agreement -----------------------------------------------------

POSITIVES = np.array([0.9, 0.4, 0.4, 0.7])
NEGATIVES = np.array([0.4, 0.1, 0.8])


def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right_ties_half():
    assert metrics.roc_auc(POSITIVES, NEGATIVES) == pytest.approx(pairwise_auc(POSITIVES, NEGATIVES), abs=1e-15)


def detection_by_hand(truth, flagged, scores, seed):
    """Counts, rates and Wilson intervals from the definitions; the AUC's interval by a stratified bootstrap drawn
    with the same generator (positives' indices, then negatives', per draw), linear percentiles 2.5 and 97.5."""
    truth, flagged = list(truth), list(flagged)
    tp = sum(t and f for t, f in zip(truth, flagged))
    fp = sum(f and not t for t, f in zip(truth, flagged))
    n_pos, n_neg = sum(truth), len(truth) - sum(truth)
    positives = np.array([s for s, t in zip(scores, truth) if t])
    negatives = np.array([s for s, t in zip(scores, truth) if not t])
    rng = np.random.default_rng(seed)
    draws = sorted(pairwise_auc(positives[rng.integers(0, n_pos, n_pos)], negatives[rng.integers(0, n_neg, n_neg)])
                   for _ in range(2000))
    interval = [draws[math.floor(r)] + (r - math.floor(r)) * (draws[math.floor(r) + 1] - draws[math.floor(r)])
                for r in (0.025 * 1999, 0.975 * 1999)]
    rates = {"sensitivity": (tp, n_pos), "specificity": (n_neg - fp, n_neg), "precision": (tp, tp + fp)}
    return {"n_positive": n_pos, "n_negative": n_neg, "true_positives": tp, "false_positives": fp,
            **{key: hits / total for key, (hits, total) in rates.items()},
            "roc_auc": pairwise_auc(positives, negatives),
            "ci95": {**{key: textbook_wilson(hits, total) for key, (hits, total) in rates.items()}, "roc_auc": interval},
            "ci_method": {"sensitivity": statistics.WILSON, "specificity": statistics.WILSON,
                          "precision": statistics.WILSON, "roc_auc": statistics.AUC_BOOTSTRAP}}


def test_detection_figures_are_counts_wilson_intervals_and_a_bootstrapped_auc():
    truth = np.array([True, False, True, True, False, True, False, False, False])
    flagged = np.array([True, True, False, True, False, True, False, True, False])
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.4, 0.1, 0.6, 0.2])

    figures = metrics.detection_figures(truth, flagged, scores, seed=5)

    expected = detection_by_hand(truth, flagged, scores, seed=5)
    assert {key: value for key, value in figures.items() if key not in ("ci95", "ci_method")} == pytest.approx(
        {key: value for key, value in expected.items() if key not in ("ci95", "ci_method")}, rel=1e-12)
    assert (figures["ci95"].keys(), figures["ci_method"]) == (expected["ci95"].keys(), expected["ci_method"])
    assert all(figures["ci95"][key] == pytest.approx(expected["ci95"][key], rel=1e-12) for key in expected["ci95"])


def test_detection_figures_read_0_1_labels_and_flags_as_booleans():
    truth, flagged, scores = [1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [0.9, 0.8, 0.4, 0.7, 0.1]

    figures = metrics.detection_figures(np.array(truth), np.array(flagged), np.array(scores))

    assert (figures["n_positive"], figures["n_negative"], figures["true_positives"], figures["false_positives"],
            figures["roc_auc"]) == (3, 2, 2, 1, pairwise_auc([0.9, 0.4, 0.7], [0.8, 0.1]))


def test_detection_figures_without_positives_leave_undefined_rates_and_the_auc_as_none():
    figures = metrics.detection_figures([False, False, False], [True, False, False], [0.9, 0.2, 0.1])

    assert (figures["sensitivity"], figures["precision"], figures["specificity"], figures["roc_auc"],
            sorted(figures["ci95"]), figures["ci_method"]) == (
        None, 0.0, 2 / 3, None, ["precision", "specificity"],
        {"precision": statistics.WILSON, "specificity": statistics.WILSON})


def test_detection_figures_with_nothing_flagged_have_no_precision():
    figures = metrics.detection_figures([True, False], [False, False], [0.3, 0.6])

    assert (figures["precision"], "precision" in figures["ci95"], figures["roc_auc"]) == (None, False, 0.0)


def test_the_auc_interval_follows_the_seed():
    rng = np.random.default_rng(0)
    truth = np.arange(20) < 8
    scores = rng.uniform(0, 1, 20) + 0.3 * truth

    intervals = [metrics.detection_figures(truth, truth, scores, seed=seed)["ci95"]["roc_auc"] for seed in (1, 1, 2)]

    assert intervals[0] == intervals[1] != intervals[2]


def test_label_agreement_decides_strictly_above_the_threshold():
    labels = np.array([True, True, False, False, True])
    scores = np.array([0.9, 0.5, 0.5, 0.2, 0.3])

    figures = metrics.label_agreement(labels, scores, 0.5)

    assert (figures["n_labels"], figures["agreement"], figures["true_positives"], figures["false_positives"],
            figures["roc_auc"]) == (5, 3 / 5, 1, 0, pytest.approx(pairwise_auc([0.9, 0.5, 0.3], [0.5, 0.2])))


# --- pct_memorized_of_subset, memorization_stop_reason -------------------------------------------------------------


def test_memorized_share_of_a_subset_counts_each_member_once():
    assert metrics.pct_memorized_of_subset(["a", "c", "c", "z"], ["a", "b", "c", "a", "d"]) == 50.0


def test_memorized_share_of_an_empty_subset_is_refused():
    with pytest.raises(AssertionError, match="empty subset"):
        metrics.pct_memorized_of_subset(["a"], [])


def test_early_stop_budget_is_strict_and_names_the_latest_share_and_the_budget():
    assert [metrics.memorization_stop_reason(history, max_pct_copies=25.0) for history in ([30.0, 25.0], [1.0, 25.5])] == [
        None, "% copies 25.50 exceeds the budget 25"]


def test_early_stop_needs_p_strict_rises_within_the_last_p_plus_one_audits():
    histories = ([1.0, 2.0, 3.0], [5.0, 1.0, 9.0, 2.0, 3.0, 4.0],  # rose in the last 2
                 [1.0, 2.0, 2.0, 3.0], [2.0, 3.0], [3.0, 1.0, 2.0], [1.0, 2.0, 4.0, 3.0])  # level once, too short,
    # fell first, fell last

    reasons = [metrics.memorization_stop_reason(history, rising_audits=2) for history in histories]

    assert reasons == ["% copies rose in 2 consecutive audits"] * 2 + [None] * 4
