"""The audit's science: thresholds, calibration, memorization and copy figures, ground-truth scoring (numpy only).

Inputs are nearest-neighbour results of the all-pairs search (raymem.search): float32 scores, which are exact to
well within ``DECISION_BAND``. Every decision whose score lies within ``DECISION_BAND`` of a threshold, and every
score that decides a threshold, is recomputed in float64 first (``Neighbours.refine_near``), so thresholds,
decisions, shares and their intervals are those of a float64 computation. Scores that decide nothing (score
summaries, best scores in matches.parquet, the per-patient and top-pair scores) stay at the float32 search's
precision, within about 3e-8.

Definitions (Dar et al., PAPER.md): a training sample is *memorized* when some synthetic sample correlates with
it strictly above the threshold; a synthetic sample is a *copy* when its best training match does; a training
patient is memorized when any of their training samples is.

Calibrations:

- ``"paper"``: tau = numpy.percentile(nn, P) over nn = each training sample's best correlation with any
  validation sample; one tau for copies and memorized samples. A synthetic sample's score is a maximum over
  n_train candidates while nn is a maximum over n_val, so when n_train > n_val novel samples exceed tau far
  more often than 1 - P/100.
- ``"matched"``: copies use tau = percentile P of each validation sample's best correlation with the training set
  (the candidate set synthetic samples are searched in). Memorized samples use the threshold that the maximum of
  m = n_synthetic novel single-pair correlations exceeds with probability 1 - P/100: 1 - F(t)^m = 1 - P/100, i.e.
  t = numpy.quantile(all train x validation pair correlations, (P/100) ** (1/m)) (linear interpolation).

- ``"generator"`` (when samples of a generator trained only on held-out patients are given): the matched
  construction with those samples as the null, so the threshold holds their copy rate at 1 - P/100 under the
  generator's own shift (smooth, low-texture samples that score high against everything).

Every calibration is reported in every audit, with its false-positive rates measured at its own thresholds on
evaluation samples (patients in neither train nor val: the test split, else the validation half that did not
calibrate) and, when null samples are given, on those (raymem.audit.statistics has the estimators and intervals;
docs/statistics.md the assumptions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from raymem.audit import statistics

DECISION_BAND = 1e-3  # scores this close to a threshold are recomputed in float64 before a decision
SUMMARY_PERCENTILES = (50, 75, 90, 95, 99)
CALIBRATIONS = ("paper", "matched", "generator")

# rows (r,) -> float64 scores (r, k) and indices (r, k): a float64 top-k search of those query rows
RowRecompute = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# (rows (t,), cols (t,)) -> float64 scores (t,) of those pairs
PairRecompute = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Neighbours:
    """Each query sample's best reference samples: scores (q, k) float64, indices (q, k) int64, best first.

    Scores start as the float32 search scores; ``refine`` replaces a row by its float64 top-k (``exact`` marks
    those rows). Refinement happens in place, so every figure computed later sees the exact rows.
    """

    def __init__(self, scores: np.ndarray, indices: np.ndarray, recompute: RowRecompute):
        self.scores = np.asarray(scores, dtype=np.float64).copy()
        self.indices = np.asarray(indices, dtype=np.int64).copy()
        self.exact = np.zeros(len(self.scores), dtype=bool)
        self._recompute = recompute

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def best(self) -> np.ndarray:
        """(q,) each query's best score."""
        return self.scores[:, 0]

    @property
    def best_index(self) -> np.ndarray:
        """(q,) each query's best reference index."""
        return self.indices[:, 0]

    def refine(self, rows: np.ndarray) -> None:
        """Recompute the given query rows in float64 (rows already exact are skipped)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[~self.exact[rows]]
        if len(rows) == 0:
            return
        scores, indices = self._recompute(rows)
        self.scores[rows], self.indices[rows] = scores, indices
        self.exact[rows] = True

    def refine_near(self, values: Sequence[float], band: float = DECISION_BAND) -> None:
        """Recompute every row whose best score lies within band of any of the values."""
        best = self.best
        near = np.zeros(len(best), dtype=bool)
        for value in values:
            near |= np.abs(best - value) <= band
        self.refine(np.flatnonzero(near))

    def exceeds(self, threshold: float) -> np.ndarray:
        """(q,) bool: best score strictly greater than threshold, decided in float64 near it."""
        self.refine_near([threshold])
        return self.best > threshold


def percentile_threshold(null: Neighbours, percentile: float) -> float:
    """numpy.percentile(null best scores, percentile) (linear), with the scores that decide it in float64.

    The rows near the provisional value and near the two order statistics it interpolates are refined until the
    order statistics themselves are exact rows (their rank cannot change after that: every score within
    DECISION_BAND of them is exact and float32 errors are far smaller).
    """
    assert len(null) > 0
    position = percentile / 100 * (len(null) - 1)
    while True:
        order = np.argsort(null.best, kind="stable")
        deciding = order[[math.floor(position), math.ceil(position)]]
        if null.exact[deciding].all():
            return float(np.percentile(null.best, percentile))
        null.refine_near([float(np.percentile(null.best, percentile)), *null.best[deciding]])


@dataclass
class TopPairs:
    """The largest pair scores of an n x m search (see raymem.search.kernel.search, top_pairs), best first.

    scores (t,) float64, rows (t,) and cols (t,) int64; n_pairs = n * m; recompute gives float64 pair scores.
    Holds at least the ``top_pairs_needed`` largest plus every pair within DECISION_BAND below the smallest of them.
    complete_above: the smallest of the requested largest scores (-inf when every pair is kept): every pair scoring
    above it, and within DECISION_BAND below it, is held.
    """

    scores: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    n_pairs: int
    recompute: PairRecompute
    complete_above: float = -math.inf

    @classmethod
    def from_search(cls, scores, rows, cols, n_pairs: int, requested: int, recompute: PairRecompute) -> TopPairs:
        """The pairs a search kept when asked for its ``requested`` largest."""
        scores = np.asarray(scores, dtype=np.float64)
        complete = -math.inf if n_pairs <= requested or len(scores) < requested else \
            float(np.partition(scores, len(scores) - requested)[len(scores) - requested])
        return cls(scores, rows, cols, n_pairs, recompute, complete)

    def covers(self, threshold: float) -> bool:
        """Whether every pair strictly above threshold is held (with the pairs that decide it in float64)."""
        return threshold >= self.complete_above

    def above(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of every pair strictly above threshold, decided in float64 near it."""
        assert self.covers(threshold), (threshold, self.complete_above)
        self.refine_near([threshold])
        keep = self.scores > threshold
        return self.rows[keep], self.cols[keep]

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64).copy()
        self.exact = np.zeros(len(self.scores), dtype=bool)

    def refine_near(self, values: Sequence[float], band: float = DECISION_BAND) -> None:
        near = np.zeros(len(self.scores), dtype=bool)
        for value in values:
            near |= np.abs(self.scores - value) <= band
        near &= ~self.exact
        if near.any():
            self.scores[near] = self.recompute(self.rows[near], self.cols[near])
            self.exact[near] = True

    def count_above(self, threshold: float) -> int:
        """Pairs strictly above threshold (threshold must be at least the smallest kept score + DECISION_BAND)."""
        self.refine_near([threshold])
        return int((self.scores > threshold).sum())


def max_of_draws_quantile(percentile: float, n_draws: int) -> float:
    """The single-pair quantile q with q ** n_draws = percentile / 100."""
    return (percentile / 100) ** (1 / n_draws)


def top_pairs_needed(n_pairs: int, percentile: float, n_draws: int) -> int:
    """How many of the largest pair scores ``max_of_draws_threshold`` reads: those from the lower of the two order
    statistics numpy's linear quantile interpolates, upward."""
    position = max_of_draws_quantile(percentile, n_draws) * (n_pairs - 1)
    return n_pairs - math.floor(position)


def max_of_draws_threshold(pairs: TopPairs, percentile: float, n_draws: int) -> float:
    """The threshold t with 1 - F(t) ** n_draws = 1 - percentile / 100, F the empirical distribution of all pair
    scores: numpy.quantile(all pair scores, (percentile / 100) ** (1 / n_draws)), linear interpolation, computed
    from the largest pairs only, with the deciding pairs in float64.
    """
    position = max_of_draws_quantile(percentile, n_draws) * (pairs.n_pairs - 1)
    lower = math.floor(position)
    upper = min(lower + 1, pairs.n_pairs - 1)
    from_top = [pairs.n_pairs - 1 - lower, pairs.n_pairs - 1 - upper]
    assert len(pairs.scores) > from_top[0], (len(pairs.scores), from_top)
    while True:
        order = np.argsort(-pairs.scores, kind="stable")
        deciding = order[from_top]
        low_value, high_value = pairs.scores[deciding]
        if pairs.exact[deciding].all():
            return float(_lerp(low_value, high_value, position - lower))
        pairs.refine_near([low_value, high_value])


def _lerp(low: float, high: float, fraction: float) -> float:
    """numpy's linear interpolation between two order statistics (numpy.lib._function_base_impl._lerp)."""
    difference = high - low
    if fraction >= 0.5:
        return high - difference * (1 - fraction)
    return low + difference * fraction


def summary(values: np.ndarray) -> dict[str, float]:
    """Mean and SUMMARY_PERCENTILES (linear) of a score distribution."""
    values = np.asarray(values, dtype=np.float64)
    figures = {"mean": float(values.mean())}
    figures.update({f"p{p}": float(np.percentile(values, p)) for p in SUMMARY_PERCENTILES})
    return figures


def percent(count: int | np.integer, total: int) -> float:
    return 100.0 * float(count) / total if total else 0.0


def split_by_patient(patient_ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split validation rows in two halves that share no patient: patients in random order join the first half
    until it holds at least half the rows. Returns the two halves' sorted row indices."""
    patients, inverse = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    if len(patients) < 2:
        raise ValueError("the validation set needs at least 2 patients: the false-positive rates are measured on "
                         "held-out patients (validation split in two by patient)")
    order = rng.permutation(len(patients))
    rows_so_far = np.cumsum(np.bincount(inverse, minlength=len(patients))[order])
    n_first = min(int(np.searchsorted(rows_so_far, len(inverse) / 2)) + 1, len(patients) - 1)
    in_first = np.isin(inverse, order[:n_first])
    return np.flatnonzero(in_first), np.flatnonzero(~in_first)


@dataclass
class Searches:
    """What the calibrations read: the search results of one audit (indices into each set; training = the
    generator's own training set, the reference).

    Calibration (val): train_to_val (n_train, 1) each training sample's best validation match; val_to_train
    (n_val, 1) each validation sample's best training match; val_pairs the largest train x val pair scores.
    Evaluation (test patients, or the held-out validation half): eval_to_train (n_eval, 1); eval_pairs train x eval
    pairs, complete above every memorized threshold. The generator's own samples: synthetic_to_train
    (n_synthetic, k), train_to_synthetic (n_train, 1). Generator-null samples (a generator trained on held-out
    patients), optional: null_to_train (n_null, 1), null_pairs train x null, complete above every memorized
    threshold once ``complete_pairs`` has run.
    """

    train_to_val: Neighbours
    val_to_train: Neighbours
    val_pairs: TopPairs
    eval_to_train: Neighbours
    eval_pairs: TopPairs | None
    synthetic_to_train: Neighbours
    train_to_synthetic: Neighbours
    train_patient_ids: np.ndarray
    eval_patient_ids: np.ndarray
    null_to_train: Neighbours | None = None
    null_pairs: TopPairs | None = None

    @property
    def n_synthetic(self) -> int:
        return len(self.synthetic_to_train)


def thresholds(name: str, searches: Searches, percentile: float) -> tuple[float, float, float, float]:
    """(threshold for copies, threshold for memorized samples, implied fpr copies, implied fpr memorized) of one
    calibration. The implied rates are in-sample: measured on the very null that set the threshold (about
    1 - percentile / 100 by construction)."""
    n_draws = searches.n_synthetic
    if name == "paper":
        tau = percentile_threshold(searches.train_to_val, percentile)
        implied = float(searches.train_to_val.exceeds(tau).mean())
        return tau, tau, implied, implied
    if name == "matched":
        copy_null, pairs = searches.val_to_train, searches.val_pairs
    else:
        assert name == "generator" and searches.null_to_train is not None, name
        copy_null, pairs = searches.null_to_train, searches.null_pairs
    tau_copies = percentile_threshold(copy_null, percentile)
    tau_memorized = max_of_draws_threshold(pairs, percentile, n_draws)
    single_pair_tail = pairs.count_above(tau_memorized) / pairs.n_pairs
    implied_memorized = 1.0 - (1.0 - single_pair_tail) ** n_draws
    return tau_copies, tau_memorized, float(copy_null.exceeds(tau_copies).mean()), float(implied_memorized)


@dataclass
class Calibration:
    """One calibration's thresholds and figures. Shares are ``statistics.Share`` (0-1, with a 95 % interval).

    Own samples: copies (of n_synthetic generated samples), memorized (of n_train training images), memorized
    patients (of the training patients). Measured on evaluation samples (held-out patients) at this calibration's
    own thresholds: fpr_copies (their share above the copy threshold), fpr_memorized / fpr_memorized_patients (the
    rate at which n_synthetic novel samples would flag a training image / patient). Under the generator null,
    when given: the same two rates with the null generator's samples as the novel ones.
    """

    name: str
    threshold_copies: float
    threshold_memorized: float
    is_copy: np.ndarray  # (n_synthetic,) bool
    is_memorized: np.ndarray  # (n_train,) bool
    is_memorized_patient: np.ndarray  # (n_patients,) bool, patients in sorted order
    implied_fpr_copies: float
    implied_fpr_memorized: float
    copies: statistics.Share
    memorized: statistics.Share
    memorized_patients: statistics.Share
    fpr_copies: statistics.Share
    fpr_memorized: statistics.Share
    fpr_memorized_patients: statistics.Share
    generator_fpr_copies: statistics.Share | None = None
    generator_fpr_memorized: statistics.Share | None = None

    def figures(self) -> dict:
        """The calibration's metrics.json entry: pct_* in percent, fpr_* in 0-1, ``ci95`` in the same units."""
        shares = {"pct_copies": (self.copies, 100.0), "pct_memorized_train": (self.memorized, 100.0),
                  "pct_memorized_patients": (self.memorized_patients, 100.0),
                  "measured_fpr_copies": (self.fpr_copies, 1.0), "measured_fpr_memorized": (self.fpr_memorized, 1.0),
                  "measured_fpr_memorized_patients": (self.fpr_memorized_patients, 1.0),
                  "generator_fpr_copies": (self.generator_fpr_copies, 1.0),
                  "generator_fpr_memorized": (self.generator_fpr_memorized, 1.0)}
        figures = {
            "threshold_copies": self.threshold_copies,
            "threshold_memorized": self.threshold_memorized,
            "n_memorized_train": int(self.is_memorized.sum()),
            "n_copies": int(self.is_copy.sum()),
            "n_memorized_patients": int(self.is_memorized_patient.sum()),
            "implied_fpr_copies": self.implied_fpr_copies,
            "implied_fpr_memorized": self.implied_fpr_memorized,
        }
        ci95, ci_method = {}, {}
        for key, (value, factor) in shares.items():
            if value is not None:
                figures[key], ci95[key] = value.scaled(factor)
                ci_method[key] = value.method
        return {**figures, "ci95": ci95, "ci_method": ci_method}


def calibrate(name: str, searches: Searches, percentile: float) -> Calibration:
    """All figures of one calibration ("paper", "matched" or "generator") for the audit."""
    if name not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {name!r}")
    tau_copies, tau_memorized, implied_copies, implied_memorized = thresholds(name, searches, percentile)
    is_copy = searches.synthetic_to_train.exceeds(tau_copies)
    is_memorized = searches.train_to_synthetic.exceeds(tau_memorized)
    _, memorized_patients = patients_memorized(searches.train_patient_ids, is_memorized)
    n_train, n_draws = len(is_memorized), searches.n_synthetic
    # one generated sample can flag several images (and patients): the intervals cluster by it too
    flagged_by = searches.train_to_synthetic.best_index
    patient_flagged_by = flagged_by[best_per_patient(searches.train_patient_ids, searches.train_to_synthetic.best)]

    def flag_rates(pairs: TopPairs, novel_groups: np.ndarray, resampled: str):
        rows, cols = pairs.above(tau_memorized)
        return tuple(statistics.memorized_rate_interval(rows, cols, n_train, novel_groups, n_draws, groups, resampled)
                     for groups in (None, searches.train_patient_ids))

    fpr_memorized, fpr_memorized_patients = flag_rates(searches.eval_pairs, searches.eval_patient_ids,
                                                       "evaluation patients")
    generator_copies = generator_memorized = None
    if searches.null_to_train is not None:
        generator_copies = statistics.share(searches.null_to_train.exceeds(tau_copies))
        # each null sample is its own group: a generator's samples are independent draws
        generator_memorized, _ = flag_rates(searches.null_pairs, np.arange(len(searches.null_to_train)),
                                            "generator-null samples")
    return Calibration(
        name=name,
        threshold_copies=tau_copies,
        threshold_memorized=tau_memorized,
        is_copy=is_copy,
        is_memorized=is_memorized,
        is_memorized_patient=memorized_patients,
        implied_fpr_copies=implied_copies,
        implied_fpr_memorized=implied_memorized,
        copies=statistics.share(is_copy),
        memorized=statistics.share(is_memorized, searches.train_patient_ids, flagged_by),
        memorized_patients=statistics.share(memorized_patients, flagged_by=patient_flagged_by),
        fpr_copies=statistics.share(searches.eval_to_train.exceeds(tau_copies), searches.eval_patient_ids),
        fpr_memorized=fpr_memorized,
        fpr_memorized_patients=fpr_memorized_patients,
        generator_fpr_copies=generator_copies,
        generator_fpr_memorized=generator_memorized,
    )


def best_per_patient(train_patient_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(p,) the row of each patient's highest score (patients in sorted order, ties to the lower row)."""
    patients, inverse = np.unique(train_patient_ids, return_inverse=True)
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores), inverse))  # by patient, best first
    first = np.searchsorted(inverse[order], np.arange(len(patients)))
    return order[first]


def patients_memorized(train_patient_ids: np.ndarray, is_memorized: np.ndarray):
    """(patients (p,) sorted unique ids, (p,) bool: any of the patient's training samples memorized)."""
    patients, inverse = np.unique(train_patient_ids, return_inverse=True)
    memorized = np.zeros(len(patients), dtype=bool)
    np.logical_or.at(memorized, inverse, is_memorized)
    return patients, memorized


def patient_rows(train_patient_ids: np.ndarray, is_memorized: np.ndarray, best_scores: np.ndarray) -> list[dict]:
    """Per training patient: patient_id, n_train_images, n_memorized, best_score; most memorized first, then by
    best score."""
    patients, inverse = np.unique(train_patient_ids, return_inverse=True)
    n_images = np.bincount(inverse, minlength=len(patients))
    n_memorized = np.bincount(inverse, weights=is_memorized, minlength=len(patients)).astype(int)
    best = np.full(len(patients), -np.inf)
    np.maximum.at(best, inverse, best_scores)
    order = np.lexsort((patients, -best, -n_memorized))
    return [
        {"patient_id": str(patients[i]), "n_train_images": int(n_images[i]), "n_memorized": int(n_memorized[i]),
         "best_score": float(best[i])}
        for i in order
    ]


def roc_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """ROC AUC of positives against negatives (Mann-Whitney U / (P N)); ties count one half."""
    from scipy.stats import rankdata  # here: importing scipy.stats costs 0.6 s, and only planted samples need it

    ranks = rankdata(np.concatenate([positive_scores, negative_scores]))
    n_pos, n_neg = len(positive_scores), len(negative_scores)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_figures(is_positive: np.ndarray, is_flagged: np.ndarray, scores: np.ndarray, seed: int = 0) -> dict:
    """Sensitivity, specificity, precision (fractions; None where undefined) and ROC AUC of scores, of flags
    against a known truth, each with a 95 % interval in ``ci95`` (Wilson; the AUC by a stratified bootstrap)."""
    is_positive, is_flagged = np.asarray(is_positive, dtype=bool), np.asarray(is_flagged, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    true_pos = int((is_positive & is_flagged).sum())
    false_pos = int((~is_positive & is_flagged).sum())
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    rates = {"sensitivity": (true_pos, n_pos), "specificity": (n_neg - false_pos, n_neg),
             "precision": (true_pos, true_pos + false_pos)}
    figures = {"n_positive": n_pos, "n_negative": n_neg, "true_positives": true_pos, "false_positives": false_pos}
    ci95 = {}
    for key, (hits, total) in rates.items():
        figures[key] = hits / total if total else None
        if total:
            ci95[key] = list(statistics.wilson_interval(hits, total))
    figures["roc_auc"] = None
    if n_pos and n_neg:
        figures["roc_auc"] = roc_auc(scores[is_positive], scores[~is_positive])
        ci95["roc_auc"] = list(statistics.auc_interval(scores[is_positive], scores[~is_positive], roc_auc, seed))
    figures["ci95"] = ci95
    figures["ci_method"] = {key: statistics.AUC_BOOTSTRAP if key == "roc_auc" else statistics.WILSON for key in ci95}
    return figures


def label_agreement(is_copy_label: np.ndarray, pair_scores: np.ndarray, threshold: float) -> dict:
    """Agreement of the audit's decision (pair score > threshold) with hand labels (True = copy)."""
    decisions = np.asarray(pair_scores) > threshold
    figures = detection_figures(is_copy_label, decisions, np.asarray(pair_scores, dtype=np.float64))
    figures["n_labels"] = len(decisions)
    figures["agreement"] = float((decisions == np.asarray(is_copy_label, dtype=bool)).mean())
    return figures


def pct_memorized_of_subset(memorized_ids: Iterable[str], subset_ids: Sequence[str]) -> float:
    """Percentage (0-100) of ``subset_ids`` that are memorized: the paper's data-size comparison measures every model
    on the subset all of them trained on."""
    subset = set(subset_ids)
    assert subset, "an empty subset has no memorized share"
    return percent(len(subset & set(memorized_ids)), len(subset))


def memorization_stop_reason(pct_copies: Sequence[float], *, max_pct_copies: float | None = None,
                             rising_audits: int | None = None) -> str | None:
    """Memorization-informed early stopping: why to stop training after the latest audit, or None.

    pct_copies: % copies at each audit so far, in order. Stops when the latest exceeds ``max_pct_copies``, or when
    it rose in each of the last ``rising_audits`` audits.
    """
    if not pct_copies:
        return None
    if max_pct_copies is not None and pct_copies[-1] > max_pct_copies:
        return f"% copies {pct_copies[-1]:.2f} exceeds the budget {max_pct_copies:g}"
    if rising_audits is not None and len(pct_copies) > rising_audits and all(
            later > earlier for earlier, later in zip(pct_copies[-rising_audits - 1:-1], pct_copies[-rising_audits:])):
        return f"% copies rose in {rising_audits} consecutive audits"
    return None
