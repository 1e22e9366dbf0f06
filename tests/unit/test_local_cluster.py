"""`raymem local-cluster` without starting anything: what it prints, the node's credentials file, and the one line it
says when the test extra is missing. tests/integration/test_jobs.py runs its cluster and job for real."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from raymem import cli, localcluster

SECRET = "local-0123456789abcdef"
# Ray shows a job's runtime env in plain text (docs/cluster.md).
RUNTIME_ENV_SECRETS = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                       "MLFLOW_TRACKING_TOKEN"}


def _summary(tmp_path: Path, keep: bool) -> tuple[localcluster.LocalCluster, localcluster.Job, list[str]]:
    cluster = localcluster.LocalCluster(tmp_path / "out", Path("/tmp/rayl-test"), "http://127.0.0.1:8265",
                                        "http://127.0.0.1:5000", "http://127.0.0.1:5001", SECRET)
    job = localcluster.Job("raymem-1234abcd", "local-20260101-120000", "SUCCEEDED", "")
    outputs = {uri: True for uri in localcluster.stage_outputs(cluster.storage_root, job.run_name)}
    return cluster, job, localcluster.summary_lines(cluster, job, outputs, "abc123", keep=keep, seconds=95)


def test_summary_names_the_dashboard_mlflow_the_bucket_every_stage_output_and_the_job(tmp_path):
    cluster, job, lines = _summary(tmp_path, keep=False)
    text = "\n".join(lines)
    expected = [cluster.dashboard, cluster.mlflow, cluster.s3_endpoint, f"bucket {cluster.bucket}",
                *localcluster.stage_outputs(cluster.storage_root, job.run_name), job.submission_id, "SUCCEEDED"]

    assert ([item for item in expected if item not in text], SECRET in text) == ([], False)


def test_printed_rerun_command_resubmits_the_same_run_with_no_secret_in_its_runtime_env(tmp_path):
    cluster, job, lines = _summary(tmp_path, keep=False)
    rerun = next(i for i, line in enumerate(lines) if line.startswith("rerun"))
    command = shlex.split(lines[rerun + 1])  # the line under "rerun"
    env_vars = json.loads(command[command.index("--runtime-env-json") + 1])["env_vars"]

    found = (command[1:5], command[command.index("--") + 1:], RUNTIME_ENV_SECRETS & set(env_vars),
             SECRET in json.dumps(env_vars))
    assert found == (["job", "submit", "--address", cluster.dashboard],
                     localcluster.pipeline_entrypoint(job.run_name), set(), False)


@pytest.mark.parametrize(("keep", "says"), [(False, "stopping everything started here now"),
                                             (True, "Ctrl-C stops everything started here")])
def test_summary_says_how_everything_stops(tmp_path, keep, says):
    _, _, lines = _summary(tmp_path, keep=keep)

    assert says in lines[-1]


def test_boto3_reads_the_secret_from_the_nodes_credentials_file_whose_settings_hold_no_secret(tmp_path, monkeypatch):
    import boto3

    node = localcluster.write_aws_files(tmp_path / "aws", SECRET)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in node.items():
        monkeypatch.setenv(key, value)

    credentials = boto3.Session().get_credentials()
    assert (credentials.secret_key, credentials.method, SECRET in json.dumps(node)) == \
        (SECRET, "shared-credentials-file", False)


def test_without_moto_the_command_says_to_run_make_setup_in_one_line_and_starts_nothing(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(localcluster, "BIN", tmp_path / "empty-venv-bin")

    code = cli.main(["local-cluster", "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err.strip().splitlines()
    assert (code, len(err), "make setup" in err[0], (tmp_path / "out").exists()) == (1, 1, True, False)
