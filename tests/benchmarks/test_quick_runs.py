"""Every script in benchmarks/ runs end to end in a reduced size, as a user or a GPU session would start it.

The figures in docs/benchmarks.md come from these scripts on lent GPUs and quiet machines, where a broken import or a
renamed field costs a whole device call. Each test here runs one script as its own process (its own local Ray
cluster where it uses Ray) in its smallest mode and checks what the script reports, not its speed: exact methods
agree with the references they are timed against, ratios are the ratios of the printed rates, intervals hold their
point estimates, counts are the counts asked for. No test asserts a timing.

Not part of `make test` (they add about 5 minutes on 2 cores, 267 s measured): `make test-benchmarks` runs them, and CI runs
both (.ci/run). audit_process.py and gpu_reproduce.py have their own quick-run tests in tests/unit/.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, out: Path | None = None, timeout: float = 1100) -> str:
    """Run benchmarks/<name>.py with args (and --out when out is given); returns its stdout, fails with its output."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYMEM_DASHBOARD": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # each script starts its own local cluster, as on a user's machine
    command = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args]
    if out is not None:
        command += ["--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}\n{(done.stdout + done.stderr)[-6000:]}"
    return done.stdout


def test_search_quick_run_agrees_with_faiss_except_on_float32_near_ties(tmp_path):
    out = tmp_path / "search.json"
    run_script("search", "--quick", out=out)
    result = json.loads(out.read_text())
    kernel = result["kernel"]
    assert sorted(row["d"] for row in kernel) == [32, 128]
    for row in kernel:
        rates = [row[f"{screen}_pairs_per_s"] for screen in ("int8", "bfloat16", "float32")] + [row["faiss_pairs_per_s"]]
        assert row["screens_identical"] and all(rate > 0 for rate in rates), row
        # every row whose top-1 differs from faiss's is a float32 near-tie, checked in float64 by the script
        assert row["rows_differing"] == row["differing_within_1e-6"], row
        assert row["top1_identical"] == pytest.approx(1 - row["rows_differing"] / row["n"]), row
        assert row["vs_faiss"] == pytest.approx(row[f"{row['default_screen']}_pairs_per_s"] / row["faiss_pairs_per_s"])
    distributed = result["distributed"]
    assert distributed["ray_efficiency"] == pytest.approx(distributed["ray_pairs_per_s"] / distributed["single_pairs_per_s"])
    memory = result["memory"]
    assert memory["peak_rss_mib"] > memory["embeddings_mib"] > 0
    assert memory["pairs_per_s"] == pytest.approx(memory["n"] ** 2 / memory["seconds"])


def test_ingest_quick_run_reads_every_file_and_streams_every_image(tmp_path):
    out = tmp_path / "ingest.json"
    run_script("ingest", "--quick", "--consumers", "1", "2", out=out)
    result = json.loads(out.read_text())
    assert (result["ingest_2d"]["shape"], result["ingest_3d"]["shape"]) == ([1, 64, 64], [1, 64, 64, 64])
    for kind in ("ingest_2d", "ingest_3d"):
        for phase in ("cold", "warm"):
            figures = result[kind][phase]
            assert figures["images_per_s"] == pytest.approx(result[kind]["images"] / figures["seconds"]), (kind, phase)
    for kind in ("stream_2d", "stream_3d"):
        stream = result[kind]
        assert stream["ray_over_pyarrow"] == pytest.approx(
            stream["ray_data"]["images_per_s"] / stream["pyarrow"]["images_per_s"]), kind
        assert sorted(stream["consumers"]) == ["1", "2"], kind
        for consumers, figures in stream["consumers"].items():
            assert figures["images_per_s"] == pytest.approx(stream["images"] / figures["seconds"]), (kind, consumers)


def test_ldm_ray_loop_and_plain_loop_report_every_stage(tmp_path):
    out = tmp_path / "ldm.json"
    stdout = run_script("ldm", "--epochs", "2", "--patients", "20", "--samples", "4", out=out)
    result = json.loads(out.read_text())
    assert result["training_images"] == 36  # 20 patients x 2 images, 10 % val: 2 patients
    for stage in ("autoencoder", "diffusion"):
        figures = result[stage]
        # the first epoch of each stage is warm-up; the plain loop runs before and after the Ray run
        assert (figures["ray_epochs"], figures["plain_epochs"]) == (1, 2), stage
        assert figures["ray_images_per_s_after_first_batch"] >= figures["ray_images_per_s"] > 0, stage
        assert figures["plain_images_per_s"] > 0 and figures["first_batch_s"] >= 0, stage
    assert result["sample"]["ray_samples_per_s"] > 0 and result["sample"]["plain_samples_per_s"] > 0
    assert stdout.count("\n| train ") == 6 and "| sample, 50 DDIM steps" in stdout


def test_detector_accuracy_reports_the_detector_and_both_baselines(tmp_path):
    out = tmp_path / "detector.json"
    run_script("detector_accuracy", "--epochs", "1", "--patients", "48", out=out)
    metrics = json.loads(out.read_text())["metrics"]
    for name in ("detector", "raw_pixel", "random_encoder"):
        for figure in ("copy_top1", "copy_auc", "copy_strong_top1", "copy_strong_auc", "reid_auc"):
            assert 0.0 <= metrics[f"{name}/{figure}"] <= 1.0, (name, figure)


def test_detector_heldout_scores_every_family_with_intervals_that_hold_their_estimates(tmp_path):
    out = tmp_path / "heldout.json"
    run_script("detector_heldout", "--train-patients", "24", "--images-per-patient", "2", "--originals", "12",
               "--negatives", "24", "--detector-epochs", "1", "--batch-size", "16", "--autoencoder-steps", "6",
               "--autoencoder-snapshots", "3", "--n-bootstrap", "50", out=out)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"detector", "raw_pixel"}
    families = set(results["detector"]["families"])
    assert families == set(results["raw_pixel"]["families"]) and len(families) >= 5, families
    for embedder, result in results.items():
        for family, figures in result["families"].items():
            for figure in ("sensitivity_at_95_specificity", "top1"):  # Wilson intervals hold their proportion
                low, high = figures["ci95"][figure]
                assert 0.0 <= low <= figures[figure] <= high <= 1.0, (embedder, family, figure, figures)
            for figure in ("sensitivity_at_95_specificity_bootstrap", "roc_auc"):  # percentile bootstrap
                low, high = figures["ci95"][figure]
                assert 0.0 <= low <= high <= 1.0, (embedder, family, figure, figures)
            assert (figures["n_positive"], figures["n_negative"]) == (12, 24), (embedder, family)


def test_statistics_simulation_gives_every_scenario_and_calibration_a_row(tmp_path):
    out = tmp_path / "simulation.json"
    run_script("statistics_simulation", "--repetitions", "3", "--scenarios", "iid", "patients", out=out)
    rows = [row for row in json.loads(out.read_text()) if "figure" in row]  # the others are CPU seconds
    assert {(row["scenario"], row["calibration"]) for row in rows} >= {
        (scenario, calibration) for scenario in ("iid", "patients") for calibration in ("paper", "matched")}
    for row in rows:
        assert row["repetitions"] == 3 and 0.0 <= row["coverage"] <= 1.0, row
        assert row["bias"] == pytest.approx(row["measured"] - row["true_rate"]), row


def test_gpu_ldm_dry_run_reports_every_variant_against_the_plain_loop(tmp_path):
    out = tmp_path / "gpu_ldm.json"
    run_script("gpu_ldm", "--quick", "--device", "cpu", "--skip-paper", out=out)
    rows = json.loads(out.read_text())["rows"]
    plain = {(row["case"], row["stage"]): row["images_per_s"] for row in rows if row["variant"] == "plain"}
    assert {stage for _, stage in plain} >= {"autoencoder", "diffusion"}, plain
    variants = {row["variant"] for row in rows}
    assert {"plain", "raymem", "fast", "fast x4"} <= variants, variants
    for row in rows:
        assert "error" not in row and row["images_per_s"] > 0, row
        assert row["x_plain"] == pytest.approx(row["images_per_s"] / plain[row["case"], row["stage"]], rel=1e-6), row


def test_gpu_search_dry_run_finds_every_top1_in_both_directions(tmp_path):
    out = tmp_path / "gpu_search.json"
    run_script("gpu_search", "--quick", "--device", "cpu", "--dims", "32",
               "--only", "mm fp32", "naive", "torch", "mm_reduce", "fused ieee",
               "--max-seconds", "900", "--variant-timeout", "600", out=out)
    rows = json.loads(out.read_text())["rows"]
    timed = [row for row in rows if row["exact"] != "baseline"]
    assert {row["variant"].split()[0] for row in timed} >= {"naive", "torch"}, [row["variant"] for row in rows]
    for row in timed:
        assert not row.get("error") and row["pairs_per_s"] > 0, row
        # exact fp32 ranking: every top-1 is float64's, or a float32 near-tie of it, both ways
        for direction, count in (("row_top1", row["n"]), ("col_top1", row["m"])):
            agreement = row[direction]
            assert (agreement["other"], agreement["identical"] + agreement["within_rounding"]) == (0, count), row
        assert math.isclose(row["pct_of_mm"], 100 * row["pairs_per_s"] / row["mm_pairs_per_s"], rel_tol=1e-6), row


def test_diffusion_lr_trains_every_rate_from_the_same_unet_and_judges_it_by_the_untrained_loss(tmp_path):
    from raymem.audit.verdicts import UNTRAINED_LOSS

    out, plot = tmp_path / "lr.json", tmp_path / "lr.png"
    printed = run_script("diffusion_lr", "--presets", "tiny", "--lrs", "2e-3", "1e-4", "--steps", "6", "--every", "4",
                         "--autoencoder-steps", "2", "--threads", "1", "--plot", str(plot), out=out)
    result = json.loads(out.read_text())
    assert [(row["preset"], row["lr"]) for row in result["results"]] == [("tiny", 2e-3), ("tiny", 1e-4)]
    for row in result["results"]:
        assert [step for step, _ in row["curve"]] == [0, 4, 6]
        assert row["last_loss"] == row["curve"][-1][1] and row["lowest_loss"] == min(loss for _, loss in row["curve"])
        assert row["trained"] == (row["last_loss"] < UNTRAINED_LOSS)
        assert f"{row['last_loss']:8.3f}" in printed
    first, second = result["results"]
    assert first["curve"][0] == second["curve"][0]  # one initialisation, one fixed batch: only the rate differs
    assert first["curve"][1] != second["curve"][1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
