"""The audit's all-pairs reduction on a GPU: top-k in both directions without the score matrix.

Inputs are two sets of float32 rows, A (n, d) "queries" (synthetic samples) and B (m, d)
"references" (training samples), each row already centred and L2-normalised, so that
``scores = A @ B.T`` holds Pearson correlations. The audit needs:

- for every query row, its k best reference rows: indices and scores, descending score,
  ties broken towards the lowest reference index;
- for every reference row, its best query row: index and score, ties towards the lowest query index.

The n x m score matrix is never held; memory is O(tile) plus the (n, k) and (m,) results.

Methods:

- ``"fused"``: one Triton kernel computes a tile of scores with ``tl.dot`` and reduces it in
  registers. Each program owns a strip of query rows and walks a group of reference columns,
  keeping the strip's running top-k; a tile's candidates are extracted (max, lowest-index argmax,
  mask) only while some row's tile maximum beats its current k-th best, so after the first tiles
  most tiles cost one max per row and per column. Each column's best row is merged across strips
  with an int64 ``atomic_max``; each group's top-k per row goes to a small (n, groups, k) buffer
  that one ``torch.topk`` merges.
- ``"mm_reduce"``: ``torch.mm`` (cuBLAS, float32 IEEE) writes the scores of all references
  against a chunk of query rows, and the same Triton kernel reduces the chunk from memory.
- ``"torch"``: the same reduction in plain torch over tiles; runs anywhere and is the reference
  the Triton methods are tested against.

Precision of the Triton dot product (``precision``): ``"ieee"`` is exact float32 (FMA, no tensor
cores). ``"tf32x3"`` splits each float32 into two TF32 parts and sums three tensor-core products:
float32-level accuracy, not bit-identical. ``"tf32"`` and ``"bf16"`` are approximate: the kernel
keeps ``RESCORED_CANDIDATES_PER_K * k`` candidates per query row, which are re-scored in float32
and re-ranked; each reference row's single best candidate is re-scored (its score is then float32,
its index may differ from the exact one where two query rows score within the low precision).

What ``method="auto"`` picks, and its accuracy contract: on CUDA with triton, "fused" in
``"tf32x3"``, measured on an H200 (Triton 3.6, n = m = 65,536 random unit rows with planted
copies, benchmarks/gpu_search.py; second run) with the default tiling at 46 %, 89 % and 113 % of the
pair rate of a float32 ``torch.mm`` of the same shape at d = 32, 128 and 512; exact "fused" ieee
reached 45 %, 48 % and 40 %, chunked mm + ``torch.topk`` 16 %, 35 % and 62 %. tf32x3 scores differ from float32
ones by float32 rounding, not more, so they are not bit-exact: against a float64 brute force its
top-1 matched for all 65,536 query rows at every d, and for all but one reference row at d = 128
and at d = 512, where the float64 best and the chosen row scored within float32 rounding
(2 * d * 2**-24) of each other. The audit recomputes in float64 every score within 1e-3 of its
threshold before deciding, far wider than that rounding, so no decision rests on the difference;
callers that need bit-identical float32 ties pass ``precision="ieee"``. Elsewhere "auto" is
"torch" (IEEE float32).

Ordering: a score and an index are packed into one int64 key, ``order(score) << 32 | (2**31 - 1 -
index)``, where ``order`` maps float32 bits to int32 monotonically (-0.0 counts as +0.0). A larger
key is a higher score, or an equal score with a lower index, so one integer max or top-k applies the
tie rule exactly; it limits n and m to below 2**31.
"""

import contextlib
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the "torch" method needs no triton
    triton = None

METHODS = ("auto", "fused", "mm_reduce", "torch")
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
RESCORED_PRECISIONS = ("tf32", "bf16")
RESCORED_CANDIDATES_PER_K = 2
INDEX_LIMIT = 2**31 - 1
PROGRAMS_PER_SM = 4
TORCH_TILE_ROWS = 1024  # query rows per tile of the torch method, fewer where the memory budget is small


@dataclass(frozen=True)
class BothWaysTopK:
    """Result of `topk_both_ways` for A (n rows), B (m rows) and k; fields named as in
    raymem.search.kernel.SearchResult.

    row_scores (n, k) float32 and row_indices (n, k) int64: each A row's best B rows, best first.
    col_scores (m,) float32 and col_indices (m,) int64: each B row's best A row.
    """

    row_scores: torch.Tensor
    row_indices: torch.Tensor
    col_scores: torch.Tensor
    col_indices: torch.Tensor


@dataclass(frozen=True)
class TritonTiling:
    """Tile shape and launch settings of the Triton kernel.

    block_rows, block_cols: query rows and reference rows per score tile (powers of two, >= 16).
    block_depth: embedding dimensions per ``tl.dot`` step (power of two, >= 16: Triton before 3.9
        rejects a ``tl.dot`` over fewer than 16). An embedding that fits in one step, padded to at
        least 16, takes one.
    column_groups: how many programs share one strip of query rows, each walking its own range of
        reference rows; None picks enough to give every SM ``PROGRAMS_PER_SM`` programs.
    """

    block_rows: int
    block_cols: int
    block_depth: int
    num_warps: int
    num_stages: int
    column_groups: int | None = None

    def __post_init__(self):
        for name, smallest in (("block_rows", 16), ("block_cols", 16), ("block_depth", 16)):
            size = getattr(self, name)
            if size < smallest or size & (size - 1):
                raise ValueError(f"TritonTiling.{name}={size}; give a power of two of at least {smallest}")


# The fastest that compiled on an H200 with Triton 3.6 (benchmarks/gpu_search.py). The FMA dot
# (ieee) holds a whole depth step of both operands in registers, hence its short steps.
# "mm_reduce" reads scores from memory, so its block_depth is unused.
# Fastest measured on an H200 (Triton 3.6, n = m = 65,536, k = 5; docs/benchmarks.md, 2026-12-04): tf32x3
# 64x128x32 with one warpgroup reached 83.0 / 119.7 / 126.3 % of fp32 torch.mm at d = 32 / 128 / 512 (128x128x32
# with 8 warps, the default before: 46.6 / 89.9 / 113.7 % in the same run); exact ieee 64x128x16 reached
# 45.2 / 48.0 / 39.8 % (2026-11).
DEFAULT_TILINGS = {
    ("fused", "ieee"): TritonTiling(64, 128, 16, num_warps=4, num_stages=3),
    ("fused", "tf32x3"): TritonTiling(64, 128, 32, num_warps=4, num_stages=3),
    ("fused", "tf32"): TritonTiling(128, 64, 32, num_warps=8, num_stages=3),
    ("fused", "bf16"): TritonTiling(128, 64, 32, num_warps=8, num_stages=3),
    ("mm_reduce", "ieee"): TritonTiling(64, 128, 16, num_warps=4, num_stages=2),
}


def topk_both_ways(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int = 5,
    *,
    method: str = "auto",
    precision: str | None = None,
    tiling: TritonTiling | None = None,
    max_scores_in_memory: int = 2**26,
) -> BothWaysTopK:
    """Top-k B rows of every A row and best A row of every B row, by dot product.

    a: (n, d) float32 query rows (synthetic samples), b: (m, d) float32 reference rows (training
    samples), on the same device, each row centred and L2-normalised by the caller
    (raymem.search.kernel.standardize). k: neighbours per A row, 1 <= k <= m.
    method: one of METHODS; "auto" is "fused" for CUDA tensors when triton is installed, else "torch"
        (see the module docstring for what it measured and its accuracy).
    precision: one of PRECISIONS, for "fused" ("mm_reduce" and "torch" are IEEE float32); None is
        "tf32x3" for "fused" (float32-level, not bit-exact) and "ieee" for the others.
    tiling: Triton tile shape; None takes DEFAULT_TILINGS[method, precision].
    max_scores_in_memory: float32 scores "mm_reduce" and "torch" hold at once (one chunk).
    """
    _check_inputs(a, b, k)
    method = _resolve_method(method, a.device)
    if precision is None:
        precision = "tf32x3" if method == "fused" else "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if method != "fused" and precision != "ieee":
        raise ValueError(f"precision {precision!r} needs method 'fused'; method {method!r} computes IEEE float32")
    if method == "torch":
        return _topk_both_ways_torch(a, b, k, max_scores_in_memory)
    tiling = tiling or DEFAULT_TILINGS[method, precision]
    return _topk_both_ways_triton(a, b, k, method, precision, tiling, max_scores_in_memory)


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton methods can run on `device`: CUDA with triton, or any device under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return device.type == "cuda" or _triton_interprets()


def _triton_interprets() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_reduce_score_tiles, InterpretedFunction)


def _check_inputs(queries: torch.Tensor, references: torch.Tensor, k: int) -> None:
    for name, rows in (("a", queries), ("b", references)):
        if rows.ndim != 2 or rows.dtype != torch.float32:
            raise ValueError(f"{name} must be a 2-D float32 tensor (rows x dims), got {rows.dtype} of shape {tuple(rows.shape)}")
        if not 0 < rows.shape[0] <= INDEX_LIMIT:
            raise ValueError(f"{name} has {rows.shape[0]} rows; give between 1 and {INDEX_LIMIT}")
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(f"{name} holds NaN or infinite values; check the embeddings that produced them")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"a has {queries.shape[1]} dims but b has {references.shape[1]}; embed both with the same detector")
    if queries.device != references.device:
        raise ValueError(f"a is on {queries.device} but b on {references.device}; move both to one device")
    if not 1 <= k <= references.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of b rows ({references.shape[0]})")


def _resolve_method(method: str, device: torch.device) -> str:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if method == "auto":
        return "fused" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if method != "torch" and not triton_runs_on(device):
        raise ValueError(
            f"method {method!r} needs triton and a CUDA device (tensors are on {device}); "
            "install triton, or use method='torch', or set TRITON_INTERPRET=1 before importing raymem to run it on CPU"
        )
    return method


@contextlib.contextmanager
def _ieee_float32_matmul():
    """torch.mm in full float32 inside the block, whatever the process-wide TF32 setting."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _pack_keys(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float32 scores and int64 indices (same shape) -> int64 keys; a larger key ranks first."""
    bits = torch.where(scores == 0, 0.0, scores).view(torch.int32).to(torch.int64)
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (order << 32) | (INDEX_LIMIT - indices)


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (float32 scores, int64 indices), the inverse of `_pack_keys`."""
    order = keys >> 32
    bits = torch.where(order < 0, order ^ 0x7FFFFFFF, order).to(torch.int32)
    return bits.view(torch.float32), INDEX_LIMIT - (keys & 0x7FFFFFFF)


def _top_keys(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, c) int64 keys -> (rows, k) largest keys, descending."""
    return keys.topk(k, dim=1).values


def _topk_both_ways_torch(queries: torch.Tensor, references: torch.Tensor, k: int, max_scores_in_memory: int) -> BothWaysTopK:
    """Tiles of torch.mm; row keys merged by top-k over packed keys, columns by strict max over ascending row tiles."""
    n, m = queries.shape[0], references.shape[0]
    tile_cols = min(m, max(k, max_scores_in_memory // min(n, TORCH_TILE_ROWS)))
    tile_rows = max(1, min(n, max_scores_in_memory // tile_cols))
    device = queries.device
    query_keys = torch.empty((n, k), dtype=torch.int64, device=device)
    best_scores = torch.full((m,), float("-inf"), dtype=torch.float32, device=device)
    best_rows = torch.zeros(m, dtype=torch.int64, device=device)
    empty_keys = _pack_keys(torch.full((k,), float("-inf"), device=device), INDEX_LIMIT - torch.arange(k, device=device))
    for row0 in range(0, n, tile_rows):
        row1 = min(row0 + tile_rows, n)
        row_keys = empty_keys.expand(row1 - row0, k)
        for col0 in range(0, m, tile_cols):
            col1 = min(col0 + tile_cols, m)
            with _ieee_float32_matmul():
                scores = queries[row0:row1] @ references[col0:col1].T
            tile_keys = _pack_keys(scores, torch.arange(col0, col1, device=device).expand_as(scores))
            row_keys = _top_keys(torch.cat([row_keys, _top_keys(tile_keys, min(k, col1 - col0))], dim=1), k)
            # torch.max returns the first maximal row; later row tiles must beat it strictly.
            tile_best_scores, tile_best_rows = scores.max(dim=0)
            improves = tile_best_scores > best_scores[col0:col1]
            best_scores[col0:col1] = torch.where(improves, tile_best_scores, best_scores[col0:col1])
            best_rows[col0:col1] = torch.where(improves, tile_best_rows + row0, best_rows[col0:col1])
        query_keys[row0:row1] = row_keys
    top_scores, top_indices = _unpack_keys(query_keys)
    return BothWaysTopK(top_scores, top_indices, best_scores, best_rows)


def _default_column_groups(row_blocks: int, col_blocks: int, device: torch.device) -> int:
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(col_blocks, math.ceil(PROGRAMS_PER_SM * sm_count / row_blocks)))


def _topk_both_ways_triton(
    queries: torch.Tensor,
    references: torch.Tensor,
    k: int,
    method: str,
    precision: str,
    tiling: TritonTiling,
    max_scores_in_memory: int,
) -> BothWaysTopK:
    n, d = queries.shape
    m = references.shape[0]
    candidates_per_row = min(m, k * RESCORED_CANDIDATES_PER_K) if precision in RESCORED_PRECISIONS else k
    row_blocks = triton.cdiv(n, tiling.block_rows)
    col_blocks = triton.cdiv(m, tiling.block_cols)
    groups = tiling.column_groups or _default_column_groups(row_blocks, col_blocks, queries.device)
    cols_per_group = triton.cdiv(col_blocks, groups) * tiling.block_cols
    groups = triton.cdiv(m, cols_per_group)
    padded_depth = max(16, triton.next_power_of_2(d))
    depth_in_one_block = padded_depth <= tiling.block_depth
    block_depth = padded_depth if depth_in_one_block else tiling.block_depth

    candidates = torch.empty((n, groups, candidates_per_row), dtype=torch.int64, device=queries.device)
    reference_best = _pack_keys(
        torch.full((m,), float("-inf"), device=queries.device),
        torch.full((m,), INDEX_LIMIT, dtype=torch.int64, device=queries.device),
    )
    operand_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    query_operands = queries.to(operand_dtype).contiguous()
    reference_operands = references.to(operand_dtype).contiguous()

    def reduce_rows(row0: int, row1: int, scores: torch.Tensor | None) -> None:
        _reduce_score_tiles[(triton.cdiv(row1 - row0, tiling.block_rows), groups)](
            query_operands[row0:],
            reference_operands,
            candidates if scores is None else scores,
            candidates,
            reference_best,
            row1 - row0,
            m,
            d,
            row0,
            cols_per_group,
            query_operands.stride(0),
            reference_operands.stride(0),
            0 if scores is None else scores.stride(0),
            K=candidates_per_row,
            K_SLOTS=triton.next_power_of_2(candidates_per_row),
            BLOCK_ROWS=tiling.block_rows,
            BLOCK_COLS=tiling.block_cols,
            BLOCK_DEPTH=block_depth,
            SCORES_IN_MEMORY=scores is not None,
            DEPTH_IN_ONE_BLOCK=depth_in_one_block,
            # input_precision only applies to float32 operands; "tf32" is triton's default for the rest.
            INPUT_PRECISION="tf32" if precision == "bf16" else precision,
            num_warps=tiling.num_warps,
            num_stages=tiling.num_stages,
        )

    if method == "fused":
        reduce_rows(0, n, None)
    else:
        # The chunk holds scores transposed, (m, rows), for the kernel to load along query rows.
        chunk_rows = max(1, min(n, max_scores_in_memory // m))
        chunk = torch.empty(m * chunk_rows, dtype=torch.float32, device=queries.device)
        for row0 in range(0, n, chunk_rows):
            row1 = min(row0 + chunk_rows, n)
            scores = chunk[: m * (row1 - row0)].view(m, row1 - row0)
            with _ieee_float32_matmul():
                torch.mm(references, queries[row0:row1].T, out=scores)
            reduce_rows(row0, row1, scores)

    top_scores, top_indices = _unpack_keys(_top_keys(candidates.view(n, -1), candidates_per_row))
    best_scores, best_rows = _unpack_keys(reference_best)
    if precision in RESCORED_PRECISIONS:
        return _rescore(queries, references, top_indices, best_rows, k, max_scores_in_memory)
    return BothWaysTopK(top_scores, top_indices, best_scores, best_rows)


def _rescore(
    queries: torch.Tensor,
    references: torch.Tensor,
    candidate_indices: torch.Tensor,
    best_rows: torch.Tensor,
    k: int,
    max_scores_in_memory: int,
) -> BothWaysTopK:
    """Float32 scores for low-precision candidates: (n, c) candidates -> top k of them; (m,) best rows re-scored.

    Products are summed elementwise, not by matmul, so TF32 settings cannot touch them.
    """
    n, c = candidate_indices.shape
    d = queries.shape[1]
    top_keys = torch.empty((n, k), dtype=torch.int64, device=queries.device)
    chunk_rows = max(1, max_scores_in_memory // (c * d))
    for row0 in range(0, n, chunk_rows):
        row1 = min(row0 + chunk_rows, n)
        indices = candidate_indices[row0:row1]
        scores = (queries[row0:row1, None, :] * references[indices]).sum(dim=2)
        top_keys[row0:row1] = _top_keys(_pack_keys(scores, indices), k)
    top_scores, top_indices = _unpack_keys(top_keys)
    best_scores = torch.empty(best_rows.shape[0], dtype=torch.float32, device=queries.device)
    chunk_cols = max(1, max_scores_in_memory // d)
    for col0 in range(0, best_rows.shape[0], chunk_cols):
        col1 = min(col0 + chunk_cols, best_rows.shape[0])
        best_scores[col0:col1] = (queries[best_rows[col0:col1]] * references[col0:col1]).sum(dim=1)
    return BothWaysTopK(top_scores, top_indices, best_scores, best_rows)


if triton is not None:

    @triton.jit
    def _pack_keys_triton(scores, indices):
        """float32 scores and int32 indices (same shape) -> int64 keys, as `_pack_keys`."""
        bits = tl.where(scores == 0.0, 0, scores.to(tl.int32, bitcast=True))
        order = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (order.to(tl.int64) << 32) | (0x7FFFFFFF - indices).to(tl.int64)

    @triton.jit
    def _key_scores_triton(keys):
        """int64 keys -> their float32 scores."""
        order = (keys >> 32).to(tl.int32)
        return tl.where(order < 0, order ^ 0x7FFFFFFF, order).to(tl.float32, bitcast=True)

    @triton.jit
    def _block_scores(
        left_ptr, left_rows, left_valid, left_row_stride,
        right_ptr, right_rows, right_valid, right_row_stride,
        depth, BLOCK_DEPTH: tl.constexpr, DEPTH_IN_ONE_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        """(L, R) float32 dot products of rows of two row-major (rows, depth) operands."""
        depth_offsets = tl.arange(0, BLOCK_DEPTH)
        left_offsets = left_rows.to(tl.int64)[:, None] * left_row_stride
        right_offsets = right_rows.to(tl.int64)[:, None] * right_row_stride
        if DEPTH_IN_ONE_BLOCK:
            in_depth = (depth_offsets < depth)[None, :]
            left = tl.load(left_ptr + left_offsets + depth_offsets[None, :], mask=left_valid[:, None] & in_depth, other=0.0)
            right = tl.load(right_ptr + right_offsets + depth_offsets[None, :], mask=right_valid[:, None] & in_depth, other=0.0)
            scores = tl.dot(left, tl.trans(right), input_precision=INPUT_PRECISION)
        else:
            scores = tl.zeros((left_rows.shape[0], right_rows.shape[0]), tl.float32)
            for depth0 in range(0, depth, BLOCK_DEPTH):
                dims = depth0 + depth_offsets
                in_depth = (dims < depth)[None, :]
                left = tl.load(left_ptr + left_offsets + dims[None, :], mask=left_valid[:, None] & in_depth, other=0.0)
                right = tl.load(right_ptr + right_offsets + dims[None, :], mask=right_valid[:, None] & in_depth, other=0.0)
                scores = tl.dot(left, tl.trans(right), scores, input_precision=INPUT_PRECISION)
        return scores

    @triton.jit
    def _reduce_score_tiles(
        queries_ptr,
        references_ptr,
        scores_ptr,
        candidates_ptr,
        reference_best_ptr,
        n_rows,
        n_cols,
        depth,
        row_offset,
        cols_per_group,
        queries_row_stride,
        references_row_stride,
        scores_row_stride,
        K: tl.constexpr,
        K_SLOTS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
        BLOCK_DEPTH: tl.constexpr,
        SCORES_IN_MEMORY: tl.constexpr,
        DEPTH_IN_ONE_BLOCK: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Reduce the scores of BLOCK_ROWS query rows against one group of reference columns.

        Grid: (cdiv(n_rows, BLOCK_ROWS), column groups). Scores come from ``tl.dot`` of
        queries (n_rows, depth) and references (n_cols, depth), or, with SCORES_IN_MEMORY, from a
        chunk of them transposed, (n_cols, n_rows) float32. Writes the strip's K best keys per row, unordered, to
        candidates (row_offset + row, group, K), and raises reference_best (n_cols,) int64 to
        each column's best key. Rows are local to the chunk; row_offset makes them global.
        """
        row_block = tl.program_id(0)
        group = tl.program_id(1)
        rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_valid = rows < n_rows
        slots = tl.arange(0, K_SLOTS)
        # K real slots start as distinct keys below any score; the padding slots sit above every
        # key, so they are never the minimum that an insertion replaces.
        empty_keys = _pack_keys_triton(tl.full([K_SLOTS], float("-inf"), tl.float32), 0x7FFFFFFF - slots)
        keys = tl.where(slots < K, empty_keys, 0x7FFFFFFFFFFFFFFF - slots.to(tl.int64))
        keys = tl.broadcast_to(keys[None, :], (BLOCK_ROWS, K_SLOTS))

        col_start = group * cols_per_group
        col_end = tl.minimum(col_start + cols_per_group, n_cols)
        for col0 in range(col_start, col_end, BLOCK_COLS):
            cols = col0 + tl.arange(0, BLOCK_COLS)
            col_valid = cols < col_end
            # The per-query state (keys) lives in the layout of the tile's query axis, so that
            # axis must hold few query rows per thread. Tensor-core accumulators give each thread
            # few rows of the dot's first operand; Triton's blocked layouts for FMA dots and for
            # loads give each thread few of the second, so there queries go second and the tile
            # is transposed back (a free relabelling of registers).
            if SCORES_IN_MEMORY:
                scores = tl.trans(
                    tl.load(
                        scores_ptr + cols.to(tl.int64)[:, None] * scores_row_stride + rows[None, :],
                        mask=col_valid[:, None] & row_valid[None, :],
                    )
                )
            elif INPUT_PRECISION == "ieee":
                scores = tl.trans(
                    _block_scores(
                        references_ptr, cols, col_valid, references_row_stride,
                        queries_ptr, rows, row_valid, queries_row_stride,
                        depth, BLOCK_DEPTH, DEPTH_IN_ONE_BLOCK, INPUT_PRECISION,
                    )
                )
            else:
                scores = _block_scores(
                    queries_ptr, rows, row_valid, queries_row_stride,
                    references_ptr, cols, col_valid, references_row_stride,
                    depth, BLOCK_DEPTH, DEPTH_IN_ONE_BLOCK, INPUT_PRECISION,
                )
            scores = tl.where(row_valid[:, None] & col_valid[None, :], scores, float("-inf"))

            # Columns: this strip's best row, merged across strips by an int64 atomic max. The
            # stored key only grows, so a stale read can only cost an atomic, never lose one.
            col_best = tl.max(scores, axis=0)
            stored = tl.load(reference_best_ptr + cols, mask=col_valid, other=0)
            may_improve = col_valid & (col_best >= _key_scores_triton(stored))
            if tl.max(may_improve.to(tl.int32), axis=0) > 0:
                best_rows = tl.min(tl.where(scores == col_best[None, :], rows[:, None], n_rows), axis=0)
                tl.atomic_max(
                    reference_best_ptr + cols,
                    _pack_keys_triton(col_best, row_offset + best_rows),
                    mask=may_improve,
                    sem="relaxed",
                )

            # Rows: up to K passes, each inserting every row's best remaining score that beats the
            # row's current K-th best; a pass runs only if some row needs it, which after the first
            # tiles is rare. No tile adds more than K keys to a row, so K passes are enough. Columns
            # arrive in ascending order, so an equal score never displaces an earlier index. The
            # passes are unrolled (no inner loop) so that the column loop stays pipelinable.
            row_best = tl.max(scores, axis=1)
            worst = tl.min(keys, axis=1)
            needed = row_best > _key_scores_triton(worst)
            for _ in tl.static_range(K):
                if tl.max(needed.to(tl.int32), axis=0) > 0:
                    best_cols = tl.min(tl.where(scores == row_best[:, None], cols[None, :], n_cols), axis=1)
                    keys = tl.where(
                        needed[:, None] & (keys == worst[:, None]),
                        _pack_keys_triton(row_best, best_cols)[:, None],
                        keys,
                    )
                    scores = tl.where(cols[None, :] == best_cols[:, None], float("-inf"), scores)
                    row_best = tl.max(scores, axis=1)
                    worst = tl.min(keys, axis=1)
                    needed = row_best > _key_scores_triton(worst)

        n_groups = tl.num_programs(1)
        candidate_offsets = ((row_offset + rows).to(tl.int64) * n_groups + group)[:, None] * K + slots[None, :]
        tl.store(candidates_ptr + candidate_offsets, keys, mask=row_valid[:, None] & (slots < K)[None, :])
