"""Benchmark: the audit's top-k-both-ways reduction against a plain matrix product on one GPU.

For query rows A (n, d) and reference rows B (m, d), centred and L2-normalised, the audit reduction
is: every query's top-k references and every reference's best query (raymem.search.gpu). This
script times every variant of it at d = 32, 128, 512 and reports pairs/s (n * m / seconds) against
``torch.mm`` of the same shape on the same card (the rate to reach: 70 %), and checks each variant's
top-1 in both directions against a float64 brute force.

Needs only torch (+ triton for the Triton variants); no Ray, no network. From the repository root:

    python benchmarks/gpu_search.py --out gpu_search.json      # GPU, n = m = 65,536, under 170 s
    python benchmarks/gpu_search.py --quick --device cpu       # tiny dry run, Triton interpreted

Variants ("exact" says what the top-k ranking rests on):

- ``mm fp32`` / ``mm tf32`` / ``mm bf16``: plain ``torch.mm`` in row chunks, scores written and
  dropped; the baselines. "% of mm" is against ``mm fp32``; "% of own mm" against the baseline of
  the variant's own precision.
- ``naive``: chunked fp32 ``torch.mm`` then ``torch.topk`` per row and ``max`` per column
  (exact fp32 scores; ties ordered however topk orders them).
- ``torch``: raymem's pure-torch tiled method (exact fp32, ties to the lowest index).
- ``mm_reduce``: cuBLAS fp32 chunk + Triton reduction kernel (exact fp32).
- ``fused <precision> <tiling>``: one Triton kernel. ieee: exact fp32. tf32x3: fp32-level
  (three TF32 tensor-core products), not bit-exact. tf32 / bf16: approximate candidates
  (2k per query), re-scored in fp32.

Top-1 columns count, over the n queries (row) and m references (col): identical to float64,
different but within float32 rounding of the float64 best (|gap| <= 2 * d * 2**-24, exact ties
within rounding), and other mismatches (real errors for the exact variants).

Order: a first pass measures, for every d, the baselines and raymem's default tiling of each fused
precision; a second pass runs the other variants (mm_reduce, torch, extra tilings) while time is
left. Variants run one at a time in a worker process (spawned, so a Triton compile or a kernel that
hangs cannot stall this one): a variant with no result within --variant-timeout is recorded as a
timeout, its worker is killed and a fresh one takes the next variant; a worker is also replaced
after any error, since a CUDA error leaves its context unusable. The whole run stops at
--max-seconds. Every row is printed to stdout as a markdown table row when it is measured, and the
JSON (--out) is rewritten after every variant with the full error text of failures, so a cut-off
run keeps what it measured. On CPU, Triton's interpreter (3.9) multiplies bfloat16 blocks as raw
integers, so the bf16 rows of a CPU dry run show mismatches that a GPU does not have.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CHUNK_BYTES = 2**30  # scores held at once by the chunked baselines and the float64 reference
TARGET_SECONDS_PER_VARIANT = 0.4  # timed repetitions fill about this long
PLANTED_COPY_FRACTION = 0.01  # share of references that are noisy copies of queries, as memorised samples
ERROR_LINES_KEPT = 15  # lines of each error in the chain kept at the start, and again at the end, in the JSON


@dataclass
class Row:
    variant: str
    exact: str
    d: int
    n: int
    m: int
    k: int
    ms: float | None = None
    pairs_per_s: float | None = None
    mm_pairs_per_s: float | None = None
    pct_of_mm: float | None = None
    pct_of_own_mm: float | None = None
    row_top1: dict = field(default_factory=dict)
    col_top1: dict = field(default_factory=dict)
    error: str | None = None

    def error_summary(self) -> str:
        """The error's last line (for a chain, the innermost cause's message), for one table cell."""
        lines = [line.strip() for line in (self.error or "").splitlines() if line.strip()]
        return lines[-1].replace("|", "/") if lines else ""


@dataclass
class Variant:
    name: str
    exact: str
    baseline: str  # the mm baseline of the same precision
    first_pass: bool  # run in the first pass over all d; the rest only while time is left
    run: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor] | None]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one tiling each: a dry run")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton through its interpreter)")
    parser.add_argument("--n", type=int, default=None, help="query rows (default 65536, quick 192)")
    parser.add_argument("--m", type=int, default=None, help="reference rows (default n)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="default 32 128 512 (quick: 32 72)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--only", nargs="+", default=None, help="run only variants whose name contains one of these")
    parser.add_argument("--max-seconds", type=float, default=170, help="stop the run after this long (default 170)")
    parser.add_argument(
        "--variant-timeout", type=float, default=30, help="seconds one variant may take, compile and check included (default 30)"
    )
    parser.add_argument(
        "--tilings", nargs="+", default=(), metavar="ROWSxCOLSxDEPTH:WARPS:STAGES[:GROUPS]",
        help="more fused tf32x3 and ieee tilings to try in the second pass, e.g. 64x64x32:4:3 128x256x32:8:3:16",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def parse_tiling(gpu, text: str):
    """'128x64x32:8:3' or '128x64x32:8:3:16' -> gpu.TritonTiling (block rows, cols, depth, warps, stages, groups)."""
    try:
        blocks, *rest = text.split(":")
        rows, cols, depth = (int(part) for part in blocks.split("x"))
        warps, stages, *groups = (int(part) for part in rest)
        return gpu.TritonTiling(rows, cols, depth, num_warps=warps, num_stages=stages,
                                column_groups=groups[0] if groups else None)
    except ValueError as error:
        raise SystemExit(f"--tilings {text!r}: give ROWSxCOLSxDEPTH:WARPS:STAGES[:GROUPS], e.g. 64x64x32:4:3 ({error})")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(milliseconds per call, last result): one warm-up (compiles), one probe, then enough calls to fill the target time."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    probe_s = time.perf_counter() - start
    repeats = max(1, min(20, int(TARGET_SECONDS_PER_VARIANT / max(probe_s, 1e-6))))
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            result = fn()
        return (time.perf_counter() - start) * 1e3 / repeats, result
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        result = fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / repeats, result


def embeddings(n: int, m: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random centred unit rows; a share of references are noisy copies of queries, and one
    reference and one query are exact duplicates, so both strong matches and exact ties occur."""
    generator = torch.Generator(device=device).manual_seed(d)
    queries = torch.randn(n, d, device=device, generator=generator)
    references = torch.randn(m, d, device=device, generator=generator)
    copies = max(1, int(PLANTED_COPY_FRACTION * m))
    sources = torch.randint(0, n, (copies,), device=device, generator=generator)
    references[:copies] = queries[sources] + 0.2 * torch.randn(copies, d, device=device, generator=generator)
    references[-1] = references[0]
    queries[-1] = queries[0]
    queries = queries - queries.mean(dim=1, keepdim=True)
    references = references - references.mean(dim=1, keepdim=True)
    return queries / queries.norm(dim=1, keepdim=True), references / references.norm(dim=1, keepdim=True)


def chunk_rows(n: int, m: int, bytes_per_score: int) -> int:
    return max(1, min(n, CHUNK_BYTES // (bytes_per_score * m)))


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch.mm of float32 in TF32 for 'tf32', in full float32 otherwise, inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def mm_baseline(precision: str) -> Callable:
    """Plain chunked matrix product of the same shape: scores written to a reused chunk and dropped."""
    operand_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def run(queries, references, k):
        q, r = queries.to(operand_dtype), references.to(operand_dtype)
        rows = chunk_rows(q.shape[0], r.shape[0], q.element_size())
        chunk = torch.empty((rows, r.shape[0]), dtype=operand_dtype, device=q.device)
        with float32_matmul_precision(precision):
            for row0 in range(0, q.shape[0], rows):
                row1 = min(row0 + rows, q.shape[0])
                torch.mm(q[row0:row1], r.T, out=chunk[: row1 - row0])
        return None

    return run


def naive_topk(queries, references, k):
    """Chunked fp32 mm, then torch.topk per row and max per column, merged over chunks."""
    n, m = queries.shape[0], references.shape[0]
    rows = chunk_rows(n, m, 4)
    chunk = torch.empty((rows, m), dtype=torch.float32, device=queries.device)
    top = torch.empty((n, k), dtype=torch.int64, device=queries.device)
    col_scores = torch.full((m,), float("-inf"), device=queries.device)
    col_rows = torch.zeros(m, dtype=torch.int64, device=queries.device)
    with float32_matmul_precision("ieee"):
        for row0 in range(0, n, rows):
            row1 = min(row0 + rows, n)
            scores = torch.mm(queries[row0:row1], references.T, out=chunk[: row1 - row0])
            top[row0:row1] = scores.topk(k, dim=1).indices
            best, best_rows = scores.max(dim=0)
            better = best > col_scores
            col_scores = torch.where(better, best, col_scores)
            col_rows = torch.where(better, best_rows + row0, col_rows)
    return top[:, 0], col_rows


def library_variant(gpu, **options) -> Callable:
    def run(queries, references, k):
        result = gpu.topk_both_ways(queries, references, k, **options)
        return result.row_indices[:, 0], result.col_indices

    return run


def tiling_label(tiling) -> str:
    groups = "" if tiling.column_groups is None else f" g{tiling.column_groups}"
    return f"{tiling.block_rows}x{tiling.block_cols}x{tiling.block_depth} w{tiling.num_warps} s{tiling.num_stages}{groups}"


def variants(gpu, quick: bool, triton_available: bool, tilings: tuple[str, ...] = ()) -> list[Variant]:
    """Every variant, in the order they run within a pass; first_pass marks those measured for every d first."""
    listed = [
        Variant("mm fp32", "baseline", "ieee", True, mm_baseline("ieee")),
        Variant("mm tf32", "baseline", "tf32", True, mm_baseline("tf32")),
        Variant("mm bf16", "baseline", "bf16", True, mm_baseline("bf16")),
        Variant("naive mm+topk", "exact fp32, ties unordered", "ieee", True, naive_topk),
    ]
    if triton_available:
        listed += triton_variants(gpu, quick, [parse_tiling(gpu, text) for text in tilings])
    return listed + [Variant("torch", "exact fp32", "ieee", False, library_variant(gpu, method="torch"))]


def triton_variants(gpu, quick: bool, more_tilings: list = ()) -> list[Variant]:
    """Each fused precision's default tiling (first pass, best-known first), then mm_reduce and the extra tilings."""
    tiling = gpu.TritonTiling
    if quick:
        small = tiling(32, 32, 32, num_warps=4, num_stages=2)
        extra_tilings = {("fused", "tf32x3"): [small], ("fused", "ieee"): [small]}
    else:
        # d = 32 is bound by the in-register reduction, not the dot: smaller tiles and one warpgroup
        # did best there (tf32x3 64x64x32 w4 s3: 52 % of mm vs 43 % for the default), but that
        # tiling hung on an H200 with Triton 3.6 at d = 128 (depth loop), so it is left out here.
        extra_tilings = {
            ("fused", "tf32x3"): [
                tiling(64, 64, 32, num_warps=4, num_stages=2),
                tiling(128, 64, 32, num_warps=8, num_stages=3, column_groups=8),
                tiling(128, 128, 32, num_warps=8, num_stages=3),
            ],
            ("fused", "ieee"): [
                tiling(64, 64, 16, num_warps=4, num_stages=2),
                tiling(128, 64, 16, num_warps=8, num_stages=3),
                tiling(64, 128, 16, num_warps=4, num_stages=3),
            ],
        }
    for key in (("fused", "tf32x3"), ("fused", "ieee")):
        extra_tilings[key] = list(extra_tilings[key]) + [t for t in more_tilings if key[1] == "tf32x3" or t.block_depth == 16]
    exactness = {"ieee": "exact fp32", "tf32x3": "fp32-level (3xTF32)", "tf32": "approx, fp32 re-scored", "bf16": "approx, fp32 re-scored"}
    first, extra = [], []
    for method, precision in [("fused", "tf32x3"), ("fused", "ieee"), ("fused", "tf32"), ("fused", "bf16"), ("mm_reduce", "ieee")]:
        name = f"{method} {precision}"
        baseline = precision if precision in ("tf32", "bf16") else "ieee"
        options = {"method": method, "precision": precision}
        default = Variant(
            f"{name} {tiling_label(gpu.DEFAULT_TILINGS[method, precision])}",
            exactness[precision], baseline, method == "fused", library_variant(gpu, **options),
        )
        (first if default.first_pass else extra).append(default)
        for t in extra_tilings.get((method, precision), []):
            extra.append(Variant(f"{name} {tiling_label(t)}", exactness[precision], baseline, False, library_variant(gpu, **options, tiling=t)))
    return first + extra


def float64_top1(queries: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best reference of each query and best query of each reference, in float64 (first index on ties)."""
    q, r = queries.double(), references.double()
    n, m = q.shape[0], r.shape[0]
    rows = chunk_rows(n, m, 8)
    row_best = torch.empty(n, dtype=torch.int64, device=q.device)
    col_scores = torch.full((m,), float("-inf"), dtype=torch.float64, device=q.device)
    col_rows = torch.zeros(m, dtype=torch.int64, device=q.device)
    for row0 in range(0, n, rows):
        row1 = min(row0 + rows, n)
        scores = q[row0:row1] @ r.T
        row_best[row0:row1] = scores.argmax(dim=1)
        best, best_rows = scores.max(dim=0)
        better = best > col_scores
        col_scores = torch.where(better, best, col_scores)
        col_rows = torch.where(better, best_rows + row0, col_rows)
    return row_best, col_rows


def agreement(found: torch.Tensor, expected: torch.Tensor, pair_scores: Callable, tolerance: float) -> dict:
    """Counts of identical, within-rounding and other top-1 choices; pair_scores(i, j) gives float64 scores."""
    different = (found != expected).nonzero().flatten()
    gaps = pair_scores(different, expected[different]) - pair_scores(different, found[different])
    within = int((gaps.abs() <= tolerance).sum())
    return {"identical": found.numel() - different.numel(), "within_rounding": within, "other": different.numel() - within}


@dataclass
class Problem:
    """One d: the embeddings and their float64 top-1 both ways."""

    queries: torch.Tensor
    references: torch.Tensor
    top1: tuple[torch.Tensor, torch.Tensor]

    def pair_scores(self, query_rows: torch.Tensor, reference_rows: torch.Tensor) -> torch.Tensor:
        return (self.queries[query_rows].double() * self.references[reference_rows].double()).sum(dim=1)


def describe_error(error: BaseException) -> str:
    """The error and the chain of its causes, each as its type and message; a long message keeps its
    first and last ERROR_LINES_KEPT lines (a Triton CompilationError points at the failing line at its end)."""
    parts = []
    while error is not None and len(parts) < 8:
        lines = str(error).strip().splitlines()
        if len(lines) > 2 * ERROR_LINES_KEPT:
            lines = lines[:ERROR_LINES_KEPT] + ["..."] + lines[-ERROR_LINES_KEPT:]
        parts.append("\n".join([f"{type(error).__name__}:", *lines]))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return "\ncaused by ".join(parts)


def measure(variant: Variant, problem: Callable[[], Problem], k: int, device: torch.device) -> dict:
    """Milliseconds per call and top-1 agreement with float64 of one variant, or its error (full chain)."""
    try:
        built = problem()
        ms, found = time_ms(lambda: variant.run(built.queries, built.references, k), device)
        if found is None:
            return {"ms": ms}
        d = built.queries.shape[1]
        tolerance = 2 * d * 2.0**-24  # float32 rounding bound of a unit-vector dot product, both scores
        return {
            "ms": ms,
            "row_top1": agreement(found[0], built.top1[0], built.pair_scores, tolerance),
            "col_top1": agreement(found[1], built.top1[1], lambda j, i: built.pair_scores(i, j), tolerance),
        }
    except Exception as error:  # reported in the row; the worker is replaced and the run goes on
        return {"error": describe_error(error)}


def worker_main(connection, settings: dict) -> None:
    """Worker process: sends its machine header, then answers (d, variant name) requests with
    `measure` results until it receives None. Embeddings and float64 top-1 are built once per d."""
    device = torch.device(settings["device"])
    from raymem.search import gpu

    listed = {v.name: v for v in variants(gpu, settings["quick"], gpu.triton_runs_on(device), settings["tilings"])}
    connection.send(
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "triton": gpu.triton.__version__ if gpu.triton is not None else "not installed",
            "cuda": torch.version.cuda,
        }
    )
    problems = {}

    def problem_for(d: int) -> Problem:
        if d not in problems:
            queries, references = embeddings(settings["n"], settings["m"], d, device)
            problems[d] = Problem(queries, references, float64_top1(queries, references))
        return problems[d]

    while (request := connection.recv()) is not None:
        d, name = request
        connection.send(measure(listed[name], lambda: problem_for(d), settings["k"], device))
        if device.type == "cuda":
            torch.cuda.empty_cache()


class Worker:
    """The one spawned worker process, started when needed; killed after a timeout, a crash or an error."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.process = None
        self.connection = None
        self.header = None

    def request(self, d: int, variant: Variant, timeout_s: float) -> dict:
        """`measure` result of one variant at d, or {"error": ...} for a timeout or a dead worker."""
        started = time.perf_counter()
        try:
            if self.process is None:
                self.start(timeout_s)
            self.connection.send((d, variant.name))
            result = self.receive(timeout_s - (time.perf_counter() - started))
        except TimeoutError:
            self.stop()
            return {"error": f"timeout: no result within {timeout_s:.0f} s (--variant-timeout or --max-seconds); worker killed"}
        except (EOFError, OSError):
            return {"error": f"worker died (exit code {self.stop()}) while running this variant"}
        if "error" in result:
            self.stop()
        return result

    def start(self, timeout_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child_end, self.settings), daemon=True)
        self.process.start()
        child_end.close()
        self.header = self.receive(timeout_s)

    def receive(self, timeout_s: float):
        if not self.connection.poll(max(0.0, timeout_s)):
            raise TimeoutError
        return self.connection.recv()  # EOFError if the worker died

    def stop(self) -> int | None:
        """Kill the worker (a hung kernel ignores anything gentler); returns its exit code."""
        if self.process is None:
            return None
        self.process.kill()
        self.process.join()
        self.connection.close()
        code, self.process, self.connection = self.process.exitcode, None, None
        return code


def add_rates(row: Row, variant: Variant, baselines: dict) -> None:
    """pairs/s and % of the mm baselines measured so far at the row's d; a baseline row records itself."""
    if row.ms is None:
        return
    row.pairs_per_s = row.n * row.m / (row.ms / 1e3)
    if variant.exact == "baseline":
        baselines[row.d, variant.baseline] = row.pairs_per_s
    row.mm_pairs_per_s = baselines.get((row.d, "ieee"))
    if row.mm_pairs_per_s:
        row.pct_of_mm = 100 * row.pairs_per_s / row.mm_pairs_per_s
    if baselines.get((row.d, variant.baseline)):
        row.pct_of_own_mm = 100 * row.pairs_per_s / baselines[row.d, variant.baseline]


def top1_cell(counts: dict) -> str:
    return f"{counts['identical']}/{counts['within_rounding']}/{counts['other']}" if counts else "-"


def number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_HEADER = (
    "| variant | exact | n | m | d | k | ms | pairs/s | mm fp32 pairs/s | % of mm | % of own mm "
    "| row top-1 same/rounding/other | col top-1 same/rounding/other | error |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(r: Row) -> str:
    return (
        f"| {r.variant} | {r.exact} | {r.n} | {r.m} | {r.d} | {r.k} | {number(r.ms, '.2f')} | {number(r.pairs_per_s, '.3e')} "
        f"| {number(r.mm_pairs_per_s, '.3e')} | {number(r.pct_of_mm, '.1f')} | {number(r.pct_of_own_mm, '.1f')} "
        f"| {top1_cell(r.row_top1)} | {top1_cell(r.col_top1)} | {r.error_summary()} |"
    )


def fastest_lines(rows: list[Row]) -> list[str]:
    lines = []
    for d in sorted({r.d for r in rows}):
        for kind in ("exact fp32", "fp32-level (3xTF32)"):
            measured = [r for r in rows if r.d == d and r.exact == kind and r.pct_of_mm]
            if measured:
                best = max(measured, key=lambda r: r.pct_of_mm)
                lines.append(f"d={d}: fastest {kind} variant: {best.variant}, {best.pct_of_mm:.1f} % of mm fp32")
    return lines


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before raymem.search.gpu decorates its kernels (here and in workers)
    from raymem.search import gpu

    n = args.n or (192 if args.quick else 65536)
    settings = {"quick": args.quick, "device": args.device, "n": n, "m": args.m or n, "k": args.k,
                "tilings": tuple(args.tilings)}
    dims = args.dims or ([32, 72] if args.quick else [32, 128, 512])
    listed = variants(gpu, args.quick, gpu.triton_runs_on(device), tuple(args.tilings))
    if args.only:
        listed = [v for v in listed if any(word in v.name for word in args.only)]
    worker = Worker(settings)
    try:
        worker.start(args.variant_timeout)
    except (TimeoutError, EOFError) as error:
        worker.stop()
        raise SystemExit(
            f"the benchmark worker on {args.device} did not start within {args.variant_timeout:g} s ({type(error).__name__}); "
            "see its error above, or raise --variant-timeout"
        )
    header = {**worker.header, "args": {key: str(value) for key, value in vars(args).items()}}
    print(f"card: {header['device']}; torch {header['torch']}; triton {header['triton']}; CUDA {header['cuda']}\n", flush=True)
    print(TABLE_HEADER, flush=True)
    deadline = started + args.max_seconds
    rows: dict[tuple[int, int], Row] = {}
    baselines: dict[tuple[int, str], float] = {}
    for first_pass in (True, False):
        for d in dims:
            for order, variant in enumerate(listed):
                if variant.first_pass != first_pass:
                    continue
                row = Row(variant.name, variant.exact, d, settings["n"], settings["m"], args.k)
                time_left = deadline - time.perf_counter()
                if time_left <= 0:
                    row.error = f"not run: past --max-seconds {args.max_seconds:g}"
                else:
                    for key, value in worker.request(d, variant, min(args.variant_timeout, time_left)).items():
                        setattr(row, key, value)
                add_rates(row, variant, baselines)
                rows[d, order] = row
                print(table_row(row), flush=True)
                print(
                    f"[{time.perf_counter() - started:6.1f}s] d={d} {row.variant}: {number(row.ms, '.2f')} ms, "
                    f"{number(row.pct_of_mm, '.1f')} % of mm, row {top1_cell(row.row_top1)}, col {top1_cell(row.col_top1)} "
                    f"{row.error_summary()}",
                    file=sys.stderr,
                    flush=True,
                )
                if args.out:
                    ordered = [rows[key] for key in sorted(rows)]
                    args.out.write_text(json.dumps({**header, "rows": [asdict(r) for r in ordered]}, indent=1))
    worker.stop()
    print("\n" + "\n".join(fastest_lines(list(rows.values()))))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
