"""Sweep trials side by side on a multi-node cluster, as many as its resources hold.

A real 3-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head and two worker nodes, 2 logical CPUs
each), the real ``raymem sweep`` joining it through RAY_ADDRESS, logging to a real `mlflow server`, its storage root
on S3 (a moto server on 127.0.0.1: the study's data, checkpoints, Tune state and audits). The study is the tiny one
cut to 2 trials with one audit each. Each trial holds 3 CPUs at its peak (driver 1 + one LDM worker or
actor 1 + Ray Data 1), so the cluster's 6 CPUs hold exactly 2: the sweep must derive 2 and run both at once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from raymem.localcluster import BIN

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "study-tiny-xray2d.yaml"
NODE_CPUS = (2, 2, 2)  # head, worker, worker: 6 CPUs, 2 trials of 3 (3 trials would need 9)


@pytest.fixture(scope="module")
def cluster_address(s3_server):  # the S3 variables set before the nodes start: their workers read and write S3
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS[0], "include_dashboard": False})
    try:
        for cpus in NODE_CPUS[1:]:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        # Cluster also writes its address as this machine's default Ray; a plain ray.init() in another process
        # (another test's local cluster) must not join this one. The sweep joins through RAY_ADDRESS.
        reset_ray_address()
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def sweep(cluster_address, mlflow_server, s3_server, tmp_path_factory):
    """Run a 2-trial sweep of the tiny study on the cluster, storage root on S3; returns the process result, its
    MLflow runs and the files under the root."""
    import boto3
    from mlflow.tracking import MlflowClient

    from raymem import storage

    study = yaml.safe_load(CONFIG.read_text())
    study.update(sweep="cluster", factors={"train_size": [8, 16]}, seeds=[0])
    study["ldm"].update(diffusion_epochs=1)  # audit_every 1: one audit per trial
    config = tmp_path_factory.mktemp("study") / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    client = MlflowClient(mlflow_server)
    # A first request to a fresh server can outlast the sweep's one-shot 5 s preflight while the cluster's nodes start
    # their workers; this one retries.
    client.search_experiments()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="raymem-sweep")
    root = "s3://raymem-sweep/root"
    env = {**os.environ, "RAY_ADDRESS": cluster_address, "RAYMEM_STORAGE_ROOT": root,
           "MLFLOW_TRACKING_URI": mlflow_server, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run([str(BIN / "raymem"), "sweep", "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    experiment = client.get_experiment_by_name(study["study"])
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`raymem.sweep` = 'cluster'")
    return {"stdout": result.stdout, "files": storage.list_files(root),
            "parent": next(run for run in runs if run.data.tags["raymem.kind"] == "sweep"),
            "trials": [run for run in runs if run.data.tags["raymem.kind"] == "trial"]}


def test_the_sweep_derives_two_trials_at_once_from_the_clusters_cpus(sweep):
    assert (sweep["parent"].data.params["max_concurrent_trials"],
            "trials at once: 2 (cluster: 6 CPU 0 GPU; each trial holds 3 CPU 0 GPU" in sweep["stdout"]) == ("2", True)


def test_both_trials_ran_at_the_same_time(sweep):
    # Each trial's MLflow run spans its training and audit: the two spans overlap only if the trials ran together.
    spans = [(run.info.start_time, run.info.end_time) for run in sweep["trials"]]
    assert len(spans) == 2 and max(start for start, _ in spans) < min(end for _, end in spans), spans


def test_the_sweep_keeps_its_study_trials_and_dashboard_on_s3(sweep):
    files = sweep["files"]
    trials = {path.split("/")[4] for path in files if path.startswith("sweeps/raymem-tiny-study/cluster/trials/")
              and path.endswith("/trial.json")}
    assert (trials, "sweeps/raymem-tiny-study/cluster/study.json" in files,
            "sweeps/raymem-tiny-study/cluster/dashboard/index.html" in files) == (
        {"n8-aug0-tiny-e1-s0", "n16-aug0-tiny-e1-s0"}, True, True), files


def test_a_command_without_ray_address_starts_its_own_cluster_where_another_ray_is_this_machines_default(
        cluster_address):
    """A `ray start` or a test's cluster makes itself this machine's default Ray (/tmp/ray/ray_current_cluster); a
    plain ray.init() would join it (and fail: a local cluster's CPU count cannot be set on a joined one). raymem
    without RAY_ADDRESS starts its own local cluster, as it says."""
    import subprocess
    import sys

    from ray._common.utils import reset_ray_address
    from ray._private.utils import write_ray_address

    code = "import ray; from raymem import runtime; runtime.init_ray(); print(ray.cluster_resources()['CPU'])"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    write_ray_address(cluster_address)
    try:
        result = subprocess.run([sys.executable, "-c", code], env={**env, "RAYMEM_LOCAL_CPUS": "3"}, cwd=REPO,
                                capture_output=True, text=True, timeout=120)
    finally:
        reset_ray_address()
    assert (result.returncode, result.stdout.strip().splitlines()[-1:]) == (0, ["3.0"]), result.stderr[-3000:]
