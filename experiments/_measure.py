"""Measurement helpers for the benchmarks: wall time (single and interleaved), process memory (Linux
``/proc``; ``getrusage`` as the fallback peak), and a counter of log records (e.g. a slow path taken)."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``); return whether that worked (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss(reset_ok: bool) -> int:
    """Peak RSS in bytes since :func:`reset_peak` (or since the start when the reset failed)."""
    if reset_ok:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def median_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn``, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def elapsed(fn: Callable[[], Any]) -> float:
    """Wall time in seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                     warmup_fns: dict[str, Callable[[], Any]] | None = None) -> dict[str, dict]:
    """Time each function ``repeats`` times, round-robin with a rotating start, after warm-up calls.

    Interleaving makes load from other processes hit every function alike, so ratios between them stay
    meaningful on a busy machine. ``warmup_fns`` (if given) replaces the functions for the warm-up (e.g. a
    smaller size of the same code path when the real one takes tens of seconds). Returns
    ``{name: {"median", "min", "times", "cpu_median", "cpu_times"}}`` in seconds: wall time, and the
    CPU time of this process over the same calls (``time.process_time``: all its threads, not the time
    it waited for a core; on a machine with more runnable processes than cores the wall time includes
    that wait, the CPU time does not).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            (warmup_fns or fns)[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            start_cpu = time.process_time()
            times[name].append(elapsed(fns[name]))
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"median": statistics.median(ts), "min": min(ts), "times": ts,
                   "cpu_median": statistics.median(cpu[name]), "cpu_times": cpu[name]}
            for name, ts in times.items()}


class _Counter(logging.Handler):
    def __init__(self, substring: str) -> None:
        super().__init__(logging.DEBUG)
        self.substring = substring
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.substring in record.getMessage():
            self.count += 1


@contextlib.contextmanager
def count_log_records(logger_name: str, substring: str) -> Iterator[_Counter]:
    """Count the records of ``logger_name`` (any level, DEBUG included) whose message holds ``substring``.

    The logger's level is lowered to DEBUG inside the block and restored after; its other handlers and
    propagation are left alone. Yields the counter (read ``.count``).
    """
    logger = logging.getLogger(logger_name)
    counter = _Counter(substring)
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
