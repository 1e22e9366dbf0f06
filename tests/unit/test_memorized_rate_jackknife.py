"""statistics.memorized_rate_interval's delete-one-group jackknife, computed sparsely (only the (group, unit) cells
that hold exceedances), against the dense form it replaced: every replicate from a full (groups x units) table of
counts. Random exceedance patterns with unequal group sizes, repeated pairs, patients as units, and groups with no
exceedance at all."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import comb

from raymem.audit import statistics


def _dense(pair_rows, pair_cols, n_train, eval_groups, n_draws, train_groups=None):
    """The dense jackknife, written from the docstring: exact without-replacement rates at n' draws."""
    eval_groups = np.asarray(eval_groups).astype(str)
    n_eval = len(eval_groups)
    groups, group_of = np.unique(eval_groups, return_inverse=True)
    sizes = np.bincount(group_of)
    draws = max(1, min(n_draws, n_eval - int(sizes.max())))
    units = np.asarray(pair_rows) if train_groups is None else np.unique(
        np.asarray(train_groups).astype(str), return_inverse=True)[1][np.asarray(pair_rows)]
    n_units = n_train if train_groups is None else len(set(np.asarray(train_groups).astype(str)))
    table = np.zeros((len(groups), n_units))
    for unit, col in {(int(u), int(c)) for u, c in zip(units, pair_cols)}:
        table[group_of[col], unit] += 1

    def rate(counts, n):  # P(at least one of `counts` among `draws` of n without replacement), averaged over units
        return float(np.mean([1 - comb(n - c, draws, exact=True) / comb(n, draws, exact=True) for c in counts]))

    estimate = rate(table.sum(axis=0), n_eval)
    left_out = np.array([rate(table.sum(axis=0) - table[g], n_eval - sizes[g]) for g in range(len(groups))])
    se = math.sqrt((len(groups) - 1) / len(groups) * np.sum((left_out - left_out.mean()) ** 2))
    n_effective = estimate * (1 - estimate) / se**2
    lo, hi = statistics.wilson_interval(estimate * n_effective, n_effective)
    power = n_draws / draws
    return 1 - (1 - estimate) ** power, lo, 1 - (1 - hi) ** power


@pytest.mark.parametrize("seed", range(6))
def test_the_sparse_jackknife_equals_the_dense_one(seed):
    rng = np.random.default_rng(seed)
    n_train, n_draws = int(rng.integers(5, 30)), int(rng.integers(1, 9))
    sizes = rng.integers(1, 5, size=int(rng.integers(4, 12)))  # unequal patients; some never above tau
    eval_groups = np.repeat([f"p{g}" for g in range(len(sizes))], sizes)
    n_pairs = int(rng.integers(3, 40))
    rows = rng.integers(0, n_train, n_pairs)
    cols = rng.integers(0, len(eval_groups), n_pairs)  # repeated (row, col) pairs count once
    train_groups = None if seed % 2 else np.array([f"t{i // 3}" for i in range(n_train)])

    share = statistics.memorized_rate_interval(rows, cols, n_train, eval_groups, n_draws, train_groups=train_groups)

    assert (share.estimate, share.lo, share.hi) == pytest.approx(
        _dense(rows, cols, n_train, eval_groups, n_draws, train_groups), rel=1e-9, abs=1e-12)
