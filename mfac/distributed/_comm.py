"""Collective plumbing of the sharded operators: process groups, agreement, communication counters.

Everything here runs at setup time (construction, ``load_state_dict``, ``check_consistency``,
:func:`~mfac.distributed.load_sharded`) except :class:`CommStats` bookkeeping, which every collective
of a step updates. :func:`_agree` is the one way ranks compare their settings: one small ``all_gather``
of a row of numbers per rank, after which every rank raises the same error or none does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["CommStats"]

#: dtypes a sharded operator may hold, by code (what :func:`_agree` sends for a dtype).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rank_world(process_group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` in ``process_group``; ``(0, 1)`` without an initialized default group."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _comm_device(process_group: Any) -> torch.device:
    """Where small metadata tensors go for a collective on ``process_group``."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(
    row: Sequence[float], process_group: Any, world: int, stats: CommStats | None = None
) -> torch.Tensor:
    """All-gather one float64 row per rank into a ``(world, len(row))`` CPU table."""
    mine = torch.tensor([float(v) for v in row], dtype=torch.float64)
    if world == 1:
        return mine.unsqueeze(0)
    device = _comm_device(process_group)
    mine = mine.to(device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=process_group)
    if stats is not None:
        stats.record("other", mine.numel() * mine.element_size() * world)
    return torch.stack(table).cpu()


def _fmt(value: float, decode: Callable[[float], str] | None) -> str:
    if decode is not None:
        return decode(value)
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _dtype_name(code: float) -> str:
    i = int(code)
    return str(_DTYPES[i]) if 0 <= i < len(_DTYPES) else f"<dtype code {i}>"


def _agree(
    what: str,
    error: BaseException | None,
    same: Mapping[str, tuple[float, Callable[[float], str] | None]],
    per_rank: Sequence[float],
    process_group: Any,
    world: int,
    stats: CommStats | None,
) -> torch.Tensor:
    """One all-gather of ``[ok, *same values, *per_rank]``; raise on every rank if anything is off.

    A rank whose local checks failed (``error``) raises its own error, after telling the others, which
    raise a ``RuntimeError`` naming it: nobody is left waiting in a later collective. Values in
    ``same`` must agree exactly across ranks (``ValueError`` listing every rank's value otherwise).

    Returns:
        The ``(world, len(per_rank))`` table of the per-rank values.
    """
    names = list(same)
    row = [0.0 if error is not None else 1.0, *(same[k][0] for k in names), *per_rank]
    table = _gather_rows(row, process_group, world, stats)
    if error is not None:
        raise error
    failed = [r for r in range(world) if table[r, 0].item() != 1.0]
    if failed:
        raise RuntimeError(
            f"{what}: rank(s) {failed} failed their local checks (see the error raised there); "
            "every rank stopped here"
        )
    for j, name in enumerate(names, start=1):
        column = table[:, j]
        if not bool((column == column[0]).all()):
            decode = same[name][1]
            listing = ", ".join(
                f"rank {r}: {_fmt(v, decode)}" for r, v in enumerate(column.tolist())
            )
            raise ValueError(
                f"{what}: ranks disagree on {name} ({listing}); it must be equal on all"
            )
    return table[:, 1 + len(names) :]



# ------------------------------------------------------------------------------- communication stats
@dataclass
class CommStats:
    """What an operator sent through collectives (per rank; reset with :meth:`reset`).

    ``allreduce_*``: the per-step traffic (``G x`` partials, the Gram matrix): ``bytes`` is the payload
    each rank contributes, ``numel * element_size`` (a ring all-reduce moves about ``2 (R-1)/R`` times
    that over each rank's link). ``other_*``: setup, checkpoint and ``submatrix`` traffic.
    """

    allreduce_calls: int = 0
    allreduce_bytes: int = 0
    allreduce_numel: int = 0
    allreduce_max_numel: int = 0
    other_calls: int = 0
    other_bytes: int = 0

    def record(self, kind: Literal["allreduce", "other"], nbytes: int, numel: int = 0) -> None:
        """Count one collective of ``nbytes`` payload bytes."""
        if kind == "allreduce":
            self.allreduce_calls += 1
            self.allreduce_bytes += int(nbytes)
            self.allreduce_numel += int(numel)
            self.allreduce_max_numel = max(self.allreduce_max_numel, int(numel))
        else:
            self.other_calls += 1
            self.other_bytes += int(nbytes)

    def reset(self) -> None:
        """Zero all counters."""
        self.allreduce_calls = self.allreduce_bytes = self.allreduce_numel = 0
        self.allreduce_max_numel = self.other_calls = self.other_bytes = 0



def _dtype_code(dtype: Any) -> float:
    return float(_DTYPES.index(dtype)) if dtype in _DTYPES else -1.0
