"""What produced a result: one run record (environment, code version, date, command line) for every script.

Each script stores :meth:`RunRecord.finish` under ``"meta"`` in its JSON, next to its own settings::

    record = RunRecord(argv)          # at the start: date, argv, commit, load average before
    ...                               # the run
    meta = record.finish(quick=args.quick, repeats=args.repeats)   # seconds, load average after

Fields: ``date`` (UTC, ISO 8601), ``argv``, ``commit`` (short hash of ``HEAD``, or ``"unknown"`` outside
a git checkout), ``dirty`` (the top-level paths with uncommitted changes to tracked files, ``[]`` when
clean: the code measured is the code imported, which may differ from ``commit``), ``python``, ``torch``,
``threads`` (torch intra-op threads when the run finished), ``cpu`` (model name), ``cpu_count``,
``machine``, ``platform``, ``load_avg_before`` / ``load_avg_after`` (1, 5, 15 min), ``seconds``.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments._measure import stopwatch

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, text=True, capture_output=True, check=True,
                              timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return done.stdout


def git_state() -> tuple[str, list[str]]:
    """``(short HEAD hash or "unknown", sorted top-level paths with uncommitted tracked changes)``."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown", []
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    dirty = set()
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        dirty.add(path.split("/")[0])
    return head.strip(), sorted(dirty)


def commit_label(meta: dict[str, Any]) -> str:
    """``"abc1234"``, or ``"abc1234 +dirty (experiments, mfac)"`` when the checkout had changes."""
    dirty = meta.get("dirty") or []
    return meta["commit"] + (f" +dirty ({', '.join(dirty)})" if dirty else "")


def load_label(meta: dict[str, Any], when: str) -> str:
    """The 1-minute load average ``when`` (``"before"`` / ``"after"``) the run, from a run record."""
    load = meta.get(f"load_avg_{when}")
    return "-" if not load else f"{load[0]:.1f}"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    """The software and machine a result comes from (no timing, no command line)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


class RunRecord:
    """The run record of one script run: start it first, :meth:`finish` it when the results are in."""

    def __init__(self, argv: Sequence[str] | None = None) -> None:
        commit, dirty = git_state()  # the code measured is the code imported now
        self.meta: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "commit": commit,
            "dirty": dirty,
            "load_avg_before": _load(),
        }
        self._watch = stopwatch()

    @property
    def seconds(self) -> float:
        """Seconds since the record was started (progress lines)."""
        return self._watch.seconds

    def finish(self, **settings: Any) -> dict[str, Any]:
        """The record with the environment, the run's duration and ``settings`` (the script's own)."""
        meta = {**self.meta, **environment(), "load_avg_after": _load(),
                "seconds": self.seconds}
        clash = set(settings) & set(meta)
        if clash:
            raise ValueError(f"settings may not overwrite the record's own fields: {sorted(clash)}")
        return {**meta, **settings}
