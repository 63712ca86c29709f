r"""The sharded operators: the single-process ones with placement hooks, nothing public re-implemented.

:class:`ShardedSlidingInverseFisher` and :class:`ShardedStaticInverseFisher` inherit every public method
(``update``, ``update_mul``, ``mul``, ``diag``, ``submatrix``, ``to_dense``, ``state_dict``,
``load_state_dict``, ...) and so every formula, check and numerical safeguard of
:class:`~mfac.fisher.sliding.SlidingInverseFisher` and :class:`~mfac.fisher.static.StaticInverseFisher`
(the float64 redo of a cancelling float32 ``G^T c`` included). They override only the hooks where
placement matters:

============================  ==============================================================
hook                          sharded behaviour
============================  ==============================================================
``_reduce``                   all-reduce of the partial ``G_r x_r`` / ``G_r G_r^T`` / ``|v_r|^2``
``_index_dim``                ``submatrix`` takes *global* coordinates ``[0, d)``
``_columns_at``               ``G[:, idx]`` for global ``idx``, gathered from the owning ranks
``_factor_columns``           ``Q[:, idx]`` likewise (static, full operator)
``_submatrix``                static, whole blocks per rank: each rank's block, summed
``_to_dense``                 the global ``d x d`` matrix on every rank
``_check_state_local``        the saved layout, then one agreement: every rank raises or none does
``_extra_state``              ``state_dict`` carries the layout (``"shard"``)
``_raise_nonfinite``          names the rank's slice: ``G g`` is all-reduced, so all ranks raise
``_use_direct_route``         the full static operator takes Woodbury (``m``-sized contractions)
``_check_available``          no scipy view (vectors live on several processes)
``_group_solve``              refused (its groups would span ranks)
============================  ==============================================================

Per step (``update_mul``) only ``_reduce`` communicates: one all-reduce of ``n <= m`` float64.
Construction, ``load_state_dict`` and ``check_consistency`` add one small ``all_gather`` each
(:func:`~mfac.distributed._comm._agree`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

from mfac.distributed._comm import (
    CommStats,
    _agree,
    _dtype_code,
    _dtype_name,
    _rank_world,
)
from mfac.distributed._layout import ShardSpec, _check_layout, _check_spec_for, _resolve_shard
from mfac.fisher.base import check_grads
from mfac.fisher.sliding import AVERAGE_OVER, WINDOW_CHUNK, SlidingInverseFisher
from mfac.fisher.static import StaticInverseFisher
from mfac.numerics import (
    DEFAULT_CHUNK,
    SMALL_DTYPE,
    NonFiniteGradientError,
    check_damp,
    check_positive_int,
)

__all__ = ["ShardedSlidingInverseFisher", "ShardedStaticInverseFisher"]


class _Sharded:
    """The placement hooks both sharded operators share: the group, the all-reduce, global indices."""

    _shard: ShardSpec
    _group: Any
    _world: int
    comm: CommStats
    _index_label = "idx (global coordinates)"

    def _init_group(self, process_group: Any) -> tuple[int, int]:
        self._group = process_group
        rank, self._world = _rank_world(process_group)
        #: counters of this rank's collectives (see :class:`CommStats`).
        self.comm = CommStats()
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

    # -------------------------------------------------------------- placement hooks
    def _reduce(self, partial: torch.Tensor) -> None:
        """Sum the partial ``G_r x_r`` (an ``m``-sized vector or ``m x m`` matrix) over the ranks."""
        self._all_reduce(partial, "allreduce")

    @property
    def _index_dim(self) -> int:
        return self._shard.dim

    def _to_dense(self) -> torch.Tensor:
        """Return the global ``(d, d)`` matrix on every rank (collective: all-reduces ``m d`` floats)."""
        return self._submatrix(torch.arange(self._shard.dim, device=self._device, dtype=torch.long))

    def _check_available(self, method: str) -> None:
        if method == "to_scipy":
            raise NotImplementedError(
                "a sharded operator has no scipy view (its vectors are spread over ranks); use mul() on "
                "the local slices, or to_dense() for tiny d"
            )
        if method == "grow":
            raise NotImplementedError(
                "a sharded window cannot grow: its layout of the coordinates over the ranks is fixed at "
                "construction"
            )

    def _group_solve(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "group_solve is not available for a sharded operator (its groups would span ranks); use "
            "submatrix() of each group's global coordinates"
        )

    # -------------------------------------------------------------- global coordinates
    def _local_part(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions in ``idx`` of the coordinates this rank holds, and their local indices."""
        start, stop = self._shard.start, self._shard.stop
        owned = ((idx >= start) & (idx < stop)).nonzero().squeeze(1)
        return owned, idx[owned] - start

    def _gather_columns(self, columns: Any, idx: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """``(rows, s)`` columns at global ``idx``: ``columns(local_idx)`` where owned, summed over ranks.

        Each coordinate is owned by exactly one rank, so the sum adds zeros only: exact. Communication:
        one all-reduce of ``rows * s`` entries (counted as ``other``).
        """
        owned, local = self._local_part(idx)
        cols = torch.zeros(rows, idx.numel(), dtype=dtype, device=self._device)
        if owned.numel():
            cols[:, owned] = columns(local)
        self._all_reduce(cols, "other")
        return cols

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self._dim} of {self._shard.dim}, rank={self._shard.rank}/"
            f"{self._shard.world_size}, ngrads={self.ngrads}, damp={self._damp:g}, dtype={self._dtype}, "
            f"device={self._device})"
        )


def _average_over_name(code: float) -> str:
    return repr(AVERAGE_OVER[int(code)]) if 0 <= code < len(AVERAGE_OVER) else "?"


class ShardedSlidingInverseFisher(_Sharded, SlidingInverseFisher):
    r"""The sliding window of :class:`~mfac.fisher.sliding.SlidingInverseFisher` with ``G`` column-sharded.

    Rank ``r`` stores ``G_r``, its ``d_r`` columns of the last ``m`` gradients; the vectors it takes and
    returns (``update(g)``, ``update_mul(g)``, ``mul(x)``, ``diag()``) are its slices of the global ones,
    of length ``dim = d_r``. ``F^{-1}`` is the one of the global window: results equal the single-process
    operator's slices up to the summation order of ``G x`` (on a world of one: bit for bit).
    ``submatrix`` and ``to_dense`` take and return global coordinates.

    Args:
        shard: a :class:`ShardSpec`, or the global ``d`` (an int) to cut evenly over the group.
        ngrads: ``m``; equal on every rank.
        damp: ``lambda > 0``; equal on every rank.
        process_group: the ``torch.distributed`` group (None: the default one, or a world of one when
            torch.distributed is not initialized).
        dtype, device, average_over, chunk: as for ``SlidingInverseFisher`` (dtype and average_over
            equal on every rank).

    Communication per ``update_mul``: one all-reduce of ``n <= m`` float64 (``G g``), plus one of a
    single float64 on the rare step whose float32 ``G^T c`` cancels and is redone in float64; per ``mul``
    of ``k`` vectors: one all-reduce of ``n * k`` float64. Never anything ``d``-sized.
    Memory per rank: ``m * d_r * bytes(dtype)`` + ``d_r`` (the row a failed step restores) +
    ``3 m^2 * 8`` bytes.

    A NaN or inf on any rank makes ``update`` / ``update_mul`` raise
    :class:`~mfac.numerics.NonFiniteGradientError` on every rank (the all-reduced ``|g|^2`` is not
    finite), with every window left untouched. Construction is collective and checks that all ranks
    agree on ``ngrads``, ``damp``, ``dtype``, ``average_over`` and the layout (``ValueError`` on every
    rank otherwise).
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
        chunk: int = WINDOW_CHUNK,
    ) -> None:
        rank, world = self._init_group(process_group)
        error: BaseException | None = None
        try:
            spec = _resolve_shard(shard, rank, world)
            SlidingInverseFisher.__init__(
                self, spec.size, ngrads, damp, dtype=dtype, device=device,
                average_over=average_over, chunk=chunk,
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
                float(AVERAGE_OVER.index(average_over)) if ok else -1.0, _average_over_name
            ),
            "world_size": (float(world), None),
        }
        bounds = list(self._shard.bounds) if ok else [-1.0] * (world + 1)
        table = _agree(
            "ShardedSlidingInverseFisher", error, same, [*bounds, float(rank)], process_group, world,
            self.comm,
        )
        _check_layout("ShardedSlidingInverseFisher", table)

    # -------------------------------------------------------------- placement hooks
    def _raise_nonfinite(self, grad: torch.Tensor) -> None:
        nan, inf = int(torch.isnan(grad).sum()), int(torch.isinf(grad).sum())
        raise NonFiniteGradientError(
            "grad must be finite on every rank: the all-reduced G g of this update is not "
            f"(this rank's slice has {nan} NaN and {inf} inf entries); every rank's window was "
            "left untouched"
        )

    def _columns_at(self, idx: torch.Tensor) -> torch.Tensor:
        return self._gather_columns(self._columns, idx, self.num_stored, self._dtype)

    def _extra_state(self) -> dict[str, Any]:
        return {"shard": self._shard.to_dict()}

    def _check_state_local(self, state: Mapping[str, Any]) -> torch.Tensor:
        """Check the saved layout and every local check, then agree (all ranks raise, or none).

        On top of :meth:`SlidingInverseFisher._check_state_local`: the state must carry the layout it
        was saved under (``"shard"``), equal to this operator's (see
        :func:`~mfac.distributed.consolidate_state_dicts` / :func:`~mfac.distributed.shard_state_dict`
        to reshard), and all ranks' states must agree on the step and the replicated ``m x m`` state.
        """
        error: BaseException | None = None
        facts = dict.fromkeys(("num_seen", "since_refactor", "jitter", "Gram checksum"), -1.0)
        sq = torch.zeros(0, dtype=SMALL_DTYPE, device=self._device)
        try:
            if isinstance(state, Mapping):
                self._check_saved_layout(state)
            sq = super()._check_state_local(state)
            n = sq.shape[0]
            facts = {
                "num_seen": float(state["num_seen"]),
                "since_refactor": float(state["since_refactor"]),
                "jitter": float(state.get("jitter", 0.0)),
                "Gram checksum": float(state["gram"][:n, :n].to(SMALL_DTYPE).sum().item()),
            }
        except (TypeError, ValueError) as err:
            error = err
        same = {k: (v, None) for k, v in facts.items()}
        _agree("load_state_dict", error, same, [], self._group, self._world, self.comm)
        return sq

    def _check_saved_layout(self, state: Mapping[str, Any]) -> None:
        saved = state.get("shard")
        if saved is None:
            raise ValueError(
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

    # -------------------------------------------------------------- consistency
    def check_consistency(self) -> None:
        """Check that the replicated ``m x m`` state agrees (collective; ``ValueError`` on every rank).

        Compares ``num_seen``, the refactor counter, the jitter and checksums of the Gram matrix and of
        its inverse across ranks (exact equality: the replicated work is deterministic).
        """
        n = self.num_stored
        facts = {
            "num_seen": float(self._num_seen),
            "since_refactor": float(self._since_refactor),
            "jitter": float(self._jitter),
            "Gram checksum": float(self._gram[:n, :n].sum().item()),
            "inverse checksum": float(self._inv[:n, :n].sum().item()),
        }
        same = {k: (v, None) for k, v in facts.items()}
        _agree("check_consistency", None, same, [], self._group, self._world, self.comm)


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
            ``ShardSpec.even(d, rank, R, align=B)``), and each rank builds its blocks alone
            (``ValueError`` on every rank otherwise).
        overwrite, chunk: as for ``StaticInverseFisher``.

    Non-finite ``grads`` are found for free, as by the single-process build, on the Gram diagonal:
    the all-reduced one (full operator: every rank raises), or each rank's blocks' (then one small
    all-gather tells the other ranks, which raise a ``RuntimeError`` naming the rank).

    Communication: build one all-reduce of ``m^2`` floats (block-diagonal: one all-gather of a flag);
    ``mul`` of ``k`` vectors one all-reduce of ``m * k`` floats (full operator); block-diagonal: none.
    Memory per rank: ``m * d_r`` (Woodbury) or ``d_r * B`` (direct blocks) entries plus ``m^2``
    float64 per block.
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
            # finiteness: checked for free on the (all-reduced) Gram diagonal by the build
            grads = check_grads(grads, "grads (this rank's columns)", finite=False)
            damp = check_damp(damp)
            if block_size is not None:
                check_positive_int(block_size, "block_size")
            m, local = grads.shape
            dtype = grads.dtype
            if shard is not None:
                if not isinstance(shard, ShardSpec):
                    raise TypeError(f"shard must be a ShardSpec or None, got {type(shard).__name__}")
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
            "ShardedStaticInverseFisher", error, same, [float(local), *given], process_group, world,
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
        try:
            StaticInverseFisher.__init__(
                self, grads, damp, block_size=None if self.full else block_size, overwrite=overwrite,
                chunk=chunk,
            )
        except (ValueError, MemoryError) as err:
            if self.full:  # the failed check read the all-reduced Gram diagonal: every rank is here
                raise
            error = err
        if not self.full:  # each rank built its blocks alone: tell the others how it went
            _agree("ShardedStaticInverseFisher", error, {}, [], process_group, world, self.comm)

    # -------------------------------------------------------------- placement hooks
    def _use_direct_route(self, block: int, m: int) -> bool:
        # full operator: Woodbury always (its contractions over d are m-sized); whole local blocks:
        # whatever a single process would do with them.
        return False if self.full else super()._use_direct_route(block, m)

    def _reduce(self, partial: torch.Tensor) -> None:
        if self.full:
            super()._reduce(partial)
        # block-diagonal: every block is on one rank, so its Gram matrix and Q x are local.

    def _factor_columns(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.full:  # whole blocks: this rank's own (local coordinates)
            return super()._factor_columns(idx)
        # full operator (one block): Q's columns gathered from their ranks, all in block 0
        cols = self._gather_columns(lambda j: self._q[0][:, j], idx, self._ngrads, self._dtype)
        return cols.T, torch.zeros_like(idx)

    def _submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        if self.full:
            return super()._submatrix(idx)
        # blocks: entries between coordinates of different ranks are in different blocks (zero)
        s = idx.numel()
        owned, local = self._local_part(idx)
        out = torch.zeros(s, s, dtype=self._dtype, device=self._device)
        if owned.numel():
            out[owned[:, None], owned[None, :]] = super()._submatrix(local)
        self._all_reduce(out, "other")
        return out

    @property
    def block_size(self) -> int:
        """``B`` (``d``, the global one, for the full operator)."""
        return self._shard.dim if self.full else self._block

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
