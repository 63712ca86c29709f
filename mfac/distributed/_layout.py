"""How the ``d`` coordinates are cut over the ranks: :func:`shard_range` and :class:`ShardSpec`.

Setup only: a layout is computed once, when a sharded operator (or the optimizer's window) is built.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mfac.distributed._comm import _gather_rows, _rank_world
from mfac.numerics import check_positive_int

__all__ = ["ShardSpec", "shard_range"]


def shard_range(dim: int, rank: int, world_size: int, *, align: int = 1) -> tuple[int, int]:
    """Return the contiguous range ``[start, stop)`` of the ``d = dim`` coordinates ``rank`` holds.

    The ``ceil(d / align)`` units of ``align`` coordinates (the last one may be short) are dealt out as
    evenly as possible, the first ``units % world_size`` ranks getting one more. ``align = B`` keeps
    blocks of ``B`` whole on one rank (what a sharded block-diagonal operator needs).

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 4), (4, 7), (7, 10)]
    >>> [shard_range(10, r, 2, align=4) for r in range(2)]
    [(0, 8), (8, 10)]
    """
    check_positive_int(dim, "dim")
    check_positive_int(world_size, "world_size")
    check_positive_int(align, "align")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    units = math.ceil(dim / align)
    if units < world_size:
        raise ValueError(
            f"cannot cut d={dim} coordinates into {world_size} non-empty shards of whole units of "
            f"{align} (there are only {units} units)"
        )
    base, extra = divmod(units, world_size)
    first = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return first * align, min((first + count) * align, dim)


@dataclass(frozen=True)
class ShardSpec:
    """A partition of ``d`` coordinates into contiguous, non-empty, rank-ordered ranges; and our rank.

    Args:
        bounds: ``(0, b_1, ..., b_R = d)``, strictly increasing: rank ``r`` holds ``[b_r, b_{r+1})``.
        rank: this process's rank in its process group.

    Build it with :meth:`even` (DDP: cut ``d`` evenly, optionally in whole blocks), :meth:`from_sizes`,
    or :meth:`from_local_size` (FSDP: collective, from each rank's number of local coordinates).
    """

    bounds: tuple[int, ...]
    rank: int

    def __post_init__(self) -> None:
        bounds = tuple(int(b) for b in self.bounds)
        object.__setattr__(self, "bounds", bounds)
        if len(bounds) < 2 or bounds[0] != 0:
            raise ValueError(f"bounds must start at 0 and have at least 2 entries, got {bounds}")
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(
                f"bounds must be strictly increasing (every shard non-empty), got {bounds}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"rank must be an int, got {self.rank!r}")
        if not 0 <= self.rank < len(bounds) - 1:
            raise ValueError(f"rank must be in [0, {len(bounds) - 1}), got {self.rank}")

    @classmethod
    def even(cls, dim: int, rank: int, world_size: int, *, align: int = 1) -> ShardSpec:
        """Cut ``dim`` coordinates as evenly as possible (in units of ``align``): see :func:`shard_range`."""
        starts = [shard_range(dim, r, world_size, align=align)[0] for r in range(world_size)]
        return cls((*starts, dim), rank)

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], rank: int) -> ShardSpec:
        """Consecutive ranges of the given per-rank sizes (all >= 1)."""
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + int(size))
        return cls(tuple(bounds), rank)

    @classmethod
    def for_group(cls, dim: int, process_group: Any = None, *, align: int = 1) -> ShardSpec:
        """:meth:`even` over the ranks of ``process_group`` (no communication)."""
        rank, world = _rank_world(process_group)
        return cls.even(dim, rank, world, align=align)

    @classmethod
    def from_local_size(cls, size: int, process_group: Any = None) -> ShardSpec:
        """Build the layout where each rank holds its ``size`` local coordinates (FSDP; collective)."""
        rank, world = _rank_world(process_group)
        table = _gather_rows([float(size)], process_group, world)
        return cls.from_sizes([int(v) for v in table[:, 0].tolist()], rank)

    @property
    def dim(self) -> int:
        """``d``: the global number of coordinates."""
        return self.bounds[-1]

    @property
    def world_size(self) -> int:
        """``R``: the number of shards."""
        return len(self.bounds) - 1

    @property
    def start(self) -> int:
        """First global coordinate of this rank."""
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        """One past the last global coordinate of this rank."""
        return self.bounds[self.rank + 1]

    @property
    def size(self) -> int:
        """``d_r``: this rank's number of coordinates."""
        return self.stop - self.start

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every rank's number of coordinates."""
        return tuple(c - b for b, c in itertools.pairwise(self.bounds))

    @property
    def slice(self) -> slice:
        """``slice(start, stop)``."""
        return slice(self.start, self.stop)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """Return this rank's columns of ``full`` (shape ``(..., d)``): the view ``full[..., start:stop]``."""
        if full.shape[-1] != self.dim:
            raise ValueError(
                f"expected a tensor with d={self.dim} in its last dimension, got shape {tuple(full.shape)}"
            )
        return full[..., self.start : self.stop]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for checkpoints)."""
        return {"bounds": list(self.bounds), "rank": self.rank}



def _check_spec_for(spec: ShardSpec, rank: int, world: int) -> None:
    if spec.world_size != world:
        raise ValueError(f"shard has {spec.world_size} ranks, the process group {world}")
    if spec.rank != rank:
        raise ValueError(f"shard is for rank {spec.rank}, this process is rank {rank} of its group")


def _resolve_shard(shard: ShardSpec | int, rank: int, world: int) -> ShardSpec:
    if isinstance(shard, ShardSpec):
        _check_spec_for(shard, rank, world)
        return shard
    if isinstance(shard, bool) or not isinstance(shard, int):
        raise TypeError(
            f"shard must be a ShardSpec or the global d (an int), got {type(shard).__name__}"
        )
    return ShardSpec.even(shard, rank, world)


def _check_layout(what: str, table: torch.Tensor) -> None:
    """Every rank must hold the same bounds (columns ``[:-1]``) and its own rank (last column)."""
    bounds = table[:, :-1]
    if not bool((bounds == bounds[0]).all()):
        raise ValueError(
            f"{what}: ranks disagree on the shard layout: "
            + ", ".join(f"rank {r}: {bounds[r].long().tolist()}" for r in range(table.shape[0]))
        )
    ranks = table[:, -1].long().tolist()
    if ranks != list(range(table.shape[0])):
        raise ValueError(f"{what}: ranks report ranks {ranks}")


