"""raymem.audit.embeddings.track_audit: one MLflow run per audit, read back from a real sqlite tracking store (no
Ray, no mocks): the tags, params, every numeric figure with its interval bounds, the phase seconds, the warnings and
the artifacts, each against the values handed in.

Written for the mutation run of embeddings.py (tools/mutation.sh), which left track_audit out while no unit test
reached it: only the CLI's integration tests did, checking a few keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raymem.audit.embeddings import AuditResult, track_audit

METRICS = {
    "calibration": "matched", "pct_copies": 12.5, "n_train": 40, "threshold": 0.91, "fpr_source": "test",
    "reference": {"source": "generator training set", "n_ids": 40},
    "ci95": {"pct_copies": [4.0, 29.0]},
    "distribution": {"synthetic_top1": {"p50": 0.8}},
    "planted": {"sensitivity": 1.0, "precision": None},
    "warnings": ["only 4 evaluation patients (fewer than 10)", "no generator null"],
}


def result(metrics: dict) -> AuditResult:
    empty = np.zeros(0)
    return AuditResult(metrics=metrics, synthetic_top1=empty, null_scores=empty, null_scores_matched=empty,
                       null_scores_generator=None, top_pairs=[], patients=[], matches=None,
                       phase_seconds={"read": 1.5, "search": 2.25})


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_an_audit_run_holds_its_tags_params_figures_phases_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"

    track_audit(result(METRICS), str(out), experiment="audits", run_name="chest-1", params={"percentile": 95.0},
                artifacts={"report.html": "<p>the report: τ = 0.93, Zürich</p>"})

    client, run = only_run(f"sqlite:///{out / 'mlflow.db'}", "audits")
    tags = run.data.tags
    assert (run.info.run_name, run.info.status, tags["raymem.stage"], tags["raymem.fpr_source"],
            tags["raymem.reference"], tags["raymem.warnings"]) == (
        "chest-1", "FINISHED", "audit", "test", "generator training set",
        "only 4 evaluation patients (fewer than 10) | no generator null")
    assert run.data.params == {"percentile": "95.0"}
    assert run.data.metrics == {
        "pct_copies": 12.5, "n_train": 40.0, "threshold": 0.91, "reference.n_ids": 40.0, "pct_copies_ci_lo": 4.0,
        "pct_copies_ci_hi": 29.0, "distribution.synthetic_top1.p50": 0.8, "planted.sensitivity": 1.0,
        "audit.phase_seconds.read": 1.5, "audit.phase_seconds.search": 2.25}
    (tmp_path / "downloaded").mkdir()
    folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "downloaded")))
    assert sorted(path.name for path in folder.iterdir()) == ["metrics.json", "report.html"]
    assert (folder / "metrics.json").read_text(encoding="utf-8") == json.dumps(METRICS, indent=2, sort_keys=True)
    assert (folder / "report.html").read_text(encoding="utf-8") == "<p>the report: τ = 0.93, Zürich</p>"
    # beside the store, not in the working directory (MLflow's default ./mlruns)
    stored = sorted(path.name for path in (out / "mlartifacts").glob("*/artifacts/*"))
    assert (stored, (tmp_path / "mlruns").exists()) == (["metrics.json", "report.html"], False)


def test_a_run_without_warnings_or_a_reference_has_neither_tag_and_a_long_list_is_cut_at_5000_characters(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quiet = {key: value for key, value in METRICS.items() if key not in ("warnings", "reference", "fpr_source")}
    noisy = METRICS | {"warnings": ["x" * 3000, "y" * 3000]}

    track_audit(result(quiet), str(tmp_path / "quiet"), experiment="audits", run_name="quiet", params={},
                stage="audit-images")
    track_audit(result(noisy), str(tmp_path / "noisy"), experiment="audits", run_name="noisy", params={})

    _, quiet_run = only_run(f"sqlite:///{tmp_path / 'quiet' / 'mlflow.db'}", "audits")
    _, noisy_run = only_run(f"sqlite:///{tmp_path / 'noisy' / 'mlflow.db'}", "audits")
    tags = quiet_run.data.tags
    assert ("raymem.warnings" in tags, tags["raymem.stage"], tags["raymem.reference"], tags["raymem.fpr_source"]) == (
        False, "audit-images", "None", "None")
    assert noisy_run.data.tags["raymem.warnings"] == ("x" * 3000 + " | " + "y" * 3000)[:5000]


def test_an_audit_written_to_s3_logs_to_the_tracking_uri_or_the_working_directory_and_keeps_artifacts_on_s3(
        tmp_path, monkeypatch, s3_bucket):
    """An s3:// out_uri: the store cannot live beside the outputs (MLFLOW_TRACKING_URI, else sqlite in the working
    directory), the artifacts can (moto S3 server)."""
    import boto3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)

    track_audit(result(METRICS), f"{s3_bucket}/audit", experiment="audits", run_name="to-cwd", params={})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")
    track_audit(result(METRICS), f"{s3_bucket}/audit", experiment="audits", run_name="to-env", params={})

    assert only_run(f"sqlite:///{tmp_path / 'mlflow.db'}", "audits")[1].info.run_name == "to-cwd"
    assert only_run(f"sqlite:///{tmp_path / 'server.db'}", "audits")[1].info.run_name == "to-env"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlflow.db", "server.db"]
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))["Contents"]
    keys = sorted(item["Key"] for item in listed)
    assert len(keys) == 2 and all(key.startswith("audit/mlartifacts/") and key.endswith("/artifacts/metrics.json")
                                  for key in keys), keys


def test_a_failing_artifact_write_leaves_the_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    with pytest.raises(OSError):
        track_audit(result(METRICS), str(tmp_path / "out"), experiment="audits", run_name="bad", params={},
                    artifacts={"sub/dir/report.html": "no such folder"})

    assert only_run(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "audits")[1].info.status == "FAILED"
