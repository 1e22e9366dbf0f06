"""What the Ray Train loops share: their console lines (which epochs print one, Train's own report logs), and the
test-only fault injection (one worker crash at a chosen epoch, ``fail_at_epoch``)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from raymem import storage

# Ray Train V2 keeps it in the run folder; the controller rewrites it each time it registers a checkpoint.
_SNAPSHOT = "checkpoint_manager_snapshot.json"

PROGRESS_LINES = 20


def progress_line(epoch: int, total: int) -> bool:
    """Whether epoch ``epoch`` (0-based) of ``total`` prints a line: about PROGRESS_LINES per training (the first, every
    total / PROGRESS_LINES, the last), so a 400-epoch run stays readable."""
    every = max(1, total // PROGRESS_LINES)
    return epoch == 0 or epoch == total - 1 or (epoch + 1) % every == 0


def quiet_train_reports(level: str) -> None:
    """Ray Train V2 logs each report (metrics, checkpoint path) at INFO under a logger named by its source file,
    which RunConfig's LoggingConfig level does not reach; give it ``level`` in this worker. Also drops torch's
    read-only-array warning, which every worker would print once."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)
    # Ray Data hands batches out read-only; the loops only read them (torch copies on the dtype/device move).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver. Not print(): Train V2 patches it
    into a logger that also tees to stdout, so each line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def crash_once(marker_uri: str, epoch: int, checkpoint_every: int, timeout_s: float = 120.0) -> None:
    """Kill this worker process, as a lost node would look to Ray Train, unless ``marker_uri`` says it was done.

    It first waits until the controller has registered the last checkpoint reported before ``epoch``. The controller
    collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a worker dying before that loses its last report,
    and the restart resumes one checkpoint earlier. A test that asserts the exact epochs trained (none twice, none
    skipped) needs the crash to strike after the report was taken, not within those 2 s.
    """
    if storage.exists(marker_uri):
        return
    previous = [e for e in range(epoch) if (e + 1) % checkpoint_every == 0]
    if previous:
        snapshot = storage.join(marker_uri.rsplit("/", 1)[0], _SNAPSHOT)
        expected = f"epoch-{previous[-1]:05d}".encode()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (storage.exists(snapshot)
                                                   and expected in storage.read_bytes(snapshot)):
            time.sleep(0.2)
    storage.write_bytes(marker_uri, b"injected once")
    os._exit(1)
