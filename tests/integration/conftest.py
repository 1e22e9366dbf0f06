"""Fixtures of the integration tests that start real services (see services.py)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from services import BIN, free_port, service_env, stop_tree, wait_http


@pytest.fixture(scope="module")
def mlflow_server():
    folder = Path(tempfile.mkdtemp(prefix="raymem-mlflow-"))
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=service_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_tree(process)
        shutil.rmtree(folder, ignore_errors=True)
