"""Starting or joining Ray the same way from the CLI, jobs and benchmarks."""

from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (``ray job submit`` sets it) or start a local one.

    A local cluster gets logical CPUs (twice the cores, at least 4): on small machines Ray Train workers that
    take every CPU starve Ray Data and the pipeline hangs (DESIGN.md, stack decisions).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus or max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=True)
