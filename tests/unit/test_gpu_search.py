"""Tests of raymem.search.gpu: top-k in both directions against a float64 brute force.

The pure-torch tiled method is tested always. The Triton methods are tested only where they can
run: on a CUDA device with triton, or on CPU through Triton's interpreter when triton is importable
(this module sets TRITON_INTERPRET=1 before importing raymem.search.gpu when no GPU is present).
The parametrisation lists only the available implementations: without triton only the torch cases exist, and
``test_the_triton_kernels_are_tested_here`` is skipped with its reason (``-ra`` shows it). The test extra installs
triton (3.9: its CPU interpreter runs these kernels; 3.6's fails on numpy 2), so CI runs them. Interpreted cases
take about a second each.
"""

import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from raymem.search import gpu  # noqa: E402  (TRITON_INTERPRET must be set first)

SMALL_TILES = gpu.TritonTiling(block_rows=16, block_cols=16, block_depth=32, num_warps=4, num_stages=2, column_groups=2)
IMPLEMENTATIONS = [
    pytest.param({"method": "torch"}, id="torch"),
    pytest.param({"method": "torch", "max_scores_in_memory": 128}, id="torch-128-score-tiles"),
]
if gpu.triton_runs_on(DEVICE):
    IMPLEMENTATIONS += [
        pytest.param({"method": "fused", "precision": "ieee", "tiling": SMALL_TILES}, id="fused-ieee"),
        pytest.param({"method": "fused", "precision": "tf32x3", "tiling": SMALL_TILES}, id="fused-tf32x3"),
        pytest.param({"method": "fused", "precision": "tf32", "tiling": SMALL_TILES}, id="fused-tf32-rescored"),
        pytest.param({"method": "mm_reduce", "tiling": SMALL_TILES, "max_scores_in_memory": 20 * 48}, id="mm_reduce"),
        # the tiling CUDA runs by default (DEFAULT_TILINGS, chosen on an H200): tiles larger than these inputs
        pytest.param({"method": "fused", "precision": "tf32x3"}, id="fused-tf32x3-default-tiling"),
    ]


def normalised(rows: torch.Tensor) -> torch.Tensor:
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True)


def copied_embeddings(n_queries: int, n_references: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries are noisy copies of references, as synthetic samples that memorised training ones."""
    generator = torch.Generator().manual_seed(dims)
    references = torch.randn(n_references, dims, generator=generator)
    queries = references[torch.randperm(n_references, generator=generator)[:n_queries]]
    queries = queries + 0.3 * torch.randn(n_queries, dims, generator=generator)
    return normalised(queries).to(DEVICE), normalised(references).to(DEVICE)


def balanced_sign_embeddings(n_rows: int, seed: int) -> torch.Tensor:
    """Rows of eight +1/4 and eight -1/4: centred, unit norm, and every score is a multiple of 1/16
    computed exactly at any precision and summation order, so equal scores are exact ties."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.tensor([1.0] * 8 + [-1.0] * 8)
    rows = torch.stack([signs[torch.randperm(16, generator=generator)] for _ in range(n_rows)])
    return (rows / 4).to(DEVICE)


def float64_scores(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    return queries.cpu().double() @ references.cpu().double().T


@pytest.mark.parametrize("dims", [24, 72], ids=["depth-in-one-block", "depth-loop"])
@pytest.mark.parametrize("options", IMPLEMENTATIONS)
def test_neighbours_are_the_float64_top_k_up_to_float32_rounding(options, dims):
    queries, references = copied_embeddings(40, 48, dims)
    scores = float64_scores(queries, references)

    result = gpu.topk_both_ways(queries, references, k=5, **options)

    row_indices, col_indices = result.row_indices.cpu(), result.col_indices.cpu()
    found_row_scores = scores.gather(1, row_indices)
    found_col_scores = scores[col_indices, torch.arange(scores.shape[1])]
    torch.testing.assert_close(found_row_scores, scores.topk(5, dim=1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(found_col_scores, scores.max(dim=0).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.row_scores.cpu().double(), found_row_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.col_scores.cpu().double(), found_col_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", IMPLEMENTATIONS)
def test_tied_scores_rank_the_lowest_index_first(options):
    queries, references = balanced_sign_embeddings(40, seed=1), balanced_sign_embeddings(48, seed=2)
    scores = float64_scores(queries, references).float()
    row_scores, row_indices = scores.sort(dim=1, descending=True, stable=True)
    col_scores, col_indices = scores.sort(dim=0, descending=True, stable=True)
    expected = (row_scores[:, :5], row_indices[:, :5], col_scores[0], col_indices[0])

    result = gpu.topk_both_ways(queries, references, k=5, **options)

    found = (result.row_scores, result.row_indices, result.col_scores, result.col_indices)
    assert all(torch.equal(got.cpu(), want) for got, want in zip(found, expected))


def test_nan_embeddings_are_rejected_with_their_name():
    queries, references = copied_embeddings(4, 8, 16)
    references[2, 5] = float("nan")

    with pytest.raises(ValueError, match="b holds NaN"):
        gpu.topk_both_ways(queries, references, k=2)


def test_k_above_the_number_of_b_rows_is_rejected():
    queries, references = copied_embeddings(4, 8, 16)

    with pytest.raises(ValueError, match="k=9"):
        gpu.topk_both_ways(queries, references, k=9)


def test_a_dot_step_shorter_than_16_dims_is_rejected():
    # Triton before 3.9 cannot compile a tl.dot over fewer than 16 dims.
    with pytest.raises(ValueError, match="block_depth=8"):
        gpu.TritonTiling(block_rows=64, block_cols=64, block_depth=8, num_warps=4, num_stages=2)


def test_reduced_precision_needs_the_fused_method():
    queries, references = copied_embeddings(4, 8, 16)

    with pytest.raises(ValueError, match="needs method 'fused'"):
        gpu.topk_both_ways(queries, references, k=2, method="torch", precision="bf16")


def test_the_triton_kernels_are_tested_here():
    if not gpu.triton_runs_on(DEVICE):
        pytest.skip("triton is not installed: the fused Triton kernels are not tested on this machine "
                    "(pip install the test extra, which pins triton for its CPU interpreter)")
    assert any("fused" in str(param.id) for param in IMPLEMENTATIONS)
