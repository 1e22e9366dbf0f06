"""`make demo`'s module end to end at the least work (``--scale smoke``): PNG files -> ingest -> detector -> LDM ->
samples -> generator null -> audit -> report and MLflow, in a real process with its own local Ray cluster.

The printed summary is checked against a recount from the audit's own per-sample scores (matches.parquet) and
thresholds, not against another path of the same code: every count and percentage the demo prints must follow
from the scores by the definitions (a copy: a sample's best score strictly above tau; a memorized image: its best
score against every sample strictly above tau; a memorized patient: any of their images memorized).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raymem.localcluster import BIN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PATIENTS, IMAGES_PER_PATIENT = 40, 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAYMEM_STORAGE_ROOT")}
    env.update(RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_AUTH_MODE="disabled")
    result = subprocess.run([str(BIN / "python"), "-m", "raymem.demo", "--out", str(out), "--scale", "smoke"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    audit = out / "audits" / "demo"
    return {"out": out, "stdout": result.stdout, "metrics": json.loads((audit / "metrics.json").read_text()),
            "matches": pq.read_table(audit / "matches.parquet").to_pylist(), "audit": audit}


def _line(stdout: str, label: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(label)]
    assert len(lines) == 1, f"{label!r}: {lines}\n{stdout[-3000:]}"
    return lines[0]


def test_the_demo_reads_every_file_and_splits_by_patient(demo):
    line = _line(demo["stdout"], "data ")
    n = PATIENTS * IMAGES_PER_PATIENT

    assert f"{n} PNG files found, {n} ingested, 0 set aside" in line
    splits = {name: (int(images), int(patients))
              for name, images, patients in re.findall(r"(\w+) (\d+) images / (\d+) patients", line)}
    assert set(splits) == {"train", "val", "test"}
    assert sum(images for images, _ in splits.values()) == n
    assert sum(patients for _, patients in splits.values()) == PATIENTS
    assert all(images == IMAGES_PER_PATIENT * patients for images, patients in splits.values())


def test_the_printed_copies_follow_from_the_samples_scores(demo):
    tau = demo["metrics"]["threshold_copies"]
    generated = [row for row in demo["matches"] if row["kind"] == "synthetic" and not row["planted_from"]]
    copies = sum(row["best_score"] > tau for row in generated)

    line = _line(demo["stdout"], "copies ")

    assert line.startswith(f"copies    {copies} of the LDM's {len(generated)} samples: "
                           f"{100 * copies / len(generated):.1f} %"), line
    assert len(generated) == 16  # the smoke config's sample.n: planted copies are counted apart


def test_the_printed_memorized_images_and_patients_follow_from_the_training_images_scores(demo):
    tau = demo["metrics"]["threshold_memorized"]
    train = [row for row in demo["matches"] if row["kind"] == "train"]
    memorized = [row for row in train if row["best_score"] > tau]
    patients = {row["patient_id"] for row in train}
    memorized_patients = {row["patient_id"] for row in memorized}

    line = _line(demo["stdout"], "memorized ")

    assert line.startswith(f"memorized {len(memorized)} of its {len(train)} training images: "
                           f"{100 * len(memorized) / len(train):.1f} %"), line
    assert (f"; {len(memorized_patients)} of {len(patients)} patients: "
            f"{100 * len(memorized_patients) / len(patients):.1f} %") in line
    assert len(train) == 16  # the LDM's training subset (ldm.train_size), not the whole training split


def test_the_threshold_line_names_the_test_patients_the_rates_were_measured_on(demo):
    metrics = demo["metrics"]

    line = _line(demo["stdout"], "threshold ")

    assert f"tau = {metrics['threshold_copies']:.4f}" in line
    assert f"measured on {metrics['n_eval']} images of {metrics['n_eval_patients']} test patients" in line


def test_the_report_and_mlflow_hold_one_finished_run_per_stage(demo):
    report = (demo["audit"] / "report.html").read_text()
    with sqlite3.connect(demo["out"] / "mlflow.db") as db:
        runs = db.execute("SELECT name, status FROM runs WHERE lifecycle_stage = 'active'").fetchall()

    assert f"{demo['metrics']['threshold_copies']:.4f}" in report and "<img" in report
    assert sorted(runs) == sorted([("detector/demo", "FINISHED"), ("ldm/demo", "FINISHED"),
                                   ("ldm/demo-null", "FINISHED"), ("audit/demo", "FINISHED")]), runs
