"""Progress of long work: a tqdm bar with its rate and time left when stderr is a terminal,
and one log line per phase when it is not (CI logs stay short)."""

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bar(
    total: float | None, desc: str, unit: str = "it", counts: bool = True, show: bool = True
) -> tqdm:
    """A tqdm bar on a terminal when `show`; a disabled one (updates cost nothing, print
    nothing) elsewhere. `counts=False` leaves out the done/total counts."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        disable=not (show and on_terminal()),
        file=sys.stderr,
        bar_format=None if counts else "{l_bar}{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )


def track(
    items: Iterable[T],
    total: float | None,
    desc: str,
    unit: str,
    log: logging.Logger,
    size: Callable[[T], float] | None = None,
) -> Iterator[T]:
    """Yield `items`, advancing a bar by `size(item)` units each (1 without `size`); off a
    terminal, log one line at the end: how many units, how long, how fast."""
    began, done = time.perf_counter(), 0.0
    with bar(total, desc, unit) as b, logging_redirect_tqdm():
        for item in items:
            yield item
            n = size(item) if size else 1
            done += n
            b.update(n)
    if not on_terminal():
        log.info("%s: %s", desc, rate(done, unit, time.perf_counter() - began))


def rate(done: float, unit: str, seconds: float) -> str:
    """E.g. "1,000 rows in 0.5 s (2,000 rows/s)"."""
    return f"{done:,.0f} {unit}s in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} {unit}s/s)"


class Phases:
    """The named steps of one job over a table: on a terminal a bar (rows through the steps
    per second, time left, the step running) that starts once the row count is known;
    elsewhere one log line per step with its time and rate."""

    def __init__(self, desc: str, steps: int, log: logging.Logger) -> None:
        self.desc, self.steps, self.log = desc, steps, log
        self.began, self.done, self.rows = time.perf_counter(), 0, 0
        self.bar: tqdm | None = None
        self.redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
        self.redirect.__enter__()

    def set_rows(self, rows: int) -> None:
        """Start the bar: `rows` pass through each step (the rate is rows x steps per s)."""
        self.rows = rows
        self.bar = bar(self.steps * rows, f"{self.desc} {rows:,} rows", "row", counts=False)
        if not self.bar.disable:
            before = time.perf_counter() - self.began  # the steps before the count took time
            self.bar.start_t -= before
            self.bar.last_print_t -= before
            self.bar.update(self.done * rows)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        began = time.perf_counter()
        yield
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.rows)
        if not on_terminal():
            took = rate(self.rows, "row", time.perf_counter() - began)
            self.log.info("%s: %s: %s", self.desc, name, took)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.redirect.__exit__(None, None, None)
