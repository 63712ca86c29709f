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

Files, by when they run:

* per step: :mod:`~mfac.distributed.operators` (the sharded operators: single-process ones with
  placement hooks), :mod:`~mfac.distributed.placement` (the optimizer's placement,
  :class:`DistributedWindow`), :mod:`~mfac.distributed.fsdp` (``DTensor`` local shards, the step's
  all-gather);
* setup: ``_layout`` (:class:`ShardSpec`, :func:`shard_range`), ``_comm`` (process groups, the
  ranks' agreement, :class:`CommStats`);
* checkpoints and offline tools: :mod:`~mfac.distributed.checkpoint`.

Importing :mod:`mfac.distributed` does nothing beyond importing ``torch.distributed``.
"""

from mfac.distributed._comm import CommStats
from mfac.distributed._layout import ShardSpec, shard_range
from mfac.distributed.checkpoint import (
    consolidate_state_dicts,
    load_sharded,
    save_sharded,
    shard_state_dict,
    state_nbytes,
)
from mfac.distributed.fsdp import gather_full, local_flat, local_tensor
from mfac.distributed.operators import ShardedSlidingInverseFisher, ShardedStaticInverseFisher
from mfac.distributed.placement import DistributedWindow

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
