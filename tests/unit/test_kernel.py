"""The blocked search kernel against brute force (raymem.search.kernel; no Ray)."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from raymem.search import kernel, native


def sign_embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows of +-1 with d/2 of each sign: centring is a no-op and, for d a perfect square, standardized entries
    are +-1/sqrt(d) exactly, so every score is an exact multiple of 2/d in float32 and float64 alike: exact ties."""
    rng = np.random.default_rng(seed)
    rows = np.ones((n, d), dtype=np.float32)
    for row in rows:
        row[rng.permutation(d)[: d // 2]] = -1
    return torch.from_numpy(rows)


def gaussian_embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def brute_force(a: torch.Tensor, b: torch.Tensor, k: int):
    """The full float64 score matrix and its reductions: top-k per row by (score desc, index asc), best row per
    column (lowest on ties)."""
    scores = (kernel.standardize(a, torch.float64) @ kernel.standardize(b, torch.float64).T).numpy()
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return scores, top, scores.argmax(axis=0)


@pytest.mark.parametrize("n, m, block_rows", [(12, 20, 1), (90, 130, 7), (129, 200, 128), (65, 300, 64), (200, 66, 199)])
def test_blocked_search_equals_brute_force_with_ties_to_lowest_index(n, m, block_rows):
    a, b = sign_embeddings(n, 16, seed=n), sign_embeddings(m, 16, seed=m)
    scores, top, best_rows = brute_force(a, b, k=5)

    found = kernel.search(a, b, k=5, block_rows=block_rows)

    assert np.array_equal(found.row_indices.numpy(), top)
    assert np.array_equal(found.row_scores.numpy(), np.take_along_axis(scores, top, 1).astype(np.float32))
    assert np.array_equal(found.col_indices.numpy(), best_rows)
    assert np.array_equal(found.col_scores.numpy(), scores.max(axis=0).astype(np.float32))


def near_duplicates(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian A and B where half of B are copies of A rows plus noise of 3e-3 and each copy has a twin with
    another 3e-3: their correlations with the A row (about 1 - 5e-6 and 1 - 1e-5) are one value in bfloat16 (8
    bits), two in float32."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=generator)
    copies = a[torch.randint(0, n, (m // 4,), generator=generator)] + 3e-3 * torch.randn(m // 4, d, generator=generator)
    twins = copies + 3e-3 * torch.randn(m // 4, d, generator=generator)
    b = torch.cat([copies, twins, torch.randn(m - 2 * (m // 4), d, generator=generator)])
    return a, b[torch.randperm(m, generator=generator)]


@pytest.mark.parametrize("screen", kernel.SCREENS)
@pytest.mark.parametrize("d, block_rows", [(48, 299), (300, 128)])
def test_every_screen_reports_the_float64_scores_rounded_once(screen, d, block_rows):
    a, b = near_duplicates(300, 1000, d, seed=d)
    scores = brute_force(a, b, k=1)[0].astype(np.float32)  # float64, rounded once; ties in float32: lowest index
    top = np.argsort(-scores, axis=1, kind="stable")[:, :4]

    found = kernel.search(a, b, k=4, block_rows=block_rows, screen=screen)

    assert np.array_equal(found.row_indices.numpy(), top)
    assert np.array_equal(found.col_indices.numpy(), scores.argmax(axis=0))
    assert np.array_equal(found.row_scores.numpy(), np.take_along_axis(scores, top, 1))
    assert np.array_equal(found.col_scores.numpy(), scores.max(axis=0))


@pytest.mark.parametrize("screen", kernel.SCREENS)
@pytest.mark.parametrize("d, offset", [(16, 0.0), (128, 0.0), (700, 0.0), (128, 30.0)])
def test_screen_scores_stay_within_their_bound_for_every_pair(screen, d, offset):
    """The bound the screen's candidate thresholds rest on, checked on every pair of a tile on this machine's BLAS
    (offset: embeddings far from zero mean, whose standardized rows round differently)."""
    generator = torch.Generator().manual_seed(d)
    a = kernel.prepare_block(torch.randn(257, d, generator=generator) + offset, screen)
    b = kernel.prepare_block(torch.randn(300, d, generator=generator).pow(3) + offset, screen)
    bound = kernel.ScreenBound.for_tile(a, b)

    values = kernel.screen_values(a.screen, b.screen.T, kernel.make_workspace(300))
    exact = a.exact @ b.exact.T

    assert bool(((bound.low(values) <= exact) & (exact <= bound.high(values))).all())


@pytest.mark.parametrize("screen", kernel.SCREENS)
def test_the_fused_c_reduction_builds_here_and_gives_the_torch_reductions_result(screen):
    generator = torch.Generator().manual_seed(3)
    a = kernel.prepare_block(torch.randn(700, 40, generator=generator), screen)
    b = kernel.prepare_block(torch.randn(3000, 40, generator=generator), screen)
    floors = {"row_floor": torch.full((700,), 0.3), "column_floor": torch.full((3000,), -torch.inf)}

    fused, plain = (kernel.search_tile(a, b, a_offset=0, b_offset=0, k=5, top_pairs=50, band=1e-3, **floors,
                                       native_reductions=fused_loop) for fused_loop in (True, False))

    assert native.load() is not None
    assert all(torch.equal(getattr(fused, f.name), getattr(plain, f.name)) for f in fields(kernel.SearchResult))


@pytest.mark.parametrize("wrong", ["row_floor", "column_max", "column_floor"])
def test_the_fused_c_reduction_refuses_a_threshold_vector_that_does_not_fit_the_strip(wrong):
    """The C code indexes these vectors by the strip's shape: one element short would be read out of bounds
    (a segfault, or a wrong candidate list), so it is an error before the call."""
    strip = torch.randn(6, 2 * kernel.COLUMN_CHUNK, generator=torch.Generator().manual_seed(2))
    vectors = {"row_floor": torch.full((6,), -torch.inf), "column_max": torch.full((strip.shape[1],), -torch.inf),
               "column_floor": torch.full((strip.shape[1],), -torch.inf)}
    vectors[wrong] = vectors[wrong][:-1]
    bound = kernel.ScreenBound(inner=0.0, output=0.0, scale=1.0, dtype=torch.float32)

    with pytest.raises(ValueError, match=f"{wrong} must be a \\({len(vectors[wrong]) + 1},\\) torch.float32"):
        native.reduce_strip(native.load(), strip, 3, kernel.COLUMN_CHUNK, vectors["row_floor"],
                            vectors["column_max"], vectors["column_floor"], bound, 0.0)


def test_a_screen_score_outside_its_bound_is_an_error():
    a = kernel.prepare_block(torch.randn(20, 64, generator=torch.Generator().manual_seed(1)), "bfloat16")
    rows, cols = torch.arange(20), torch.arange(20)
    screen_scores = (a.screen[rows].float() * a.screen[cols].float()).sum(dim=1) - 0.05
    too_tight = kernel.ScreenBound(inner=1e-3, output=0.0, scale=1.0, dtype=torch.float32)

    with pytest.raises(RuntimeError, match="beyond its bound"):
        kernel.rescore(a, a, rows, cols, screen_scores, too_tight)


def test_a_tile_skips_what_other_tiles_already_beat_and_the_merge_is_unchanged():
    a, b = torch.randn(40, 16), torch.randn(50, 16)
    a_block, b_block = kernel.prepare_block(a), kernel.prepare_block(b)
    first = kernel.search_tile(a_block, b_block, a_offset=0, b_offset=0, k=3)
    accumulator = kernel.SearchAccumulator(40, 50, 3)
    accumulator.add(first, 0, 0)

    again = kernel.search_tile(a_block, b_block, a_offset=0, b_offset=0, k=3,
                               row_floor=torch.full((40,), 2.0), column_floor=torch.full((50,), 2.0))
    accumulator.add(again, 0, 0)

    assert bool((again.row_scores == -torch.inf).all()) and bool((again.col_indices == kernel.PADDING_INDEX).all())
    merged = accumulator.result()
    assert torch.equal(merged.row_indices, first.row_indices) and torch.equal(merged.col_indices, first.col_indices)


def test_k_larger_than_the_reference_set_keeps_every_reference_row():
    a, b = sign_embeddings(10, 16, 1), sign_embeddings(3, 16, 2)

    found = kernel.search(a, b, k=5, block_rows=2)

    assert np.array_equal(found.row_indices.numpy(), brute_force(a, b, k=3)[1])


@pytest.mark.parametrize(
    "embeddings, top_pairs, band, block_rows",
    [(sign_embeddings, 1, 0.0, 7), (sign_embeddings, 25, 0.0, 64), (sign_embeddings, 25, 0.25, 30),
     (sign_embeddings, 400, 0.0, 33), (gaussian_embeddings, 300, 0.01, 45)],
)
def test_top_pairs_are_the_largest_scores_and_everything_within_band_below(embeddings, top_pairs, band, block_rows):
    a, b = embeddings(100, 16, 3), embeddings(120, 16, 4)
    scores = brute_force(a, b, k=1)[0]
    cutoff = np.sort(scores.ravel())[::-1][top_pairs - 1] - band
    expected_rows, expected_cols = np.nonzero(scores >= cutoff)
    order = np.lexsort((expected_cols, expected_rows, -scores[expected_rows, expected_cols]))

    found = kernel.search(a, b, k=1, block_rows=block_rows, top_pairs=top_pairs, band=band)

    assert np.array_equal(
        np.stack([found.pair_rows.numpy(), found.pair_cols.numpy()]),
        np.stack([expected_rows[order], expected_cols[order]]),
    )


def test_tiles_merged_in_any_order_give_the_same_result():
    a, b = torch.randn(70, 16), torch.randn(90, 16)
    blocks = 20
    tiles = [
        (kernel.search_tile(kernel.prepare_block(a[i : i + blocks]), kernel.prepare_block(b[j : j + blocks]),
                            a_offset=i, b_offset=j, k=3, top_pairs=10, band=1e-3), i, j)
        for i, j in kernel.tile_grid(70, 90, blocks)
    ]
    results = []
    for order in (range(len(tiles)), np.random.default_rng(0).permutation(len(tiles))):
        accumulator = kernel.SearchAccumulator(70, 90, 3, top_pairs=10, band=1e-3)
        for t in order:
            accumulator.add(*tiles[t])
        results.append(accumulator.result())

    assert all(torch.equal(getattr(results[0], f), getattr(results[1], f)) for f in kernel.SearchResult.__dataclass_fields__)


def test_exact_topk_equals_float64_brute_force_with_ties():
    queries, reference = sign_embeddings(30, 16, 5), sign_embeddings(50, 16, 6)
    scores, top, _ = brute_force(queries, reference, k=3)
    blocks = [(start, reference[start : start + 7]) for start in range(0, 50, 7)]

    found_scores, found_indices = kernel.exact_topk(queries, reversed(blocks), k=3)

    assert np.array_equal(found_indices.numpy(), top) and np.array_equal(
        found_scores.numpy(), np.take_along_axis(scores, top, 1)
    )


def test_exact_pair_scores_are_pearson_correlations():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((20, 9)), rng.standard_normal((20, 9))

    found = kernel.exact_pair_scores(torch.from_numpy(a), torch.from_numpy(b)).numpy()

    assert np.allclose(found, [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)], atol=1e-14)


def test_order_key_sorts_by_score_descending_then_index_ascending():
    scores = torch.tensor([0.5, -0.0, 1.0, 0.5, 0.0, -2.0, 1.0], dtype=torch.float32)
    indices = torch.tensor([9, 3, 4, 2, 1, 0, 8])

    order = torch.argsort(kernel.order_key(scores, indices))

    assert indices[order].tolist() == [4, 8, 2, 9, 1, 3, 0]


def test_invalid_rows_are_constant_or_not_finite():
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0], [1.0, float("nan"), 0.0], [0.0, float("inf"), 1.0]])

    assert kernel.find_invalid_rows(rows).tolist() == [False, True, True, True]


def test_accumulated_pairs_are_ordered_by_score_then_a_row_then_b_row():
    just_below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))
    scores = torch.tensor([0.5, 0.5, 0.5, just_below_half, -0.25])
    rows = torch.tensor([2**20 + 3, 2**20 + 3, 2**20 + 1, 7, 2**20])
    cols = torch.tensor([9, 2, 2**19, 1, 0])
    empty = torch.zeros((0, 1))
    tile = kernel.SearchResult(empty, empty.long(), empty[:, 0], empty[:, 0].long(), scores, rows, cols)
    accumulator = kernel.SearchAccumulator(2**20 + 4, 2**19 + 1, 1, top_pairs=5)
    accumulator.add(tile, 0, 0)

    merged = accumulator.result()

    assert list(zip(merged.pair_rows.tolist(), merged.pair_cols.tolist())) == [
        (2**20 + 1, 2**19), (2**20 + 3, 2), (2**20 + 3, 9), (7, 1), (2**20, 0)
    ]


@pytest.mark.parametrize("k", [1, 5, 300, 400])
@pytest.mark.parametrize("steps", [None, 8])
def test_topk_lowest_index_is_a_stable_descending_sort_cut_at_k(k, steps):
    # steps None: distinct float64 scores, torch.topk's candidates stand; 8: scores in steps of 1/8, so ties
    # straddle the k-th place and whole rows are sorted
    scores = torch.randn(200, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    if steps is not None:
        scores = torch.round(scores * steps) / steps
    expected = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]

    values, columns = kernel.topk_lowest_index(scores, k)

    assert torch.equal(columns, expected) and torch.equal(values, scores.gather(1, expected))


def test_rows_prepared_once_in_threads_are_the_blocks_prepare_block_makes():
    rows = gaussian_embeddings(1000, 40, seed=3) * 5 + 2

    prepared = kernel.PreparedRows.of(rows, 128, "int8")

    direct = [kernel.prepare_block(rows[start : start + 128], "int8") for start in range(0, 1000, 128)]
    assert all(torch.equal(ours.exact, theirs.exact) and torch.equal(ours.screen, theirs.screen)
               and (ours.scale, ours.rounding) == (theirs.scale, theirs.rounding)
               for ours, theirs in zip(prepared.blocks, direct, strict=True))


def test_a_search_of_prepared_rows_equals_the_search_of_raw_rows():
    a, b = gaussian_embeddings(300, 24, seed=1), gaussian_embeddings(500, 24, seed=2)
    raw = kernel.search(a, b, k=3, block_rows=128, top_pairs=20, band=1e-3, screen="int8")

    prepared = kernel.search(kernel.PreparedRows.of(a, 128, "int8"), b, k=3, block_rows=128, top_pairs=20, band=1e-3)

    assert all(torch.equal(getattr(raw, f.name), getattr(prepared, f.name)) for f in fields(kernel.SearchResult))


def test_prepared_rows_of_another_block_size_are_refused():
    a = kernel.PreparedRows.of(gaussian_embeddings(50, 8, seed=4), 16)

    with pytest.raises(ValueError, match="block_rows"):
        kernel.search(a, gaussian_embeddings(40, 8, seed=5), k=1, block_rows=32)
