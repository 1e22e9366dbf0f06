"""benchmarks/gpu_detector.py --quick --device cpu: every paper case and every training-step variant runs, the ratios
are images/s over the plain loop's, and the plain loop and raymem's train_step give the same loss; no timing is
asserted. The script runs once (about 25 s of CPU, minutes of wall time on a loaded machine) with one torch thread.
Part of `make test-benchmarks` (tests/benchmarks/test_quick_runs.py says why), not of `make test`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# one script run for the module: its tests stay on one test worker (make test-benchmarks: --dist loadgroup)
pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(1200), pytest.mark.xdist_group("gpu_detector")]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_detector.py"
VARIANTS = ["plain", "raymem", "fast", "fast x4", "compiled x4"]
COMPARED_PRESETS = ["tiny", "small2d"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_detector") / "out.json"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                               capture_output=True, text=True, timeout=1100, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_paper_case_trains_and_embeds(quick_run):
    failed = [(row["case"], row["status"]) for row in quick_run["rows"]
              if row["status"] != "ok" or not row["train_images_per_s"] > 0]

    assert (len(quick_run["rows"]), failed) == (4, [])


def test_every_step_variant_of_both_presets_runs(quick_run):
    ran = [(row["preset"], row["variant"]) for row in quick_run["step_rows"]
           if row["status"] == "ok" and row["images_per_s"] > 0]

    assert ran == [(preset, variant) for preset in COMPARED_PRESETS for variant in VARIANTS]


def test_x_plain_is_images_per_s_over_the_plain_loops_of_the_same_case(quick_run):
    rows = quick_run["step_rows"]
    plain = {row["case"]: row["images_per_s"] for row in rows if row["variant"] == "plain"}

    mismatched = [(row["case"], row["variant"]) for row in rows
                  if not math.isclose(row["x_plain"], row["images_per_s"] / plain[row["case"]], rel_tol=1e-9)]

    assert (len(plain), mismatched) == (2, [])


def test_the_plain_loop_and_train_step_give_the_same_loss(quick_run):
    checks = [(check["preset"], check["passed"]) for check in quick_run["same_loss_checks"]]

    assert checks == [(preset, True) for preset in COMPARED_PRESETS]
