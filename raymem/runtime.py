"""Starting or joining Ray the same way from the CLI, jobs and benchmarks, and how much of Ray's output shows."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "RAYMEM_VERBOSE"


def verbose() -> bool:
    """Ray's own progress bars and INFO logs on the console (``raymem -v``, or RAYMEM_VERBOSE=1 for a job)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def train_log_level() -> str:
    """Ray Train's console level for raymem's trainers (RunConfig.logging_config): its per-report INFO lines only
    when verbose; warnings and errors always."""
    return "INFO" if verbose() else "WARNING"


def quiet_ray_output() -> None:
    """Unless verbose: no Ray Data progress bars or progress logs on the console, and Ray Data's console logger at
    WARNING. raymem's own stage lines and one bar or line per long step stay; Ray Data still writes everything to
    ray-data.log in the Ray session's log folder.

    Ray Data passes the driver's DataContext to the processes that execute a dataset (Train's split coordinator,
    its actors), so setting it here covers them; the environment variable covers local clusters started after it.
    """
    if verbose():
        return
    import warnings

    from ray.data import DataContext
    from ray.data._internal.logging import SessionFileHandler

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.WARNING)
    # Ray Train's own ingest setup uses it (Ray 2.58); nothing a raymem user can change.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")


def _quiet_local_workers() -> None:
    """Before a local cluster starts, whose processes inherit this environment: no Ray Data progress bars, and Ray
    Data's console logger at WARNING in every process (its default logging config with the console level raised;
    the session's ray-data.log still gets everything). Workers of a cluster joined through RAY_ADDRESS keep their
    nodes' settings; the driver's DataContext still turns their progress bars off."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if "RAY_DATA_LOGGING_CONFIG" in os.environ:
        return
    import copy
    import tempfile
    from pathlib import Path

    import ray
    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    quiet = copy.deepcopy(DEFAULT_CONFIG)
    quiet["handlers"]["console"]["level"] = "WARNING"
    path = Path(tempfile.gettempdir()) / f"raymem-ray-data-logging-{ray.__version__}.yaml"
    text = yaml.safe_dump(quiet)
    if not path.exists() or path.read_text() != text:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(path)  # atomic: concurrent runs never read half a file
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)


# A local cluster's training runs last seconds: Ray Train V2's controller polls its workers every 2 s by default,
# and a run waits on that poll at each state change (2 cores: tests/integration/test_ldm_train.py 118 s at 2 s,
# 108 s at 0.5 s).
# Set for the processes a local cluster starts (they inherit the environment); a remote cluster keeps its own.
LOCAL_CLUSTER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def local_cpus() -> int:
    """Logical CPUs of a local cluster: RAYMEM_LOCAL_CPUS, else twice the cores and at least 4."""
    value = os.environ.get("RAYMEM_LOCAL_CPUS", "").strip()
    if not value:
        return max(4, 2 * (os.cpu_count() or 2))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"RAYMEM_LOCAL_CPUS: a whole number of logical CPUs >= 1 (got {value!r})")
    return int(value)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (``ray job submit`` sets it) or start a local one; then quiet Ray's output
    unless verbose.

    A local cluster gets logical CPUs (twice the cores, at least 4; RAYMEM_LOCAL_CPUS sets another count): on small
    machines Ray Train workers that take every CPU starve Ray Data and the pipeline hangs (DESIGN.md, stack
    decisions).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        for name, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(name, value)
        if not verbose():
            _quiet_local_workers()
        # The dashboard serves Ray's State API, which Train V2's placement-group cleaner polls: without it that
        # thread logs a warning every few seconds. RAYMEM_DASHBOARD=0 leaves it out (the tests do: many short clusters).
        dashboard = os.environ.get("RAYMEM_DASHBOARD", "1") != "0"
        # address="local": a new cluster of its own, never another Ray that this machine last started (`ray start`,
        # a test's cluster), which a plain ray.init() joins through /tmp/ray/ray_current_cluster.
        context = ray.init(address="local", num_cpus=num_cpus or local_cpus(), include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", logging_level=logging.WARNING, log_to_driver=True)
        if dashboard and context.dashboard_url:
            print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    quiet_ray_output()
