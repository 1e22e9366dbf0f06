"""The search kernel's fused strip reduction (strip_reduce.c), compiled with the machine's C compiler on first use.

``reduce_strip`` does in two passes over a strip what raymem.search.kernel otherwise does with a dozen torch
operations (chunk maxima both ways, thresholds, candidate extraction): on the 2-core dev box 2.7x faster on a
512 x 4,096 strip of int32 values and 1.6x on float32, which matters where the screen GEMM is cheap (small d).

The library is built once per source, compiler and CPU (``-O3 -march=native``) into ``RAYMEM_CACHE`` (default
``~/.cache/raymem``) and loaded with ctypes, which releases the GIL during the call. Without a C compiler, or with
``RAYMEM_NATIVE=0``, ``load`` returns None and the kernel keeps its torch path; the results are the same either
way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("strip_reduce.c")
MAX_K = 64  # strip_reduce.c's MAX_K
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_FUNCTIONS = {torch.int32: "reduce_strip_int32", torch.float32: "reduce_strip_float32"}


def _cache_dir() -> Path:
    return Path(os.environ.get("RAYMEM_CACHE", Path.home() / ".cache" / "raymem"))


def _build_key(compiler: str) -> str:
    """Source, compiler version and CPU flags: a library built for one machine is never loaded on another."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = os.uname().machine
    return hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(_FLAGS), flags]).encode()).hexdigest()[:16]


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built (a warning says why) or RAYMEM_NATIVE=0."""
    if os.environ.get("RAYMEM_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("no C compiler found: the search kernel uses its slower torch reductions", stacklevel=2)
        return None
    try:
        library = _cache_dir() / f"strip_reduce-{_build_key(compiler)}.so"
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # built aside, renamed: atomic
                built = Path(scratch) / library.name
                subprocess.run([compiler, *_FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True,
                               text=True, check=True)
                os.replace(built, library)
        native = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"could not build {SOURCE.name} ({detail.strip()[:300]}): the search kernel uses its slower "
                      "torch reductions", stacklevel=2)
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
    for name in _FUNCTIONS.values():
        function = getattr(native, name)
        function.restype = size
        function.argtypes = [pointer, size, size, size, size, pointer, pointer, pointer, pointer, pointer, pointer,
                             real, real, real, real, size, pointer, pointer, pointer]
    return native


def reduce_strip(native: ctypes.CDLL, strip: torch.Tensor, k: int, chunk: int, row_floor: torch.Tensor,
                 column_max: torch.Tensor, column_floor: torch.Tensor, bound, slack: float):
    """Candidates of a contiguous CPU strip (r, w) of screen values (int32 or float32): entries that reach their
    row's threshold or their column's, as (rows, cols, values), and the row thresholds (r,), chunk maxima
    (r, w // chunk). column_max (w,) is updated in place. row_floor (r,), column_floor (w,): thresholds in the
    strip's dtype. bound: the tile's kernel.ScreenBound; slack: its reach slack."""
    assert strip.is_contiguous() and strip.dtype in _FUNCTIONS and k <= MAX_K, (strip.dtype, k)
    n_rows, width = strip.shape
    for name, vector, length in (("row_floor", row_floor, n_rows), ("column_max", column_max, width),
                                 ("column_floor", column_floor, width)):
        # the C code reads these (and writes column_max in place) by the strip's shape: a vector of another length
        # would be an out-of-bounds access, not an error
        if vector.shape != (length,) or vector.dtype != strip.dtype:
            raise ValueError(f"reduce_strip: {name} must be a ({length},) {strip.dtype} vector for a {n_rows} x "
                             f"{width} strip, got {tuple(vector.shape)} {vector.dtype}")
    assert column_max.is_contiguous(), "column_max is updated in place"
    row_floor, column_floor = row_floor.contiguous(), column_floor.contiguous()
    row_threshold = torch.empty(n_rows, dtype=strip.dtype)
    chunk_max = torch.empty((n_rows, width // chunk), dtype=strip.dtype)
    column_threshold = torch.empty(width, dtype=strip.dtype)
    function = getattr(native, _FUNCTIONS[strip.dtype])
    capacity = 16 * n_rows + 4 * width
    while True:
        rows, cols = torch.empty(capacity, dtype=torch.int64), torch.empty(capacity, dtype=torch.int64)
        values = torch.empty(capacity, dtype=strip.dtype)
        found = function(strip.data_ptr(), n_rows, width, chunk, k, row_floor.data_ptr(), row_threshold.data_ptr(),
                         chunk_max.data_ptr(), column_max.data_ptr(), column_floor.data_ptr(),
                         column_threshold.data_ptr(), bound.scale, bound.inner, bound.output, slack, capacity,
                         rows.data_ptr(), cols.data_ptr(), values.data_ptr())
        if found <= capacity:
            return (rows[:found], cols[:found], values[:found]), row_threshold, chunk_max
        capacity = found  # a second call finds the same entries: every maximum it updates is already taken
