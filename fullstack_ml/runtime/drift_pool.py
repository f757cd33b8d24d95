"""Drift scored in a helper process, for the serving worker: this module imports neither
whylogs nor pandas (0.8 s of the worker's start-up); the helper imports `drift` itself."""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

CATEGORIES = ("NO_DRIFT", "POSSIBLE_DRIFT", "DRIFT")  # drift_category, in order of severity


def helper_pool() -> ProcessPoolExecutor:
    """One helper process (spawned) for `window_drift`, which exits once the process that
    started it is gone: a SIGKILLed serving worker left its helper, and the resource
    tracker the helper kept open, running as orphans (about 240 MB)."""
    spawn = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(1, mp_context=spawn, initializer=exit_with, initargs=(os.getpid(),))


def exit_with(parent: int, every_s: float = 1.0) -> None:
    """In a helper: a thread that ends the process once `parent` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def load_reference(reference: str) -> None:
    """In the helper: import whylogs and read the profile in the file `reference` now, not
    at the first score."""
    from fullstack_ml.runtime.drift import cached_profile

    cached_profile(reference)


def window_drift(rows: np.ndarray, columns: list[str], reference: str) -> dict[str, Any]:
    """In the helper: drift scores of `rows` (named `columns`) against the profile in the
    file `reference`."""
    from fullstack_ml.runtime.drift import window_drift as scores

    return scores(rows, columns, reference)


def drifted(scores: dict[str, Any]) -> list[str]:
    return sorted(c for c, s in scores.items() if s and s["drift_category"] == "DRIFT")
