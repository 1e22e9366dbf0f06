"""Exact all-pairs Pearson-correlation search between two embedding sets, in tiles (pure torch, CPU or CUDA).

For A (n x d) and B (m x d) the search returns, without ever holding the n x m score matrix:

- every A row's top-k B rows (scores descending, ties towards the lowest B index);
- every B row's best A row (ties towards the lowest A index);
- optionally the largest pair scores over all n * m pairs (``top_pairs``), which the matched calibration's
  null distribution needs (raymem.audit.metrics).

Scores are Pearson correlations: each row is centred and L2-normalised (in float64, then rounded to float32),
so a score is a float32 dot product. Ties go to the lowest index, exactly: selections sort int64 keys that pack a
float32 score and an index (``order_key``), and a column's best row is the first row equal to its maximum.

The work is split on a fixed grid of tiles: A rows and B rows in blocks of ``block_rows``. ``search_tile`` is
the one function that turns a tile into partial results, and ``SearchAccumulator`` merges partial results in any
order into the same answer; the Ray search (raymem.search.distributed) uses both unchanged, which is why the two
are bitwise identical (a BLAS may round differently for a different matrix shape, never for the same one).

Inside a tile, A rows go in strips whose score buffer stays cache-sized. Per strip the reductions touch every
score once or twice with value-only maxima (over chunks of ``COLUMN_CHUNK`` columns and ``ROW_CHUNK`` rows); the
few entries that can matter are then picked out and sorted by key. Memory is O(strip + results).

Float64 recomputation (``exact_topk``, ``exact_pair_scores``) serves the audit's decisions within 1e-3 of a
threshold (raymem.audit.metrics).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import torch

COLUMN_CHUNK = 64  # columns per chunk maximum (rows' top-k): a row's candidates are chunks that reach its bound
ROW_CHUNK = 16  # rows per chunk maximum (columns' best)
BOUND_GROUPS_PER_K = 2  # see _row_candidates
STRIP_SCORES = 1 << 21  # scores per strip buffer: 8 MiB of float32 stays in this CPU's caches
_INT32_MAGNITUDE = 0x7FFFFFFF


def find_invalid_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows whose Pearson correlation is undefined: (n, d) -> (n,) bool, True where a row has a non-finite
    value or is constant (centring leaves the zero vector)."""
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


def order_key(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys, ascending in (score descending, index ascending): any shape, float32 scores, indices < 2**31.

    The float32 bits are mapped to an int32 that is monotone in the value (-0.0 counts as +0.0), negated, and
    placed above the index.
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    monotone = torch.where(bits < 0, bits ^ _INT32_MAGNITUDE, bits).to(torch.int64)
    return ((-monotone) << 32) | indices


@dataclass(frozen=True)
class SearchResult:
    """An all-pairs search of A (n x d) against B (m x d), or one tile's part of it (then n, m are the tile's
    row counts and indices are still global).

    row_scores (n, k) float32 and row_indices (n, k) int64: each A row's best B rows, best first, ties towards the
    lowest index; k = min(requested k, m).
    col_scores (m,) float32 and col_indices (m,) int64: each B row's best A row, ties towards the lowest index.
    pair_scores (t,) float32, pair_rows (t,) int64 (A index), pair_cols (t,) int64 (B index): the largest pair
    scores, best first (ties: lowest A index, then lowest B index); see ``search`` for which ones.
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

    Every row must have at least k candidates. Returns (n_rows, k) scores and cols.
    """
    by_score = torch.argsort(order_key(scores, cols))
    by_row = by_score[torch.sort(rows[by_score], stable=True).indices]
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    keep = by_row[(torch.arange(len(by_row), device=rows.device) - starts[rows[by_row]]) < k]
    return scores[keep].view(n_rows, k), cols[keep].view(n_rows, k)


def _entries_at_least(strip: torch.Tensor, chunk_max: torch.Tensor, bound: torch.Tensor):
    """The entries of a strip (r, w) that are >= bound (r,), as local (rows, cols, scores).

    chunk_max (r, w // COLUMN_CHUNK) holds each full chunk's maximum; only chunks that reach the bound are read.
    The w % COLUMN_CHUNK trailing columns are read directly.
    """
    n_chunks = chunk_max.shape[1]
    chunk_rows, chunks = torch.nonzero(chunk_max >= bound[:, None], as_tuple=True)
    chunked = strip[:, : n_chunks * COLUMN_CHUNK].view(len(strip), n_chunks, COLUMN_CHUNK)
    if chunked.is_contiguous():  # index_select on whole chunks is several times faster than fancy indexing
        values = chunked.view(-1, COLUMN_CHUNK).index_select(0, chunk_rows * n_chunks + chunks)
    else:
        values = chunked[chunk_rows, chunks]
    hit, offset = torch.nonzero(values >= bound[chunk_rows, None], as_tuple=True)
    rows, cols, scores = chunk_rows[hit], chunks[hit] * COLUMN_CHUNK + offset, values[hit, offset]
    tail = strip[:, n_chunks * COLUMN_CHUNK :]
    tail_rows, tail_cols = torch.nonzero(tail >= bound[:, None], as_tuple=True)
    return (
        torch.cat([rows, tail_rows]),
        torch.cat([cols, tail_cols + n_chunks * COLUMN_CHUNK]),
        torch.cat([scores, tail[tail_rows, tail_cols]]),
    )


def _row_candidates(strip: torch.Tensor, chunk_max: torch.Tensor, k: int):
    """Entries of a strip (r, w) that include every row's top-k (k <= w), as local (rows, cols, scores).

    A row's bound is the k-th largest of the maxima of BOUND_GROUPS_PER_K * k disjoint groups of its chunks: k
    distinct entries reach it, so the row's k best do too, and only entries >= bound are kept (a few more than k
    per row). Groups rather than single chunks because sorting a few group maxima costs less than a top-k.
    """
    n_rows, n_chunks = chunk_max.shape
    n_groups = min(n_chunks, BOUND_GROUPS_PER_K * k)
    if n_groups >= k:
        per_group = n_chunks // n_groups
        group_max = chunk_max[:, : n_groups * per_group].view(n_rows, n_groups, per_group).amax(dim=2)
        bound = torch.sort(group_max, dim=1, descending=True).values[:, k - 1]
    else:
        bound = torch.full((n_rows,), -torch.inf, dtype=strip.dtype, device=strip.device)
    return _entries_at_least(strip, chunk_max, bound)


def _first_match(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each column of values (r, w), the first row equal to target (w,), which must occur: (w,) int64.

    Float arithmetic (a max of descending row weights) because it is much faster on CPU than an integer argmin.
    """
    n_rows = values.shape[0]
    weights = torch.arange(n_rows, 0, -1, dtype=values.dtype, device=values.device)[:, None]
    return n_rows - torch.where(values == target, weights, 0.0).amax(dim=0).to(torch.int64)


def _column_best(strip: torch.Tensor):
    """Each strip column's best row: (r, w) -> (w,) scores, (w,) local rows (ties: lowest row); r < 2**24.

    Chunk maxima over ROW_CHUNK rows find each column's first chunk holding its maximum, then the first row in it.
    """
    n_rows, width = strip.shape
    n_chunks = n_rows // ROW_CHUNK
    if n_chunks == 0:
        best = strip.amax(dim=0)
        return best, _first_match(strip, best)
    chunk_max = strip[: n_chunks * ROW_CHUNK].view(n_chunks, ROW_CHUNK, width).amax(dim=1)
    best = chunk_max.amax(dim=0)
    first_chunk = _first_match(chunk_max, best)
    columns = torch.arange(width, device=strip.device)
    offsets = torch.arange(ROW_CHUNK, device=strip.device) * width
    in_chunk = (first_chunk * ROW_CHUNK * width + columns)[None, :] + offsets[:, None]
    inside = strip.view(-1).index_select(0, in_chunk.view(-1)).view(ROW_CHUNK, width)
    rows = first_chunk * ROW_CHUNK + _first_match(inside, best)
    if n_chunks * ROW_CHUNK == n_rows:
        return best, rows
    rest_best, rest_rows = _column_best(strip[n_chunks * ROW_CHUNK :])
    better = rest_best > best  # the remaining rows come later: equal scores keep the earlier row
    return torch.where(better, rest_best, best), torch.where(better, rest_rows + n_chunks * ROW_CHUNK, rows)


def _top_pairs_of_strip(strip: torch.Tensor, chunk_max: torch.Tensor, count: int, band: float):
    """The strip's ``count`` largest entries and every entry within ``band`` below the count-th largest, as local
    (rows, cols, scores). The count-th largest chunk maximum bounds the count-th largest entry from below."""
    n_chunks = chunk_max.numel()
    if count <= n_chunks:
        bound = torch.topk(chunk_max.reshape(-1), count, sorted=False).values.amin()
    else:
        bound = torch.topk(strip.reshape(-1), min(count, strip.numel()), sorted=False).values.amin()
    return _entries_at_least(strip, chunk_max, (bound - band).expand(strip.shape[0]))


def search_tile(
    a_block: torch.Tensor,
    b_block: torch.Tensor,
    *,
    a_offset: int,
    b_offset: int,
    k: int,
    top_pairs: int = 0,
    band: float = 0.0,
    workspace: torch.Tensor | None = None,
) -> SearchResult:
    """One tile of the search: standardized float32 blocks a_block (a, d) and b_block (b, d), their first global
    row numbers a_offset and b_offset.

    Returns each A row's top-min(k, b) within the tile, each B row's best A row within the tile, and (top_pairs > 0)
    the tile's top_pairs largest scores plus every score within ``band`` below the top_pairs-th. workspace: a
    float32 buffer of at least ``min(a, strip) * b`` elements (see ``make_workspace``) reused across tiles.
    """
    n_a, n_b = a_block.shape[0], b_block.shape[0]
    k = min(k, n_b)
    strip_rows = max(1, STRIP_SCORES // n_b)
    if workspace is None:
        workspace = make_workspace(n_b, a_block.device)
    b_transposed = b_block.T
    row_parts, pair_parts = [], []
    col_scores = torch.full((n_b,), -torch.inf, device=a_block.device)
    col_rows = torch.zeros(n_b, dtype=torch.int64, device=a_block.device)
    for start in range(0, n_a, strip_rows):
        a_strip = a_block[start : start + strip_rows]
        strip = workspace[: a_strip.shape[0] * n_b].view(a_strip.shape[0], n_b)
        torch.mm(a_strip, b_transposed, out=strip)
        n_chunks = n_b // COLUMN_CHUNK
        chunk_max = strip[:, : n_chunks * COLUMN_CHUNK].view(len(strip), n_chunks, COLUMN_CHUNK).amax(dim=2)
        rows, cols, scores = _row_candidates(strip, chunk_max, k)
        row_parts.append((rows + start, cols, scores))
        best, rows = _column_best(strip)
        better = best > col_scores  # strips come in row order: equal scores keep the earlier row
        col_scores = torch.where(better, best, col_scores)
        col_rows = torch.where(better, rows + start, col_rows)
        if top_pairs > 0:
            rows, cols, scores = _top_pairs_of_strip(strip, chunk_max, top_pairs, band)
            pair_parts.append((rows + start, cols, scores))
    pair_rows, pair_cols, pair_scores = (torch.cat(part) for part in zip(*pair_parts)) if pair_parts else (
        torch.zeros(0, dtype=torch.int64, device=a_block.device),
        torch.zeros(0, dtype=torch.int64, device=a_block.device),
        torch.zeros(0, device=a_block.device),
    )
    row_scores, row_cols = _select_per_row(*(torch.cat(part) for part in zip(*row_parts)), n_a, k)
    return SearchResult(
        row_scores=row_scores,
        row_indices=row_cols + b_offset,
        col_scores=col_scores,
        col_indices=col_rows + a_offset,
        pair_scores=pair_scores,
        pair_rows=pair_rows + a_offset,
        pair_cols=pair_cols + b_offset,
    )


def make_workspace(b_rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A strip buffer for tiles with up to ``b_rows`` B rows (float32, STRIP_SCORES or one strip row)."""
    return torch.empty(max(STRIP_SCORES, b_rows), dtype=torch.float32, device=device)


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


@contextmanager
def _intra_op_threads(n: int):
    """Run torch ops with n intra-op threads inside the block (torch's setting is process-wide)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def search(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    k: int,
    block_rows: int = 4096,
    top_pairs: int = 0,
    band: float = 0.0,
    workers: int | None = None,
    progress=None,
) -> SearchResult:
    """Exact Pearson search of raw embeddings a (n, d) against b (m, d), in this process on their device.

    k: top-k per A row (min(k, m) kept). top_pairs > 0 also returns the top_pairs largest of all n * m pair
    scores plus every pair within ``band`` below the top_pairs-th. Rows must be valid (``find_invalid_rows``).
    Blocks are standardized once each; tiles follow ``tile_grid``.

    On CPU, up to ``workers`` threads (default: torch's intra-op thread count) run whole tiles, each with the
    remaining share of intra-op threads (one when there are enough tiles): the tile's many small reductions gain
    little from intra-op threads and lose much to their synchronisation, and one thread per tile is also how Ray
    workers run them. On CUDA tiles run one after another.
    progress: anything with ``update(n)``, advanced once per finished tile.
    """
    device = a.device
    threads = torch.get_num_threads()
    n_tiles = -(-a.shape[0] // block_rows) * -(-b.shape[0] // block_rows)
    workers = 1 if device.type == "cuda" else min(workers or threads, n_tiles)
    a_blocks = [standardize(a[start : start + block_rows]) for start in range(0, a.shape[0], block_rows)]
    b_blocks = [standardize(b[start : start + block_rows]) for start in range(0, b.shape[0], block_rows)]
    accumulator = SearchAccumulator(a.shape[0], b.shape[0], k, top_pairs=top_pairs, band=band, device=device)
    per_thread = threading.local()

    def run_tile(a_offset: int, b_offset: int) -> SearchResult:
        if not hasattr(per_thread, "workspace"):
            per_thread.workspace = make_workspace(min(block_rows, b.shape[0]), device)
        return search_tile(a_blocks[a_offset // block_rows], b_blocks[b_offset // block_rows], a_offset=a_offset,
                           b_offset=b_offset, k=k, top_pairs=top_pairs, band=band, workspace=per_thread.workspace)

    with _intra_op_threads(max(1, threads // workers)), ThreadPoolExecutor(workers) as pool:
        pending: dict = {}
        for offsets in tile_grid(a.shape[0], b.shape[0], block_rows):
            if len(pending) >= 2 * workers:  # bounded: results are merged as they finish
                _merge_finished(pending, accumulator, progress)
            pending[pool.submit(run_tile, *offsets)] = offsets
        while pending:
            _merge_finished(pending, accumulator, progress)
    return accumulator.result()


def _merge_finished(pending: dict, accumulator: SearchAccumulator, progress) -> None:
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        accumulator.add(future.result(), *pending.pop(future))
        if progress is not None:
            progress.update(1)


def exact_topk(
    queries: torch.Tensor, reference_blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, query_rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-k of raw query rows (q, d) over raw reference rows given as (first index, block (b_i, d)) pairs.

    Returns scores (q, k') float64 and indices (q, k') int64, k' = min(k, reference rows), best first, ties
    towards the lowest index. Memory O(q * k + query_rows * block).
    """
    standardized = standardize(queries, torch.float64)
    best_scores = torch.zeros((queries.shape[0], 0), dtype=torch.float64, device=queries.device)
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    for offset, block in reference_blocks:
        reference = standardize(block, torch.float64).T
        scores = torch.cat([standardized[s : s + query_rows] @ reference for s in range(0, len(queries), query_rows)])
        indices = torch.arange(offset, offset + block.shape[0], device=queries.device).expand_as(scores)
        best_scores, best_indices = _merge_exact(best_scores, best_indices, scores, indices, k)
    return best_scores, best_indices


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
