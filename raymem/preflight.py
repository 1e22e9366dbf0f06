"""Checks that run before any stage, so a command fails in seconds, in one line, with nothing written.

Every command that writes (``raymem`` subcommands and the ``jobs/`` entrypoints) calls :func:`run_preflight` before it
starts Ray: the MLflow tracking store answers and holds (or can create) the experiment, and the storage root is
reachable and writable (for S3: the endpoint answers and the bucket exists). Without these checks an unreachable
MLflow server is found only after the data stage, once MLflow's client has retried for minutes, and a missing bucket
only after the data was generated.

Each failure is a :class:`PreflightError` whose message is one line naming what failed and what to set. Nothing here
computes: when everything is in place a local check takes milliseconds, a tracking server a few requests.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from raymem import storage, tracking

TIMEOUT_S = 5.0  # per request; each check asks once, without retries
_SET_TRACKING = "set MLFLOW_TRACKING_URI (or the job file's tracking_uri)"


class PreflightError(RuntimeError):
    """What a command needs is not there; the message is one line naming it and what to set."""


def _one_line(err: BaseException) -> str:
    reason = " ".join(str(err).split())
    return reason[:300] + " ..." if len(reason) > 300 else reason


def check_tracking(uri: str, experiment: str | None = None, artifact_location: str | None = None,
                   timeout_s: float = TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking server answers and, with ``experiment``, holds it active (creating it with
    ``artifact_location``, as the first stage to log would); a ``sqlite:///`` store's folder is writable.

    Other stores (postgresql://, databricks) are left to MLflow's own client.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
        if experiment is not None:
            _check_experiment(uri, experiment, artifact_location, timeout_s)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            storage.check_writable(str(folder))
        except storage.StorageError as err:
            raise PreflightError(f"MLflow store {uri}: {err}; {_SET_TRACKING} to a writable store or a tracking "
                                 "server") from None


def _check_server(uri: str, timeout_s: float) -> None:
    """One GET of ``<uri>/health``: any HTTP answer below 500 counts (a login or a proxy may guard the path)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"HTTP {err.code}"
    except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, a timeout, a malformed URL
        reason = _one_line(getattr(err, "reason", err))
    raise PreflightError(f"MLflow tracking server {uri} does not answer ({reason}); start it, or {_SET_TRACKING} to a "
                         "running server")


@contextlib.contextmanager
def _mlflow_asks_once(timeout_s: float) -> Iterator[None]:
    """MLflow's client retries a failing request for minutes by default; the check asks once, briefly."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout_s)))}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_experiment(uri: str, experiment: str, artifact_location: str | None, timeout_s: float) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        with _mlflow_asks_once(timeout_s):
            exp_id = tracking.experiment_id(client, experiment, artifact_location)
            stage = client.get_experiment(exp_id).lifecycle_stage
    except Exception as err:  # noqa: BLE001 - MlflowException or a requests error: either is the one line
        raise PreflightError(f"MLflow tracking server {uri} cannot get or create experiment {experiment!r}: "
                             f"{_one_line(err)}; check the server and its login (MLFLOW_TRACKING_USERNAME / "
                             f"MLFLOW_TRACKING_TOKEN), or {_SET_TRACKING}") from None
    if stage != "active":
        raise PreflightError(f"MLflow experiment {experiment!r} on {uri} is deleted; restore it (`mlflow experiments "
                             "restore`) or name another experiment")


def check_storage(uri: str) -> None:
    """``uri`` (a folder) is reachable and writable: a probe object is written there and removed."""
    try:
        storage.check_writable(uri)
    except storage.StorageError as err:
        advice = "" if storage.is_s3(uri) else "; choose a folder you can write to"
        raise PreflightError(f"{err}{advice}") from None


def run_preflight(storage_root: str, *, experiment: str | None = None, tracking_uri: str | None = None,
                  artifact_location: str | None = None) -> None:
    """Before any stage: ``storage_root`` is reachable and writable; then, with ``experiment`` (the command logs to
    MLflow), the tracking store (``tracking_uri``, else the one a stage writing under ``storage_root`` uses) answers
    and holds the experiment. Raises :class:`PreflightError`; the storage is left as it was.
    """
    check_storage(storage_root)
    if experiment is not None:
        check_tracking(tracking_uri or tracking.stage_tracking_uri(storage_root), experiment, artifact_location)
