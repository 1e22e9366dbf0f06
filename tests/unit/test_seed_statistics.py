"""Across-seed intervals and the verdicts read from them (raymem.audit.statistics), against textbook values."""

import math

import numpy as np
import pytest

from raymem.audit import statistics

# Two-sided 95 % Student-t quantiles from printed tables, independent of scipy: df 1, 2, 4.
T_TABLE = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}


@pytest.mark.parametrize("values", [[3.0, 5.0], [10.0, 12.0, 11.0], [1.0, 2.0, 4.0, 8.0, 16.0]])
def test_seed_interval_is_the_students_t_interval(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_TABLE[n - 1] * sd / math.sqrt(n)
    got = statistics.seed_interval(values)
    assert (got.n, got.mean) == (n, pytest.approx(mean))
    assert (got.lo, got.hi) == (pytest.approx(mean - half, rel=1e-9), pytest.approx(mean + half, rel=1e-9))


def test_seed_interval_drops_failed_seeds_and_says_nothing_from_one():
    assert statistics.seed_interval([4.0, float("nan"), 6.0]).n == 2
    one = statistics.seed_interval([7.0])
    assert one.mean == 7.0 and math.isnan(one.lo) and math.isnan(one.hi)
    assert statistics.seed_interval([]).n == 0


def test_factor_effect_pairs_by_seed():
    # seed-level differences are 20, 23, 17: a paired analysis sees a tight effect that an unpaired one would not
    effect = statistics.factor_effect([10.0, 12.0, 11.0], [30.0, 35.0, 28.0])
    assert effect.mean == pytest.approx(20.0)
    assert effect.hi - effect.lo == pytest.approx(2 * T_TABLE[2] * 3.0 / math.sqrt(3))
    with pytest.raises(ValueError, match="one value per seed"):
        statistics.factor_effect([1.0, 2.0], [1.0])


@pytest.mark.parametrize("effect, direction, expected", [
    ((20.0, 12.5, 27.5), "up", statistics.SHOWN),
    ((20.0, 12.5, 27.5), "down", statistics.NOT_SHOWN),
    ((-20.0, -27.5, -12.5), "down", statistics.SHOWN),
    ((-20.0, -27.5, 0.5), "down", statistics.SAME_DIRECTION),
    ((6.5, -165.0, 178.0), "up", statistics.SAME_DIRECTION),
    ((6.5, 0.0, 13.0), "up", statistics.SAME_DIRECTION),  # touching 0 is not excluding it
    ((0.0, -1.0, 1.0), "up", statistics.NOT_SHOWN),
    ((5.0, math.nan, math.nan), "up", statistics.SAME_DIRECTION),  # one seed: no interval, no claim
    ((math.nan, math.nan, math.nan), "up", statistics.NOT_SHOWN),
])
def test_verdict_never_stronger_than_the_interval(effect, direction, expected):
    mean, lo, hi = effect
    assert statistics.verdict(statistics.SeedMean(mean, lo, hi, 3, 1.0), direction) == expected


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        statistics.verdict(statistics.seed_interval(np.array([1.0, 2.0])), "flat")
