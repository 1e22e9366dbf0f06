"""`ray job submit` end to end: a real Ray head, a real `mlflow server` and a moto S3 server, all on 127.0.0.1.

The jobs get their S3 credentials, storage root and MLflow URI only through the runtime env (--runtime-env-json);
the Ray head itself is started without them, as on a cluster whose nodes hold no user secrets.
Everything started here is stopped by process id (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from services import BIN, free_port, service_env, stop_tree, wait_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = "jobs/configs/tiny-xray2d.yaml"
EXPERIMENT = "raymem-tiny"  # the tiny config's experiment
PIPELINE = ["python", "jobs/pipeline.py", "--config", CONFIG]
SECRET = f"secret-{uuid.uuid4().hex}"  # moto accepts any credentials; a unique value is findable in logs


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; yields the dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--metrics-export-port", "--runtime-env-agent-port",
                                             "--node-manager-port", "--object-manager-port")}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=4",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
               *(f"{flag}={port}" for flag, port in ports.items())]
    process = subprocess.Popen(command, env=service_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        wait_http(f"{address}/api/jobs/", 240, process)
        yield address
    finally:
        stop_tree(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_head, mlflow_server, s3_server):
    """What a job needs: the dashboard address, the MLflow URI, and a bucket for the storage root."""
    import boto3

    bucket = f"raymem-jobs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    runtime_env = {"env_vars": {
        "AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "raymem-test", "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1", "MLFLOW_TRACKING_URI": mlflow_server,
        "RAYMEM_STORAGE_ROOT": f"s3://{bucket}/studies", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    return {"address": ray_head, "mlflow": mlflow_server, "bucket": bucket, "runtime_env": runtime_env}


def _ray(cluster: dict, command: str, *args: str) -> str:
    """`ray job COMMAND --address ... ARGS` from the repository root; returns its stdout."""
    result = subprocess.run([str(BIN / "ray"), "job", command, "--address", cluster["address"], *args], cwd=REPO,
                            env=service_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def submit(cluster: dict, entrypoint: list[str]) -> str:
    """`ray job submit --working-dir .` from the repository root; returns the submission id."""
    job_id = f"raymem-{uuid.uuid4().hex[:8]}"
    _ray(cluster, "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(cluster["runtime_env"]),
         "--submission-id", job_id, "--no-wait", "--", *entrypoint)
    return job_id


def wait_for_job(cluster: dict, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster["address"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(1)
    _ray(cluster, "stop", job_id)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s:\n{_ray(cluster, 'logs', job_id)[-3000:]}")


def mlflow_runs(cluster: dict) -> dict:
    """{run name: run} of the tiny experiment on the MLflow server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return {}
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id], max_results=1000)}


@pytest.fixture(scope="module")
def pipeline_job(cluster):
    """The tiny pipeline submitted once: (run name, submission id, final status, job logs)."""
    run_name = f"e2e-{uuid.uuid4().hex[:6]}"
    job_id = submit(cluster, [*PIPELINE, "--run-name", run_name])
    status = wait_for_job(cluster, job_id, timeout_s=300)
    return {"run_name": run_name, "job_id": job_id, "status": status, "logs": _ray(cluster, "logs", job_id)}


def test_pipeline_job_succeeds(pipeline_job):
    assert pipeline_job["status"] == "SUCCEEDED", pipeline_job["logs"][-5000:]


def test_pipeline_job_writes_every_stage_output_to_s3(cluster, pipeline_job):
    from raymem import storage

    root = f"s3://{cluster['bucket']}/studies"
    name = pipeline_job["run_name"]
    expected = [f"{root}/datasets/{name}/manifest.json", f"{root}/detector/{name}/detector.pt",
                f"{root}/synthetic/{name}/manifest.json", f"{root}/audits/{name}/metrics.json",
                f"{root}/audits/{name}/matches.parquet", f"{root}/audits/{name}/report.html"]
    assert [uri for uri in expected if not storage.exists(uri)] == []


def test_pipeline_job_logs_each_stage_run_with_its_metrics(cluster, pipeline_job):
    name = pipeline_job["run_name"]
    required = {f"detector/{name}": {"train_loss", "epochs_completed"}, f"ldm/{name}": {"epochs_completed"},
                f"audit/{name}": {"pct_memorized_train", "pct_copies"}}
    runs = mlflow_runs(cluster)
    found = {key: (runs[key].info.status, sorted(metrics - set(runs[key].data.metrics))) if key in runs else None
             for key, metrics in required.items()}
    assert found == {key: ("FINISHED", []) for key in required}


def test_secrets_never_reach_job_logs_or_mlflow_params(cluster, pipeline_job):
    params = {key: value for run in mlflow_runs(cluster).values() for key, value in run.data.params.items()}
    leaks = [where for where, text in (("job logs", pipeline_job["logs"]), ("mlflow params", json.dumps(params)))
             if SECRET in text]
    assert leaks == []


def test_resubmitted_job_with_the_same_run_name_resumes_without_redoing_or_duplicating(cluster, pipeline_job):
    name = pipeline_job["run_name"]
    runs_before = sorted(mlflow_runs(cluster))
    job_id = submit(cluster, [*PIPELINE, "--run-name", name])
    status = wait_for_job(cluster, job_id, timeout_s=120)
    logs = _ray(cluster, "logs", job_id)
    assert (status, logs.count("already done"), sorted(mlflow_runs(cluster))) == ("SUCCEEDED", 5, runs_before), \
        logs[-3000:]


def test_ray_job_stop_ends_the_running_mlflow_run_killed(cluster):
    name = f"stop-{uuid.uuid4().hex[:6]}"
    job_id = submit(cluster, [*PIPELINE, "--run-name", name])
    deadline = time.monotonic() + 120
    while f"detector/{name}" not in mlflow_runs(cluster):
        assert time.monotonic() < deadline, _ray(cluster, "logs", job_id)[-3000:]
        time.sleep(0.5)
    _ray(cluster, "stop", job_id)
    status = wait_for_job(cluster, job_id, timeout_s=60)
    assert (status, mlflow_runs(cluster)[f"detector/{name}"].info.status) == ("STOPPED", "KILLED")
