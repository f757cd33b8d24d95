"""Start or join Ray, one way, for every stage that uses it (ingest and profile on Ray Data,
train and distil on Ray Train).

Import this module before `ray`: it sets Ray's environment, which Ray reads at import and
which the processes it starts inherit.
"""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# No usage stats, no log folding, quiet libraries.
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_LOG_LEVEL": "ERROR",
    "RAY_LOGGER_LEVEL": "error",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # the 2 s default caps training at 1 epoch/2 s
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_key, _value)

import ray  # noqa: E402
import ray.data  # noqa: E402
from ray.data import ExecutionResources  # noqa: E402

from fullstack_ml.progress import on_terminal  # noqa: E402


def start(
    address: str | None = None, cpus: int = 0, runtime_env: dict[str, Any] | None = None
) -> bool:
    """Join the cluster at `address` (`auto`, `host:port`, `ray://...`), or start a private
    local Ray when it is None; a Ray already running in this process is used as it is.

    The local Ray gets a logical CPU more than `cpus` (what Ray Train's workers take), and
    at least one per core: with none spare, Ray Data's tasks wait forever for a CPU.
    `runtime_env` (Ray's: e.g. a `working_dir` shipping this project's code to every node)
    applies to the job.

    Returns:
        Whether this call started (or joined) Ray.
    """
    if ray.is_initialized():
        return False
    local = {"num_cpus": max(cpus + 1, os.cpu_count() or 1)} if address is None else {}
    ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.ERROR,
        configure_logging=True,
        runtime_env=runtime_env,
        **local,
    )
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = on_terminal()
    return True


@contextmanager
def session(
    address: str | None = None, cpus: int = 0, runtime_env: dict[str, Any] | None = None
) -> Iterator[None]:
    """Ray while the block runs (`start`); shut down after it if this block started it."""
    started = start(address, cpus, runtime_env)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def bounded_ray_data(object_store_bytes: int = 1 << 30) -> None:
    """Ray Data quiet (progress bars on a terminal only, its log at ERROR) and with at most
    `object_store_bytes` of blocks in flight: reading runs ahead of slow tasks (whylogs
    profiling) only that far, so memory does not grow with the data."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = on_terminal()  # off in logs; Ray Data's own bars
    context.execution_options.resource_limits = ExecutionResources(
        object_store_memory=object_store_bytes
    )
