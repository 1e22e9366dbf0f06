"""Fixtures of the integration tests that start real services (raymem.localcluster starts and stops them)."""

from __future__ import annotations

import pytest

from raymem import localcluster


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite store, local artifacts) on 127.0.0.1; yields its URI."""
    service = localcluster.mlflow_service(tmp_path_factory.mktemp("mlflow"))
    with localcluster.serving([service], localcluster.service_env()):
        yield service.url
