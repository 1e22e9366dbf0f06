"""Throughput and memory of the exact all-pairs search (raymem.search), on this machine's CPUs.

Figures (printed as a markdown table, and as JSON with --out):

1. kernel: pairs/s of raymem.search.kernel.search (top-k of every A row AND best A row of every B row) against
   faiss-cpu IndexFlatIP top-k (one direction only) on the same centred, L2-normalised float32 embeddings, same
   run; raymem with each screen (kernel.SCREENS: int8, bfloat16, float32; the results are bitwise the same) and
   which one kernel.default_screen picks; the fraction of rows whose top-1 index agrees with faiss, and how many of
   the rows that differ are exact ties or float32 near-ties (float64 scores of the two candidates within 1e-6);
2. fraction of peak: the same pairs/s against plain float32 torch.mm over the same tile grid (block x block
   products into a preallocated buffer, both directions' worth of work being one product);
3. distributed: raymem.search.distributed on a local Ray cluster against the single-process kernel;
4. peak memory: the resident set size of a separate process that searches n x n at d = 128 (--memory-rows,
   100,000 by default; the score matrix would be 4 * n**2 bytes).

Each timing is the best of --repeats runs; methods alternate so machine load affects them alike.
Run: python benchmarks/search.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymem.search import kernel  # noqa: E402

TOP_K = 5


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def tiled_matmul(a: torch.Tensor, b: torch.Tensor, block_rows: int) -> None:
    """The plain float32 products of the search's tile grid, into one preallocated buffer."""
    out = torch.empty(block_rows * block_rows)
    for a_start, b_start in kernel.tile_grid(len(a), len(b), block_rows):
        a_block, b_block = a[a_start : a_start + block_rows], b[b_start : b_start + block_rows]
        torch.mm(a_block, b_block.T, out=out[: len(a_block) * len(b_block)].view(len(a_block), len(b_block)))


def top1_agreement(a: np.ndarray, b: np.ndarray, ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Rows whose top-1 differs, and of those how many are ties within 1e-6 in float64."""
    differ = np.flatnonzero(ours != theirs)
    a64 = kernel.standardize(torch.from_numpy(a[differ]), torch.float64).numpy()
    b64 = kernel.standardize(torch.from_numpy(b), torch.float64).numpy()
    gap = np.abs(np.einsum("ij,ij->i", a64, b64[ours[differ]]) - np.einsum("ij,ij->i", a64, b64[theirs[differ]]))
    return {"top1_identical": 1 - len(differ) / len(ours), "rows_differing": int(len(differ)),
            "differing_within_1e-6": int((gap <= 1e-6).sum())}


def kernel_figures(n: int, d: int, block_rows: int, repeats: int) -> dict:
    import faiss

    rng = np.random.default_rng(d)
    a, b = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    a_std, b_std = kernel.standardize(torch.from_numpy(a)), kernel.standardize(torch.from_numpy(b))
    index = faiss.IndexFlatIP(d)
    index.add(b_std.numpy())
    def raymem(screen):
        return lambda: kernel.search(a_std, b_std, k=TOP_K, block_rows=block_rows, screen=screen)

    runs = {**{screen: raymem(screen) for screen in kernel.SCREENS},
            "faiss": lambda: index.search(a_std.numpy(), TOP_K),
            "matmul": lambda: tiled_matmul(a_std, b_std, block_rows)}
    seconds = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], best_time(run, 1))
    found = {screen: raymem(screen)() for screen in kernel.SCREENS}
    default = kernel.default_screen(d)
    ours = found[default].row_indices[:, 0].numpy()
    theirs = index.search(a_std.numpy(), TOP_K)[1][:, 0]
    pairs = n * n
    return {
        "n": n, "m": n, "d": d, "k": TOP_K, "block_rows": block_rows, "default_screen": default,
        **{f"{name}_pairs_per_s": pairs / s for name, s in seconds.items()},
        **{f"{screen}_vs_faiss": seconds["faiss"] / seconds[screen] for screen in kernel.SCREENS},
        "vs_faiss": seconds["faiss"] / seconds[default],
        "fraction_of_matmul": seconds["matmul"] / seconds[default],
        "screens_identical": all(torch.equal(getattr(found[default], field), getattr(result, field))
                                 for result in found.values() for field in kernel.SearchResult.__dataclass_fields__),
        **top1_agreement(a_std.numpy(), b_std.numpy(), ours, theirs),
    }


def distributed_figures(n: int, d: int, block_rows: int, repeats: int) -> dict:
    import ray

    from raymem.search import distributed

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        a_set, b_set = distributed.put_blocks([a], block_rows, d), distributed.put_blocks([b], block_rows, d)
        distributed.search(a_set, b_set, k=TOP_K)  # workers start and import torch once
        single = best_time(lambda: kernel.search(torch.from_numpy(a), torch.from_numpy(b), k=TOP_K,
                                                 block_rows=block_rows), repeats)
        spread = best_time(lambda: distributed.search(a_set, b_set, k=TOP_K), repeats)
    finally:
        ray.shutdown()
    return {"n": n, "d": d, "block_rows": block_rows, "ray_cpus": os.cpu_count(),
            "single_pairs_per_s": n * n / single, "ray_pairs_per_s": n * n / spread, "ray_efficiency": single / spread}


def memory_figures(n: int, d: int, block_rows: int) -> dict:
    """Peak RSS of a fresh process that searches n x n (embeddings generated inside it), as it reports it."""
    code = (
        "import resource, sys, time, torch; sys.path.insert(0, sys.argv[1]); from raymem.search import kernel;"
        "g = torch.Generator().manual_seed(0); n, d, block = map(int, sys.argv[2:5]);"
        "a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g);"
        "t = time.perf_counter(); kernel.search(a, b, k=5, block_rows=block);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), str(n), str(d),
                           str(block_rows)], capture_output=True, text=True, check=True)
    seconds, peak_kib = done.stdout.split()[-2:]
    return {"n": n, "d": d, "block_rows": block_rows, "seconds": float(seconds), "pairs_per_s": n * n / float(seconds),
            "peak_rss_mib": int(peak_kib) / 1024, "embeddings_mib": 2 * n * d * 4 / 2**20,
            "score_matrix_mib_avoided": 4 * n * n / 2**20}


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    lines += ["| d | n = m | raymem pairs/s (default screen) | faiss IndexFlatIP pairs/s | raymem / faiss | "
              "int8 / bfloat16 / float32 screen vs faiss | float32 mm pairs/s | raymem / mm | screens bitwise equal "
              "| top-1 identical | differing rows (of which ties within 1e-6) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["kernel"]:
        by_screen = " / ".join(f"{row[f'{screen}_vs_faiss']:.2f}x" for screen in kernel.SCREENS)
        lines.append(f"| {row['d']} | {row['n']:,} | {row[row['default_screen'] + '_pairs_per_s']:.3g} "
                     f"({row['default_screen']}) | {row['faiss_pairs_per_s']:.3g} | **{row['vs_faiss']:.2f}x** "
                     f"| {by_screen} | {row['matmul_pairs_per_s']:.3g} | {row['fraction_of_matmul']:.0%} "
                     f"| {row['screens_identical']} | {row['top1_identical']:.4%} "
                     f"| {row['rows_differing']} ({row['differing_within_1e-6']}) |")
    row = results["distributed"]
    lines += ["", "| distributed (local Ray) | n = m | d | single-process pairs/s | Ray pairs/s | efficiency |",
              "|---|---|---|---|---|---|",
              f"| {row['ray_cpus']} Ray CPUs | {row['n']:,} | {row['d']} | {row['single_pairs_per_s']:.3g} | "
              f"{row['ray_pairs_per_s']:.3g} | {row['ray_efficiency']:.0%} |"]
    row = results["memory"]
    lines += ["", "| peak memory | n = m | d | seconds | pairs/s | peak RSS | embeddings | n x m scores (not held) |",
              "|---|---|---|---|---|---|---|---|",
              f"| kernel.search | {row['n']:,} | {row['d']} | {row['seconds']:.1f} | {row['pairs_per_s']:.3g} | "
              f"{row['peak_rss_mib']:.0f} MiB | {row['embeddings_mib']:.0f} MiB | "
              f"{row['score_matrix_mib_avoided']:,.0f} MiB |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke run)")
    parser.add_argument("--rows", type=int, default=32768, help="n = m for the kernel comparison")
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--distributed-rows", type=int, default=16384)
    parser.add_argument("--memory-rows", type=int, default=100_000, help="n = m for the peak-memory run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.dims, args.distributed_rows, args.memory_rows, args.repeats = 8192, [32, 128], 8192, 8192, 1
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at start",
        "kernel": [kernel_figures(args.rows, d, args.block_rows, args.repeats) for d in args.dims],
        "distributed": distributed_figures(args.distributed_rows, 128, args.block_rows, args.repeats),
        "memory": memory_figures(args.memory_rows, 128, args.block_rows),
    }
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
