"""`ray job submit` end to end on the cluster `raymem local-cluster` starts (raymem.localcluster): a real Ray head, a
real `mlflow server` and a moto S3 server, all on 127.0.0.1, and the tiny pipeline submitted the way the command does.

Credentials as docs/cluster.md asks: the S3 keys live on the node, in an AWS credentials file the Ray head is started
with (AWS_SHARED_CREDENTIALS_FILE); the runtime env carries only non-secrets (endpoint, region, storage root, MLflow
URI, revision). The secret-key test searches every place Ray and MLflow show a job, and finds the runtime env's
revision marker there, so the search is not vacuous.
Everything started here is stopped by process id (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from raymem import localcluster

pytestmark = pytest.mark.slow

REVISION = f"marker-{uuid.uuid4().hex}"  # a non-secret in the runtime env: where Ray shows the env, it shows this


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with localcluster.start(tmp_path_factory.mktemp("local-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def pipeline_job(cluster):
    """The tiny pipeline submitted once, as `raymem local-cluster` submits it."""
    return localcluster.run_pipeline(cluster, f"e2e-{uuid.uuid4().hex[:6]}", REVISION, timeout_s=300, follow=True)


def mlflow_runs(cluster) -> dict:
    """{run name: run} of the tiny experiment on the MLflow server."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow)
    experiment = client.get_experiment_by_name(localcluster.EXPERIMENT)
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = [run.info.run_name for run in runs]
    # keyed by name, two runs of one name would look like one: a rerun that duplicates its runs must fail here
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)
    return {run.info.run_name: run for run in runs}


def test_pipeline_job_succeeds(pipeline_job):
    assert pipeline_job.status == "SUCCEEDED", pipeline_job.logs[-5000:]


def test_pipeline_job_writes_every_stage_output_to_s3_readable_with_the_nodes_credentials_file(
        cluster, pipeline_job, monkeypatch):
    from raymem import storage

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in cluster.client_env().items():
        monkeypatch.setenv(key, value)
    outputs = localcluster.stage_outputs(cluster.storage_root, pipeline_job.run_name)

    assert (len(outputs), [uri for uri in outputs if not storage.exists(uri)]) == (6, [])


def test_pipeline_job_logs_each_stage_run_with_its_metrics(cluster, pipeline_job):
    name = pipeline_job.run_name
    required = {f"detector/{name}": {"train_loss", "epochs_completed"}, f"ldm/{name}": {"epochs_completed"},
                f"audit/{name}": {"pct_memorized_train", "pct_copies"}}
    runs = mlflow_runs(cluster)
    found = {key: (runs[key].info.status, sorted(metrics - set(runs[key].data.metrics))) if key in runs else None
             for key, metrics in required.items()}
    assert found == {key: ("FINISHED", []) for key in required}


def where_ray_and_mlflow_show_a_job(cluster, job) -> dict[str, bytes]:
    """Everything a user or an operator can read about the job: {place: its bytes}."""
    with urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=30) as response:
        jobs_api = response.read()
    runs = mlflow_runs(cluster).values()
    shown = {"ray job list": cluster.ray_job("list").encode(), "jobs API": jobs_api, "job logs": job.logs.encode(),
             "mlflow params": json.dumps([run.data.params for run in runs]).encode(),
             "mlflow tags": json.dumps([run.data.tags for run in runs]).encode()}
    shown |= {f"ray log {path.relative_to(cluster.ray_logs)}": path.read_bytes()
              for path in sorted(cluster.ray_logs.rglob("*")) if path.is_file()}
    shown |= {f"service log {path.name}": path.read_bytes() for path in sorted(cluster.folder.glob("*.log"))}
    return shown


def test_the_secret_key_shows_nowhere_that_shows_the_runtime_env(cluster, pipeline_job):
    shown = where_ray_and_mlflow_show_a_job(cluster, pipeline_job)
    leaked = [where for where, text in shown.items() if cluster.secret_key.encode() in text]
    # The positive control: these places do show the runtime env (and the head's session logs were read).
    marker_missing = [where for where in ("ray job list", "jobs API", "mlflow tags", "ray log runtime_env_agent.log")
                      if REVISION.encode() not in shown.get(where, b"")]

    assert (leaked, marker_missing) == ([], [])


def test_resubmitted_job_with_the_same_run_name_resumes_without_redoing_or_duplicating(cluster, pipeline_job):
    runs_before = sorted(mlflow_runs(cluster))

    job = localcluster.run_pipeline(cluster, pipeline_job.run_name, REVISION, timeout_s=120)

    assert (job.status, job.logs.count("already done"), sorted(mlflow_runs(cluster))) == \
        ("SUCCEEDED", 5, runs_before), job.logs[-3000:]


def test_ray_job_stop_ends_the_running_mlflow_run_killed(cluster):
    name = f"stop-{uuid.uuid4().hex[:6]}"
    job_id = cluster.submit(localcluster.pipeline_entrypoint(name), REVISION)
    deadline = time.monotonic() + 120
    while f"detector/{name}" not in mlflow_runs(cluster):
        assert time.monotonic() < deadline, cluster.ray_job("logs", job_id)[-3000:]
        time.sleep(0.5)
    cluster.ray_job("stop", job_id)
    status = cluster.wait(job_id, timeout_s=60)
    assert (status, mlflow_runs(cluster)[f"detector/{name}"].info.status) == ("STOPPED", "KILLED")
