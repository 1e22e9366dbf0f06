"""Uncertainty and measured false-positive rates of the audit's figures (numpy only; no Ray).

Every headline figure of an audit is a share of something: of the generator's samples (copies), of the training
images or patients (memorized), of held-out evaluation samples (false positives). This module gives each its
estimator and its 95 % interval; docs/statistics.md states the assumptions and the simulations behind them.

- ``wilson_interval``: the Wilson score interval of a binomial share. ``design_effect`` widens it for shares of
  samples that come in clusters (several images of one patient are not independent): Wilson at the effective
  size n / deff, deff from the cluster-robust variance of the share (Kish; at least 1).
- ``share``: a share with its interval, clustered or not, as a ``Share`` (estimate and interval in 0-1).
- ``memorized_rate_interval``: the rate at which a training image (or patient) would be flagged as memorized by
  ``n_draws`` novel samples, from the pairs in which real held-out samples score above the threshold. Per image
  j with c_j of n evaluation samples above the threshold, the probability that n_draws of them drawn without
  replacement hold at least one is 1 - C(n - c_j, n_draws) / C(n, n_draws): for independent evaluation samples an
  unbiased estimate of 1 - (1 - q_j) ** n_draws, q_j the image's own single-draw rate (so images that are hubs
  count as hubs, unlike a threshold that assumes one score distribution for all). Its 95 % interval is Wilson's at the effective size from a jackknife over evaluation patients; the rate is
  measured at most at n_eval - (largest patient) draws and carried up to n_draws by a bound.
- ``auc_interval``: a stratified percentile bootstrap of the ROC AUC.
- ``seed_interval``: the mean of one figure over independent seeds (trials that differ only in their seed) with
  its 95 % Student-t interval; ``factor_effect`` the paired effect of a factor (the figure at its last level
  minus at its first, seed by seed) with that interval, and ``verdict`` what the interval allows one to say
  about the paper's direction: "shown", "same direction, not significant" or "not shown".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, ndtri, stdtrit  # not scipy.stats: its import alone costs the audit ~0.6 s

CONFIDENCE = 0.95
Z = float(ndtri(0.5 + CONFIDENCE / 2))  # 1.959963984540054
BOOTSTRAP_DRAWS = 2000
MIN_EVAL_PATIENTS = 10  # fewer evaluation patients than this: a stated rate gets a warning, not a silent number

WILSON = "Wilson score interval"
SEED_T = "Student-t interval of the mean over seeds"
SHOWN = "shown"
SAME_DIRECTION = "same direction, not significant"
NOT_SHOWN = "not shown"
AUC_BOOTSTRAP = f"stratified percentile bootstrap over positives and negatives ({BOOTSTRAP_DRAWS} draws)"


@dataclass(frozen=True)
class Share:
    """A share in 0-1 with its 95 % interval [lo, hi] and how the interval was made."""

    estimate: float
    lo: float
    hi: float
    method: str

    def scaled(self, factor: float) -> tuple[float, list[float]]:
        """(estimate, [lo, hi]) in the figure's own units (factor 100 for percentages)."""
        return self.estimate * factor, [self.lo * factor, self.hi * factor]


def wilson_interval(successes: float, n: float, *, design_effect: float = 1.0) -> tuple[float, float]:
    """The 95 % Wilson score interval (lo, hi) in 0-1 of successes out of n trials, at the effective size
    n / design_effect; it holds the share successes / n. n = 0: (0, 1), nothing is known."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    n_eff = n / max(design_effect, 1.0)
    z2 = Z * Z
    centre = (p + z2 / (2 * n_eff)) / (1 + z2 / n_eff)
    half = Z * math.sqrt(p * (1 - p) / n_eff + z2 / (4 * n_eff * n_eff)) / (1 + z2 / n_eff)
    # The score interval always holds p; its bounds at p = 0 or 1 land a rounding error off it (2.8e-17 above 0 for
    # 0 of 24), so they are pinned to p and to 0-1.
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def design_effect(flags: np.ndarray, clusters: np.ndarray) -> float:
    """Kish's design effect of the share mean(flags) when samples come in clusters: the cluster-robust (ratio
    estimator) variance over the binomial one, at least 1; 1 when the share is 0 or 1 or there is one cluster.

    flags (n,) bool or 0/1; clusters (n,) any hashable labels.
    """
    flags = np.asarray(flags, dtype=np.float64)
    n = len(flags)
    p = flags.mean() if n else 0.0
    _, inverse = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
    n_clusters = int(inverse.max()) + 1 if n else 0
    if n_clusters < 2 or p in (0.0, 1.0):
        return 1.0
    totals = np.bincount(inverse, weights=flags, minlength=n_clusters)
    sizes = np.bincount(inverse, minlength=n_clusters)
    robust = n_clusters / (n_clusters - 1) * np.sum((totals - p * sizes) ** 2) / n**2
    return max(1.0, float(robust / (p * (1 - p) / n)))


def share(flags: np.ndarray, clusters: np.ndarray | None = None, flagged_by: np.ndarray | None = None) -> Share:
    """mean(flags) with its 95 % Wilson interval; at the effective sample size when the units come in clusters
    (several images of one patient) or when one generated sample can flag several units (flagged_by (n,): the
    generated sample that flags each unit; unflagged units count alone). With both, the design effects add
    (deff_1 + deff_2 - 1), a two-way clustering approximation."""
    flags = np.asarray(flags, dtype=bool)
    n, successes = len(flags), int(flags.sum())
    estimate = successes / n if n else 0.0
    if clusters is None and flagged_by is None:
        return Share(estimate, *wilson_interval(successes, n), WILSON)
    deff, parts = 1.0, []
    if clusters is not None:
        deff += design_effect(flags, clusters) - 1.0
        parts.append("patients")
    if flagged_by is not None:
        own = np.where(flags, np.asarray(flagged_by).astype(str), [f"unit-{i}" for i in range(n)])
        deff += design_effect(flags, own) - 1.0
        parts.append("the generated sample that flags each")
    method = f"Wilson score interval at the effective sample size n / design effect (clusters: {', '.join(parts)})"
    return Share(estimate, *wilson_interval(successes, n, design_effect=deff), method)


def _log_choose(n: np.ndarray, k: int) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def flag_probability(counts: np.ndarray, n_eval: np.ndarray | int, n_draws: int) -> np.ndarray:
    """Probability that n_draws of n_eval evaluation samples, drawn without replacement, hold at least one of the
    counts (...,) above the threshold: 1 - C(n_eval - c, n_draws) / C(n_eval, n_draws), unbiased for 1 - (1 - q)
    ** n_draws when the evaluation samples are independent. Needs n_draws <= n_eval; shapes broadcast."""
    counts = np.asarray(counts, dtype=np.float64)
    n_eval = np.broadcast_to(np.asarray(n_eval, dtype=np.float64), counts.shape)
    assert (n_eval >= n_draws).all(), "measure at most n_eval draws (memorized_rate_interval brackets beyond)"
    out = np.zeros(counts.shape)
    free = n_eval - counts
    certain = free < n_draws  # every n_draws-subset holds an exceedance
    out[certain] = 1.0
    hyper = ~certain & (counts > 0)
    out[hyper] = 1.0 - np.exp(_log_choose(free[hyper], n_draws) - _log_choose(n_eval[hyper], n_draws))
    return out


def _units(pair_rows: np.ndarray, n_train: int, train_groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    pair_rows = np.asarray(pair_rows, dtype=np.int64)
    if train_groups is None:
        return pair_rows, n_train
    _, inverse = np.unique(np.asarray(train_groups).astype(str), return_inverse=True)
    return inverse[pair_rows], int(inverse.max()) + 1 if len(inverse) else 0


def memorized_rate_interval(pair_rows: np.ndarray, pair_cols: np.ndarray, n_train: int, eval_groups: np.ndarray,
                            n_draws: int, train_groups: np.ndarray | None = None,
                            resampled: str = "evaluation patients") -> Share:
    """The rate (0-1) at which a training image, or a training patient (train_groups (n_train,) labels), would be
    flagged as memorized by n_draws novel samples, with its 95 % interval. pair_rows, pair_cols (p,): every
    (training row, evaluation row) pair scoring strictly above the threshold; a patient is flagged when a novel
    sample scores above the threshold with any of its images; eval_groups (n_eval,) the evaluation samples' patients.

    The rate is measured exactly (without-replacement form) at n' = min(n_draws, n_eval - the largest group)
    draws, so every delete-one-group jackknife replicate is exact too; the jackknife's standard error gives a
    Wilson interval at the effective size rate (1 - rate) / se^2 (inside 0-1, not symmetric near 0). With more
    draws than that, the rate at n' is a lower bound of the rate at n_draws and 1 - (1 - r') ** (n_draws / n') an
    upper bound (Jensen: equal when every unit has one single-draw rate, above it with hubs), so the estimate and
    the interval's upper end are carried up by that bound and the lower end stays at n': a conservative bracket.
    The jackknife keeps every evaluation sample distinct, which the without-replacement form needs (a
    with-replacement bootstrap duplicates samples and biases it down).

    With no evaluation sample above the threshold the upper bound is the rate of a unit whose single-draw rate is
    the Wilson upper bound for 0 of n_eval (one unit's worst case).
    """
    eval_groups = np.asarray(eval_groups).astype(str)
    n_eval = len(eval_groups)
    groups, group_of = np.unique(eval_groups, return_inverse=True)
    group_sizes = np.bincount(group_of, minlength=len(groups))
    measured_draws = max(1, min(n_draws, n_eval - int(group_sizes.max()) if len(groups) > 1 else n_eval))
    method = f"Wilson score interval at the effective size from a delete-one jackknife over {resampled}"
    if measured_draws < n_draws:
        method += (f"; measured at {measured_draws} draws, estimate and upper end carried to {n_draws} draws by "
                   "1 - (1 - r) ** (m / n') (an upper bound)")
    units, n_units = _units(pair_rows, n_train, train_groups)
    cols = np.asarray(pair_cols, dtype=np.int64)
    if len(cols) == 0 or n_units == 0:
        upper = 1.0 - (1.0 - wilson_interval(0, n_eval)[1]) ** n_draws
        return Share(0.0, 0.0, upper, f"{method}; none above the threshold: upper bound from the Wilson bound for "
                                      "0 of n_eval")
    # A column counts once per unit: distinct (unit, column) pairs, as one int64 code each (a 1-D unique, many
    # times faster than np.unique(axis=1) on the stacked pairs, same lexicographic order).
    codes = np.unique(units * n_eval + cols)
    flagged_units, unit_index = np.unique(codes // n_eval, return_inverse=True)
    n_flagged = len(flagged_units)
    counts = np.bincount(unit_index, minlength=n_flagged).astype(np.float64)  # evaluation samples per unit
    estimate = float(flag_probability(counts, n_eval, measured_draws).sum() / n_units)
    lo, hi = 0.0, 1.0
    if len(groups) >= 2:
        # Delete-one-group replicates without the dense (groups x units) table: leaving group g out changes a
        # unit's count only where g holds some of its evaluation samples, so each replicate is the sum at g's
        # left-out size over the full counts, corrected on g's (group, unit) cells, which number at most the pairs.
        cells, in_cell = np.unique(group_of[codes % n_eval] * n_flagged + unit_index, return_counts=True)
        cell_group, cell_unit = cells // n_flagged, cells % n_flagged
        left_n = n_eval - group_sizes
        sizes, size_of = np.unique(left_n, return_inverse=True)
        left_out = np.array([flag_probability(counts, size, measured_draws).sum() for size in sizes])[size_of]
        np.add.at(left_out, cell_group,
                  flag_probability(counts[cell_unit] - in_cell, left_n[cell_group], measured_draws)
                  - flag_probability(counts[cell_unit], left_n[cell_group], measured_draws))
        left_out = left_out / n_units
        n_groups = len(groups)
        se = math.sqrt((n_groups - 1) / n_groups * np.sum((left_out - left_out.mean()) ** 2))
        if estimate in (0.0, 1.0) or se == 0.0:
            lo, hi = wilson_interval(estimate * n_eval, n_eval)
        else:
            n_effective = estimate * (1 - estimate) / se**2
            lo, hi = wilson_interval(estimate * n_effective, n_effective)
    power = n_draws / measured_draws
    return Share(1.0 - (1.0 - estimate) ** power, lo, 1.0 - (1.0 - hi) ** power, method)


def auc_interval(positive_scores: np.ndarray, negative_scores: np.ndarray, auc_fn, seed: int = 0) -> tuple[float, float]:
    """95 % stratified percentile bootstrap interval of auc_fn(positives, negatives)."""
    rng = np.random.default_rng(seed)
    positive_scores, negative_scores = np.asarray(positive_scores), np.asarray(negative_scores)
    values = [auc_fn(positive_scores[rng.integers(0, len(positive_scores), len(positive_scores))],
                     negative_scores[rng.integers(0, len(negative_scores), len(negative_scores))])
              for _ in range(BOOTSTRAP_DRAWS)]
    lo, hi = np.percentile(values, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class SeedMean:
    """The mean of one figure over n independent seeds with its 95 % Student-t interval [lo, hi] (NaN bounds for
    fewer than 2 seeds: one seed says nothing about the spread)."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n_seeds": self.n, "sd": self.sd}


def seed_interval(values) -> SeedMean:
    """Mean and 95 % Student-t interval (n - 1 degrees of freedom) of one figure measured once per seed. Non-finite
    values are dropped (a seed whose trial failed); no values at all give NaN everywhere."""
    values = np.asarray([v for v in np.asarray(values, dtype=np.float64).ravel() if np.isfinite(v)])
    n = len(values)
    if n == 0:
        return SeedMean(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(values.mean())
    if n < 2:
        return SeedMean(mean, math.nan, math.nan, 1, math.nan)
    sd = float(values.std(ddof=1))
    half = float(stdtrit(n - 1, 0.5 + CONFIDENCE / 2)) * sd / math.sqrt(n)
    return SeedMean(mean, mean - half, mean + half, n, sd)


def factor_effect(first_level, last_level) -> SeedMean:
    """The paired effect of a factor over seeds: last_level[i] - first_level[i] for every seed i where both were
    measured (the two arrays are aligned by seed; NaN marks a missing trial), with its 95 % Student-t interval."""
    first = np.asarray(first_level, dtype=np.float64)
    last = np.asarray(last_level, dtype=np.float64)
    if first.shape != last.shape:
        raise ValueError(f"factor_effect needs one value per seed at both levels; got {first.shape} and {last.shape}")
    return seed_interval(last - first)


def verdict(effect: SeedMean, direction: str) -> str:
    """What an effect with its interval says about a direction ("up": the figure rises from the first level to the
    last; "down": it falls). SHOWN: the whole 95 % interval lies strictly on that side of 0. SAME_DIRECTION: the
    mean does, the interval does not (or there are too few seeds for one). NOT_SHOWN: the mean is 0 or the other way.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    sign = 1.0 if direction == "up" else -1.0
    if not math.isfinite(effect.mean) or sign * effect.mean <= 0:
        return NOT_SHOWN
    nearest_zero = effect.lo if direction == "up" else effect.hi  # the bound on the side of 0
    if math.isfinite(nearest_zero) and sign * nearest_zero > 0:
        return SHOWN
    return SAME_DIRECTION
