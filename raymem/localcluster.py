"""A raymem cluster on 127.0.0.1 for a first try and for the integration tests (``raymem local-cluster``).

Starts a Ray head (``ray start --head``), an MLflow server (sqlite store, local artifacts) and an S3 endpoint (a moto
server), each as a process of its own, stopped with its whole process tree by process id (never ``ray stop``, which
stops every Ray on the machine); submits ``jobs/pipeline.py --config jobs/configs/tiny-xray2d.yaml`` with
``ray job submit --working-dir .`` and follows it. tests/integration/test_jobs.py runs these same functions.

Credentials as docs/cluster.md asks of a real cluster: the S3 keys live on the node, in an AWS credentials file the Ray
head is started with (``AWS_SHARED_CREDENTIALS_FILE``), which boto3 and pyarrow read; a job's runtime env holds only
non-secrets (endpoint, region, storage root, MLflow URI, code revision).

Folders: ``out`` (the state folder) keeps the MLflow store, each service's log and each job's log after the cluster
stops; the node folder (a short folder under /tmp: Ray's socket paths have a length limit) holds the credentials file
and the head's Ray temp dir, and goes with the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from raymem.runtime import LOCAL_CLUSTER_ENV

BIN = Path(sys.executable).parent  # the environment's `ray`, `mlflow` and `moto_server`
REPO = Path(__file__).resolve().parents[1]  # the checkout `ray job submit --working-dir .` uploads
PIPELINE = "jobs/pipeline.py"
PIPELINE_CONFIG = "jobs/configs/tiny-xray2d.yaml"
EXPERIMENT = "raymem-tiny"  # the tiny config's experiment
HEAD_CPUS = 4  # logical CPUs: on a 2-core machine Ray Train workers would otherwise starve Ray Data (DESIGN.md)
REGION = "us-east-1"
BUCKET = "raymem-local"
ACCESS_KEY_ID = "raymem-local"  # moto accepts any keys; the secret key is random per cluster
# The head's ports, all free ones: another Ray on this machine keeps its own.
RAY_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
                  "--node-manager-port", "--object-manager-port")
# What each pipeline stage commits under the storage root ({run}: the run name).
STAGE_OUTPUTS = ("datasets/{run}/manifest.json", "detector/{run}/detector.pt", "synthetic/{run}/manifest.json",
                 "audits/{run}/metrics.json", "audits/{run}/matches.parquet", "audits/{run}/report.html")
FINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


class LocalClusterError(RuntimeError):
    """A service that did not start or a `ray job` command that failed; the message says which."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    """Return once ``url`` answers 200; raise if ``process`` (its server) exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc: Ray's processes may start their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process and wait; then SIGKILL, by pid, it and every descendant still alive."""
    family = descendants(process.pid)
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    kill_tree(process, [*family, *(d for p in family for d in descendants(p))])


def kill_tree(process: subprocess.Popen, family: list[int] | None = None) -> None:
    """SIGKILL the process and every descendant (or ``family``, found before it could be orphaned), with no chance
    to clean up: a lost driver."""
    for pid in [process.pid, *(descendants(process.pid) if family is None else family)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait(timeout=10)


def service_env(node: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without AWS settings or an MLflow URI (a service must not inherit this shell's
    credentials), with this environment's tools first on PATH, plus ``node``'s settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_TRACKING_URI"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               **{name: env.get(name, value) for name, value in LOCAL_CLUSTER_ENV.items()}, **(node or {}))
    return env


def write_aws_files(folder: Path, secret_key: str) -> dict[str, str]:
    """An AWS credentials file and config file in ``folder`` (private to this user); returns the node settings that
    point boto3 and pyarrow at them (no secret among them)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    credentials, config = folder / "credentials", folder / "config"
    credentials.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY_ID}\naws_secret_access_key = {secret_key}\n")
    credentials.chmod(0o600)
    config.write_text(f"[default]\nregion = {REGION}\n")
    # No EC2 metadata lookups on a laptop: the credentials file is the only source.
    return {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": str(config),
            "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class Service:
    """A server to start: its command, the URL it serves, and the URL that answers 200 once it is ready."""

    name: str
    command: list[str]
    url: str
    ready_url: str
    ready_timeout_s: float


def s3_service() -> Service:
    port = free_port()
    return Service("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}",
                   f"http://127.0.0.1:{port}/moto-api/", 60)


def mlflow_service(folder: Path) -> Service:
    """``mlflow server`` with a sqlite store and proxied artifacts, both in ``folder``."""
    port = free_port()
    return Service("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                              f"sqlite:///{Path(folder).absolute() / 'mlflow.db'}", "--artifacts-destination",
                              str(Path(folder).absolute() / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                              "--workers", "1"],
                   f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/health", 120)


def ray_head_service(temp_dir: Path) -> Service:
    """``ray start --head --block`` on 127.0.0.1 with its own ports and temp dir; its URL is the dashboard's (and the
    job server's) address."""
    ports = {flag: free_port() for flag in RAY_PORT_FLAGS}
    dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
    return Service("ray-head", [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                f"--num-cpus={HEAD_CPUS}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                f"--temp-dir={temp_dir}", *(f"{flag}={port}" for flag, port in ports.items())],
                   dashboard, f"{dashboard}/api/jobs/", 240)


@contextlib.contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ctrl-C does not cut a cleanup short (which would orphan the services not stopped yet)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def serving(services: list[Service], env: dict[str, str], log_folder: Path | None = None) -> Iterator[None]:
    """Start every service at once (their start-ups overlap), return once each answers, and when the block ends (Ctrl-C
    included) stop each one's whole process tree, the last started first. Each service's output goes to
    ``log_folder/<name>.log``, else nowhere."""
    processes: list[subprocess.Popen] = []
    try:
        for service in services:
            with (open(log_folder / f"{service.name}.log", "wb") if log_folder
                  else contextlib.nullcontext(subprocess.DEVNULL)) as log:
                # A session of its own: Ctrl-C in the terminal reaches this process only, which stops the services.
                processes.append(subprocess.Popen(service.command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
        for service, process in zip(services, processes, strict=True):
            try:
                wait_http(service.ready_url, service.ready_timeout_s, process)
            except (RuntimeError, TimeoutError) as err:
                log = f"; its log: {log_folder / f'{service.name}.log'}" if log_folder else ""
                raise LocalClusterError(f"{service.name} did not start: {err}{log}") from err
        yield
    finally:
        with _interrupts_ignored():
            for process in reversed(processes):
                stop_tree(process)


def _ray(args: list[str]) -> str:
    """``ray ARGS`` from the repository root (``--working-dir .`` is the checkout); returns its stdout."""
    result = subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=service_env(), capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0:
        raise LocalClusterError(f"ray {' '.join(args[:2])} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@dataclass(frozen=True)
class Job:
    submission_id: str
    run_name: str
    status: str  # SUCCEEDED, FAILED or STOPPED
    logs: str


@dataclass(frozen=True)
class LocalCluster:
    """The running services: where each answers, and where the files are."""

    folder: Path  # the state folder: mlflow/ (store and artifacts), <service>.log, jobs/<submission id>.log
    node_folder: Path  # aws/ (the node's credentials file) and ray/ (the head's temp dir)
    dashboard: str  # the Ray dashboard and job server
    mlflow: str  # the MLflow server (tracking URI and UI)
    s3_endpoint: str
    secret_key: str  # in the node's credentials file only

    @property
    def bucket(self) -> str:
        return BUCKET

    @property
    def storage_root(self) -> str:
        return f"s3://{BUCKET}/studies"

    @property
    def ray_temp_dir(self) -> Path:
        return self.node_folder / "ray"

    @property
    def ray_logs(self) -> Path:
        """Every log of the head's Ray session (the raylet, the dashboard, the runtime env agent, the jobs)."""
        return self.ray_temp_dir / "session_latest" / "logs"

    def client_env(self) -> dict[str, str]:
        """What a process on this machine sets to reach the bucket as the nodes do (the credentials file, no keys)."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_REGION": REGION,
                "AWS_SHARED_CREDENTIALS_FILE": str(self.node_folder / "aws" / "credentials"),
                "AWS_CONFIG_FILE": str(self.node_folder / "aws" / "config")}

    def runtime_env(self, revision: str) -> dict:
        """A job's runtime env: non-secrets only, since Ray shows it in plain text (docs/cluster.md)."""
        return {"env_vars": {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_REGION": REGION,
                             "RAYMEM_STORAGE_ROOT": self.storage_root, "MLFLOW_TRACKING_URI": self.mlflow,
                             "RAYMEM_GIT_REVISION": revision, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}

    def submit_command(self, entrypoint: list[str], revision: str, *options: str) -> list[str]:
        """``ray job submit --working-dir .`` of ``entrypoint`` with further ``options``, to run from the repository
        root (without ``--no-wait`` it follows the job's log)."""
        return ["ray", "job", "submit", "--address", self.dashboard, "--working-dir", ".", "--runtime-env-json",
                json.dumps(self.runtime_env(revision)), *options, "--", *entrypoint]

    def ray_job(self, command: str, *args: str) -> str:
        """``ray job COMMAND --address <dashboard> ARGS`` from the repository root; returns its stdout."""
        return _ray(["job", command, "--address", self.dashboard, *args])

    def submit(self, entrypoint: list[str], revision: str) -> str:
        """Submit ``entrypoint`` (not waiting for it); returns the submission id."""
        submission_id = f"raymem-{uuid.uuid4().hex[:8]}"
        _ray(self.submit_command(entrypoint, revision, "--submission-id", submission_id, "--no-wait")[1:])
        return submission_id

    def status(self, submission_id: str) -> str:
        with urllib.request.urlopen(f"{self.dashboard}/api/jobs/{submission_id}", timeout=10) as response:
            return json.load(response)["status"]

    def wait(self, submission_id: str, timeout_s: float | None = None, follow: bool = False) -> str:
        """The job's final status; ``follow`` streams its log to this process's stdout meanwhile
        (``ray job logs --follow``). After ``timeout_s`` the job is stopped and TimeoutError raised."""
        follower = subprocess.Popen([str(BIN / "ray"), "job", "logs", "--address", self.dashboard, "--follow",
                                     submission_id], cwd=REPO, env=service_env()) if follow else None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while (status := self.status(submission_id)) not in FINAL_STATUSES:
                if deadline is not None and time.monotonic() > deadline:
                    self.ray_job("stop", submission_id)
                    raise TimeoutError(f"job {submission_id} still running after {timeout_s} s:\n"
                                       f"{self.ray_job('logs', submission_id)[-3000:]}")
                time.sleep(1)
        finally:
            if follower is not None:
                try:
                    follower.wait(timeout=30)  # it ends with the job; a stopped job may leave it waiting
                except subprocess.TimeoutExpired:
                    stop_tree(follower)
        return status


def pipeline_entrypoint(run_name: str) -> list[str]:
    return ["python", PIPELINE, "--config", PIPELINE_CONFIG, "--run-name", run_name]


def run_pipeline(cluster: LocalCluster, run_name: str, revision: str, *, timeout_s: float | None = None,
                 follow: bool = False) -> Job:
    """The tiny pipeline as a Ray job, submitted and waited for; its log is kept in the state folder."""
    submission_id = cluster.submit(pipeline_entrypoint(run_name), revision)
    status = cluster.wait(submission_id, timeout_s, follow=follow)
    logs = cluster.ray_job("logs", submission_id)
    (cluster.folder / "jobs").mkdir(exist_ok=True)
    (cluster.folder / "jobs" / f"{submission_id}.log").write_text(logs)
    return Job(submission_id, run_name, status, logs)


def stage_outputs(storage_root: str, run_name: str) -> list[str]:
    return [f"{storage_root}/{output.format(run=run_name)}" for output in STAGE_OUTPUTS]


def _create_bucket(endpoint: str, secret_key: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY_ID,
                 aws_secret_access_key=secret_key).create_bucket(Bucket=BUCKET)


@contextlib.contextmanager
def start(folder: str | Path) -> Iterator[LocalCluster]:
    """Start the S3 endpoint (with an empty bucket), the MLflow server and the Ray head; stop them all when the block
    ends. ``folder`` is the state folder (created; an MLflow store already there is kept)."""
    folder = Path(folder).absolute()
    (folder / "mlflow").mkdir(parents=True, exist_ok=True)
    node_folder = Path(tempfile.mkdtemp(prefix="rayl-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        secret_key = f"local-{secrets.token_hex(16)}"
        node = write_aws_files(node_folder / "aws", secret_key)
        s3, mlflow, head = s3_service(), mlflow_service(folder / "mlflow"), ray_head_service(node_folder / "ray")
        with serving([s3, mlflow, head], service_env(node), log_folder=folder):
            _create_bucket(s3.url, secret_key)
            yield LocalCluster(folder, node_folder, head.url, mlflow.url, s3.url, secret_key)
    finally:
        shutil.rmtree(node_folder, ignore_errors=True)


def missing_tools() -> list[str]:
    """The executables the cluster needs that this environment lacks (moto comes with the test extra)."""
    return [name for name in ("ray", "mlflow", "moto_server") if not (BIN / name).exists()]


def summary_lines(cluster: LocalCluster, job: Job, outputs: dict[str, bool], revision: str, keep: bool,
                  seconds: float) -> list[str]:
    """Where to look after the run: the dashboard, the MLflow UI, the bucket and each stage's output, the job, how
    to rerun and how to stop."""
    ray = BIN / "ray"
    ray_shown = str(ray.relative_to(REPO)) if ray.is_relative_to(REPO) else str(ray)  # .venv/bin/ray
    rerun = [ray_shown, *cluster.submit_command(pipeline_entrypoint(job.run_name), revision)[1:]]
    lines = [f"raymem local cluster: the tiny pipeline {job.status} ({seconds:.0f} s with the start-up; "
             f"submission {job.submission_id}, run name {job.run_name})",
             f"ray       dashboard {cluster.dashboard} (jobs, logs, actors); the head's logs in {cluster.ray_logs}",
             f"mlflow    UI {cluster.mlflow}, experiment {EXPERIMENT}: runs detector/{job.run_name}, "
             f"ldm/{job.run_name}, audit/{job.run_name}; store in {cluster.folder / 'mlflow'}",
             f"s3        endpoint {cluster.s3_endpoint}, bucket {cluster.bucket}, storage root {cluster.storage_root}; "
             f"keys in the node's credentials file {cluster.client_env()['AWS_SHARED_CREDENTIALS_FILE']}",
             *(f"{'outputs' if i == 0 else '':9} {uri}{'' if present else '  (missing)'}"
               for i, (uri, present) in enumerate(outputs.items())),
             f"job log   {cluster.folder / 'jobs' / f'{job.submission_id}.log'}",
             f"rerun     from {REPO} (the same run name resumes: every stage says 'already done'; "
             "a new one starts a new study):",
             f"          {shlex.join(rerun)}"]
    if keep:
        lines.append("stop      Ctrl-C stops everything started here (the MLflow store and the logs in "
                     f"{cluster.folder} stay)")
    else:
        lines.append("stop      stopping everything started here now; S3 objects and the Ray logs go with it, the "
                     f"MLflow store and the logs in {cluster.folder} stay. Rerun with --keep to browse the dashboard "
                     "and MLflow UI")
    return lines


def main(out: str, keep: bool = False) -> int:
    """``raymem local-cluster``: start, run the tiny pipeline, print the summary, stop (``keep``: after Ctrl-C)."""
    from raymem import storage, tracking

    if missing := missing_tools():
        print(f"raymem local-cluster: {', '.join(missing)} not found in {BIN}: run `make setup` (moto comes with "
              "the test extra)", file=sys.stderr)
        return 1
    if not (REPO / PIPELINE).exists():
        print(f"raymem local-cluster: {REPO / PIPELINE} not found: run it from a raymem checkout (`make setup` "
              "installs it editable)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # `kill <pid>` cleans up like Ctrl-C
    revision = tracking.git_revision()
    run_name = f"local-{datetime.now():%Y%m%d-%H%M%S}"
    started = time.monotonic()
    try:
        print(f"starting a Ray head, an MLflow server and an S3 endpoint on 127.0.0.1 (state in {out})", flush=True)
        with start(out) as cluster:
            print(f"submitting {PIPELINE} --config {PIPELINE_CONFIG} --run-name {run_name} to {cluster.dashboard}",
                  flush=True)
            job = run_pipeline(cluster, run_name, revision, follow=True)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                os.environ.pop(key, None)
            os.environ.update(cluster.client_env())  # read the bucket as the nodes do
            outputs = {uri: storage.exists(uri) for uri in stage_outputs(cluster.storage_root, run_name)}
            print("\n".join(["", *summary_lines(cluster, job, outputs, revision, keep,
                                                time.monotonic() - started)]), flush=True)
            if keep:
                while True:
                    signal.pause()
    except LocalClusterError as err:
        print(f"raymem local-cluster: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: everything started here has been stopped", file=sys.stderr)
        return 130
    return 0 if job.status == "SUCCEEDED" else 1
