"""The whole audit as a user runs it against an exact faiss-cpu audit of the same figures (issue 17).

Both tools run as separate processes on the same Parquet files (embedding schema, random float32 rows; train and
synthetic n rows each, val and test n * --eval-fraction rows each, four images per patient), alternating run by
run (the order flips every alternation), and the figures are medians over --alternations:

- raymem: ``raymem -v audit-embeddings --train --val --test --synthetic --out`` (both calibrations, every
  decision near a threshold re-checked in float64, metrics.json and matches.parquet written). ``-v`` makes it
  print the seconds of each phase (read, standardise, search, calibrate, figures, matches, write), which
  this script reads back; start-up = the process's wall time minus the phases' sum (interpreter, imports, exit).
- faiss: ``python benchmarks/audit_process.py --faiss-audit ...`` (``faiss_audit`` below): reads the same files
  with pyarrow, centres and L2-normalises in float32, and with ``faiss.IndexFlatIP`` computes the paper's
  figures: tau = percentile P of each training sample's best validation score, each synthetic sample's top-k
  training samples (copies: the best above tau), each training sample's best synthetic sample (memorized: above
  tau), each test sample's best training sample (the measured copy false-positive rate); writes them as JSON.

The paper figures of the two must agree (threshold within 1e-6, the same counts of copies, memorized training
samples and test samples above tau); the run stops otherwise.

    .venv/bin/python benchmarks/audit_process.py [--rows 40000 100000] [--alternations 3] [--omp-passive]
        [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PERCENTILE = 95.0
TOP_K = 5
IMAGES_PER_PATIENT = 4
PHASE_LINE = re.compile(r"audit-embeddings phase seconds: (.*)")


def write_embeddings(folder: Path, n: int, d: int, eval_fraction: float, seed: int = 0) -> dict[str, str]:
    """train and synthetic (n, d), val and test (n * eval_fraction, d) random float32 rows as embedding-schema
    Parquet files under folder; returns {role: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_eval = max(IMAGES_PER_PATIENT * 2, int(n * eval_fraction))
    paths = {}
    for role, rows in (("train", n), ("val", n_eval), ("test", n_eval), ("synthetic", n)):
        values = rng.standard_normal((rows, d), dtype=np.float32)
        paths[role] = str(folder / f"{role}.parquet")
        pq.write_table(pa.table({
            "sample_id": [f"{role}{i}" for i in range(rows)],
            "patient_id": [f"{role}-p{i // IMAGES_PER_PATIENT}" for i in range(rows)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), d),
        }), paths[role])
    return paths


def faiss_audit(paths: dict[str, str], out: str, percentile: float = PERCENTILE, top_k: int = TOP_K) -> None:
    """The paper's figures with faiss-cpu (exact float32 inner products of standardized rows), as JSON at out."""
    import faiss
    import pyarrow.parquet as pq

    def read(path: str) -> np.ndarray:
        column = pq.read_table(path, columns=["embedding"])["embedding"].combine_chunks()
        rows = column.flatten().to_numpy().reshape(len(column), -1).astype(np.float32)
        rows -= rows.mean(axis=1, keepdims=True)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    def index_of(rows: np.ndarray):
        index = faiss.IndexFlatIP(rows.shape[1])
        index.add(rows)
        return index

    train, val, test, synthetic = (read(paths[role]) for role in ("train", "val", "test", "synthetic"))
    train_index = index_of(train)
    train_to_val = index_of(val).search(train, 1)[0][:, 0]
    tau = float(np.percentile(train_to_val, percentile))
    synthetic_scores, synthetic_indices = train_index.search(synthetic, top_k)
    train_to_synthetic = index_of(synthetic).search(train, 1)[0][:, 0]
    test_to_train = train_index.search(test, 1)[0][:, 0]
    Path(out).write_text(json.dumps({
        "threshold": tau,
        "n_copies": int((synthetic_scores[:, 0] > tau).sum()),
        "n_memorized_train": int((train_to_synthetic > tau).sum()),
        "n_test_above": int((test_to_train > tau).sum()),
        "first_synthetic_neighbours": synthetic_indices[0].tolist(),
    }))


def raymem_command() -> list[str]:
    """``raymem`` as installed beside this interpreter (the console script), else ``python -m raymem.cli``."""
    script = Path(sys.executable).with_name("raymem")
    return [str(script)] if script.exists() else [sys.executable, "-m", "raymem.cli"]


def run_raymem(paths: dict[str, str], out: Path, env: dict[str, str]) -> dict:
    """One ``raymem -v audit-embeddings`` process: wall seconds, its phase seconds, its paper figures."""
    shutil.rmtree(out, ignore_errors=True)
    command = [*raymem_command(), "-v", "audit-embeddings", *(f"--{role}={path}" for role, path in paths.items()),
               f"--out={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"raymem audit-embeddings failed:\n{done.stderr[-3000:]}")
    found = PHASE_LINE.search(done.stderr)
    assert found, done.stderr[-2000:]
    phases = {name: float(value) for name, value in (item.split("=") for item in found.group(1).split())}
    metrics = json.loads((out / "metrics.json").read_text())
    paper = metrics["calibrations"]["paper"]
    assert (out / "matches.parquet").exists()
    figures = {"threshold": paper["threshold_copies"], "n_copies": paper["n_copies"],
               "n_memorized_train": paper["n_memorized_train"],
               "n_test_above": round(paper["measured_fpr_copies"] * metrics["n_eval"])}
    return {"seconds": wall, "phases": phases, "figures": figures}


def run_faiss(paths: dict[str, str], out: Path, env: dict[str, str]) -> dict:
    """One faiss audit process (this file with --faiss-audit): wall seconds and its figures."""
    command = [sys.executable, __file__, "--faiss-audit", json.dumps(paths), str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the faiss audit failed:\n{done.stderr[-3000:]}")
    return {"seconds": wall, "figures": json.loads(out.read_text())}


def same_figures(ours: dict, theirs: dict) -> bool:
    return abs(ours["threshold"] - theirs["threshold"]) <= 1e-6 and all(
        ours[key] == theirs[key] for key in ("n_copies", "n_memorized_train", "n_test_above"))


def compare(n: int, d: int, eval_fraction: float, alternations: int, work: Path, env: dict[str, str]) -> dict:
    """Alternating runs of both tools on one data set (both processes with environment env); medians and the
    median of the per-alternation ratios."""
    paths = write_embeddings(work, n, d, eval_fraction)
    runs = {"raymem": [], "faiss": []}
    for alternation in range(alternations):
        order = ("raymem", "faiss") if alternation % 2 == 0 else ("faiss", "raymem")
        for tool in order:
            if tool == "raymem":
                runs[tool].append(run_raymem(paths, work / "raymem-out", env))
            else:
                runs[tool].append(run_faiss(paths, work / "faiss.json", env))
        ours, theirs = runs["raymem"][-1]["figures"], runs["faiss"][-1]["figures"]
        if not same_figures(ours, theirs):
            raise AssertionError(f"raymem and faiss disagree: {ours} against {theirs}")
        print(f"  n={n:,} alternation {alternation + 1}: raymem {runs['raymem'][-1]['seconds']:.2f} s, "
              f"faiss {runs['faiss'][-1]['seconds']:.2f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    phase_names = list(runs["raymem"][0]["phases"])
    phases = {name: statistics.median(run["phases"][name] for run in runs["raymem"]) for name in phase_names}
    phases["start-up"] = statistics.median(run["seconds"] - sum(run["phases"].values()) for run in runs["raymem"])
    return {
        "n": n, "m": n, "d": d, "n_val": len_rows(paths["val"]), "n_test": len_rows(paths["test"]),
        "alternations": alternations,
        "raymem_seconds": [run["seconds"] for run in runs["raymem"]],
        "faiss_seconds": [run["seconds"] for run in runs["faiss"]],
        "raymem_median": statistics.median(run["seconds"] for run in runs["raymem"]),
        "faiss_median": statistics.median(run["seconds"] for run in runs["faiss"]),
        "ratio_median": statistics.median(r["seconds"] / f["seconds"] for r, f in zip(runs["raymem"], runs["faiss"])),
        "phases_median": phases,
        "figures": runs["raymem"][-1]["figures"],
    }


def len_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", "",
             "| n = m (d) | val, test | raymem s (median) | faiss s (median) | raymem / faiss (median of same-run "
             "ratios) | raymem phases, median s |", "|---|---|---|---|---|---|"]
    for row in results["sizes"]:
        phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in row["phases_median"].items())
        lines.append(f"| {row['n']:,} ({row['d']}) | {row['n_val']:,}, {row['n_test']:,} | {row['raymem_median']:.2f} "
                     f"| {row['faiss_median']:.2f} | **{row['ratio_median']:.2f}x** | {phases} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[40_000, 100_000], help="n = m, one run per size")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--eval-fraction", type=float, default=0.25, help="val and test rows, as a fraction of n")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--omp-passive", action="store_true",
                        help="run both tools with OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of "
                             "spinning, which spares faiss (and torch outside raymem's one-thread blocks) on a "
                             "machine shared with other work")
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 1 alternation (a smoke run)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--faiss-audit", nargs=2, metavar=("PATHS_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.faiss_audit:
        faiss_audit(json.loads(args.faiss_audit[0]), args.faiss_audit[1])
        return
    if args.quick:
        args.rows, args.alternations = [2000], 1
    env = {**os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_passive else {})}
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset')}, "
                          f"load average {os.getloadavg()[0]:.1f} at start", "sizes": []}
    for n in args.rows:
        with tempfile.TemporaryDirectory() as work:
            results["sizes"].append(compare(n, args.dim, args.eval_fraction, args.alternations, Path(work), env))
    results["machine"] += f", {os.getloadavg()[0]:.1f} at the end"
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
