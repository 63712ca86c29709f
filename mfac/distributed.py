r"""The ``m x d`` gradient window sharded over ``torch.distributed`` ranks: only ``m``-sized data crosses.

Each rank holds a slice of the ``d`` coordinates of every stored gradient (``G = [G_0 | G_1 | ...]``,
rank ``r`` holds the ``(m, d_r)`` block ``G_r``). The operators' only contractions over ``d`` that feed the
``m x m`` system (:meth:`~mfac.fisher.base.InverseFisher._reduce`) become local partial products plus one
``all_reduce`` of an ``m``-vector (or, once per static build, of the ``m x m`` Gram matrix)::

    G x     = sum_r G_r x_r                 local (m, k) partial products, one all-reduce of m * k floats
    G G^T   = sum_r G_r G_r^T               static build: one all-reduce of m * m floats
    G^T c   = [G_0^T c | G_1^T c | ...]      purely local: rank r computes its own slice
    diag(F^{-1}), the m x m work            local (diag) / replicated (the float64 m x m algebra)

The ``m x m`` algebra (Gram updates, Cholesky, rank-one corrections) is replicated: every rank gets the
same all-reduced inputs and runs the same deterministic float64 code, so no rank waits for another and
nothing ``d``-sized is ever communicated. Memory per rank: ``m * d_r * bytes`` for the window (``1/R`` of
the single-process one) plus the replicated ``2 m^2 * 8`` bytes.

Which coordinates a rank holds does not matter for the math (``F^{-1}`` commutes with permutations of the
coordinates), only that the ranks' coordinates partition the ``d`` of the model. :class:`ShardSpec`
describes the partition as contiguous ranges in rank order of one global coordinate vector:

* **DDP** (every rank has the whole all-reduced gradient): rank ``r`` keeps ``shard.take(flat_grad)``, the
  range ``[start, stop)`` of :meth:`ShardSpec.even` (uneven by at most one coordinate, or one block).
* **FSDP** (``fully_shard``: parameters are ``DTensor`` s, each rank owns a shard of each): rank ``r``
  keeps the concatenation of its local shards (:func:`local_tensor`, :func:`local_flat`), and the global
  vector is these concatenations in rank order (:meth:`ShardSpec.from_local_size`).

Collectives: every public method that contracts over ``d`` (``mul``, ``update``, ``update_mul``,
``submatrix``, ``to_dense``, ``check_consistency``, ``load_state_dict``) and the constructors are
collective: all ranks of the group must call them in the same order with the same shapes. ``diag`` and
``state_dict`` are local. Construction and ``load_state_dict`` gather every rank's settings first (one
small ``all_gather``) and raise the same ``ValueError`` on every rank when they disagree (``ngrads``,
``damp``, dtype, the shard layout, the checkpoint's step), so a mistake never turns into a hang. A
non-finite gradient on any rank makes ``update`` raise on every rank, with every window left untouched
(detected from the all-reduced ``G g`` itself: no extra communication).

Without an initialized process group (and ``process_group=None``) everything runs as a world of one rank.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from mfac.fisher.base import check_grads
from mfac.fisher.sliding import SlidingInverseFisher
from mfac.fisher.static import StaticInverseFisher
from mfac.numerics import (
    DEFAULT_CHUNK,
    SMALL_DTYPE,
    check_damp,
    check_positive_int,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CommStats",
    "DistributedWindow",
    "ShardSpec",
    "ShardedSlidingInverseFisher",
    "ShardedStaticInverseFisher",
    "consolidate_state_dicts",
    "gather_full",
    "load_sharded",
    "local_flat",
    "local_tensor",
    "save_sharded",
    "shard_range",
    "shard_state_dict",
    "state_nbytes",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AVERAGE_OVER = ("seen", "ngrads")


# ---------------------------------------------------------------------------------------------- layout
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


# ------------------------------------------------------------------------------------ process groups
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


class _NonFiniteSum(RuntimeError):
    """The all-reduced ``G g`` of an update is not finite: some rank's gradient shard is not."""


# ------------------------------------------------------------------------------ the sharded operators
class _Sharded:
    """What the sharded operators share: the group, the all-reduce hook, global indices, counters."""

    _shard: ShardSpec
    _group: Any
    _world: int
    comm: CommStats
    _guard_nonfinite: bool = False

    def _init_group(self, process_group: Any) -> tuple[int, int]:
        self._group = process_group
        rank, self._world = _rank_world(process_group)
        #: counters of this rank's collectives (see :class:`CommStats`).
        self.comm = CommStats()
        self._guard_nonfinite = False
        return rank, self._world

    # -------------------------------------------------------------- properties
    @property
    def shard(self) -> ShardSpec:
        """The layout of the coordinates over the ranks, and this rank's part."""
        return self._shard

    @property
    def global_dim(self) -> int:
        """``d``: the number of coordinates over all ranks (``dim`` is this rank's ``d_r``)."""
        return self._shard.dim

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` process group (None: the default group, or a world of one)."""
        return self._group

    # -------------------------------------------------------------- collectives
    def _all_reduce(self, tensor: torch.Tensor, kind: Literal["allreduce", "other"]) -> None:
        if self._world == 1:
            return
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group)
        if buf is not tensor:
            tensor.copy_(buf)
        self.comm.record(kind, tensor.numel() * tensor.element_size(), tensor.numel())

    def _reduce(self, partial: torch.Tensor) -> None:
        """Sum the partial ``G_r x_r`` (an ``m``-sized vector or ``m x m`` matrix) over the ranks."""
        self._all_reduce(partial, "allreduce")
        if self._guard_nonfinite and not bool(torch.isfinite(partial).all()):
            raise _NonFiniteSum

    # -------------------------------------------------------------- global views
    def _check_global_index(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.dtype in (torch.bool, torch.uint8) or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"idx must be an integer index tensor, got dtype {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
        d = self._shard.dim
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
            raise IndexError(
                f"idx (global coordinates) must lie in [0, {d}), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        return idx.to(device=self._device, dtype=torch.long)

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """Return ``F^{-1}[idx][:, idx]`` for *global* coordinates ``idx`` on every rank (collective).

        Every rank must pass the same ``idx``. Communication: one all-reduce of ``m * s`` (or ``s * s``)
        floats for ``s = len(idx)``. Shape ``(s, s)``.
        """
        return self._global_submatrix(self._check_global_index(idx))

    def to_dense(self) -> torch.Tensor:
        """Return ``F^{-1}`` as an explicit ``(d, d)`` matrix on every rank (collective; tiny ``d``)."""
        return self._global_submatrix(
            torch.arange(self._shard.dim, device=self._device, dtype=torch.long)
        )

    def to_scipy(self):
        """Not available for a sharded operator: its vectors live on several processes."""
        raise NotImplementedError(
            "a sharded operator has no scipy view (its vectors are spread over ranks); use mul() on "
            "the local slices, or to_dense() for tiny d"
        )

    def _local_part(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions in ``idx`` of the coordinates this rank holds, and their local indices."""
        start, stop = self._shard.start, self._shard.stop
        owned = ((idx >= start) & (idx < stop)).nonzero().squeeze(1)
        return owned, idx[owned] - start

    def _cols_all_ranks(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``rows[:, idx]`` for global ``idx`` (rows: this rank's ``(n, d_r)``), summed over ranks."""
        owned, local = self._local_part(idx)
        cols = torch.zeros(rows.shape[0], idx.numel(), dtype=rows.dtype, device=rows.device)
        cols[:, owned] = rows[:, local]
        self._all_reduce(cols, "other")
        return cols

    def _global_submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _group_solve(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "group_solve is not available for a sharded operator (its groups would span ranks); use "
            "submatrix() of each group's global coordinates"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self._dim} of {self._shard.dim}, rank={self._shard.rank}/"
            f"{self._shard.world_size}, ngrads={self.ngrads}, damp={self._damp:g}, dtype={self._dtype}, "
            f"device={self._device})"
        )


def _dtype_code(dtype: Any) -> float:
    return float(_DTYPES.index(dtype)) if dtype in _DTYPES else -1.0


class ShardedSlidingInverseFisher(_Sharded, SlidingInverseFisher):
    r"""The sliding window of :class:`~mfac.fisher.sliding.SlidingInverseFisher` with ``G`` column-sharded.

    Rank ``r`` stores ``G_r``, its ``d_r`` columns of the last ``m`` gradients; the vectors it takes and
    returns (``update(g)``, ``update_mul(g)``, ``mul(x)``, ``diag()``) are its slices of the global ones,
    of length ``dim = d_r``. ``F^{-1}`` is the one of the global window: results equal the single-process
    operator's slices up to the summation order of ``G x``.

    Args:
        shard: a :class:`ShardSpec`, or the global ``d`` (an int) to cut evenly over the group.
        ngrads: ``m``; equal on every rank.
        damp: ``lambda > 0``; equal on every rank.
        process_group: the ``torch.distributed`` group (None: the default one, or a world of one when
            torch.distributed is not initialized).
        dtype, device, average_over, chunk: as for ``SlidingInverseFisher`` (dtype and average_over
            equal on every rank).

    Communication per ``update_mul``: one all-reduce of ``n <= m`` float64 (``G g``); per ``mul`` of
    ``k`` vectors: one all-reduce of ``n * k`` float64. Nothing else; never anything ``d``-sized.
    Memory per rank: ``m * d_r * bytes(dtype)`` + ``2 m^2 * 8`` bytes.

    Construction is collective and checks that all ranks agree on ``ngrads``, ``damp``, ``dtype``,
    ``average_over`` and the layout (``ValueError`` on every rank otherwise).
    """

    def __init__(
        self,
        shard: ShardSpec | int,
        ngrads: int,
        damp: float,
        *,
        process_group: Any = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        average_over: Literal["seen", "ngrads"] = "seen",
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        rank, world = self._init_group(process_group)
        error: BaseException | None = None
        try:
            spec = _resolve_shard(shard, rank, world)
            SlidingInverseFisher.__init__(
                self,
                spec.size,
                ngrads,
                damp,
                dtype=dtype,
                device=device,
                average_over=average_over,
                chunk=chunk,
            )
            self._shard = spec
        except (TypeError, ValueError, MemoryError) as err:
            error = err
        ok = error is None
        same = {
            "ngrads": (float(self._m) if ok else -1.0, None),
            "damp": (self._damp if ok else -1.0, None),
            "dtype": (_dtype_code(dtype), _dtype_name),
            "average_over": (
                float(_AVERAGE_OVER.index(average_over)) if ok else -1.0,
                lambda v: repr(_AVERAGE_OVER[int(v)]) if 0 <= v < len(_AVERAGE_OVER) else "?",
            ),
            "world_size": (float(world), None),
        }
        bounds = list(self._shard.bounds) if ok else [-1.0] * (world + 1)
        table = _agree(
            "ShardedSlidingInverseFisher",
            error,
            same,
            [*bounds, float(rank)],
            process_group,
            world,
            self.comm,
        )
        _check_layout("ShardedSlidingInverseFisher", table)

    # -------------------------------------------------------------- updates (collective)
    def update(self, grad: torch.Tensor) -> None:
        """Add this rank's slice (shape ``(d_r,)``) of the newest gradient (collective).

        A NaN or inf on any rank raises ``ValueError`` on every rank and leaves every window untouched.
        """
        self._check_vector(grad, "grad")
        self._guarded_update(grad)

    def update_mul(self, grad: torch.Tensor) -> torch.Tensor:
        """Add this rank's slice of ``g``, return its slice of ``F^{-1} g`` (``(d_r,)``; collective)."""
        self._check_vector(grad, "grad")
        coeff = self._guarded_update(grad) * self.scale  # (n,) float64, replicated
        return coeff.to(self._dtype) @ self._grads[: self.num_stored]

    def _guarded_update(self, grad: torch.Tensor) -> torch.Tensor:
        """``_update`` with a global finiteness check folded into its one all-reduce.

        ``(G g)[r] = sum over ranks of |g_r|^2`` is finite on every rank iff every rank's ``g_r`` is;
        ``_update`` all-reduces it before it touches the Gram matrix, so on failure only the ring row and
        the counter need restoring (the row is copied first: one ``d_r`` copy per step, which replaces
        the local finiteness pass of the single-process ``update``).
        """
        row = self.next_row
        saved = self._grads[row].clone()
        seen = self._num_seen
        self._guard_nonfinite = True
        try:
            return self._update(grad)
        except _NonFiniteSum:
            self._grads[row].copy_(saved)
            self._num_seen = seen
            nan, inf = int(torch.isnan(grad).sum()), int(torch.isinf(grad).sum())
            raise ValueError(
                "grad must be finite on every rank: the all-reduced G g of this update is not "
                f"(this rank's slice has {nan} NaN and {inf} inf entries); every rank's window was "
                "left untouched"
            ) from None
        finally:
            self._guard_nonfinite = False

    # -------------------------------------------------------------- global views
    def _global_submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        n = self.num_stored
        same = (idx[:, None] == idx[None, :]).to(self._dtype)
        if n == 0:
            return same / self._damp
        cols = self._cols_all_ranks(self._grads[:n].to(SMALL_DTYPE), idx)  # (n, s)
        inner = cols.T @ self._inv[:n, :n] @ cols
        return (same - inner.to(self._dtype)) / self._damp

    # -------------------------------------------------------------- consistency
    def _replicated_facts(self) -> dict[str, float]:
        n = self.num_stored
        return {
            "num_seen": float(self._num_seen),
            "since_refactor": float(self._since_refactor),
            "jitter": float(self._jitter),
            "Gram checksum": float(self._gram[:n, :n].sum().item()),
            "inverse checksum": float(self._inv[:n, :n].sum().item()),
        }

    def check_consistency(self) -> None:
        """Check that the replicated ``m x m`` state agrees (collective; ``ValueError`` on every rank).

        Compares ``num_seen``, the refactor counter, the jitter and checksums of the Gram matrix and of
        its inverse across ranks (exact equality: the replicated work is deterministic).
        """
        same = {k: (v, None) for k, v in self._replicated_facts().items()}
        _agree("check_consistency", None, same, [], self._group, self._world, self.comm)

    # -------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Return this rank's state: its ``(m, d_r)`` window slice, the ``m x m`` state, the layout."""
        return {**SlidingInverseFisher.state_dict(self), "shard": self._shard.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's :meth:`state_dict` (collective: all ranks must load the same step).

        Checks, on every rank before anything changes: the saved layout equals this operator's (bounds
        and rank; see :func:`consolidate_state_dicts` / :func:`shard_state_dict` to reshard), the
        settings and shapes match, and all ranks' checkpoints agree on the step and the replicated
        ``m x m`` state. Any failure raises on every rank and leaves every operator untouched.
        """
        error: BaseException | None = None
        facts = dict.fromkeys(("num_seen", "since_refactor", "jitter", "Gram checksum"), -1.0)
        try:
            saved = state.get("shard")
            if saved is None:
                raise KeyError(
                    "state_dict has no 'shard' entry: it was not saved by a sharded operator (use "
                    "shard_state_dict() to cut a single-process state into shards)"
                )
            saved_spec = (tuple(saved["bounds"]), int(saved["rank"]))
            if saved_spec != (self._shard.bounds, self._shard.rank):
                raise ValueError(
                    f"state_dict was saved by rank {saved_spec[1]} of the layout {list(saved_spec[0])}; "
                    f"this is rank {self._shard.rank} of {list(self._shard.bounds)} (reshard with "
                    "consolidate_state_dicts() and shard_state_dict())"
                )
            _check_sliding_state(state, self)
            n = min(int(state["num_seen"]), self._m)
            facts = {
                "num_seen": float(state["num_seen"]),
                "since_refactor": float(state["since_refactor"]),
                "jitter": float(state.get("jitter", 0.0)),
                "Gram checksum": float(state["gram"][:n, :n].to(SMALL_DTYPE).sum().item()),
            }
        except (KeyError, TypeError, ValueError) as err:
            error = err
        same = {k: (v, None) for k, v in facts.items()}
        _agree("load_state_dict", error, same, [], self._group, self._world, self.comm)
        SlidingInverseFisher.load_state_dict(self, state)


class ShardedStaticInverseFisher(_Sharded, StaticInverseFisher):
    r"""The static operator of :class:`~mfac.fisher.static.StaticInverseFisher` with ``G`` column-sharded.

    Args:
        grads: this rank's columns ``G_r`` of the ``m`` gradients, shape ``(m, d_r)`` (``m`` equal on
            every rank, dtype too).
        damp: ``lambda > 0``; equal on every rank.
        shard: the layout; None (default) takes the ranks' columns in rank order (one all-gather of
            the sizes). Given, it must match every rank's ``d_r``.
        process_group: the ``torch.distributed`` group (see :class:`ShardedSlidingInverseFisher`).
        block_size: ``B``. None (or ``B >= d``): the full operator, always built by the Woodbury route
            (``M = m damp I + G G^T`` from one all-reduce of ``m x m`` floats, ``Q_r = L^{-1} G_r`` local),
            even where a single process would invert a ``d x d`` block directly (``d <= m``): that route
            would need ``d``-sized communication. ``B < d``: the block-diagonal operator; then every
            block must lie on one rank (shard boundaries at multiples of ``B``: use
            ``ShardSpec.even(d, rank, R, align=B)``), and each rank builds its blocks alone, with no
            communication at all (``ValueError`` on every rank otherwise).
        overwrite, chunk: as for ``StaticInverseFisher``.

    Communication: build one all-reduce of ``m^2`` floats; ``mul`` of ``k`` vectors one all-reduce of
    ``m * k`` floats (full operator); block-diagonal: none. Memory per rank: ``m * d_r`` (Woodbury) or
    ``d_r * B`` (direct blocks) entries plus ``m^2`` float64 per block.
    """

    def __init__(
        self,
        grads: torch.Tensor,
        damp: float,
        *,
        shard: ShardSpec | None = None,
        process_group: Any = None,
        block_size: int | None = None,
        overwrite: bool = False,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        rank, world = self._init_group(process_group)
        error: BaseException | None = None
        m = local = -1
        dtype = None
        try:
            grads = check_grads(grads, "grads (this rank's columns)")
            damp = check_damp(damp)
            if block_size is not None:
                check_positive_int(block_size, "block_size")
            m, local = grads.shape
            dtype = grads.dtype
            if shard is not None:
                if not isinstance(shard, ShardSpec):
                    raise TypeError(
                        f"shard must be a ShardSpec or None, got {type(shard).__name__}"
                    )
                _check_spec_for(shard, rank, world)
                if shard.size != local:
                    raise ValueError(
                        f"shard says rank {rank} holds {shard.size} coordinates, its grads have {local} "
                        "columns"
                    )
        except (TypeError, ValueError) as err:
            error = err
        ok = error is None
        same = {
            "ngrads (rows of grads)": (float(m), None),
            "damp": (float(damp) if ok else -1.0, None),
            "dtype": (_dtype_code(dtype), _dtype_name),
            "block_size": (float(block_size) if ok and block_size is not None else 0.0, None),
            "whether a shard is given": (float(shard is not None), None),
        }
        given = list(shard.bounds) if ok and shard is not None else [-1.0] * (world + 1)
        table = _agree(
            "ShardedStaticInverseFisher",
            error,
            same,
            [float(local), *given],
            process_group,
            world,
            self.comm,
        )
        sizes = [int(v) for v in table[:, 0].tolist()]
        if min(sizes) < 1:
            raise ValueError(f"every rank must hold at least one coordinate, got sizes {sizes}")
        spec = ShardSpec.from_sizes(sizes, rank)
        if shard is not None and any(
            tuple(int(v) for v in table[r, 1:].tolist()) != spec.bounds for r in range(world)
        ):
            raise ValueError(
                f"ranks passed shard layouts {[table[r, 1:].long().tolist() for r in range(world)]}; "
                f"their grads give {list(spec.bounds)}: they must all be equal"
            )
        self._shard = spec
        d = spec.dim
        #: True for the full operator (sharded Woodbury), False for whole blocks on each rank.
        self.full = block_size is None or block_size >= d
        if not self.full:
            misaligned = [r for r, b in enumerate(spec.bounds[:-1]) if b % block_size]
            if misaligned:
                raise ValueError(
                    f"block_size={block_size} needs every shard to start at a multiple of it (a block "
                    f"must lie on one rank); the layout {list(spec.bounds)} does not at rank(s) "
                    f"{misaligned}: use ShardSpec.even(d, rank, world_size, align={block_size})"
                )
        StaticInverseFisher.__init__(
            self,
            grads,
            damp,
            block_size=None if self.full else block_size,
            overwrite=overwrite,
            chunk=chunk,
        )

    def _use_direct_route(self, block: int, m: int) -> bool:
        # full operator: Woodbury always (its contractions over d are m-sized); whole local blocks:
        # whatever a single process would do with them.
        return False if self.full else super()._use_direct_route(block, m)

    def _reduce(self, partial: torch.Tensor) -> None:
        if self.full:
            super()._reduce(partial)
        # block-diagonal: every block is on one rank, so its Gram matrix and Q x are local.

    @property
    def block_size(self) -> int:
        """``B`` (``d``, the global one, for the full operator)."""
        return self._shard.dim if self.full else self._block

    def _global_submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        s = idx.numel()
        same = (idx[:, None] == idx[None, :]).to(self._dtype)
        if self.route == "empty":
            return same / self._damp
        if self.full:
            cols = self._cols_all_ranks(self._q[0], idx)  # (m, s)
            return (same - cols.T @ cols) / self._damp
        # blocks: entries between coordinates of different ranks are in different blocks (zero)
        owned, local = self._local_part(idx)
        out = torch.zeros(s, s, dtype=self._dtype, device=self._device)
        if owned.numel():
            out[owned[:, None], owned[None, :]] = StaticInverseFisher._submatrix(self, local)
        self._all_reduce(out, "other")
        return out

    def check_consistency(self) -> None:
        """Check that the replicated state agrees (collective; ``ValueError`` on every rank)."""
        same = {
            "ngrads": (float(self._ngrads), None),
            "jitter": (float(self.jitter), None),
            "route": (
                float(("empty", "direct", "woodbury").index(self.route)) if self.full else 0.0,
                None,
            ),
        }
        _agree("check_consistency", None, same, [], self._group, self._world, self.comm)


# ------------------------------------------------------------------------------- optimizer placement
class DistributedWindow:
    r"""Where an M-FAC optimizer's window lives: sharded over the ranks of a process group.

    The optimizer keeps its math; it asks this object for three things (see :mod:`mfac.optim`):
    :meth:`local` (the part of a parameter or gradient this rank works on), :meth:`new_fisher` (the
    window over the flat vector of those parts) and :meth:`update_mul` (add the flat gradient, return
    the flat step), plus :meth:`all_finite` (one agreed answer for the non-finite-gradient rule).

    Args:
        process_group: the group (None: the default one; a world of one without torch.distributed).
        params: how the parameters are placed:

            * ``"replicated"`` (DDP): every rank has every parameter and the all-reduced gradient. The
              optimizer's flat vector has all ``d`` coordinates; the window keeps this rank's slice
              (:meth:`ShardSpec.even`); the step's slice is all-gathered so that every replica takes
              the same step (``d`` floats per step, as ZeRO-1 does; the window itself only all-reduces
              ``m`` floats).
            * ``"sharded"`` (FSDP2 ``fully_shard``): parameters are ``DTensor`` s; each rank works on
              its local shards only (:func:`local_tensor`), whose concatenation is its slice of the
              window (:meth:`ShardSpec.from_local_size`). Nothing ``d``-sized is communicated.
            * ``"auto"`` (default): ``"sharded"`` if the parameters are ``DTensor`` s, else
              ``"replicated"``.
    """

    _MODES = ("auto", "replicated", "sharded")

    def __init__(self, process_group: Any = None, *,
                 params: Literal["auto", "replicated", "sharded"] = "auto") -> None:
        if params not in self._MODES:
            raise ValueError(f"params must be one of {self._MODES}, got {params!r}")
        self.process_group = process_group
        self.params = params
        #: the resolved placement (``"replicated"`` or ``"sharded"``) once a window exists.
        self.mode: str | None = None
        #: counters of the collectives issued outside the operator (step gathers, finiteness votes).
        self.comm = CommStats()

    def __repr__(self) -> str:
        return f"DistributedWindow(params={self.params!r}, mode={self.mode!r})"

    @staticmethod
    def local(tensor: torch.Tensor) -> torch.Tensor:
        """Return the part of ``tensor`` this rank works on (:func:`local_tensor`)."""
        return local_tensor(tensor)

    def _resolve(self, params: Sequence[torch.Tensor]) -> str:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - torch without DTensor
            DTensor = ()
        kinds = {isinstance(p, DTensor) for p in params}
        if len(kinds) > 1:
            raise ValueError(
                "the parameters mix DTensors (FSDP-sharded) and plain tensors; one M-FAC window "
                "needs them all sharded (fully_shard the whole model) or all replicated (DDP)"
            )
        sharded = kinds == {True}
        if self.params == "replicated" and sharded:
            raise ValueError("params='replicated' but the parameters are DTensors (FSDP)")
        if self.params == "sharded" and not sharded:
            logger.debug("params='sharded' with plain tensors: each rank's tensors are its shard")
            return "sharded"
        return "sharded" if sharded else "replicated"

    def new_fisher(
        self,
        dim: int,
        ngrads: int,
        damp: float,
        *,
        params: Sequence[torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str | None,
        average_over: Literal["seen", "ngrads"] = "seen",
        chunk: int = DEFAULT_CHUNK,
    ) -> ShardedSlidingInverseFisher:
        """Build the window (collective) over the optimizer's flat vector of ``dim`` coordinates.

        ``dim`` is ``d`` (replicated: the flat vector holds every coordinate) or this rank's count of
        local coordinates (sharded); ``params`` are the parameters behind them (for ``"auto"``).
        """
        mode = self._resolve(params)
        if mode == "replicated":
            shard = ShardSpec.for_group(dim, self.process_group)
        else:
            shard = ShardSpec.from_local_size(dim, self.process_group)
        fisher = ShardedSlidingInverseFisher(
            shard, ngrads, damp, process_group=self.process_group, dtype=dtype, device=device,
            average_over=average_over, chunk=chunk,
        )
        self.mode = mode
        return fisher

    def update_mul(self, fisher: ShardedSlidingInverseFisher, flat: torch.Tensor) -> torch.Tensor:
        """Add the flat gradient to ``fisher`` and return the flat ``F^{-1} g`` (collective).

        Replicated: ``flat`` has ``d`` coordinates; this rank adds its slice and all-gathers the step.
        Sharded: ``flat`` is this rank's slice and so is the step.
        """
        if self.mode == "replicated":
            shard = fisher.shard
            step = fisher.update_mul(shard.take(flat))
            return gather_full(step, shard, process_group=self.process_group, stats=self.comm)
        return fisher.update_mul(flat)

    def all_finite(self, flat: torch.Tensor) -> bool:
        """Whether the flat gradient is finite on every rank (collective: one all-reduce of 1 float).

        Every rank gets the same answer, so every rank skips (or raises) together.
        """
        ok = torch.tensor([1.0 if bool(torch.isfinite(flat).all()) else 0.0], device=flat.device)
        if _rank_world(self.process_group)[1] > 1:
            ok = ok.to(_comm_device(self.process_group))
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.process_group)
            self.comm.record("other", ok.element_size())
        return bool(ok.item() == 1.0)


# ------------------------------------------------------------------------------------- helpers
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


def _check_sliding_state(state: Mapping[str, Any], op: SlidingInverseFisher) -> None:
    """Make the checks ``SlidingInverseFisher.load_state_dict`` makes, without changing anything.

    Local only (no collective): every rank reports its error to the others through ``_agree`` first.
    """
    op._check_state_local(state)  # keys, counters, finiteness, shapes (ValueError)
    mine_settings = (
        ("dim", op.dim),
        ("ngrads", op.ngrads),
        ("damp", op.damp),
        ("average_over", op.average_over),
    )
    for key, mine in mine_settings:
        if key not in state:
            raise KeyError(f"state_dict is missing {key!r}")
        if state[key] != mine:
            raise ValueError(f"state_dict has {key}={state[key]!r}, this operator {key}={mine!r}")
    m, d = op.ngrads, op.dim
    for key, shape in (("grads", (m, d)), ("gram", (m, m)), ("inv", (m, m))):
        if key not in state:
            raise KeyError(f"state_dict is missing {key!r}")
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {tuple(state[key].shape)}, expected {shape}"
            )
    for key in ("num_seen", "since_refactor"):
        if key not in state:
            raise KeyError(f"state_dict is missing {key!r}")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return this rank's part of ``tensor``.

    The local shard of a ``DTensor`` (FSDP2 ``fully_shard`` parameters and gradients; a view that shares
    its storage), else the tensor itself (DDP, FSDP1 flat parameters, plain tensors).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return tensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_flat(
    tensors: Iterable[torch.Tensor | None],
    *,
    dtype: torch.dtype | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Concatenate the local parts (:func:`local_tensor`) of ``tensors``, flattened, into one vector.

    A None entry (a parameter without gradient) contributes zeros, which needs ``sizes`` (the local
    numel of each entry). This is rank ``r``'s slice of the FSDP global vector (see the module docs).
    """
    parts = []
    for t in tensors:
        if t is None:
            if sizes is None:
                raise ValueError("a None tensor needs `sizes` to know how many zeros it stands for")
            parts.append(None)
            continue
        parts.append(local_tensor(t).reshape(-1))
    dtype = dtype or next((p.dtype for p in parts if p is not None), torch.float32)
    device = next((p.device for p in parts if p is not None), torch.device("cpu"))
    out = [
        torch.zeros(int(sizes[i]), dtype=dtype, device=device) if p is None else p.to(dtype)
        for i, p in enumerate(parts)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=device)


def gather_full(
    local: torch.Tensor,
    shard: ShardSpec,
    *,
    process_group: Any = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Assemble the whole ``(d,)`` vector from every rank's ``(d_r,)`` slice (collective).

    This *is* ``d``-sized communication (an all-gather of ``d`` floats): the operators never need it;
    a DDP optimizer does, to apply a sharded update to replicated parameters (as ZeRO-1 does).
    """
    if local.shape != (shard.size,):
        raise ValueError(f"local must have shape ({shard.size},), got {tuple(local.shape)}")
    if shard.world_size == 1:
        return local.clone()
    width = max(shard.sizes)
    padded = torch.zeros(width, dtype=local.dtype, device=local.device)
    padded[: shard.size] = local
    parts = [torch.empty_like(padded) for _ in range(shard.world_size)]
    dist.all_gather(parts, padded, group=process_group)
    if stats is not None:
        stats.record("other", width * local.element_size() * shard.world_size)
    return torch.cat([p[:n] for p, n in zip(parts, shard.sizes, strict=True)])


def state_nbytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages held in ``obj``'s attributes (an operator's memory)."""
    seen: dict[int, int] = {}
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------- checkpoints
_FILE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.pt$")


def _shard_file(directory: Path, rank: int, world: int) -> Path:
    return directory / f"shard-{rank:05d}-of-{world:05d}.pt"


def save_sharded(
    state: Mapping[str, Any], directory: str | os.PathLike, *, process_group: Any = None
) -> Path:
    """Each rank writes its own ``state`` to ``directory/shard-RRRRR-of-WWWWW.pt`` (atomic rename).

    ``state`` is any per-rank state dict: a sharded operator's, or an optimizer's whose window is
    sharded. Collective only in that it ends with a barrier (all files exist when it returns).
    """
    rank, world = _rank_world(process_group)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = _shard_file(directory, rank, world)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    if world > 1:
        dist.barrier(group=process_group)
    return path


def load_sharded(
    directory: str | os.PathLike,
    *,
    process_group: Any = None,
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read, on each rank, the file :func:`save_sharded` wrote for it (collective).

    Raises on every rank (never hangs) when any rank's file is missing or the checkpoint was written
    by a different number of ranks (then say so: reshard with :func:`consolidate_state_dicts` and
    :func:`shard_state_dict`).
    """
    rank, world = _rank_world(process_group)
    directory = Path(directory)
    error: BaseException | None = None
    state: dict[str, Any] = {}
    try:
        path = _shard_file(directory, rank, world)
        if not path.exists():
            worlds = sorted(
                {
                    int(mt.group(2))
                    for p in directory.glob("shard-*.pt")
                    if (mt := _FILE.match(p.name))
                }
            )
            if worlds and world not in worlds:
                raise ValueError(
                    f"{directory} holds a checkpoint written by {worlds} rank(s), this group has "
                    f"{world}: reshard it (consolidate_state_dicts, then shard_state_dict)"
                )
            raise FileNotFoundError(f"no shard file for rank {rank} of {world}: {path}")
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except (OSError, ValueError, RuntimeError) as err:
        error = err
    _agree("load_sharded", error, {}, [], process_group, world, None)
    return state


def consolidate_state_dicts(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One single-process :class:`~mfac.fisher.sliding.SlidingInverseFisher` state from all ranks'.

    ``states``: every rank's :meth:`ShardedSlidingInverseFisher.state_dict` (any order). Checks that
    they form one layout and agree on the replicated state; concatenates the window slices.
    No process group needed (an offline tool, e.g. to reshard or to inspect a run).
    """
    if not states:
        raise ValueError("states must hold every rank's state_dict, got none")
    by_rank = sorted(states, key=lambda s: int(s["shard"]["rank"]))
    bounds = [tuple(s["shard"]["bounds"]) for s in by_rank]
    ranks = [int(s["shard"]["rank"]) for s in by_rank]
    if len(set(bounds)) != 1 or ranks != list(range(len(bounds[0]) - 1)):
        raise ValueError(
            f"states do not form one layout: ranks {ranks} with bounds {[list(b) for b in bounds]}"
        )
    first = by_rank[0]
    for s in by_rank[1:]:
        for key in ("ngrads", "damp", "average_over", "num_seen", "since_refactor", "jitter"):
            if s.get(key) != first.get(key):
                raise ValueError(f"states disagree on {key}: {first.get(key)!r} vs {s.get(key)!r}")
        for key in ("gram", "inv"):
            if not torch.equal(s[key], first[key]):
                raise ValueError(f"states disagree on the replicated {key!r} matrix")
    full = {k: v for k, v in first.items() if k != "shard"}
    full["grads"] = torch.cat([s["grads"] for s in by_rank], dim=1)
    full["dim"] = int(bounds[0][-1])
    return full


def shard_state_dict(state: Mapping[str, Any], shard: ShardSpec) -> dict[str, Any]:
    """Cut a single-process ``SlidingInverseFisher`` state (or a consolidated one) for one rank."""
    if int(state["dim"]) != shard.dim:
        raise ValueError(f"state has dim={state['dim']}, the layout d={shard.dim}")
    out = dict(state)
    out["grads"] = shard.take(state["grads"]).clone()
    out["dim"] = shard.size
    out["shard"] = shard.to_dict()
    return out
