"""Cost measurements for the benchmarks: wall time, the two-pass floor, process memory, log records.

Timing: every comparison between implementations goes through :func:`time_interleaved` (round-robin
with a rotating start, so that load from other processes hits every function alike and the ratios stay
meaningful on a busy machine); a one-off duration (a whole training run, a section) is a
:func:`stopwatch`. The floor of a sliding-window step, two passes over the ``m x d`` buffer, is
:func:`two_pass_floor`; the floor of a static build, one Gram product plus one triangular solve, is
:func:`static_build_floor` (both return callables to time next to what they are the floor of).

Memory: resident set size now and its peak (Linux ``/proc``; ``getrusage`` as the fallback peak).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Clock = Callable[[], float]


# ====================================================================== time
def elapsed(fn: Callable[[], Any], clock: Clock = time.perf_counter) -> float:
    """Wall time in seconds of one call of ``fn``."""
    start = clock()
    fn()
    return clock() - start


class Stopwatch:
    """Wall time since it was started: ``seconds`` (frozen by :meth:`stop` or at the end of a ``with``)."""

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self._stop: float | None = None

    @property
    def seconds(self) -> float:
        """Seconds from the start to the stop (to now while it runs)."""
        return (self._clock() if self._stop is None else self._stop) - self._start

    def stop(self) -> float:
        """Stop (once; later calls keep the first stop) and return :attr:`seconds`."""
        if self._stop is None:
            self._stop = self._clock()
        return self.seconds

    def __enter__(self) -> Stopwatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stopwatch(clock: Clock = time.perf_counter) -> Stopwatch:
    """Time something once (a training run, a section of a script), started now.

    ``with stopwatch() as watch: ...`` then ``watch.seconds`` (stopped when the block ends, also when it
    raises); or ``watch = stopwatch()`` ... ``watch.seconds`` for a running total. For comparisons between
    implementations use :func:`time_interleaved` instead.
    """
    return Stopwatch(clock)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    warmup_fns: Mapping[str, Callable[[], Any]] | None = None,
    *,
    setup: Mapping[str, Callable[[], Any]] | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, dict]:
    """Time each function ``repeats`` times, round-robin with a rotating start, after warm-up calls.

    Round ``r`` calls the functions in their order rotated by ``r`` (``a b c``, ``b c a``, ``c a b``,
    ...), so none is always first after a pause, and load from other processes hits every function
    alike: ratios between them stay meaningful on a busy machine. ``warmup`` untimed rounds come first
    (in order); ``warmup_fns`` (if given) replaces the functions for them (e.g. a smaller size of the
    same code path when the real one takes tens of seconds). ``setup[name]`` (if given) runs untimed
    before every call of ``name``, warm-up included (e.g. writing a fresh gradient into ``.grad``).

    Returns ``{name: {"median", "min", "times", "cpu_median", "cpu_times"}}`` in seconds (``times`` in
    call order): wall time, and the CPU time of this process over the same calls (``time.process_time``:
    all its threads, not the time it waited for a core; on a machine with more runnable processes than
    cores the wall time includes that wait, the CPU time does not). With a fake ``clock`` the CPU times
    are still real.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(fns)
    setup = setup or {}
    unknown = set(setup) - set(names)
    if unknown:
        raise ValueError(f"setup names functions that are not timed: {sorted(unknown)}")

    def call(table: Mapping[str, Callable[[], Any]], name: str) -> None:
        if name in setup:
            setup[name]()
        table[name]()

    for _ in range(warmup):
        for name in names:
            call(warmup_fns or fns, name)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if name in setup:
                setup[name]()
            start_cpu = time.process_time()
            times[name].append(elapsed(fns[name], clock))
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"median": statistics.median(ts), "min": min(ts), "times": ts,
                   "cpu_median": statistics.median(cpu[name]), "cpu_times": cpu[name]}
            for name, ts in times.items()}


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1, **kwargs: Any) -> float:
    """Median wall time of ``fn`` alone: :func:`time_interleaved` with one function."""
    return time_interleaved({"fn": fn}, repeats, warmup, **kwargs)["fn"]["median"]


# ====================================================================== floors
def two_pass_floor(
    window: torch.Tensor, g: torch.Tensor | None = None, c: torch.Tensor | None = None,
    *, between: Callable[[], Any] | None = None,
) -> Callable[[], None]:
    """The floor of a sliding-window step: the two passes ``G @ g`` and ``G.T @ c`` over ``window``.

    ``window`` is the ``m x d`` buffer itself (a reference, not a copy: time the floor on the storage the
    step reads). ``g`` ``(d,)`` and ``c`` ``(m,)`` default to fixed random vectors of the window's dtype
    and device, drawn from a private generator (the global RNG is not touched). Time the returned callable
    with :func:`time_interleaved` next to the step it is the floor of. Memory-bound: ``2 m d`` elements
    read per call. ``between`` (if given) is called between the two passes, where a step does its
    ``m x m`` work: to price that work in place, after a pass has streamed the window through the caches.
    """
    m, d = window.shape
    gen = torch.Generator(device=window.device).manual_seed(0)
    opts = {"dtype": window.dtype, "device": window.device, "generator": gen}
    g = torch.randn(d, **opts) if g is None else g
    c = torch.randn(m, **opts) if c is None else c

    def floor() -> None:
        torch.mv(window, g)
        if between is not None:
            between()
        torch.mv(window.T, c)

    return floor


def static_build_floor(grads: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The parts of a static build's floor over ``grads`` ``(m, d)``, to time interleaved with the build.

    ``{"gram": G @ G.T, "trsm_left": L^{-1} G, "trsm_right": (G^T L^{-T}) as a right-sided solve}``
    with ``L`` the Cholesky factor of ``G G^T + m I`` (the Gram accumulated in float64 in one chunked
    pass, the factor cast to ``grads``' dtype; its values do not matter for the time). The floor is
    ``gram`` plus the faster triangular-solve layout: :func:`static_floor_seconds`.
    """
    from mfac.numerics import accumulated_matmul  # here: the llm-compressor peer's venv imports this module

    m = grads.shape[0]
    gram = accumulated_matmul(grads, grads.T)  # shape: (m, m), float64
    gram.diagonal().add_(m)
    factor = torch.linalg.cholesky(gram).to(grads.dtype)  # shape: (m, m)
    factor_t = factor.T.contiguous()
    return {
        "gram": lambda: grads @ grads.T,
        "trsm_left": lambda: torch.linalg.solve_triangular(factor, grads, upper=False),
        "trsm_right": lambda: torch.linalg.solve_triangular(factor_t, grads.T, upper=True, left=False),
    }


def static_floor_seconds(times: Mapping[str, Mapping[str, float]], stat: str = "median") -> float:
    """``gram`` plus the faster of ``trsm_left`` / ``trsm_right`` from :func:`time_interleaved`'s result."""
    return times["gram"][stat] + min(times["trsm_left"][stat], times["trsm_right"][stat])


# ====================================================================== memory
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


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn()`` once; return its result, its wall seconds and the peak RSS increase (bytes) during it.

    The peak is ``VmHWM`` after :func:`reset_peak` (``ru_maxrss`` where the reset is not possible, then an
    upper bound: the peak since the process started), minus the RSS before the call; never negative.
    """
    before = current_rss()
    ok = reset_peak()
    with stopwatch() as watch:
        out = fn()
    return out, watch.seconds, max(peak_rss(ok) - before, 0)


# ====================================================================== log records
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


class OpCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside the ``with`` block (``.count``).

    Each is one kernel launch on a GPU and a few us of dispatch and Python on a CPU, whatever the sizes:
    the count is a step's fixed cost, measured without a clock.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))
