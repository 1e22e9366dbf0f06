"""The search kernel's smaller contracts, each against an independent numpy computation (raymem.search.kernel;
no Ray). Written from the survivors of a mutation run (docs/testing.md, "Mutation testing with a tool"): the
blocked search as a whole is tested in test_kernel.py; these pin the pieces a wrong result could hide in (the
screen's bound and its inversion, the tile's floors, padding and offsets, the CPU defaults, the float64 top-k)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch

from raymem.search import kernel
from test_kernel import gaussian_embeddings as gaussian, sign_embeddings as sign_rows  # rows with exact ties


# --- independent references (numpy, float64) -------------------------------------------------------------------


def pearson(a, b) -> np.ndarray:
    """The full n x m matrix of Pearson correlations, numpy float64 (rows centred and L2-normalised)."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit(a) @ unit(b).T


def top_k(scores32: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best by (float32 score desc, column asc): a stable sort of the negated scores."""
    columns = np.argsort(-scores32, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores32, columns, 1), columns


def largest_pairs(scores32: np.ndarray, count: int, band: float) -> set[tuple[int, int]]:
    """(row, col) of the count largest scores and every score within band below the count-th (float32)."""
    cutoff = np.sort(scores32.ravel())[::-1][count - 1] - np.float32(band)
    return set(zip(*map(list, np.nonzero(scores32 >= cutoff))))


def with_copies(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian A (n, d) and B (m, d) where B row 0 is a noisy copy of A row 0 and B row 1 of A row 5: the best
    entries of A row 0, A row 5 and B columns 0 and 1 sit at local index 0 of a tile."""
    a, b = gaussian(n, d, seed), gaussian(m, d, seed + 1)
    b[0] = a[0] + 0.05 * gaussian(1, d, seed + 2)[0]
    b[1] = a[5] + 0.05 * gaussian(1, d, seed + 3)[0]
    return a, b


class Counter:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


# --- default_screen: the CPU's 8-bit and bfloat16 dot-product flags decide ---------------------------------------


def fake_cpuinfo(monkeypatch, text: str | None):
    """default_screen reads /proc/cpuinfo; replace that file's content (None: the file cannot be read)."""
    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo" or text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)
    monkeypatch.setattr(kernel, "open", fake_open, raising=False)


CPUINFO = "processor\t: 0\nmodel name\t: avx512_vnni in a name\nflags\t\t: fpu sse2 {}\nbugs\t\t: amx_int8\n"


@pytest.mark.parametrize("flags, dim, screen", [
    ("avx512_vnni avx512_bf16", 160, "int8"),  # up to INT8_MAX_DIM: int8
    ("avx512_vnni avx512_bf16", 161, "bfloat16"),  # above it: bfloat16 dot products
    ("avx_vnni", 8, "int8"), ("amx_int8", 8, "int8"),
    ("avx_vnni", 161, "float32"),  # no bfloat16 dot products
    ("amx_bf16", 8, "bfloat16"), ("avx512_bf16", 1000, "bfloat16"),
    ("avx2 fma", 8, "float32"), (None, 8, "float32"),  # None: a CPU whose cpuinfo has no flags line
])
def test_the_default_screen_follows_the_cpu_flags_and_the_dimension(monkeypatch, flags, dim, screen):
    fake_cpuinfo(monkeypatch, CPUINFO.format(flags) if flags else "processor\t: 0\nFeatures\t: fp asimd\n")

    assert kernel.default_screen(dim) == screen  # the device defaults to the CPU


def test_the_default_screen_is_float32_off_the_cpu_or_without_cpuinfo(monkeypatch):
    fake_cpuinfo(monkeypatch, CPUINFO.format("avx512_vnni avx512_bf16"))
    off_cpu = kernel.default_screen(64, torch.device("cuda"))  # a device name: no CUDA needed
    fake_cpuinfo(monkeypatch, None)
    unreadable = kernel.default_screen(64, "cpu")

    assert (off_cpu, unreadable) == ("float32", "float32")


def test_prepared_blocks_and_searches_take_the_default_screen_when_none_is_named(monkeypatch):
    fake_cpuinfo(monkeypatch, CPUINFO.format("avx512_vnni avx512_bf16"))
    rows = gaussian(20, 8, seed=1)

    screens = (kernel.prepare_block(rows).screen.dtype, kernel.prepare_block(gaussian(20, 200, seed=2)).screen.dtype,
               kernel.PreparedRows.of(rows, 8).screen)

    assert screens == (torch.int8, torch.bfloat16, "int8")


# --- prepare_block and standardize ------------------------------------------------------------------------------


def test_standardize_centres_and_normalises_each_row_in_float64_and_returns_float32_by_default():
    rows = gaussian(6, 9, seed=3).double() * 7 + 3
    centred = rows.numpy() - rows.numpy().mean(axis=1, keepdims=True)

    found = kernel.standardize(rows)

    assert found.dtype == torch.float32 and np.array_equal(
        found.numpy(), (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32))


def test_an_int8_block_holds_multiples_of_its_largest_magnitude_over_127_and_its_largest_rounding_error():
    rows = gaussian(30, 12, seed=4) * 3 + 1
    centred = rows.double().numpy() - rows.double().numpy().mean(axis=1, keepdims=True)
    exact = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    scale = np.abs(exact).max() / 127
    rounded = np.round(exact / scale)

    block = kernel.prepare_block(rows, "int8")

    assert block.screen.dtype == torch.int8 and np.array_equal(block.screen.numpy(), rounded)
    assert block.scale == pytest.approx(scale, rel=1e-15) and np.allclose(block.exact.numpy(), exact, atol=1e-15)
    assert block.rounding == pytest.approx(np.linalg.norm(rounded * scale - exact, axis=1).max(), rel=1e-12)


@pytest.mark.parametrize("screen", ["bfloat16", "float32"])
def test_a_float_block_holds_the_rows_rounded_to_its_dtype_with_scale_one(screen):
    rows = gaussian(30, 12, seed=5)
    centred = rows.double().numpy() - rows.double().numpy().mean(axis=1, keepdims=True)
    exact = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    rounded = torch.from_numpy(exact).to(getattr(torch, screen))

    block = kernel.prepare_block(rows, screen)

    assert block.scale == 1.0 and torch.equal(block.screen, rounded)
    assert block.rounding == pytest.approx(np.linalg.norm(rounded.double().numpy() - exact, axis=1).max(), rel=1e-9)


def test_an_unknown_screen_is_refused():
    with pytest.raises(ValueError, match="float16"):
        kernel.prepare_block(gaussian(4, 8, seed=6), "float16")


# --- ScreenBound: the documented bound, its inverse, its extremes ------------------------------------------------


def test_the_int8_bound_is_the_rounding_of_both_blocks_with_exact_int32_sums():
    a, b = kernel.prepare_block(gaussian(20, 40, seed=7), "int8"), kernel.prepare_block(gaussian(30, 40, seed=8), "int8")

    bound = kernel.ScreenBound.for_tile(a, b)

    # Cauchy-Schwarz: |a'.b' - a.b| <= ||e_a|| + ||a'|| ||e_b|| with ||a'|| <= 1 + ||e_a||; float64 noise 1e-9
    assert (bound.dtype, bound.output, bound.lowest) == (torch.int32, 0.0, -(2**31))
    assert bound.scale == pytest.approx(a.scale * b.scale, rel=1e-15)
    assert bound.inner == pytest.approx(a.rounding + (1 + a.rounding) * b.rounding + 1e-9, rel=1e-12)


@pytest.mark.parametrize("screen, output", [("bfloat16", 2.0**-8), ("float32", 0.0)])
def test_a_float_bound_adds_float32_accumulation_over_d_terms(screen, output):
    d = 300
    a, b = kernel.prepare_block(gaussian(20, d, seed=9), screen), kernel.prepare_block(gaussian(30, d, seed=10), screen)
    norms = (1 + a.rounding) * (1 + b.rounding)
    gamma_d = d * 2.0**-24 / (1 - d * 2.0**-24)  # Higham 3.1, u = 2**-24

    bound = kernel.ScreenBound.for_tile(a, b)

    assert (bound.dtype, bound.output, bound.scale, bound.lowest) == (torch.float32, output, 1.0, -torch.inf)
    assert bound.inner == pytest.approx(a.rounding + (1 + a.rounding) * b.rounding + 1e-9 + gamma_d * norms, rel=1e-12)


@pytest.mark.parametrize("screen, extra", [("float32", 2 * 2.0**-8 + 2.0**-16), ("bfloat16", 0.0)])
def test_a_float32_gemm_allowed_to_round_its_inputs_is_bounded_as_a_bfloat16_one(screen, extra):
    a, b = kernel.prepare_block(gaussian(20, 64, seed=11), screen), kernel.prepare_block(gaussian(30, 64, seed=12), screen)
    highest = kernel.ScreenBound.for_tile(a, b)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 passes allowed
    try:
        relaxed = kernel.ScreenBound.for_tile(a, b)
    finally:
        torch.set_float32_matmul_precision(saved)

    assert relaxed.inner - highest.inner == pytest.approx(extra * (1 + a.rounding) * (1 + b.rounding), abs=1e-15)


BOUNDS = {
    "int32": kernel.ScreenBound(inner=0.01, output=0.0, scale=3e-5, dtype=torch.int32),
    "bfloat16": kernel.ScreenBound(inner=1e-4, output=2.0**-8, scale=1.0, dtype=torch.float32),
}


@pytest.mark.parametrize("name", BOUNDS)
def test_low_and_high_are_the_extreme_exact_scores_a_screen_value_allows(name):
    bound = BOUNDS[name]
    values = (torch.tensor([-30000, -5, 0, 7, 20000, 33333], dtype=torch.int32) if name == "int32"
              else torch.tensor([-0.9, -0.3, 0.0, 0.25, 0.5, 0.99], dtype=torch.float32))
    x = values.double().numpy() * bound.scale
    # x = y (1 + e), |e| <= output, and |y - t| <= inner: t ranges over y -+ inner for y between x/(1+o), x/(1-o)
    y = np.stack([x / (1 + bound.output), x / (1 - bound.output)])

    low, high = bound.low(values), bound.high(values)

    assert np.allclose(low.numpy(), y.min(axis=0) - bound.inner, rtol=0, atol=1e-15)
    assert np.allclose(high.numpy(), y.max(axis=0) + bound.inner, rtol=0, atol=1e-15)


def below(values: torch.Tensor) -> torch.Tensor:
    """The next representable screen value below each threshold."""
    if values.dtype == torch.int32:
        return values - 1
    return torch.nextafter(values, torch.tensor(-torch.inf))


@pytest.mark.parametrize("name", BOUNDS)
def test_reach_is_the_lowest_screen_value_whose_high_can_reach_a_level(name):
    bound = BOUNDS[name]
    levels = torch.tensor([-0.95, -0.4, -0.01, 0.0, 0.003, 0.3, 0.7, 0.999], dtype=torch.float64)
    target = levels.numpy() - 1e-6  # the reported float32 scores' slack

    threshold = bound.reach(levels)

    ulp = 2.0**-23  # a float32 rounding near 1
    assert threshold.dtype == (torch.int32 if name == "int32" else torch.float32)
    assert bool((bound.high(below(threshold)).numpy() < target + ulp).all())  # below it: no score reaches the level
    assert bool((bound.high(threshold).numpy() >= target - (bound.scale if name == "int32" else ulp)).all())


def test_reach_of_no_floor_admits_every_int32_value_and_of_an_unreachable_level_none():
    bound = BOUNDS["int32"]

    threshold = bound.reach(torch.tensor([-torch.inf, 1e12], dtype=torch.float64))

    assert threshold.tolist() == [-(2**31), 2**31 - 1]


def test_every_screen_value_lies_within_low_and_high_of_its_exact_score_for_nearly_equal_rows():
    # rows nearly parallel: the scores sit just below 1 where the bfloat16 output rounding is widest
    base = gaussian(1, 64, seed=13)
    rows = base + 1e-3 * gaussian(40, 64, seed=14)
    a, b = kernel.prepare_block(rows[:20], "bfloat16"), kernel.prepare_block(rows[20:], "bfloat16")
    bound = kernel.ScreenBound.for_tile(a, b)

    values = kernel.screen_values(a.screen, b.screen.T, kernel.make_workspace(20))
    exact = torch.from_numpy(pearson(rows[:20], rows[20:]))

    assert bool(((bound.low(values) <= exact) & (exact <= bound.high(values))).all())


# --- rescore ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", [[(3, 1), (0, 2)], [(2, 5), (0, 0), (2, 1), (1, 4), (0, 3)]])
def test_rescore_returns_candidates_in_row_col_order_with_float64_scores_rounded_once(pairs):
    a_rows, b_rows = gaussian(4, 24, seed=15), gaussian(6, 24, seed=16)
    a, b = kernel.prepare_block(a_rows, "float32"), kernel.prepare_block(b_rows, "float32")
    bound = kernel.ScreenBound.for_tile(a, b)
    rows, cols = torch.tensor([r for r, _ in pairs]), torch.tensor([c for _, c in pairs])
    screen = (a.screen[rows] * b.screen[cols]).sum(dim=1)

    found_rows, found_cols, found_screen, scores = kernel.rescore(a, b, rows, cols, screen, bound)

    expected = sorted(pairs)
    reference = pearson(a_rows, b_rows)
    assert list(zip(found_rows.tolist(), found_cols.tolist())) == expected
    assert np.array_equal(scores.numpy(), np.array([reference[r, c] for r, c in expected], dtype=np.float32))
    assert torch.equal(found_screen, torch.stack([screen[pairs.index(p)] for p in expected]))


def test_a_screen_score_above_its_bound_is_an_error_too():
    a = kernel.prepare_block(gaussian(6, 32, seed=17), "float32")
    rows = torch.arange(6)
    too_high = (a.screen * a.screen).sum(dim=1) + 0.05  # the exact scores are 1
    bound = kernel.ScreenBound(inner=1e-3, output=0.0, scale=1.0, dtype=torch.float32)

    with pytest.raises(RuntimeError, match="beyond its bound"):
        kernel.rescore(a, a, rows, rows, too_high, bound)


# --- search_tile: one tile against brute force, on both reductions --------------------------------------------


@pytest.fixture(params=["native", "torch"])
def reductions(request):
    return request.param == "native"


@pytest.mark.parametrize("screen", kernel.SCREENS)
@pytest.mark.parametrize("strip_rows", [None, 48])
def test_a_tile_reports_every_rows_top_k_every_columns_best_and_its_largest_pairs(
        monkeypatch, reductions, screen, strip_rows):
    # 100 x 150: two full chunks of 64 columns and a tail of 22; one strip of 100 rows: six row chunks of 16 and a
    # tail of 4; or strips of 48 rows (three row chunks, no tail) and a last one of 4 (no full row chunk)
    a_rows, b_rows = with_copies(100, 150, 24, seed=18)
    if strip_rows is not None:
        monkeypatch.setattr(kernel, "STRIP_SCORES", strip_rows * 150)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    row_scores, row_cols = top_k(scores, 3)

    tile = kernel.search_tile(kernel.prepare_block(a_rows, screen), kernel.prepare_block(b_rows, screen),
                              a_offset=1000, b_offset=500, k=3, top_pairs=9, band=0.05, native_reductions=reductions)

    assert np.array_equal(tile.row_indices.numpy(), row_cols + 500)
    assert np.array_equal(tile.row_scores.numpy(), row_scores)
    assert np.array_equal(tile.col_indices.numpy(), scores.argmax(axis=0) + 1000)
    assert np.array_equal(tile.col_scores.numpy(), scores.max(axis=0))
    pairs = set(zip(tile.pair_rows.tolist(), tile.pair_cols.tolist()))
    assert pairs == {(r + 1000, c + 500) for r, c in largest_pairs(scores, 9, 0.05)}
    assert np.array_equal(tile.pair_scores.numpy(), scores[tile.pair_rows.numpy() - 1000, tile.pair_cols.numpy() - 500])


@pytest.mark.parametrize("screen", kernel.SCREENS)
def test_a_tile_narrower_than_a_chunk_with_k_above_its_chunk_count_is_exact(reductions, screen):
    # 10 A rows (no full chunk of 16 rows), 50 B rows (no full chunk of 64 columns), ties everywhere
    a_rows, b_rows = sign_rows(10, 16, seed=19), sign_rows(50, 16, seed=20)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    row_scores, row_cols = top_k(scores, 4)

    tile = kernel.search_tile(kernel.prepare_block(a_rows, screen), kernel.prepare_block(b_rows, screen),
                              a_offset=0, b_offset=0, k=4, top_pairs=6, native_reductions=reductions)

    assert np.array_equal(tile.row_indices.numpy(), row_cols) and np.array_equal(tile.row_scores.numpy(), row_scores)
    assert np.array_equal(tile.col_indices.numpy(), scores.argmax(axis=0))
    assert set(zip(tile.pair_rows.tolist(), tile.pair_cols.tolist())) == largest_pairs(scores, 6, 0.0)


def test_a_tile_keeps_every_b_row_when_k_exceeds_them_and_every_pair_when_top_pairs_exceeds_them(reductions):
    a_rows, b_rows = gaussian(7, 16, seed=21), gaussian(5, 16, seed=22)
    scores = pearson(a_rows, b_rows).astype(np.float32)

    tile = kernel.search_tile(kernel.prepare_block(a_rows, "int8"), kernel.prepare_block(b_rows, "int8"),
                              a_offset=0, b_offset=0, k=9, top_pairs=100, native_reductions=reductions)

    assert np.array_equal(tile.row_indices.numpy(), top_k(scores, 5)[1])
    assert len(tile.pair_scores) == 35


def test_a_tile_without_top_pairs_returns_no_pairs_and_with_top_pairs_alone_exactly_that_many():
    a_rows, b_rows = gaussian(30, 16, seed=23), gaussian(40, 16, seed=24)
    a, b = kernel.prepare_block(a_rows, "float32"), kernel.prepare_block(b_rows, "float32")
    scores = pearson(a_rows, b_rows).astype(np.float32)

    without = kernel.search_tile(a, b, a_offset=0, b_offset=0, k=1)
    five = kernel.search_tile(a, b, a_offset=0, b_offset=0, k=1, top_pairs=5)  # band 0 by default

    assert len(without.pair_scores) == len(without.pair_rows) == len(without.pair_cols) == 0
    assert set(zip(five.pair_rows.tolist(), five.pair_cols.tolist())) == largest_pairs(scores, 5, 0.0)


@pytest.mark.parametrize("k, closed_every", [(3, 3), (2, 4)])
def test_a_tile_pads_only_the_rows_and_columns_its_floors_rule_out(reductions, k, closed_every):
    a_rows, b_rows = with_copies(40, 70, 16, seed=25)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    # floors of 2.0: other tiles found better; (2, 4): rows 1, 2, 3, 5, 6, 7... closed, 10 rows x 2 entries kept
    closed = torch.arange(40) % closed_every == 0 if closed_every == 3 else torch.arange(40) % 4 != 0
    row_floor = torch.where(closed, 2.0, -torch.inf)
    column_floor = torch.where(torch.arange(70) % 4 == 1, 2.0, -torch.inf)
    open_rows, open_cols = (row_floor == -torch.inf).numpy(), (column_floor == -torch.inf).numpy()

    tile = kernel.search_tile(kernel.prepare_block(a_rows, "int8"), kernel.prepare_block(b_rows, "int8"),
                              a_offset=0, b_offset=0, k=k, row_floor=row_floor, column_floor=column_floor,
                              native_reductions=reductions)

    assert np.array_equal(tile.row_indices.numpy()[open_rows], top_k(scores, k)[1][open_rows])
    assert bool((tile.row_indices[~open_rows] == kernel.PADDING_INDEX).all())
    assert bool((tile.row_scores[~open_rows] == -torch.inf).all())
    assert np.array_equal(tile.col_indices.numpy()[open_cols], scores.argmax(axis=0)[open_cols])
    assert bool((tile.col_indices[~open_cols] == kernel.PADDING_INDEX).all())
    assert bool((tile.col_scores[~open_cols] == -torch.inf).all())


# --- merging tiles: floors, ties, any order ---------------------------------------------------------------------


@pytest.mark.parametrize("screen", ["int8", "float32"])
def test_tiles_run_with_the_floors_of_tiles_merged_before_in_reverse_order_give_the_brute_force_answer(screen):
    # as the Ray search runs them: any order, each with the floors the merged tiles reached; exact ties across
    # tiles (sign rows) must still go to the lowest index
    a_rows, b_rows = sign_rows(60, 16, seed=26), sign_rows(70, 16, seed=27)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    row_scores, row_cols = top_k(scores, 4)
    accumulator = kernel.SearchAccumulator(60, 70, 4, top_pairs=12)

    for a_offset, b_offset in reversed(list(kernel.tile_grid(60, 70, 16))):
        row_floor, column_floor = accumulator.floors(a_offset, len(a_rows[a_offset:a_offset + 16]),
                                                     b_offset, len(b_rows[b_offset:b_offset + 16]))
        tile = kernel.search_tile(kernel.prepare_block(a_rows[a_offset:a_offset + 16], screen),
                                  kernel.prepare_block(b_rows[b_offset:b_offset + 16], screen),
                                  a_offset=a_offset, b_offset=b_offset, k=4, top_pairs=12,
                                  row_floor=row_floor, column_floor=column_floor)
        accumulator.add(tile, a_offset, b_offset)
    merged = accumulator.result()

    assert np.array_equal(merged.row_indices.numpy(), row_cols) and np.array_equal(merged.row_scores.numpy(), row_scores)
    assert np.array_equal(merged.col_indices.numpy(), scores.argmax(axis=0))
    assert np.array_equal(merged.col_scores.numpy(), scores.max(axis=0))
    assert set(zip(merged.pair_rows.tolist(), merged.pair_cols.tolist())) == largest_pairs(scores, 12, 0.0)


def test_floors_are_minus_infinity_before_any_tile_and_then_the_kth_best_and_the_best_found():
    a_rows, b_rows = gaussian(10, 16, seed=28), gaussian(12, 16, seed=29)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    accumulator = kernel.SearchAccumulator(10, 12, 3)
    before = accumulator.floors(0, 10, 0, 12)

    accumulator.add(kernel.search_tile(kernel.prepare_block(a_rows), kernel.prepare_block(b_rows),
                                       a_offset=0, b_offset=0, k=3), 0, 0)
    row_floor, column_floor = accumulator.floors(2, 5, 4, 6)

    assert bool((before[0] == -torch.inf).all()) and bool((before[1] == -torch.inf).all())
    assert np.array_equal(row_floor.numpy(), top_k(scores, 3)[0][2:7, -1])
    assert np.array_equal(column_floor.numpy(), scores.max(axis=0)[4:10])


def test_the_accumulator_keeps_every_pair_within_band_below_the_top_pairs_th_whatever_the_tile_order():
    a_rows, b_rows = gaussian(50, 16, seed=30), gaussian(60, 16, seed=31)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    tiles = [(kernel.search_tile(kernel.prepare_block(a_rows[i:i + 20]), kernel.prepare_block(b_rows[j:j + 20]),
                                 a_offset=i, b_offset=j, k=1, top_pairs=8, band=0.04), i, j)
             for i, j in kernel.tile_grid(50, 60, 20)]
    accumulator = kernel.SearchAccumulator(50, 60, 1, top_pairs=8, band=0.04)

    for tile in sorted(tiles, key=lambda t: -float(t[0].pair_scores.max())):  # the best tile first
        accumulator.add(*tile)
    merged = accumulator.result()

    assert set(zip(merged.pair_rows.tolist(), merged.pair_cols.tolist())) == largest_pairs(scores, 8, 0.04)
    assert np.all(np.diff(merged.pair_scores.numpy()) <= 0)


def test_the_tile_grid_runs_a_blocks_outermost():
    assert list(kernel.tile_grid(5, 3, 2)) == [(0, 0), (0, 2), (2, 0), (2, 2), (4, 0), (4, 2)]


# --- search: arguments and threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 3])
def test_a_search_on_any_number_of_workers_is_the_brute_force_answer_and_reports_each_tile(workers):
    a_rows, b_rows = sign_rows(50, 16, seed=32), sign_rows(45, 16, seed=33)
    scores = pearson(a_rows, b_rows).astype(np.float32)
    progress = Counter()

    found = kernel.search(a_rows, b_rows, k=3, block_rows=8, workers=workers, screen="int8", progress=progress)

    assert np.array_equal(found.row_indices.numpy(), top_k(scores, 3)[1])
    assert np.array_equal(found.col_indices.numpy(), scores.argmax(axis=0))
    assert progress.n == 7 * 6


def test_raw_rows_searched_against_prepared_rows_take_the_prepared_screen():
    a_rows, b_rows = gaussian(30, 16, seed=34), gaussian(40, 16, seed=35)
    scores = pearson(a_rows, b_rows).astype(np.float32)

    against_b = kernel.search(a_rows, kernel.PreparedRows.of(b_rows, 16, "bfloat16"), k=2, block_rows=16)
    against_a = kernel.search(kernel.PreparedRows.of(a_rows, 16, "bfloat16"), b_rows, k=2, block_rows=16)

    assert np.array_equal(against_b.row_indices.numpy(), top_k(scores, 2)[1])
    assert np.array_equal(against_a.row_indices.numpy(), top_k(scores, 2)[1])


@pytest.mark.parametrize("case", ["asked another screen", "prepared with two screens", "b of another block size"])
def test_prepared_rows_that_do_not_match_the_search_are_refused(case):
    a_rows, b_rows = gaussian(20, 8, seed=36), gaussian(20, 8, seed=37)
    a = kernel.PreparedRows.of(a_rows, 16, "int8")
    b = {"asked another screen": b_rows, "prepared with two screens": kernel.PreparedRows.of(b_rows, 16, "float32"),
         "b of another block size": kernel.PreparedRows.of(b_rows, 8, "int8")}[case]

    with pytest.raises(ValueError, match="prepared rows must share"):
        kernel.search(a, b, k=1, block_rows=16, screen="float32" if case == "asked another screen" else None)


def test_a_search_keeps_every_pair_within_band_below_the_top_pairs_th_across_tiles():
    # one top pair but a wide band: most of the pairs kept lie in tiles whose own best is far below the global one
    a_rows, b_rows = gaussian(40, 8, seed=46), gaussian(50, 8, seed=47)
    scores = pearson(a_rows, b_rows).astype(np.float32)

    found = kernel.search(a_rows, b_rows, k=1, block_rows=16, top_pairs=2, band=0.3, screen="float32")

    assert set(zip(found.pair_rows.tolist(), found.pair_cols.tolist())) == largest_pairs(scores, 2, 0.3)


def test_a_search_without_top_pairs_returns_empty_pairs():
    found = kernel.search(gaussian(10, 8, seed=38), gaussian(12, 8, seed=39), k=2, block_rows=4)

    assert (len(found.pair_scores), found.pair_rows.dtype, found.pair_scores.dtype) == (0, torch.int64, torch.float32)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_map_blocks_keeps_the_items_order_and_on_cpu_runs_each_with_one_intra_op_thread(device):
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        found = kernel.map_blocks(lambda item: (item * item, torch.get_num_threads()), range(7), device)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)

    assert [square for square, _ in found] == [0, 1, 4, 9, 16, 25, 36] and after == 2
    assert device == "cuda" or all(threads == 1 for _, threads in found)


def test_invalid_rows_are_found_with_one_intra_op_thread_and_the_setting_is_restored():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        invalid = kernel.find_invalid_rows(torch.tensor([[1.0, 2.0], [3.0, 3.0]]))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)

    assert invalid.tolist() == [False, True] and after == 2


# --- exact float64 top-k ----------------------------------------------------------------------------------------


def test_exact_topk_in_small_query_slices_and_blocks_is_the_float64_brute_force():
    queries, reference = sign_rows(23, 16, seed=40), sign_rows(40, 16, seed=41)
    scores = pearson(queries, reference)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    blocks = [(start, reference[start:start + 9]) for start in range(0, 40, 9)]

    found_scores, found_indices = kernel.exact_topk(queries, blocks[::-1], 5, query_rows=4)

    assert (found_scores.dtype, found_indices.dtype) == (torch.float64, torch.int64)
    assert np.array_equal(found_indices.numpy(), expected)
    assert np.allclose(found_scores.numpy(), np.take_along_axis(scores, expected, 1), rtol=0, atol=1e-15)


def test_exact_topk_with_k_above_the_reference_rows_keeps_them_all():
    queries, reference = gaussian(6, 10, seed=42), gaussian(4, 10, seed=43)

    found_scores, found_indices = kernel.exact_topk(queries, [(0, reference[:3]), (3, reference[3:])], 10)

    assert np.array_equal(found_indices.numpy(), np.argsort(-pearson(queries, reference), axis=1, kind="stable"))


def test_merged_exact_parts_in_any_order_are_the_top_k_with_ties_to_the_lowest_index():
    queries, reference = sign_rows(12, 16, seed=44), sign_rows(30, 16, seed=45)
    scores = pearson(queries, reference)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    parts = [kernel.exact_topk(queries, [(start, reference[start:start + 10])], 4) for start in (0, 10, 20)]

    merged_scores, merged_indices = kernel.merge_exact_topk(reversed(parts), 4)
    single = kernel.merge_exact_topk(parts[:1], 4)

    assert np.array_equal(merged_indices.numpy(), expected)
    assert np.allclose(merged_scores.numpy(), np.take_along_axis(scores, expected, 1), rtol=0, atol=1e-15)
    assert np.array_equal(single[1].numpy(), np.argsort(-scores[:, :10], axis=1, kind="stable")[:, :4])


@pytest.mark.parametrize("shape, k", [((3, 5), 0), ((0, 5), 2)])
def test_topk_lowest_index_of_nothing_is_empty(shape, k):
    values, columns = kernel.topk_lowest_index(torch.zeros(shape, dtype=torch.float64), k)

    assert values.shape == columns.shape == (shape[0], min(k, shape[1])) and columns.dtype == torch.int64


def test_exact_pair_scores_are_float64_correlations():
    rng = np.random.default_rng(48)
    a, b = rng.standard_normal((15, 33)), rng.standard_normal((15, 33))

    found = kernel.exact_pair_scores(torch.from_numpy(a).float(), torch.from_numpy(b).float())

    expected = np.diag(pearson(a.astype(np.float32), b.astype(np.float32)))
    assert found.dtype == torch.float64 and np.allclose(found.numpy(), expected, rtol=0, atol=1e-15)


def test_topk_lowest_index_of_rows_tied_throughout_keeps_their_lowest_columns():
    values, columns = kernel.topk_lowest_index(torch.full((3, 5), 0.25, dtype=torch.float64), 2)

    assert columns.tolist() == [[0, 1]] * 3 and values.tolist() == [[0.25, 0.25]] * 3


def test_topk_lowest_index_of_a_single_row_finds_its_best_columns():
    values, columns = kernel.topk_lowest_index(torch.tensor([[0.1, 0.7, 0.3, 0.7]], dtype=torch.float64), 2)

    assert (columns.tolist(), values.tolist()) == ([[1, 3]], [[0.7, 0.7]])


def test_merging_many_tied_exact_parts_keeps_the_lowest_indices():
    """k = 40 of 200 references with exact ties (+-1 rows): each merge sorts 80 candidates, where torch's unstable
    CPU sort no longer keeps the index order of equal scores (it does below about 64)."""
    queries, reference = sign_rows(6, 16, seed=49), sign_rows(200, 16, seed=50)
    expected = np.argsort(-pearson(queries, reference), axis=1, kind="stable")[:, :40]
    parts = [kernel.exact_topk(queries, [(start, reference[start:start + 50])], 40) for start in (150, 0, 100, 50)]

    _, merged = kernel.merge_exact_topk(parts, 40)

    assert np.array_equal(merged.numpy(), expected)


def test_a_search_for_top_pairs_without_a_band_returns_exactly_that_many():
    a_rows, b_rows = gaussian(30, 12, seed=51), gaussian(25, 12, seed=52)
    scores = pearson(a_rows, b_rows).astype(np.float32)

    found = kernel.search(a_rows, b_rows, k=1, top_pairs=7, block_rows=16, screen="float32")

    pairs = set(zip(found.pair_rows.tolist(), found.pair_cols.tolist()))
    assert pairs == largest_pairs(scores, 7, 0.0) and len(found.pair_scores) == 7


# --- where the work runs: the native reduction, the workspace, the floors, the threads, the device ------------------


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that each call's keyword arguments are recorded (and the call still made)."""
    calls, real = [], getattr(module, name)

    def recording(*args, **kwargs):
        calls.append({"thread": threading.get_ident(), "intra_op_threads": torch.get_num_threads(), **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


@pytest.mark.parametrize("k, native_reductions, expected", [
    (3, True, True), (kernel.native.MAX_K, True, True), (kernel.native.MAX_K + 1, True, False), (3, False, False)])
def test_a_cpu_tile_reduces_its_strips_natively_up_to_the_c_loops_k(monkeypatch, k, native_reductions, expected):
    a, b = kernel.prepare_block(gaussian(20, 16, seed=53), "float32"), kernel.prepare_block(gaussian(70, 16, seed=54),
                                                                                           "float32")
    calls = count_calls(monkeypatch, kernel.native, "reduce_strip")

    tile = kernel.search_tile(a, b, a_offset=0, b_offset=0, k=k, native_reductions=native_reductions)

    expected_cols = np.argsort(-pearson(a.exact, b.exact).astype(np.float32), axis=1, kind="stable")[:, :k]
    assert (bool(calls), np.array_equal(tile.row_indices.numpy(), expected_cols)) == (expected, True)


def test_a_cpu_tile_takes_the_native_reduction_by_default(monkeypatch):
    assert kernel.native.load() is not None, "the C reduction did not build (a C compiler is needed)"
    a = kernel.prepare_block(gaussian(10, 16, seed=55), "float32")
    calls = count_calls(monkeypatch, kernel.native, "reduce_strip")

    kernel.search_tile(a, a, a_offset=0, b_offset=0, k=2)

    assert len(calls) == 1


def test_a_search_prepares_one_workspace_per_thread_and_passes_it_to_every_tile(monkeypatch):
    made = count_calls(monkeypatch, kernel, "make_workspace")
    tiles = count_calls(monkeypatch, kernel, "search_tile")

    kernel.search(gaussian(24, 16, seed=56), gaussian(24, 16, seed=57), k=2, block_rows=8, workers=1,
                  screen="float32")

    workspaces = {id(call["workspace"]) for call in tiles}
    assert (len(made), len(tiles), len(workspaces), None in [call["workspace"] for call in tiles]) == (1, 9, 1, False)


def test_later_tiles_of_a_search_get_the_floors_earlier_tiles_found(monkeypatch):
    """One worker; a tile is submitted once the tiles two places before it are merged (the pending bound), so the
    third and fourth tile of one A block (B block) certainly see the k-th scores (best scores) the first found."""
    tiles = count_calls(monkeypatch, kernel, "search_tile")

    kernel.search(gaussian(8, 16, seed=58), gaussian(32, 16, seed=59), k=2, block_rows=8, workers=1, screen="float32")
    kernel.search(gaussian(32, 16, seed=58), gaussian(8, 16, seed=59), k=2, block_rows=8, workers=1, screen="float32")

    finite = [(bool(torch.isfinite(call["row_floor"]).all()), bool(torch.isfinite(call["column_floor"]).all()))
              for call in tiles]
    one_a_block, one_b_block = finite[:4], finite[4:]
    assert ([rows for rows, _ in one_a_block[2:]], [cols for _, cols in one_a_block]) == ([True, True], [False] * 4)
    assert ([rows for rows, _ in one_b_block], [cols for _, cols in one_b_block[2:]]) == ([False] * 4, [True, True])


def test_a_search_runs_its_tiles_on_the_given_workers_each_with_one_intra_op_thread(monkeypatch):
    """The first two tiles wait for each other (a barrier), so two workers must run them at once and a third
    thread would be made for the next tiles submitted meanwhile, if the pool allowed one."""
    real, calls, both = kernel.search_tile, [], threading.Barrier(2, timeout=10)

    def tile(*args, **kwargs):
        calls.append((threading.get_ident(), torch.get_num_threads()))
        if len(calls) <= 2:
            both.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "search_tile", tile)
    with kernel._intra_op_threads(2):
        kernel.search(gaussian(16, 16, seed=60), gaussian(32, 16, seed=61), k=2, block_rows=8, workers=2,
                      screen="float32")

    assert (len(calls), len({thread for thread, _ in calls}), {threads for _, threads in calls}) == (8, 2, {1})


def test_map_blocks_defaults_to_the_cpu():
    assert kernel.map_blocks(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]


def test_the_accumulator_and_the_workspace_live_on_the_given_device():
    """The meta device stands in for a GPU: a tensor made without the device would land on the CPU."""
    meta = torch.device("meta")

    accumulator = kernel.SearchAccumulator(5, 6, 2, top_pairs=3, device=meta)
    workspace = kernel.make_workspace(10, meta)
    empty = kernel._concat([], meta)

    tensors = [value for value in vars(accumulator).values() if isinstance(value, torch.Tensor)]
    tensors += [workspace.scores, workspace.product, *empty]
    assert (len(tensors), {tensor.device.type for tensor in tensors}) == (13, {"meta"})
    assert kernel.SearchAccumulator(1, 1, 1).col_scores.device.type == "cpu"


def test_the_accumulated_result_has_int64_indices_and_float32_scores():
    a_rows, b_rows = gaussian(10, 16, seed=62), gaussian(12, 16, seed=63)
    accumulator = kernel.SearchAccumulator(10, 12, 3, top_pairs=4)
    a = kernel.prepare_block(a_rows, "float32")
    for start in (0, 6):
        b = kernel.prepare_block(b_rows[start:start + 6], "float32")
        accumulator.add(kernel.search_tile(a, b, a_offset=0, b_offset=start, k=3, top_pairs=4), 0, start)

    result = accumulator.result()

    dtypes = {name: getattr(result, name).dtype for name in ("row_indices", "col_indices", "pair_rows", "pair_cols",
                                                             "row_scores", "col_scores", "pair_scores")}
    assert dtypes == {"row_indices": torch.int64, "col_indices": torch.int64, "pair_rows": torch.int64,
                      "pair_cols": torch.int64, "row_scores": torch.float32, "col_scores": torch.float32,
                      "pair_scores": torch.float32}


# --- small contracts --------------------------------------------------------------------------------------------------


def test_screen_values_are_computed_in_the_workspace():
    workspace = kernel.make_workspace(8)
    for screen in ("int8", "float32", "bfloat16"):
        a, b = kernel.prepare_block(gaussian(4, 16, seed=64), screen), kernel.prepare_block(gaussian(8, 16, seed=65),
                                                                                          screen)

        values = kernel.screen_values(a.screen, b.screen.T, workspace)

        assert values.data_ptr() == workspace.scores.data_ptr(), screen


def test_int8_tiles_are_refused_where_int32_sums_could_overflow():
    """d * 127**2 must stay below 2**31: d = 133144 is the largest dimension that does."""
    def bound(d):
        block = kernel.prepare_block(torch.ones(2, d).index_fill_(1, torch.tensor([0]), -1.0), "int8")
        return kernel.ScreenBound.for_tile(block, block)

    assert bound(133_144).dtype == torch.int32
    with pytest.raises(AssertionError):
        bound(133_145)


def test_negative_zero_has_the_bits_of_positive_zero():
    bits = kernel._monotone_bits(torch.tensor([-1e-45, -0.0, 0.0, 1e-45]))

    assert bits.tolist()[1] == bits.tolist()[2] and bits.tolist() == sorted(bits.tolist())


def test_a_tile_asked_for_its_one_largest_pair_returns_one():
    a, b = kernel.prepare_block(gaussian(9, 16, seed=66), "float32"), kernel.prepare_block(gaussian(11, 16, seed=67),
                                                                                          "float32")

    tile = kernel.search_tile(a, b, a_offset=0, b_offset=0, k=1, top_pairs=1)

    scores = pearson(a.exact, b.exact)
    assert (tile.pair_rows.tolist(), tile.pair_cols.tolist()) == ([int(scores.argmax() // 11)],
                                                                  [int(scores.argmax() % 11)])


# --- which path the work takes: numpy's nonzero, the top-k's fast path, candidates already in order, strips -----


def test_the_cpus_nonzero_takes_numpy_not_torch_nonzero(monkeypatch):
    """On the CPU numpy's flatnonzero runs several times faster than torch.nonzero (_nonzero's docstring)."""
    mask = torch.tensor([[False, True, False, True], [True, False, False, True]])
    monkeypatch.setattr(torch, "nonzero", lambda *args, **kwargs: pytest.fail("torch.nonzero on the CPU"))

    rows, cols = kernel._nonzero(mask)

    assert (rows.tolist(), cols.tolist()) == ([0, 0, 1, 1], [1, 3, 0, 3])


def test_rows_without_a_tie_at_the_kth_place_sort_only_their_k_best(monkeypatch):
    """The fast path: torch.topk's k-th value decides each row's candidates; only with a tie straddling the k-th
    place are whole rows sorted. Distinct random scores never tie, so no sort sees more than k columns."""
    scores = torch.from_numpy(np.random.default_rng(70).standard_normal((5, 40)))
    widths, real = [], torch.sort

    def recorded(values, *args, **kwargs):
        widths.append(values.shape[-1])
        return real(values, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", recorded)
    values, columns = kernel.topk_lowest_index(scores, 3)

    expected_columns = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :3]
    assert (widths, columns.tolist()) == ([3], expected_columns.tolist())
    assert np.array_equal(values.numpy(), np.take_along_axis(scores.numpy(), expected_columns, 1))


def rescore_case(order):
    """Candidate pairs of two float32-screen blocks in the given order, with their screen scores."""
    a, b = kernel.prepare_block(gaussian(5, 16, seed=71), "float32"), kernel.prepare_block(gaussian(6, 16, seed=72),
                                                                                          "float32")
    rows, cols = torch.tensor([0, 0, 2, 3, 4])[order], torch.tensor([1, 5, 0, 2, 4])[order]
    screen = (a.screen @ b.screen.T)[rows, cols]
    return a, b, rows, cols, screen, kernel.ScreenBound.for_tile(a, b)


@pytest.mark.parametrize("order, sorts", [([0, 1, 2, 3, 4], 0), ([3, 0, 4, 2, 1], 1)])
def test_rescore_sorts_its_candidates_only_when_they_are_out_of_order(monkeypatch, order, sorts):
    a, b, rows, cols, screen, bound = rescore_case(order)
    calls = count_calls(monkeypatch, torch, "argsort")

    rows, cols, _, scores = kernel.rescore(a, b, rows, cols, screen, bound)

    expected = pearson(a.exact, b.exact)[[0, 0, 2, 3, 4], [1, 5, 0, 2, 4]].astype(np.float32)
    assert (len(calls), rows.tolist(), cols.tolist(), scores.tolist()) == (
        sorts, [0, 0, 2, 3, 4], [1, 5, 0, 2, 4], expected.tolist())


def test_a_tile_wider_than_the_strip_budget_screens_one_row_at_a_time(monkeypatch):
    """STRIP_SCORES bounds a strip's scores (its memory); a row wider than that still makes a strip of one row."""
    a, b = kernel.prepare_block(gaussian(5, 16, seed=73), "float32"), kernel.prepare_block(gaussian(24, 16, seed=74),
                                                                                          "float32")
    monkeypatch.setattr(kernel, "STRIP_SCORES", 20)
    heights, real = [], kernel.screen_values
    monkeypatch.setattr(kernel, "screen_values",
                        lambda strip, *args: heights.append(strip.shape[0]) or real(strip, *args))

    tile = kernel.search_tile(a, b, a_offset=0, b_offset=0, k=2)

    expected_cols = np.argsort(-pearson(a.exact, b.exact).astype(np.float32), axis=1, kind="stable")[:, :2]
    assert (heights, tile.row_indices.tolist()) == ([1] * 5, expected_cols.tolist())


# --- threads: the pending tiles' bound, merging as tiles finish, intra-op threads per worker, map_blocks ---------


def test_a_search_keeps_at_most_two_tiles_per_worker_pending(monkeypatch):
    """One worker: while the first tile runs, the search submits one more and then waits for a tile to finish
    (2 x workers pending). The first tile waits a second for more submissions that must not come."""
    submitted = []

    class Counting(kernel.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            submitted.append(1)
            return super().submit(*args, **kwargs)

    seen, real = [], kernel.search_tile

    def tile(*args, **kwargs):
        if not seen:
            deadline = time.monotonic() + 1.0
            while len(submitted) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(len(submitted))
        return real(*args, **kwargs)

    a, b = (kernel.PreparedRows.of(gaussian(n, 16, seed=n), 8, "float32") for n in (8, 40))  # before counting
    monkeypatch.setattr(kernel, "ThreadPoolExecutor", Counting)
    monkeypatch.setattr(kernel, "search_tile", tile)
    kernel.search(a, b, k=2, block_rows=8, workers=1)

    assert (seen, len(submitted)) == ([2], 5)


def test_a_slow_tile_does_not_hold_back_the_other_worker(monkeypatch):
    """Two workers: the first tile to start waits for the fifth to start. The search merges tiles as they finish
    (not all pending ones at once), so the other worker runs the second to fifth tiles meanwhile."""
    fifth_started, starts, real = threading.Event(), [], kernel.search_tile
    waited = []

    def tile(*args, **kwargs):
        starts.append(1)
        if len(starts) == 5:
            fifth_started.set()
        if len(starts) == 1:
            waited.append(fifth_started.wait(timeout=10))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "search_tile", tile)
    with kernel._intra_op_threads(2):
        kernel.search(gaussian(8, 16, seed=77), gaussian(48, 16, seed=78), k=2, block_rows=8, workers=2,
                      screen="float32")

    assert (waited, len(starts)) == ([True], 6)


def test_each_of_two_workers_gets_half_of_four_intra_op_threads():
    threads, real = [], kernel.search_tile

    def tile(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, kernel._intra_op_threads(4):
        patch.setattr(kernel, "search_tile", tile)
        kernel.search(gaussian(8, 16, seed=79), gaussian(16, 16, seed=80), k=2, block_rows=8, workers=2,
                      screen="float32")

    assert threads == [2, 2]


def test_the_validity_check_runs_on_one_intra_op_thread(monkeypatch):
    calls = count_calls(monkeypatch, torch, "isfinite")
    rows = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.0, float("nan"), 0.0]])

    with kernel._intra_op_threads(2):
        invalid = kernel.find_invalid_rows(rows)

    assert ([call["intra_op_threads"] for call in calls], invalid.tolist()) == ([1], [False, True, True])


def test_map_blocks_with_one_intra_op_thread_runs_in_the_callers_thread():
    with kernel._intra_op_threads(1):
        threads = kernel.map_blocks(lambda item: threading.get_ident(), [1, 2, 3])

    assert threads == [threading.get_ident()] * 3


def test_map_blocks_runs_as_many_threads_as_intra_op_threads_each_with_one():
    """Two intra-op threads, four items: two threads run at once (the first two meet at a barrier), never more
    (the items hold their place a moment after it, so a larger pool would run the others beside them)."""
    both, lock, active, seen = threading.Barrier(2, timeout=10), threading.Lock(), [0], []

    def work(item):
        with lock:
            active[0] += 1
            seen.append((active[0], torch.get_num_threads()))
        if item < 2:
            both.wait()
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return item * 10

    with kernel._intra_op_threads(2):
        results = kernel.map_blocks(work, [0, 1, 2, 3])

    assert (results, max(count for count, _ in seen), {threads for _, threads in seen}) == ([0, 10, 20, 30], 2, {1})


# --- the screens' tightness: how many candidates reach the exact rescoring ------------------------------------------


def test_a_tile_asked_for_one_top_pair_returns_only_its_best_pair():
    """search_tile's contract: the tile's top_pairs largest exact scores plus those within band below (band 0 here);
    the screen's candidates around the best are trimmed in the tile, not left to the merge."""
    a, b = (kernel.prepare_block(gaussian(n, 64, seed=n), "int8") for n in (40, 60))

    tile = kernel.search_tile(a, b, a_offset=0, b_offset=0, k=2, top_pairs=1)

    scores = pearson(a.exact, b.exact)
    best = np.unravel_index(np.argmax(scores), scores.shape)
    assert (tile.pair_rows.tolist(), tile.pair_cols.tolist()) == ([best[0]], [best[1]])


def test_rows_of_exactly_k_chunks_are_screened_by_their_kth_chunk_maximum():
    """Two chunks of COLUMN_CHUNK columns and k = 2: a row's bound is the lower of its two chunk maxima, so only the
    entries near the top of the row are candidates, not all 128 (and the row's exact top 2 among them)."""
    a = kernel.prepare_block(gaussian(4, 16, seed=81), "float32")
    b = kernel.prepare_block(gaussian(2 * kernel.COLUMN_CHUNK, 16, seed=82), "float32")
    strip = a.screen @ b.screen.T
    chunk_max = strip.view(4, 2, kernel.COLUMN_CHUNK).amax(dim=2)
    bound = kernel.ScreenBound.for_tile(a, b)

    (rows, cols, _), _ = kernel._row_candidates(strip, chunk_max, 2, bound, torch.full((4,), bound.lowest))

    top2 = np.argsort(-pearson(a.exact, b.exact), axis=1)[:, :2]
    candidates = set(zip(rows.tolist(), cols.tolist()))
    assert {(row, int(col)) for row in range(4) for col in top2[row]} <= candidates and len(candidates) <= 4 * 8
