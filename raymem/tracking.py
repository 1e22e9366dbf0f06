"""MLflow tracking: one run per stage run, reopened (never duplicated) on retry, ended truthfully.

MLflow 3's file store is gone: without MLFLOW_TRACKING_URI the store is ``sqlite:///<abs path>/mlflow.db`` under
the output root; with several processes or nodes, point MLFLOW_TRACKING_URI at a real ``mlflow server``.
Experiments are created on the driver with an explicit artifact location so every process agrees on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymem import storage

RUN_KEY_TAG = "raymem.run_key"
DEFAULT_EXPERIMENT = "raymem"  # the experiment of a CLI command that names none (raymem audit)
GIT_REVISION_TAG = "raymem.git_revision"


def git_revision() -> str:
    """The code's git revision: RAYMEM_GIT_REVISION, else `git rev-parse HEAD` of this checkout, else 'unknown'
    (``ray job submit`` uploads the working tree without .git)."""
    if os.environ.get("RAYMEM_GIT_REVISION"):
        return os.environ["RAYMEM_GIT_REVISION"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def tracking_uri(default_root: str = ".") -> str:
    """MLFLOW_TRACKING_URI when set, else a sqlite store in ``default_root`` (a local folder, created here)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        Path(default_root).absolute().mkdir(parents=True, exist_ok=True)
    return _store_uri(default_root)


def _store_uri(default_root: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(default_root).absolute() / 'mlflow.db'}"


def stage_tracking_uri(out: str) -> str:
    """The store a stage writing under ``out`` logs to, named without creating anything: MLFLOW_TRACKING_URI when
    set, else sqlite in ``out`` when it is a local folder, else sqlite in the working directory."""
    return _store_uri("." if storage.is_s3(out) else out)


def artifact_root(out: str) -> str:
    """``<out>/mlartifacts`` (a local ``out`` made absolute): the artifact location train-ldm gives a new experiment."""
    return storage.join(storage.absolute(out), "mlartifacts")


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created with an explicit artifact location when new."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client, exp_id: str, run_key: str):
    """The run that carries ``run_key`` (a stable name for one logical run), or None."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    return runs[0] if runs else None


@dataclass(frozen=True)
class TrackedRun:
    """An open MLflow run: log through ``client`` with ``run_id`` (no global MLflow state is touched)."""

    client: Any
    run_id: str
    uri: str


@contextlib.contextmanager
def run(experiment: str, run_key: str, *, uri: str | None = None, artifact_location: str | None = None,
        tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> Iterator[TrackedRun]:
    """Open the MLflow run for ``run_key`` (reopening it after a retry or a rerun) and yield it.

    The run ends FINISHED on success, FAILED on an exception, KILLED on SIGTERM/SIGINT (``ray job stop``).
    Uses an explicit client rather than ``mlflow.set_tracking_uri``, which would leak the URI into the
    environment of everything started later in the process.
    """
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment, artifact_location)
    existing = find_run(client, exp_id, run_key)
    if existing is None:
        # Every run names its code; on a cluster, RAYMEM_GIT_REVISION set at submit time (docs/cluster.md).
        all_tags = {RUN_KEY_TAG: run_key, "mlflow.runName": run_key, GIT_REVISION_TAG: git_revision(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(exp_id, tags=all_tags, run_name=run_key).info.run_id
    else:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")

    def _killed(signum, frame):  # noqa: ARG001 - signal handler signature
        client.set_terminated(run_id, status="KILLED")
        raise SystemExit(128 + signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # only the main thread may install handlers
            previous[sig] = signal.signal(sig, _killed)
    try:
        yield TrackedRun(client=client, run_id=run_id, uri=uri)
    except BaseException as err:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        client.set_terminated(run_id, status=status)
        raise
    else:
        client.set_terminated(run_id, status="FINISHED")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def log_params(tracked: TrackedRun, params: dict[str, Any]) -> None:
    """Log params once; a rerun with the same values is fine, a changed value is an error MLflow names."""
    from mlflow.entities import Param

    current = tracked.client.get_run(tracked.run_id).data.params
    new = [Param(k, str(v)) for k, v in params.items() if k not in current]
    if new:
        tracked.client.log_batch(tracked.run_id, params=new)


def log_metrics(tracked: TrackedRun, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics keyed by name ('/' becomes '.', which the MLflow UI groups)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    tracked.client.log_batch(tracked.run_id, metrics=[
        Metric(key.replace("/", "."), float(value), stamp, step) for key, value in metrics.items()])
