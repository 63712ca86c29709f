"""The optimizer's placement over ``torch.distributed`` ranks: :class:`DistributedWindow`.

Per step: :meth:`DistributedWindow.update_mul` (the sharded window's one all-reduce of ``m`` floats,
one finiteness vote of one float, and, for replicated parameters, the all-gather of the step).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from mfac.distributed._comm import CommStats, _comm_device, _rank_world
from mfac.distributed._layout import ShardSpec
from mfac.distributed.fsdp import gather_full, local_tensor
from mfac.distributed.operators import ShardedSlidingInverseFisher
from mfac.fisher.sliding import WINDOW_CHUNK
from mfac.optim._placement import NonFiniteElsewhere

__all__ = ["DistributedWindow"]

logger = logging.getLogger(__name__)


class DistributedWindow:
    r"""Where an M-FAC optimizer's window lives: sharded over the ranks of a process group.

    The optimizer keeps its math; it asks its placement (the protocol of :mod:`mfac.optim._placement`,
    whose one-process default communicates nothing) for three things: :meth:`local` (the part of a
    parameter or gradient this rank works on), :meth:`new_fisher` (the window over the flat vector of
    those parts) and :meth:`update_mul` (add the flat gradient, return the flat step; with the
    finiteness vote of :meth:`all_finite`, one agreed answer for the non-finite-gradient rule).

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
        chunk: int = WINDOW_CHUNK,
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

    def update_mul(
        self, fisher: ShardedSlidingInverseFisher, flat: torch.Tensor, *, check_finite: bool = True
    ) -> torch.Tensor:
        """Add the flat gradient to ``fisher`` and return the flat ``F^{-1} g`` (collective).

        Replicated: ``flat`` has ``d`` coordinates; this rank adds its slice and all-gathers the step.
        Sharded: ``flat`` is this rank's slice and so is the step.

        ``check_finite``: first :meth:`all_finite` (one all-reduce of one float); if the gradient is
        not finite on some rank, every rank raises :class:`~mfac.numerics.NonFiniteGradientError` and
        no window changes. False skips the vote. Either way the window reads its own checks (its step
        is a collective already): a finite gradient whose squared norm overflows still raises on
        every rank.
        """
        if check_finite and not self.all_finite(flat):
            raise NonFiniteElsewhere(
                "the gradient is not finite on every rank (NaN or inf here or on another rank); "
                "every rank's window was left untouched"
            )
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


