"""Preflight: before any stage, an unreachable MLflow server, S3 endpoint or bucket, or an unwritable storage root
fails in seconds with one line naming what failed and what to set, and nothing is left behind."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from raymem import jobconfig, preflight

REPO = Path(__file__).resolve().parents[2]


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def broken_tracking_server():
    """An HTTP server on 127.0.0.1 whose /health answers 200 and whose MLflow REST API answers 500 (a tracking
    server with a broken backend store, which MLflow's client would retry for minutes). Yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 500)
            self.end_headers()
            self.wfile.write(b"OK" if self.path == "/health" else b"backend store unavailable")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _failure(check, *args) -> tuple[str, float]:
    """(message, seconds) of the PreflightError that ``check(*args)`` raises."""
    started = time.perf_counter()
    with pytest.raises(preflight.PreflightError) as failed:
        check(*args)
    return str(failed.value), time.perf_counter() - started


def test_an_unreachable_tracking_server_fails_in_seconds_naming_it_and_what_to_set():
    uri = _closed_port_url()

    message, seconds = _failure(preflight.check_tracking, uri, "raymem")

    assert seconds < 10 and "\n" not in message and uri in message and "MLFLOW_TRACKING_URI" in message


def test_a_tracking_server_whose_api_fails_is_asked_once_not_retried_for_minutes(broken_tracking_server):
    message, seconds = _failure(preflight.check_tracking, broken_tracking_server, "raymem")

    assert seconds < 15 and "\n" not in message and "experiment 'raymem'" in message


def test_an_unwritable_sqlite_store_names_the_store_and_what_to_set(tmp_path):
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"

    message, _ = _failure(preflight.check_tracking, uri, "raymem")

    assert message.startswith(f"MLflow store {uri}: ") and "MLFLOW_TRACKING_URI" in message


def test_an_unreachable_s3_endpoint_fails_in_seconds_naming_AWS_ENDPOINT_URL(monkeypatch):
    endpoint = _closed_port_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "raymem-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "raymem-test")

    message, seconds = _failure(preflight.check_storage, "s3://raymem-studies/root")

    assert seconds < 15 and "\n" not in message and f"AWS_ENDPOINT_URL={endpoint}" in message


def test_a_missing_bucket_is_named(s3_server):
    bucket = f"raymem-missing-{uuid.uuid4().hex[:8]}"

    message, _ = _failure(preflight.check_storage, f"s3://{bucket}/studies")

    assert f"bucket {bucket} of s3://{bucket}/studies does not exist at {s3_server}" in message


def test_an_existing_bucket_passes_and_keeps_no_object(s3_server, s3_bucket):
    import boto3

    preflight.check_storage(f"{s3_bucket}/studies")

    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))
    assert [item["Key"] for item in listed.get("Contents", []) if not item["Key"].endswith("/")] == []  # markers only


def test_a_writable_local_root_with_its_sqlite_store_passes_and_is_left_as_it_was(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    preflight.run_preflight(str(tmp_path / "studies" / "xray"), experiment="raymem")

    assert list(tmp_path.iterdir()) == []


def test_a_local_root_that_cannot_be_a_folder_names_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    root = str(tmp_path / "a-file" / "studies")

    message, _ = _failure(preflight.check_storage, root)

    assert message.startswith(f"cannot write to {root}: ") and "\n" not in message


def test_a_job_with_a_missing_bucket_stops_before_any_stage_with_one_line(s3_server, tmp_path, capsys):
    bucket = f"raymem-missing-{uuid.uuid4().hex[:8]}"
    job = tmp_path / "job.yaml"
    job.write_text(f"storage_root: s3://{bucket}/studies\ndata: {{phantoms: {{kind: xray2d}}}}\n")

    code = jobconfig.main(("data",), ["--config", str(job)])

    err = capsys.readouterr().err  # also holds the in-process moto server's request log
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"{job}: bucket {bucket} of s3://{bucket}/studies does not exist")


def test_a_job_whose_local_root_cannot_be_a_folder_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a-file").write_text("")
    job = tmp_path / "job.yaml"
    job.write_text(f"storage_root: {tmp_path / 'a-file' / 'studies'}\ndata: {{phantoms: {{kind: xray2d}}}}\n")

    code = jobconfig.main(("train-detector",), ["--config", str(job)])

    err = capsys.readouterr().err
    assert (code, err.count("\n")) == (1, 1) and err.startswith(f"{job}: cannot write to {tmp_path / 'a-file'}")


def _run(command: list[str], tracking_uri: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, *command], check=False, cwd=cwd, env=env, capture_output=True,
                               text=True, timeout=120)
    return completed, time.perf_counter() - started


def test_the_cli_stops_on_an_unreachable_tracking_server_in_one_line_with_nothing_written(tmp_path):
    uri = _closed_port_url()
    out = tmp_path / "out"

    completed, seconds = _run(["-m", "raymem.cli", "train-detector", "--dataset", str(tmp_path / "dataset"),
                               "--out", str(out)], uri, tmp_path)

    lines = completed.stderr.splitlines()
    assert (completed.returncode, seconds < 90, len(lines), out.exists()) == (1, True, 1, False)
    assert lines[0].startswith(f"raymem train-detector: MLflow tracking server {uri} does not answer")


def test_a_job_stops_on_an_unreachable_tracking_server_in_one_line_with_nothing_written(tmp_path):
    uri = _closed_port_url()
    root = tmp_path / "root"
    job = tmp_path / "job.yaml"
    job.write_text(f"storage_root: {root}\ntracking_uri: {uri}\ndata: {{phantoms: {{kind: xray2d}}}}\n")

    completed, seconds = _run([str(REPO / "jobs" / "pipeline.py"), "--config", str(job)], uri, tmp_path)

    lines = completed.stderr.splitlines()
    assert (completed.returncode, seconds < 90, len(lines), root.exists()) == (1, True, 1, False)
    assert lines[0].startswith(f"{job}: MLflow tracking server {uri} does not answer")
