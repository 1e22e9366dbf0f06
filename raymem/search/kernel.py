"""Exact all-pairs Pearson-correlation search between two embedding sets, in tiles (pure torch, CPU or CUDA).

For A (n x d) and B (m x d) the search returns, without ever holding the n x m score matrix:

- every A row's top-k B rows (scores descending, ties towards the lowest B index);
- every B row's best A row (ties towards the lowest A index);
- optionally the largest pair scores over all n * m pairs (``top_pairs``), which the matched calibration's
  null distribution needs (raymem.audit.metrics).

Scores are Pearson correlations: each row is centred and L2-normalised in float64, so a score is the dot product
of two standardized rows. Every reported score is that dot product computed in float64 and rounded to float32, so
the results do not depend on the BLAS, the tile grid or the screen below. Ties go to the lowest index, exactly:
selections sort int64 keys that pack a float32 score and an index (``order_key``).

Screen and recheck. A tile's scores are first computed by one GEMM of the rows rounded for a screen
(``SCREENS``; ``default_screen``: int8 with exact int32 sums up to INT8_MAX_DIM on CPUs with 8-bit dot products,
about 4x the float32 GEMM rate; bfloat16, about 2.4x, above that; float32 elsewhere). ``ScreenBound`` bounds the
screen's error from below and above for that tile: the measured rounding of the rows, the GEMM's float32
accumulation and, for a bfloat16 result, its rounding. The reductions run on the screen values with every
threshold lowered by that bound, so they keep a few more entries than they need and never one fewer; those
candidates are then recomputed in float64 and the exact selection is made among them. A candidate whose screen
value falls outside its bound (a GEMM that does not accumulate as assumed) raises. Tiles also skip entries below
what merged tiles already found (``search_tile``'s floors).

The work is split on a fixed grid of tiles: A rows and B rows in blocks of ``block_rows``. ``search_tile`` is
the one function that turns a tile into partial results, and ``SearchAccumulator`` merges partial results in any
order into the same answer; the Ray search (raymem.search.distributed) uses both unchanged.

Inside a tile, A rows go in strips whose score buffer stays cache-sized. Per strip the reductions touch every
score once or twice with value-only maxima (over chunks of ``COLUMN_CHUNK`` columns and ``ROW_CHUNK`` rows); the
few entries that can matter are then picked out. Memory is O(strip + results).

Float64 recomputation of whole rows (``exact_topk``, ``exact_pair_scores``) serves the audit's decisions within
1e-3 of a threshold (raymem.audit.metrics).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from raymem.search import native

COLUMN_CHUNK = 64  # columns per chunk maximum (rows' top-k): a row's candidates are chunks that reach its bound
ROW_CHUNK = 16  # rows per chunk maximum (columns' best)
STRIP_SCORES = 1 << 21  # scores per strip buffer: 8 MiB of float32 stays in this CPU's caches
SCREENS = ("int8", "bfloat16", "float32")
INT8_MAX_DIM = 160  # default_screen; docs/benchmarks.md: int8 is faster at d = 128 on the dev box, bf16 at 256
_BFLOAT16_ROUNDOFF = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_FLOAT64_NOISE = 1e-9  # float64 standardization and dot products of unit rows, d << 1e6: errors below 1e-12
_REPORT_SLACK = 1e-6  # screen thresholds sit this far lower: float32 rounding of thresholds and reported scores
_INT32_MAGNITUDE = 0x7FFFFFFF
PADDING_INDEX = 0x7FFFFFFF  # index of a tile's padding entries (score -inf): order_key sorts it after every row

# rescore builds a sparse CSR pattern only to name the pairs for sampled_addmm; torch warns that CSR is beta
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@contextmanager
def _intra_op_threads(n: int):
    """Run torch ops with n intra-op threads inside the block (torch's setting is process-wide)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def find_invalid_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows whose Pearson correlation is undefined: (n, d) -> (n,) bool, True where a row has a non-finite
    value or is constant (centring leaves the zero vector). One intra-op thread (``map_blocks`` says why)."""
    with _intra_op_threads(1):
        finite = torch.isfinite(embeddings).all(dim=1)
        constant = embeddings.amax(dim=1) == embeddings.amin(dim=1)
    return ~finite | constant


def standardize(embeddings: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centre and L2-normalise each row, computed in float64: (n, d) -> (n, d) in ``dtype``.

    The Pearson correlation of two rows is then the dot product of their standardized rows. Rows must be valid
    (``find_invalid_rows`` false); a constant row would divide by zero.
    """
    rows = embeddings.to(torch.float64)
    rows = rows - rows.mean(dim=1, keepdim=True)
    rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows.to(dtype)


def _monotone_bits(scores: torch.Tensor) -> torch.Tensor:
    """int64 in [-2**31, 2**31), ascending with the float32 scores (-0.0 counts as +0.0)."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, bits ^ _INT32_MAGNITUDE, bits).to(torch.int64)


def order_key(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys, ascending in (score descending, index ascending): any shape, float32 scores, indices < 2**31.

    The float32 bits are mapped to an int64 that is monotone in the value, negated, and placed above the index.
    """
    return ((-_monotone_bits(scores)) << 32) | indices


def default_screen(dim: int, device: torch.device | str = "cpu") -> str:
    """The fastest screen for embeddings of dimension ``dim`` on this device.

    On a CPU with 8-bit integer dot products (AVX512-VNNI, AVX-VNNI or AMX) int8 up to INT8_MAX_DIM: its GEMM runs
    at about 2x bfloat16 and 4x float32, but its rounding error (about 0.012 in score, whatever d) is wide against
    the spread of scores (about 1 / sqrt(d)) at large d, and the extra candidates then cost more than the GEMM
    saves. Beyond that, or without VNNI, bfloat16 with bfloat16 dot products (AVX512-BF16, AMX); float32
    elsewhere (CUDA tiles too: raymem.search.gpu has the fused CUDA kernel).
    """
    if torch.device(device).type != "cpu":
        return "float32"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    except OSError:
        return "float32"
    if dim <= INT8_MAX_DIM and {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        return "int8"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"


@dataclass(frozen=True)
class Block:
    """Rows ready for ``search_tile``: exact (r, d) float64 standardized rows; screen (r, d) the same rounded to
    the screen dtype, as multiples of ``scale`` (int8: one scale for the block; 1.0 for float screens);
    rounding: the largest L2 norm of a row's rounding error, ||scale * screen_i - exact_i||."""

    exact: torch.Tensor
    screen: torch.Tensor
    scale: float
    rounding: float


def prepare_block(embeddings: torch.Tensor, screen: str | None = None) -> Block:
    """Standardize raw embeddings (r, d) for the search and round them for the screen (``SCREENS``; None:
    ``default_screen`` of their device). int8 rounds to multiples of the block's largest magnitude / 127."""
    screen = screen or default_screen(embeddings.shape[1], embeddings.device)
    if screen not in SCREENS:
        raise ValueError(f"screen {screen!r} is not one of {SCREENS}")
    exact = standardize(embeddings, torch.float64)
    if screen == "int8":
        scale = float(exact.abs().max()) / 127 if exact.numel() else 1.0
        rounded = torch.round(exact / scale).clamp(-127, 127).to(torch.int8)
    else:
        scale, rounded = 1.0, exact.to(getattr(torch, screen))
    error = torch.linalg.vector_norm(rounded.to(torch.float64) * scale - exact, dim=1)
    return Block(exact=exact, screen=rounded, scale=scale, rounding=float(error.max()) if len(error) else 0.0)


@dataclass(frozen=True)
class ScreenBound:
    """How far a tile's screen score can be from the exact score t of the same pair.

    A strip holds values v (int32 counts for int8, float32 otherwise) whose score estimate is x = scale * v. The
    GEMM computes y with |y - t| <= inner and, for a bfloat16 result, rounds it once: x = y (1 + e) with
    |e| <= output (0 for float32 and int32 results). ``low`` and ``high`` bound t given v; ``reach`` is the
    smallest v whose t can reach a level.
    """

    inner: float
    output: float
    scale: float
    dtype: torch.dtype

    @classmethod
    def for_tile(cls, a: Block, b: Block) -> ScreenBound:
        """The bound of a.screen @ b.screen.T (int8: exact int32 sums; float: float32 accumulation over d terms).

        Rows are unit vectors rounded with errors e_a, e_b (||e|| <= a.rounding, b.rounding): by Cauchy-Schwarz
        |a'.b' - a.b| <= ||e_a|| + ||a'|| ||e_b||, and summing d products in float32 adds at most
        gamma_d ||a'|| ||b'|| (gamma_d = d u / (1 - d u), u = 2**-24; Higham, Accuracy and Stability, 3.1).
        A float32 GEMM that torch lets round its inputs lower (``torch.get_float32_matmul_precision()`` other
        than "highest": TF32 or bfloat16 passes) is bounded as if it rounded them to bfloat16.
        """
        d = a.exact.shape[1]
        norm_a, norm_b = 1 + a.rounding, 1 + b.rounding
        inner = a.rounding + norm_a * b.rounding + _FLOAT64_NOISE
        if a.screen.dtype == torch.int8:
            assert d * 127**2 < 2**31, d  # int32 sums of int8 products stay exact
            return cls(inner=inner, output=0.0, scale=a.scale * b.scale, dtype=torch.int32)
        inner += d * 2.0**-24 / (1 - d * 2.0**-24) * norm_a * norm_b
        if a.screen.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
            inner += (2 * 2.0**-8 + 2.0**-16) * norm_a * norm_b
        output = _BFLOAT16_ROUNDOFF if a.screen.dtype == torch.bfloat16 else 0.0
        return cls(inner=inner, output=output, scale=1.0, dtype=torch.float32)

    @property
    def lowest(self) -> float | int:
        """A value below every screen value: the start of running maxima, the threshold of no floor."""
        return torch.iinfo(self.dtype).min if self.dtype == torch.int32 else -torch.inf

    def low(self, values: torch.Tensor) -> torch.Tensor:
        """A lower bound (float64) of the exact scores of entries with these screen values."""
        x = values.to(torch.float64) * self.scale
        return torch.where(x >= 0, x / (1 + self.output), x / (1 - self.output)) - self.inner

    def high(self, values: torch.Tensor) -> torch.Tensor:
        """An upper bound (float64) of the exact scores of entries with these screen values."""
        x = values.to(torch.float64) * self.scale
        return torch.where(x >= 0, x / (1 - self.output), x / (1 + self.output)) + self.inner

    def reach(self, level: torch.Tensor) -> torch.Tensor:
        """Thresholds in the strip's dtype: every entry whose exact score is >= level (float64), or whose reported
        float32 score can tie with such an entry's, has a screen value >= the threshold (``high`` inverted,
        lowered by _REPORT_SLACK, rounded down)."""
        z = level - _REPORT_SLACK - self.inner
        x = torch.where(z >= 0, z * (1 - self.output), z * (1 + self.output))
        if self.dtype == torch.float32:
            return x.to(torch.float32)
        limits = torch.iinfo(torch.int32)
        return torch.floor(x / self.scale).clamp(limits.min, limits.max).to(torch.int32)


def rescore(a: Block, b: Block, rows: torch.Tensor, cols: torch.Tensor, screen_scores: torch.Tensor,
            bound: ScreenBound) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact scores of distinct candidate pairs (t,) (local rows of a, local rows of b): float64 dot products
    rounded once to float32. Returns (rows, cols, screen_scores, scores), all ordered by (row, col).

    A sampled dense-dense product (``torch.sparse.sampled_addmm``) computes just these dot products, reading the
    rows in place: gathering t rows of d float64s for an element-wise product costs some 30 times more. Raises if
    a screen score lies outside its bound (a GEMM that broke the bound's assumptions).
    """
    pairs = rows * b.exact.shape[0] + cols
    if len(pairs) > 1 and not bool((pairs[1:] > pairs[:-1]).all()):  # row candidates come in order already
        order = torch.argsort(pairs)
        rows, cols, screen_scores = rows[order], cols[order], screen_scores[order]
    row_starts = torch.zeros(a.exact.shape[0] + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=a.exact.shape[0]), 0, out=row_starts[1:])
    pattern = torch.sparse_csr_tensor(row_starts, cols, torch.zeros(len(rows), dtype=torch.float64, device=rows.device),
                                      size=(a.exact.shape[0], b.exact.shape[0]), check_invariants=False)
    exact = torch.sparse.sampled_addmm(pattern, a.exact, b.exact.T).values()
    outside = (exact < bound.low(screen_scores)) | (exact > bound.high(screen_scores))
    if outside.any():
        worst = float((exact - screen_scores.to(torch.float64) * bound.scale).abs().max())
        raise RuntimeError(
            f"the {a.screen.dtype} screen GEMM erred by {worst:.3g}, beyond its bound (inner {bound.inner:.3g}, "
            f"output {bound.output:.3g}); this BLAS does not accumulate as assumed: search with screen='float32'"
        )
    return rows, cols, screen_scores, exact.to(torch.float32)


@dataclass(frozen=True)
class SearchResult:
    """An all-pairs search of A (n x d) against B (m x d), or one tile's part of it (then n, m are the tile's
    row counts and indices are still global).

    row_scores (n, k) float32 and row_indices (n, k) int64: each A row's best B rows, best first, ties towards the
    lowest index; k = min(requested k, m).
    col_scores (m,) float32 and col_indices (m,) int64: each B row's best A row, ties towards the lowest index.
    pair_scores (t,) float32, pair_rows (t,) int64 (A index), pair_cols (t,) int64 (B index): the largest pair
    scores; see ``search`` for which ones. A whole search lists them best first (ties: lowest A index, then lowest
    B index); one tile's part lists its candidates by (A index, B index), and the accumulator orders them.
    """

    row_scores: torch.Tensor
    row_indices: torch.Tensor
    col_scores: torch.Tensor
    col_indices: torch.Tensor
    pair_scores: torch.Tensor
    pair_rows: torch.Tensor
    pair_cols: torch.Tensor


def _select_per_row(rows: torch.Tensor, cols: torch.Tensor, scores: torch.Tensor, n_rows: int, k: int):
    """From candidate entries (t,) with local row numbers, each row's best k by (score desc, col asc).

    Entries of one row must come in ascending col order (one stable sort then breaks score ties by col). Returns
    (n_rows, k) scores and cols; a row with fewer than k candidates is padded with score -inf and col -1.
    """
    descending = _INT32_MAGNITUDE - _monotone_bits(scores)  # in [0, 2**32)
    by_row = torch.sort((rows << 32) | descending, stable=True).indices
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(by_row), device=rows.device) - starts[rows[by_row]]
    kept = by_row[position < k]
    if len(kept) == n_rows * k:
        return scores[kept].view(n_rows, k), cols[kept].view(n_rows, k)
    best_scores = torch.full((n_rows, k), -torch.inf, device=scores.device)
    best_cols = torch.full((n_rows, k), -1, dtype=torch.int64, device=cols.device)
    best_scores[rows[kept], position[position < k]] = scores[kept]
    best_cols[rows[kept], position[position < k]] = cols[kept]
    return best_scores, best_cols


def _nonzero(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 of the true entries of a 2D bool mask, in row-major order. On CPU numpy's flatnonzero
    runs several times faster than torch.nonzero."""
    if mask.device.type == "cpu":
        flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
    else:
        flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
    return flat // mask.shape[1], flat % mask.shape[1]


def _entries_at_least(strip: torch.Tensor, chunk_max: torch.Tensor, bound: torch.Tensor):
    """The entries of a strip (r, w) that are >= bound (r,), as local (rows, cols, scores).

    chunk_max (r, w // COLUMN_CHUNK) holds each full chunk's maximum; only chunks that reach the bound are read.
    The w % COLUMN_CHUNK trailing columns are read directly.
    """
    n_chunks = chunk_max.shape[1]
    chunk_rows, chunks = _nonzero(chunk_max >= bound[:, None])
    chunked = strip[:, : n_chunks * COLUMN_CHUNK].view(len(strip), n_chunks, COLUMN_CHUNK)
    if chunked.is_contiguous():  # index_select on whole chunks is several times faster than fancy indexing
        values = chunked.view(-1, COLUMN_CHUNK).index_select(0, chunk_rows * n_chunks + chunks)
    else:
        values = chunked[chunk_rows, chunks]
    hit, offset = _nonzero(values >= bound[chunk_rows, None])
    rows, cols, scores = chunk_rows[hit], chunks[hit] * COLUMN_CHUNK + offset, values[hit, offset]
    tail = strip[:, n_chunks * COLUMN_CHUNK :]
    if tail.shape[1] == 0:
        return rows, cols, scores
    tail_rows, tail_cols = _nonzero(tail >= bound[:, None])
    return (
        torch.cat([rows, tail_rows]),
        torch.cat([cols, tail_cols + n_chunks * COLUMN_CHUNK]),
        torch.cat([scores, tail[tail_rows, tail_cols]]),
    )


def _row_candidates(strip: torch.Tensor, chunk_max: torch.Tensor, k: int, bound: ScreenBound, floor: torch.Tensor):
    """Entries of a strip (r, w) of screen scores that include every row's exact top-k (k <= w) among the
    entries that reach ``floor`` (r,) (screen thresholds from other tiles), as local (rows, cols, screen scores),
    and the rows' thresholds (r,).

    A row's screen bound is the k-th largest of its chunk maxima: k distinct entries reach it, so the row's k-th
    best exact score is at least ``bound.low`` of it, and only entries that can reach that are kept (a few more
    than k per row).
    """
    if chunk_max.shape[1] >= k:
        kth = torch.topk(chunk_max, k, dim=1, sorted=False).values.amin(dim=1)
        floor = torch.maximum(bound.reach(bound.low(kth)), floor)
    return _entries_at_least(strip, chunk_max, floor), floor


def _column_candidates(strip: torch.Tensor, column_max: torch.Tensor, bound: ScreenBound, floor: torch.Tensor):
    """Entries of a strip (r, w) that can be their column's best in the tile so far and reach ``floor`` (w,)
    (screen thresholds from other tiles), as local (rows, cols, screen scores), and the columns' running screen
    maxima (w,) updated with this strip.

    Chunk maxima over ROW_CHUNK rows find the chunks that can hold such an entry; only those are read.
    """
    n_rows, width = strip.shape
    n_chunks = n_rows // ROW_CHUNK
    chunk_max = strip[: n_chunks * ROW_CHUNK].view(n_chunks, ROW_CHUNK, width).amax(dim=1)
    tail = strip[n_chunks * ROW_CHUNK :]
    column_max = torch.maximum(column_max, chunk_max.amax(dim=0) if n_chunks else tail.amax(dim=0))
    if n_chunks and len(tail):
        column_max = torch.maximum(column_max, tail.amax(dim=0))
    threshold = torch.maximum(bound.reach(bound.low(column_max)), floor)
    chunks, cols = _nonzero(chunk_max >= threshold)
    in_chunk = torch.arange(ROW_CHUNK, device=strip.device)
    rows = chunks[:, None] * ROW_CHUNK + in_chunk
    values = strip.view(-1).index_select(0, (rows * width + cols[:, None]).view(-1)).view(-1, ROW_CHUNK)
    hit, offset = _nonzero(values >= threshold[cols, None])
    rows, cols, scores = rows[hit, offset], cols[hit], values[hit, offset]
    if len(tail) == 0:
        return column_max, (rows, cols, scores)
    tail_rows, tail_cols = _nonzero(tail >= threshold)
    return column_max, (
        torch.cat([rows, tail_rows + n_chunks * ROW_CHUNK]),
        torch.cat([cols, tail_cols]),
        torch.cat([scores, tail[tail_rows, tail_cols]]),
    )


def _strip_candidates(strip: torch.Tensor, k: int, bound: ScreenBound, row_floor: torch.Tensor,
                      column_max: torch.Tensor, column_floor: torch.Tensor, use_native: bool):
    """Distinct entries of a strip (r, w) that can be a row's top-k or a column's best, as local (rows, cols, screen
    values), the rows' thresholds (r,), the chunk maxima (r, w // COLUMN_CHUNK) and the columns' running maxima (w,)
    updated with this strip. ``use_native``: the fused C reduction (raymem.search.native; contiguous CPU strips),
    otherwise the same steps as torch operations (``_row_candidates``, ``_column_candidates``)."""
    if use_native:
        candidates, row_threshold, chunk_max = native.reduce_strip(
            native.load(), strip, k, COLUMN_CHUNK, row_floor, column_max, column_floor, bound, _REPORT_SLACK)
        return candidates, row_threshold, chunk_max, column_max
    n_chunks = strip.shape[1] // COLUMN_CHUNK
    chunk_max = strip[:, : n_chunks * COLUMN_CHUNK].view(len(strip), n_chunks, COLUMN_CHUNK).amax(dim=2)
    (rows, cols, _), row_threshold = _row_candidates(strip, chunk_max, k, bound, row_floor)
    column_max, (more_rows, more_cols, _) = _column_candidates(strip, column_max, bound, column_floor)
    pairs = torch.unique(torch.cat([rows, more_rows]) * strip.shape[1] + torch.cat([cols, more_cols]))
    rows, cols = pairs // strip.shape[1], pairs % strip.shape[1]
    return (rows, cols, strip[rows, cols]), row_threshold, chunk_max, column_max


def _pair_candidates(strip: torch.Tensor, chunk_max: torch.Tensor, count: int, band: float, bound: ScreenBound,
                     level: torch.Tensor):
    """Entries of a strip (r, w) that can be among the tile's ``count`` largest exact scores or within ``band``
    below the count-th, as local (rows, cols, screen scores), and the level (float64) the tile's count-th exact
    score is known to reach, raised with this strip.

    The strip's count-th largest chunk maximum: count distinct entries reach it in screen scores.
    """
    if count <= chunk_max.numel():
        kth = torch.topk(chunk_max.reshape(-1), count, sorted=False).values.amin()
    else:
        kth = torch.topk(strip.reshape(-1), min(count, strip.numel()), sorted=False).values.amin()
    if count <= strip.numel():
        level = torch.maximum(level, bound.low(kth))
    threshold = bound.reach(level - band)
    return level, _entries_at_least(strip, chunk_max, threshold.expand(strip.shape[0]))


@dataclass(frozen=True)
class Workspace:
    """Strip buffers reused across tiles: scores (float32) and product (bfloat16, the screen GEMM's output)."""

    scores: torch.Tensor
    product: torch.Tensor


def make_workspace(b_rows: int, device: torch.device | str = "cpu") -> Workspace:
    """Strip buffers for tiles with up to ``b_rows`` B rows (STRIP_SCORES entries, or one strip row)."""
    size = max(STRIP_SCORES, b_rows)
    return Workspace(scores=torch.empty(size, dtype=torch.float32, device=device),
                     product=torch.empty(size, dtype=torch.bfloat16, device=device))


def screen_values(a_strip: torch.Tensor, b_transposed: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """The strip's screen values (r, w) in the workspace: int32 for an int8 screen, float32 otherwise."""
    shape = (a_strip.shape[0], b_transposed.shape[1])
    scores = workspace.scores[: shape[0] * shape[1]].view(shape)
    if a_strip.dtype == torch.int8:
        return torch._int_mm(a_strip, b_transposed, out=scores.view(torch.int32))
    if a_strip.dtype == torch.float32:
        return torch.mm(a_strip, b_transposed, out=scores)
    product = workspace.product[: shape[0] * shape[1]].view(shape)
    torch.mm(a_strip, b_transposed, out=product)
    return scores.copy_(product)


def _concat(parts: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, scores) parts joined; empty int64/int64/float32 tensors when there are none."""
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, torch.zeros(0, device=device)
    rows, cols, scores = zip(*parts)
    return torch.cat(rows), torch.cat(cols), torch.cat(scores)


def search_tile(
    a: Block,
    b: Block,
    *,
    a_offset: int,
    b_offset: int,
    k: int,
    top_pairs: int = 0,
    band: float = 0.0,
    row_floor: torch.Tensor | None = None,
    column_floor: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    native_reductions: bool = True,
) -> SearchResult:
    """One tile of the search: blocks a (a rows) and b (b rows) from ``prepare_block`` with the same screen dtype,
    their first global row numbers a_offset and b_offset.

    Returns each A row's top-min(k, b) within the tile, each B row's best A row within the tile, and (top_pairs > 0)
    the tile's top_pairs largest scores plus every score within ``band`` below the top_pairs-th; all scores exact
    (float64 rounded to float32). workspace: from ``make_workspace``, reused across tiles.

    row_floor (a,) and column_floor (b,), float32: scores that other tiles already found for each A row's k-th best
    and each B row's best (``SearchAccumulator.floors``; -inf: none yet). Entries below a floor cannot change the
    merged result, so they are skipped; a row or column left without enough entries is padded with score -inf
    and index PADDING_INDEX.

    native_reductions: reduce each strip with the fused C loop (raymem.search.native) where it is built and the
    tile is on the CPU; False takes the torch operations, which give the same result.
    """
    device = a.screen.device
    n_a, n_b = a.screen.shape[0], b.screen.shape[0]
    k = min(k, n_b)
    bound = ScreenBound.for_tile(a, b)
    strip_rows = max(1, STRIP_SCORES // n_b)
    workspace = workspace or make_workspace(n_b, device)
    b_transposed = b.screen.T
    use_native = native_reductions and device.type == "cpu" and k <= native.MAX_K and native.load() is not None
    candidate_parts, row_thresholds, pair_parts = [], [], []
    column_max = torch.full((n_b,), bound.lowest, dtype=bound.dtype, device=device)
    pair_level = torch.tensor(-torch.inf, dtype=torch.float64, device=device)
    no_floor = torch.tensor(bound.lowest, dtype=bound.dtype, device=device)
    row_floor = no_floor.expand(n_a) if row_floor is None else bound.reach(row_floor.to(torch.float64))
    column_floor = no_floor.expand(n_b) if column_floor is None else bound.reach(column_floor.to(torch.float64))
    for start in range(0, n_a, strip_rows):
        strip = screen_values(a.screen[start : start + strip_rows], b_transposed, workspace)
        (rows, cols, values), row_threshold, chunk_max, column_max = _strip_candidates(
            strip, k, bound, row_floor[start : start + len(strip)], column_max, column_floor, use_native)
        candidate_parts.append((rows + start, cols, values))
        row_thresholds.append(row_threshold)
        if top_pairs > 0:
            pair_level, (rows, cols, values) = _pair_candidates(strip, chunk_max, top_pairs, band, bound, pair_level)
            pair_parts.append((rows + start, cols, values))

    rows, cols, values, scores = rescore(a, b, *_concat(candidate_parts, device), bound)
    is_row = values >= torch.cat(row_thresholds)[rows]
    row_scores, row_cols = _select_per_row(rows[is_row], cols[is_row], scores[is_row], n_a, k)
    # strips kept column entries for the lower maxima they knew
    is_column = values >= torch.maximum(bound.reach(bound.low(column_max)), column_floor)[cols]
    col_scores, col_rows = _select_per_row(cols[is_column], rows[is_column], scores[is_column], n_b, 1)

    rows, cols, scores = _concat(pair_parts, device)
    final = scores >= bound.reach(pair_level - band)
    rows, cols, _, pair_scores = rescore(a, b, rows[final], cols[final], scores[final], bound)
    if len(pair_scores) > top_pairs > 0:
        keep = pair_scores >= torch.topk(pair_scores, top_pairs, sorted=False).values.amin() - band
        rows, cols, pair_scores = rows[keep], cols[keep], pair_scores[keep]
    return SearchResult(
        row_scores=row_scores,
        row_indices=torch.where(row_cols >= 0, row_cols + b_offset, PADDING_INDEX),
        col_scores=col_scores[:, 0],
        col_indices=torch.where(col_rows[:, 0] >= 0, col_rows[:, 0] + a_offset, PADDING_INDEX),
        pair_scores=pair_scores,
        pair_rows=rows + a_offset,
        pair_cols=cols + b_offset,
    )


class SearchAccumulator:
    """Merges tile results into the full search result; the order tiles arrive in does not change the answer.

    n, m: A and B row counts; k: top-k per A row; top_pairs: how many of the largest pair scores to keep, plus
    every pair within ``band`` below the top_pairs-th (a tile keeps the same, so no such pair is lost). Holds
    O(n * k + m + pairs) values.
    """

    def __init__(self, n: int, m: int, k: int, *, top_pairs: int = 0, band: float = 0.0, device="cpu"):
        self.k = min(k, m)
        self.top_pairs = top_pairs
        self.band = band
        self.col_scores = torch.full((m,), -torch.inf, device=device)
        self.col_indices = torch.full((m,), n, dtype=torch.int64, device=device)
        self.pair_scores = torch.zeros(0, device=device)
        self.pair_rows = torch.zeros(0, dtype=torch.int64, device=device)
        self.pair_cols = torch.zeros(0, dtype=torch.int64, device=device)
        self._row_indices = torch.zeros((n, self.k), dtype=torch.int64, device=device)
        self._row_scores = torch.full((n, self.k), -torch.inf, device=device)
        self._row_keys = torch.full((n, self.k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)

    def add(self, tile: SearchResult, a_offset: int, b_offset: int) -> None:
        """Merge one tile's result; a_offset/b_offset: the tile's first A and B rows."""
        n_a, n_b = tile.row_scores.shape[0], tile.col_scores.shape[0]
        rows = slice(a_offset, a_offset + n_a)
        keys = torch.cat([self._row_keys[rows], order_key(tile.row_scores, tile.row_indices)], dim=1)
        indices = torch.cat([self._row_indices[rows], tile.row_indices], dim=1)
        scores = torch.cat([self._row_scores[rows], tile.row_scores], dim=1)
        keep = torch.sort(keys, dim=1).indices[:, : self.k]
        self._row_keys[rows] = keys.gather(1, keep)
        self._row_indices[rows] = indices.gather(1, keep)
        self._row_scores[rows] = scores.gather(1, keep)

        cols = slice(b_offset, b_offset + n_b)
        old_scores, old_rows = self.col_scores[cols], self.col_indices[cols]
        better = (tile.col_scores > old_scores) | ((tile.col_scores == old_scores) & (tile.col_indices < old_rows))
        self.col_scores[cols] = torch.where(better, tile.col_scores, old_scores)
        self.col_indices[cols] = torch.where(better, tile.col_indices, old_rows)

        if self.top_pairs > 0:
            self._merge_pairs(tile.pair_scores, tile.pair_rows, tile.pair_cols)

    def floors(self, a_offset: int, a_rows: int, b_offset: int, b_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the tiles merged so far found: the k-th best score of A rows a_offset.. (a_rows,) and the best score
        of B rows b_offset.. (b_rows,), float32, -inf where not yet found (``search_tile``'s floors)."""
        return (self._row_scores[a_offset : a_offset + a_rows, -1].clone(),
                self.col_scores[b_offset : b_offset + b_rows].clone())

    def _merge_pairs(self, scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        scores = torch.cat([self.pair_scores, scores])
        rows = torch.cat([self.pair_rows, rows])
        cols = torch.cat([self.pair_cols, cols])
        if len(scores) > self.top_pairs:
            # Every kept pair reaches the current top_pairs-th score minus band; that score only rises as tiles
            # arrive, so a pair dropped here would be dropped at the end too.
            bound = torch.topk(scores, self.top_pairs, sorted=False).values.amin() - self.band
            keep = scores >= bound
            scores, rows, cols = scores[keep], rows[keep], cols[keep]
        self.pair_scores, self.pair_rows, self.pair_cols = scores, rows, cols

    def result(self) -> SearchResult:
        """The merged result; pairs ordered by (score desc, A row, B row)."""
        by_position = torch.argsort((self.pair_rows << 31) | self.pair_cols)  # rows, cols < 2**31
        by_score = torch.argsort(order_key(self.pair_scores[by_position], torch.zeros_like(by_position)), stable=True)
        order = by_position[by_score]
        return SearchResult(
            row_scores=self._row_scores,
            row_indices=self._row_indices,
            col_scores=self.col_scores,
            col_indices=self.col_indices,
            pair_scores=self.pair_scores[order],
            pair_rows=self.pair_rows[order],
            pair_cols=self.pair_cols[order],
        )


def tile_grid(n: int, m: int, block_rows: int) -> Iterator[tuple[int, int]]:
    """The (a_offset, b_offset) of every tile, A blocks outermost."""
    for a_offset in range(0, n, block_rows):
        for b_offset in range(0, m, block_rows):
            yield a_offset, b_offset


def map_blocks(function, items: Iterable, device: torch.device | str = "cpu") -> list:
    """[function(item) for item in items], on CPU with up to torch's intra-op thread count of Python threads, each
    running torch with one intra-op thread (on CUDA one after another). As the search runs its tiles: per-block
    work gains little from intra-op threads, and on a shared machine their spin-waiting costs many times the work
    (preparing 40,000 x 128 rows: 0.08 s on one thread, 1.2 s on two beside a busy process, 2-core dev box)."""
    items = list(items)
    if torch.device(device).type == "cuda":
        return [function(item) for item in items]
    workers = min(torch.get_num_threads(), len(items))
    with _intra_op_threads(1):
        if workers <= 1:
            return [function(item) for item in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(function, items))


@dataclass(frozen=True)
class PreparedRows:
    """Embeddings (n, d) ready for ``search``: their blocks of ``block_rows`` rows (the last may be shorter), each
    standardized and rounded for ``screen`` once (``prepare_block``), so that a set searched several times (the
    audit's training set) is prepared once."""

    blocks: tuple[Block, ...]
    block_rows: int
    screen: str
    n_rows: int
    device: torch.device

    @classmethod
    def of(cls, embeddings: torch.Tensor, block_rows: int, screen: str | None = None) -> PreparedRows:
        """Prepare raw embeddings (n, d); screen None: ``default_screen`` of their dimension and device."""
        screen = screen or default_screen(embeddings.shape[1], embeddings.device)
        blocks = tuple(map_blocks(lambda start: prepare_block(embeddings[start : start + block_rows], screen),
                                  range(0, embeddings.shape[0], block_rows), embeddings.device))
        return cls(blocks, block_rows, screen, embeddings.shape[0], embeddings.device)


def search(
    a: torch.Tensor | PreparedRows,
    b: torch.Tensor | PreparedRows,
    *,
    k: int,
    block_rows: int = 4096,
    top_pairs: int = 0,
    band: float = 0.0,
    workers: int | None = None,
    screen: str | None = None,
    progress=None,
) -> SearchResult:
    """Exact Pearson search of raw embeddings a (n, d) against b (m, d), in this process on their device.

    k: top-k per A row (min(k, m) kept). top_pairs > 0 also returns the top_pairs largest of all n * m pair
    scores plus every pair within ``band`` below the top_pairs-th. Rows must be valid (``find_invalid_rows``).
    Blocks are prepared once each (``PreparedRows.of``; screen: one of SCREENS, None for ``default_screen``; the
    results are the same for every screen, only the speed differs), or a and b come prepared (with this
    block_rows, both with one screen); tiles follow ``tile_grid``.

    On CPU, up to ``workers`` threads (default: torch's intra-op thread count) run whole tiles, each with the
    remaining share of intra-op threads (one when there are enough tiles): the tile's many small reductions gain
    little from intra-op threads and lose much to their synchronisation, and one thread per tile is also how Ray
    workers run them. On CUDA tiles run one after another.
    progress: anything with ``update(n)``, advanced once per finished tile.
    """
    if not isinstance(b, PreparedRows):
        b = PreparedRows.of(b, block_rows, screen or (a.screen if isinstance(a, PreparedRows) else None))
    if not isinstance(a, PreparedRows):
        a = PreparedRows.of(a, block_rows, b.screen)
    if (a.block_rows, b.block_rows, b.screen) != (block_rows, block_rows, a.screen) or screen not in (None, a.screen):
        raise ValueError(f"prepared rows must share block_rows {block_rows} and one screen; got block_rows "
                         f"{a.block_rows} and {b.block_rows}, screens {a.screen} and {b.screen} (asked: {screen})")
    device, a_blocks, b_blocks = a.device, a.blocks, b.blocks
    threads = torch.get_num_threads()
    n_tiles = len(a_blocks) * len(b_blocks)
    workers = 1 if device.type == "cuda" else min(workers or threads, n_tiles)
    accumulator = SearchAccumulator(a.n_rows, b.n_rows, k, top_pairs=top_pairs, band=band, device=device)
    merging = threading.Lock()
    per_thread = threading.local()

    def run_tile(a_offset: int, b_offset: int) -> SearchResult:
        if not hasattr(per_thread, "workspace"):
            per_thread.workspace = make_workspace(min(block_rows, b.n_rows), device)
        a_block, b_block = a_blocks[a_offset // block_rows], b_blocks[b_offset // block_rows]
        with merging:
            row_floor, column_floor = accumulator.floors(a_offset, len(a_block.exact), b_offset, len(b_block.exact))
        return search_tile(a_block, b_block, a_offset=a_offset, b_offset=b_offset, k=k, top_pairs=top_pairs,
                           band=band, row_floor=row_floor, column_floor=column_floor, workspace=per_thread.workspace)

    with _intra_op_threads(max(1, threads // workers)), ThreadPoolExecutor(workers) as pool:
        pending: dict = {}
        for offsets in tile_grid(a.n_rows, b.n_rows, block_rows):
            if len(pending) >= 2 * workers:  # bounded: results are merged as they finish
                _merge_finished(pending, accumulator, merging, progress)
            pending[pool.submit(run_tile, *offsets)] = offsets
        while pending:
            _merge_finished(pending, accumulator, merging, progress)
    return accumulator.result()


def _merge_finished(pending: dict, accumulator: SearchAccumulator, merging: threading.Lock, progress) -> None:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        result = future.result()
        with merging:
            accumulator.add(result, *pending.pop(future))
        if progress is not None:
            progress.update(1)


def exact_topk(
    queries: torch.Tensor, reference_blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, query_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-k of raw query rows (q, d) over raw reference rows given as (first index, block (b_i, d)) pairs.

    Returns scores (q, k') float64 and indices (q, k') int64, k' = min(k, reference rows), best first, ties
    towards the lowest index. Memory O(q * k per block + query_rows * block per thread); blocks run as ``map_blocks``.
    """
    standardized = standardize(queries, torch.float64)

    def block_topk(offset_and_block):
        offset, block = offset_and_block
        reference = standardize(block, torch.float64).T
        scores = torch.cat([standardized[s : s + query_rows] @ reference for s in range(0, len(queries), query_rows)])
        block_scores, block_columns = topk_lowest_index(scores, k)
        return block_scores, block_columns + offset

    best_scores = torch.zeros((queries.shape[0], 0), dtype=torch.float64, device=queries.device)
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    for block_scores, block_indices in map_blocks(block_topk, reference_blocks, queries.device):
        best_scores, best_indices = _merge_exact(best_scores, best_indices, block_scores, block_indices, k)
    return best_scores, best_indices


def topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest of scores (q, b), best first, ties towards the lowest column: values (q, k') and columns
    (q, k') int64, k' = min(k, b). The same as the first k' of a stable descending sort of every row.

    torch.topk finds the k-th largest value of each row but breaks ties in no stated order; the entries at or
    above it are the answer unless a tie straddles the k-th place. Only then are whole rows sorted (rarely: the
    rows of one block share the float64 value only for duplicated or symmetric embeddings).
    """
    k = min(k, scores.shape[1])
    if k == 0 or len(scores) == 0:
        empty = torch.zeros((len(scores), k), dtype=torch.int64, device=scores.device)
        return scores[:, :k], empty
    kth = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    candidates = scores >= kth
    if bool((candidates.sum(dim=1) == k).all()):
        columns = candidates.nonzero()[:, 1].view(-1, k)  # ascending within each row
        values = scores.gather(1, columns)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices
        return values.gather(1, order), columns.gather(1, order)
    columns = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, columns), columns


def _merge_exact(scores_a, indices_a, scores_b, indices_b, k):
    """Best k by (float64 score desc, index asc) of two (q, *) candidate sets."""
    scores = torch.cat([scores_a, scores_b], dim=1)
    indices = torch.cat([indices_a, indices_b], dim=1)
    by_index = torch.argsort(indices, dim=1)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    keep = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, keep), indices.gather(1, keep)


def merge_exact_topk(parts: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int):
    """Merge float64 (scores, indices) parts of the same queries over disjoint references (any order)."""
    scores, indices = None, None
    for part_scores, part_indices in parts:
        if scores is None:
            scores, indices = part_scores, part_indices
        else:
            scores, indices = _merge_exact(scores, indices, part_scores, part_indices, k)
    return scores, indices


def exact_pair_scores(a_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """Float64 Pearson correlation of raw row pairs: a_rows (t, d), b_rows (t, d) -> (t,)."""
    return (standardize(a_rows, torch.float64) * standardize(b_rows, torch.float64)).sum(dim=1)
