"""Test-only fault injection for the Ray Train loops: one worker crash at a chosen epoch (``fail_at_epoch``)."""

from __future__ import annotations

import os
import time

from raymem import storage

# Ray Train V2 keeps it in the run folder; the controller rewrites it each time it registers a checkpoint.
_SNAPSHOT = "checkpoint_manager_snapshot.json"


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
