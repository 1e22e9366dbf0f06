"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1) and a real local Ray cluster.

Nothing here mocks S3 or Ray: the moto server speaks the S3 protocol over HTTP, and Ray runs real processes.
"""

from __future__ import annotations

import os
import uuid

import pytest

from raymem.runtime import LOCAL_CLUSTER_ENV

# Ray >= 2.59 enables token auth for local clusters; tests run a private local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAYMEM_DASHBOARD", "0")  # many short local clusters: no dashboard each (raymem.runtime)
# The clusters fixtures start themselves (ray.init, ray.cluster_utils) run as the CLI runs a local one.
os.environ.update({name: os.environ.get(name, value) for name, value in LOCAL_CLUSTER_ENV.items()})


# `make test` runs two pytest-xdist workers, each taking one test file at a time in collection order
# (--dist loadfile --no-loadscope-reorder). Longest first, so no long file starts last and runs alone: the files
# that took over 40 s in the sequential suite (fresh-clone run of 2026-12-05, 2-core machine), longest first.
LONGEST_FIRST = (
    "integration/test_sweep_run.py", "integration/test_determinism.py", "integration/test_demo.py",
    "integration/test_jobs.py", "integration/test_sweep_cluster.py", "integration/test_cli_paths.py",
    "integration/test_ldm_train.py", "integration/test_detector_train.py", "integration/test_cli_resume.py",
    "integration/test_audit_images.py", "integration/test_ingest.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((at for at, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)),
                    len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every file keeps its tests' order, the other files their collection order


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; sets the AWS_* variables raymem.storage reads. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the moto server; returns 's3://<bucket>'."""
    import boto3

    name = f"raymem-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One real local Ray cluster per test module (4 logical CPUs on a 2-core machine, see DESIGN.md).

    Started after the S3 server so its workers inherit the AWS_* endpoint variables, as cluster nodes would.
    """
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=False)
    # A stalled pipeline should fail the test, not hang it.
    DataContext.get_current().execution_no_progress_timeout_s = 120
    yield ray
    ray.shutdown()


@pytest.fixture
def make_phantom_dataset(tmp_path):
    """make_phantom_dataset(kind, patients, per_patient, test_fraction=0.0) -> URI of a committed 32-pixel phantom
    dataset (25 % of patients val, test_fraction of them test)."""
    from raymem import config
    from raymem.data.ingest import phantom_dataset

    def make(kind: str, patients: int, per_patient: int, test_fraction: float = 0.0) -> str:
        uri = str(tmp_path / f"ds-{kind}")
        phantom_dataset(uri, kind, patients=patients, images_per_patient=per_patient, size=32, seed=0,
                        cfg=config.validate(config.IngestConfig,
                                            {"val_fraction": 0.25, "test_fraction": test_fraction}))
        return uri

    return make
