"""The all-pairs search as Ray tasks over the kernel's tile grid (orchestration only: the science is in kernel.py).

Each embedding set is streamed in once and put in the object store as raw float32 blocks of ``block_rows``
rows (``put_blocks``); the driver keeps only object references. One task per tile (A block x B block) prepares
its two blocks and runs ``kernel.search_tile`` with the floors the merged tiles had reached when it was submitted;
at most ``max_in_flight`` tasks are pending (``ray.wait``); a task whose worker dies is retried (``max_retries``),
costing only its tile. Partial results are merged on the driver by ``kernel.SearchAccumulator`` as they arrive, in
any order. The tile grid, the per-tile function and the merge are the single-process search's (``kernel.search``);
every score is exact and every selection a fixed rule, so the results are bitwise identical to it, whatever order
the tiles finish in.

Driver memory: the merged results, O(n * k + m + top pairs), and one block at a time while putting or reading
rows. Tasks use Ray's default scheduling, which places a task where most of its argument bytes already are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch

from raymem.search import kernel

TILE_RETRIES = 3


@dataclass(frozen=True)
class BlockSet:
    """An embedding set in the object store: raw float32 blocks (block_rows, d), the last one shorter.

    refs[i] holds rows offsets[i] .. offsets[i] + block_rows; n_rows rows of dimension dim in all.
    """

    refs: list
    offsets: list[int]
    n_rows: int
    dim: int
    block_rows: int

    def block_of(self, row: int) -> int:
        return row // self.block_rows

    def rows_in(self, block: int) -> int:
        return min(self.block_rows, self.n_rows - self.offsets[block])


def rechunk(batches: Iterable[np.ndarray], block_rows: int) -> Iterator[np.ndarray]:
    """Regroup row batches (b_i, d) of any sizes into blocks of exactly block_rows rows (the last may be shorter)."""
    pending: list[np.ndarray] = []
    pending_rows = 0
    for batch in batches:
        pending.append(batch)
        pending_rows += len(batch)
        while pending_rows >= block_rows:
            joined = np.concatenate(pending)
            yield joined[:block_rows]
            pending, pending_rows = [joined[block_rows:]], pending_rows - block_rows
    if pending_rows:
        yield np.concatenate(pending)


def put_blocks(batches: Iterable[np.ndarray], block_rows: int, dim: int) -> BlockSet:
    """Stream row batches (b_i, dim) float32 into the object store as a BlockSet; each block is put once."""
    refs, offsets, n_rows = [], [], 0
    for block in rechunk(batches, block_rows):
        refs.append(ray.put(np.ascontiguousarray(block, dtype=np.float32)))
        offsets.append(n_rows)
        n_rows += len(block)
    return BlockSet(refs=refs, offsets=offsets, n_rows=n_rows, dim=dim, block_rows=block_rows)


_workspace: dict[int, kernel.Workspace] = {}  # per worker process: the strip buffer, reused by the tiles it runs
_prepared: OrderedDict[str, kernel.Block] = OrderedDict()  # per worker process: the blocks it prepared last
PREPARED_BLOCKS = 4  # a worker keeps this many prepared blocks (a tile row reuses its A block, B blocks cycle)


def _prepare(block: np.ndarray, key: str) -> kernel.Block:
    """kernel.prepare_block of a raw block, once per worker while it stays among the last PREPARED_BLOCKS used:
    preparing (float64 standardization, screen rounding) costs a fifth of a tile's search at d = 128."""
    if key in _prepared:
        _prepared.move_to_end(key)
    else:
        _prepared[key] = kernel.prepare_block(torch.from_numpy(np.array(block)))
        if len(_prepared) > PREPARED_BLOCKS:
            _prepared.popitem(last=False)
    return _prepared[key]


def _tile(a_block: np.ndarray, b_block: np.ndarray, a_key: str, b_key: str, a_offset: int, b_offset: int, k: int,
          top_pairs: int, band: float, row_floor: torch.Tensor, column_floor: torch.Tensor):
    """One tile from raw blocks (a_key, b_key: their object ids): prepare both (as kernel.search does per block)
    and run kernel.search_tile. The screen is this worker's default: results do not depend on it, so workers on
    different CPUs agree."""
    if len(b_block) not in _workspace:
        _workspace.clear()
        _workspace[len(b_block)] = kernel.make_workspace(len(b_block))
    return kernel.search_tile(
        _prepare(a_block, a_key),
        _prepare(b_block, b_key),
        a_offset=a_offset,
        b_offset=b_offset,
        k=k,
        top_pairs=top_pairs,
        band=band,
        row_floor=row_floor,
        column_floor=column_floor,
        workspace=_workspace[len(b_block)],
    )


_tile_task = ray.remote(num_cpus=1)(_tile)


def _merge_ready(pending: dict, accumulator: kernel.SearchAccumulator, progress) -> None:
    """Wait for the next pending tile to finish and merge it."""
    ready, _ = ray.wait(list(pending), num_returns=1)
    for ref in ready:
        accumulator.add(ray.get(ref), *pending.pop(ref))
        if progress is not None:
            progress.update(1)


def default_in_flight() -> int:
    """Twice the cluster's CPUs: every CPU busy, with one tile queued behind each."""
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def search(
    a: BlockSet,
    b: BlockSet,
    *,
    k: int,
    top_pairs: int = 0,
    band: float = 0.0,
    max_in_flight: int | None = None,
    max_retries: int = TILE_RETRIES,
    progress=None,
) -> kernel.SearchResult:
    """The search of kernel.search (same arguments and result), one Ray task per tile.

    progress: anything with ``update(n)`` (a tqdm bar), advanced once per finished tile.
    """
    assert a.block_rows == b.block_rows and a.dim == b.dim, (a.block_rows, b.block_rows, a.dim, b.dim)
    task = _tile_task.options(max_retries=max_retries)
    max_in_flight = max_in_flight or default_in_flight()
    accumulator = kernel.SearchAccumulator(a.n_rows, b.n_rows, k, top_pairs=top_pairs, band=band)
    pending: dict = {}
    for a_offset, b_offset in kernel.tile_grid(a.n_rows, b.n_rows, a.block_rows):
        if len(pending) >= max_in_flight:
            _merge_ready(pending, accumulator, progress)
        a_id, b_id = a.block_of(a_offset), b.block_of(b_offset)
        floors = accumulator.floors(a_offset, a.rows_in(a_id), b_offset, b.rows_in(b_id))
        a_ref, b_ref = a.refs[a_id], b.refs[b_id]
        pending[task.remote(a_ref, b_ref, a_ref.hex(), b_ref.hex(), a_offset, b_offset, k, top_pairs, band,
                            *floors)] = (a_offset, b_offset)
    while pending:
        _merge_ready(pending, accumulator, progress)
    return accumulator.result()


@ray.remote(num_cpus=1)
def _exact_task(queries: np.ndarray, offset: int, block: np.ndarray, k: int):
    return kernel.exact_topk(torch.from_numpy(np.array(queries)), [(offset, torch.from_numpy(np.array(block)))], k)


def exact_topk(queries: np.ndarray, reference: BlockSet, k: int, *, max_retries: int = TILE_RETRIES):
    """kernel.exact_topk of raw query rows (q, d) over a BlockSet: one task per reference block, merged on the
    driver (the merge is order-independent). Returns float64 scores (q, k') and int64 indices (q, k')."""
    queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
    task = _exact_task.options(max_retries=max_retries)
    parts = [task.remote(queries_ref, offset, ref, k) for offset, ref in zip(reference.offsets, reference.refs)]
    return kernel.merge_exact_topk((ray.get(part) for part in parts), k)


def take_rows(blocks: BlockSet, rows: np.ndarray) -> np.ndarray:
    """The raw rows (r, d) float32 at the given indices, fetching one block at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    taken = np.empty((len(rows), blocks.dim), dtype=np.float32)
    block_ids = rows // blocks.block_rows
    for block_id in np.unique(block_ids):
        mine = block_ids == block_id
        taken[mine] = ray.get(blocks.refs[block_id])[rows[mine] - blocks.offsets[block_id]]
    return taken
