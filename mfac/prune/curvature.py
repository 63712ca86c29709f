r"""Curvature sources for OBS pruning: what the pruner asks of a curvature estimate.

The pruner (:func:`~mfac.prune.prune_oneshot`) works on the *kept space*: the ``k`` coordinates of the pruned
parameters that are still present, in flat order. At each (re)computation step it calls::

    source.prepare(model, space)     # curvature at the current weights (e.g. collect gradients)
    source.saliency(w)               # (k,) loss increase of removing each weight alone
    source.update(w, removed, kind)  # (k,) weight change removing ``removed`` (dw_S = -w_S)
    source.release()                 # drop the estimate (memory)

Group (structured) OBS adds two optional methods, ``group_saliency(w, labels)`` (one loss increase per group)
and ``group_update(w, removed, labels, kind)``; ``labels`` ``(k,)`` numbers the groups ``0..n-1``.

Restricting to the kept space is what makes earlier pruning stick (see :mod:`mfac.prune.pruner`). A new
curvature source (e.g. a layer-wise input Hessian, SparseGPT-style) implements these four methods and is
passed as ``curvature=`` to the pruner; masks, schedules, N:M and the scorer API are shared.

Sources here:

* :class:`FisherCurvature`: the M-FAC empirical Fisher ``F = damp I + (1/m) G^T G`` of ``m`` gradients, full
  or block-diagonal (``block_size``): streamed into :class:`~mfac.fisher.BlockFisherAccumulator` when
  ``block_size <= ngrads`` (``G`` never exists), else through :class:`~mfac.fisher.StaticInverseFisher`.
* :class:`DiagonalFisherCurvature`: its diagonal ``damp + (1/m) sum_i g_i^2`` (OBD-style baseline).
* :class:`IdentityCurvature`: ``F = I``: magnitude pruning (baseline).
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from mfac.collect import collect_grads, stream_grads
from mfac.fisher import BlockFisherAccumulator, InverseFisher, StaticInverseFisher
from mfac.numerics import check_damp, check_memory, check_positive_int, format_bytes
from mfac.params import ParamSpace
from mfac.prune.scores import (
    group_independent_update,
    group_saliency,
    independent_update,
    joint_update,
    obs_saliency,
    restricted_joint_update,
)

logger = logging.getLogger(__name__)

__all__ = [
    "UPDATES",
    "Curvature",
    "DiagonalFisherCurvature",
    "FisherCurvature",
    "IdentityCurvature",
    "UpdateKind",
]

UpdateKind = Literal["joint", "independent", "none"]
#: the weight updates a pruning step can apply.
UPDATES: tuple[str, ...] = ("joint", "independent", "none")


def check_update(update: str) -> str:
    """Validate an update kind."""
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    return update


def _group_sum(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(n,)`` sums of ``values`` over each group ``labels == q`` (``n = max(labels) + 1``)."""
    n = int(labels.max()) + 1 if labels.numel() else 0
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, labels, values)


def _mask_only(w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    dw = torch.zeros_like(w)
    dw[removed] = -w[removed]
    return dw


class Curvature(abc.ABC):
    """A curvature estimate over the kept coordinates, refreshed at each pruning (re)computation."""

    #: whether ``prepare`` reads ``loss_fn`` / ``data`` (False: a data-free baseline).
    needs_data: bool = True

    @abc.abstractmethod
    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Estimate the curvature at the current weights over ``space``'s kept coordinates (``k``)."""

    @abc.abstractmethod
    def saliency(self, w: torch.Tensor) -> torch.Tensor:
        """``(k,)`` saliencies (loss increase of removing each weight alone) for weights ``w`` ``(k,)``."""

    @abc.abstractmethod
    def update(self, w: torch.Tensor, removed: torch.Tensor, kind: str) -> torch.Tensor:
        """``dw`` ``(k,)`` for removing ``removed`` (``(k,)`` bool), with ``dw[removed] == -w[removed]``."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """Free the estimate (called after each step)."""

    def group_saliency(self, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(n,)`` loss increase of removing each group ``{labels == q}`` of ``w`` alone (group OBS)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement group (structured) pruning")

    def group_update(
        self, w: torch.Tensor, removed: torch.Tensor, labels: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """``dw`` for removing the whole groups ``removed``; the default serves kinds that ignore groups.

        ``"joint"`` removes the union of the groups jointly, which is what :meth:`update` does with
        ``removed``; ``"none"`` zeros. ``"independent"`` (sum of per-group corrections) needs the
        curvature's own implementation.
        """
        if kind == "independent":
            raise NotImplementedError(
                f"{type(self).__name__} has no per-group independent update; use update='joint'"
            )
        return self.update(w, removed, kind)


class FisherCurvature(Curvature):
    r"""The empirical Fisher of ``ngrads`` gradients, as M-FAC's static inverse (full or block-diagonal).

    Two routes, chosen by shape (the same ``F^{-1}`` to rounding):

    * **streaming** (``block_size <= ngrads``): the gradients (kept coordinates only) come from
      :func:`~mfac.collect.stream_grads` in chunks and are folded into the block statistics of a
      :class:`~mfac.fisher.BlockFisherAccumulator`; ``G`` is never materialised. Memory ``k * B * 4``
      bytes (float32) plus one chunk of ``min(64, max(8, B // 2))`` gradients, against ``m * k * 4`` for
      ``G``. The joint update is :func:`~mfac.prune.scores.joint_update` on the explicit blocks (one
      ``|S_b| x |S_b|`` solve per block, ``O(k B^2)``), no second build.
    * **materialised** (``block_size > ngrads`` or None: Woodbury needs ``G``): ``prepare`` collects ``G``
      (``m x k``, via :func:`~mfac.collect.collect_grads`) and builds a
      :class:`~mfac.fisher.StaticInverseFisher`; the joint update rebuilds it with the removed columns
      zeroed (:func:`~mfac.prune.scores.restricted_joint_update`). Memory about ``2 m k`` entries, checked
      against the free memory before anything is collected (``MemoryError`` with the figure).

    Updates: ``"independent"`` is one ``mul``; ``"joint"`` is exact joint removal; ``"none"`` only zeros.

    Subclass hooks: :meth:`streams` (the route), ``_gradients`` (where the materialised ``G`` comes from)
    and ``_build`` (the operator built from it); ``prepare`` itself stays the one implementation.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        data: iterable of batches, iterated afresh at each step (a list or a DataLoader).
        ngrads: ``m``.
        damp: ``lambda``.
        block_size: ``B`` of the block-diagonal Fisher over the kept coordinates (``None``: full).
        collect: extra keyword arguments for :func:`~mfac.collect.collect_grads` (``per_sample``, ``cycle``,
            ``train``, ``progress``).
        retain_grads: keep ``G`` after the build (needed by the ``"joint"`` update). Without it the build
            reuses ``G``'s memory (peak ``m k`` instead of ``2 m k`` entries).
        relative_damp: ``damp`` is a multiple of the Fisher's own scale, the mean diagonal entry
            ``mu = |G|_F^2 / (m k)`` of ``(1/m) G^T G`` of each (re)computation: the damp used is
            ``damp * mu`` (:attr:`last_damp` while the estimate is held; a ``DEBUG`` log line too).
            Scale-free: the same value works across models, losses and sparsities (0.1 to 1 is a good
            start for the joint update).
    """

    def __init__(
        self,
        loss_fn: Any,
        data: Iterable[Any],
        *,
        ngrads: int,
        damp: float,
        block_size: int | None = None,
        collect: Mapping[str, Any] | None = None,
        retain_grads: bool = True,
        relative_damp: bool = False,
    ) -> None:
        self.retain_grads = bool(retain_grads)
        self.relative_damp = bool(relative_damp)
        #: the absolute damp of the current estimate (``damp``, or ``damp * mu`` when relative); None
        #: before ``prepare`` and after ``release``.
        self.last_damp: float | None = None
        self.loss_fn = loss_fn
        self.data = data
        self.ngrads = check_positive_int(ngrads, "ngrads")
        self.damp = check_damp(damp)
        self.block_size = None if block_size is None else check_positive_int(block_size, "block_size")
        self.collect = dict(collect or {})
        for key in ("params", "masked"):
            if key in self.collect:
                raise ValueError(f"collect may not set {key!r}: the pruner sets it")
        self._grads: torch.Tensor | None = None
        self._finv: InverseFisher | None = None
        self._diag: torch.Tensor | None = None

    def streams(self, kept: int) -> bool:
        """Whether ``prepare`` takes the streaming route for ``kept`` coordinates: ``min(B, k) <= m``."""
        return self.block_size is not None and min(self.block_size, kept) <= self.ngrads

    def memory_estimate(self, kept: int, itemsize: int = 4) -> int:
        """Peak bytes of one (re)computation over ``kept`` coordinates (the route's main tensors)."""
        m, k = self.ngrads, kept
        if self.streams(k):
            block = min(self.block_size, k)
            nb = -(-k // block)
            return (nb * block * block + self.chunk_rows() * k) * itemsize
        return 2 * m * k * itemsize

    def chunk_rows(self) -> int:
        """Gradients per chunk of the streaming route: ``min(64, max(8, B // 2), ngrads)``."""
        return min(64, max(8, (self.block_size or 0) // 2), self.ngrads)

    def _check_memory(self, space: ParamSpace) -> None:
        k = space.kept_dim
        itemsize = torch.empty((), dtype=space.dtype).element_size()
        need = self.memory_estimate(k, itemsize)
        if self.streams(k):
            advice = "use a smaller block_size or move the parameters to a larger device"
            what = f"the streaming block Fisher (k={k} coordinates, block_size={self.block_size})"
        else:
            route = (
                "the full Fisher" if self.block_size is None else f"block_size={self.block_size} > ngrads"
            )
            advice = (
                f"{route} goes through the Woodbury route, which stores G ({self.ngrads} x {k}, "
                f"{format_bytes(self.ngrads * k * itemsize)}). Use block_size <= ngrads (the streaming route "
                "never stores G: k * block_size entries), a smaller ngrads, or shard G over processes "
                "with mfac.distributed"
            )
            what = f"the materialised Fisher ({self.ngrads} gradients x {k} coordinates, ~2 m k entries)"
        check_memory(need, space.device, what, advice)

    def _gradients(self, model: nn.Module, space: ParamSpace) -> torch.Tensor:
        """Return ``G`` ``(m, k)`` at the current weights, kept coordinates (materialised route's hook)."""
        return collect_grads(
            model,
            self.loss_fn,
            self.data,
            self.ngrads,
            params=space,
            masked=space.has_masks,
            **self.collect,
        )

    def _damp_for(self, grads: torch.Tensor | BlockFisherAccumulator) -> float:
        """Return the absolute damp for this ``G``: ``damp``, or ``damp * |G|_F^2 / (m k)`` if relative.

        ``grads`` may be the streaming statistics, whose trace is ``|G|_F^2``.
        """
        if not self.relative_damp:
            return self._absolute_damp(0.0, 1)
        if isinstance(grads, BlockFisherAccumulator):
            return self._absolute_damp(grads.sq_norm_sum(), grads.ngrads * grads.dim)
        sq = float(torch.linalg.vector_norm(grads, dtype=torch.float64)) ** 2
        return self._absolute_damp(sq, grads.numel())

    def _absolute_damp(self, sq_sum: float, count: int) -> float:
        """``damp``, or ``damp * sq_sum / count`` (the mean squared gradient entry) when relative."""
        damp = self.damp
        if self.relative_damp:
            scale = sq_sum / max(count, 1)
            if not (math.isfinite(scale) and scale > 0.0):
                raise ValueError(
                    f"relative_damp needs gradients with a finite, positive mean square, got {scale}"
                )
            damp *= scale
            logger.debug("relative_damp: damp %g x mean Fisher diagonal %g = %g", self.damp, scale, damp)
        self.last_damp = damp
        return damp

    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Gradients at the current weights (streamed, or ``G``: ``m x k``); build ``F^{-1}``, its diag."""
        self.release()
        self._check_memory(space)
        if self.streams(space.kept_dim):
            self._finv = self._build_streamed(model, space)
            self._diag = self._finv.diag()
            return
        grads = self._gradients(model, space)  # shape: (m, k)
        self._finv = self._build(grads, self._damp_for(grads))
        self._grads = grads if self.retain_grads else None
        self._diag = self._finv.diag()

    def _build_streamed(self, model: nn.Module, space: ParamSpace) -> InverseFisher:
        """Return the block-diagonal ``F^{-1}`` from the gradient stream at the current weights.

        The streaming route's hook: ``ngrads`` gradients over ``space``'s kept coordinates, in chunks of
        :meth:`chunk_rows`, folded into a :class:`~mfac.fisher.BlockFisherAccumulator` and finalised with
        the damp of :meth:`_damp_for` (sets :attr:`last_damp`). A subclass may time the pieces or return
        an operator it built before at the same weights (several targets from one model).
        """
        acc = BlockFisherAccumulator(space.kept_dim, self.block_size, dtype=space.dtype, device=space.device)
        for chunk in stream_grads(
            model, self.loss_fn, self.data, self.ngrads, chunk=self.chunk_rows(), params=space,
            masked=space.has_masks, **self.collect,
        ):
            acc.add(chunk)
        return acc.finalize(self._damp_for(acc))

    def _build(self, grads: torch.Tensor, damp: float) -> InverseFisher:
        """Return ``F^{-1}`` of ``grads`` ``(m, k)`` with the absolute ``damp`` (materialised route's hook).

        Builds a :class:`~mfac.fisher.StaticInverseFisher` (in ``grads``' memory unless ``retain_grads``).
        A subclass may return an operator it built before from the same gradients (several runs from one
        model); with ``retain_grads`` it must leave ``grads`` intact (the joint update reuses them).
        """
        return StaticInverseFisher(grads, damp, block_size=self.block_size, overwrite=not self.retain_grads)

    def saliency(self, w: torch.Tensor) -> torch.Tensor:
        """Return ``w^2 / (2 diag(F^{-1}))``."""
        assert self._finv is not None, "prepare() first"
        return obs_saliency(w, self._finv, diag=self._diag)

    def update(self, w: torch.Tensor, removed: torch.Tensor, kind: str) -> torch.Tensor:
        """Return the ``kind`` update (joint: a second build from ``G`` with the removed columns zeroed)."""
        assert self._finv is not None, "prepare() first"
        check_update(kind)
        if kind == "none":
            return _mask_only(w, removed)
        if kind == "independent":
            return independent_update(w, self._finv, removed, diag=self._diag)
        if self._grads is None and getattr(self._finv, "route", None) == "direct":
            # explicit inverse blocks (the streaming route): one solve per block, no rebuild, no G
            return joint_update(w, self._finv, removed)
        if self._grads is None:
            raise RuntimeError("the joint update needs the gradients: build with retain_grads=True")
        self._finv = None  # free the factor before the second build
        grads, self._grads = self._grads, None
        return restricted_joint_update(
            w, grads, self.last_damp, removed, block_size=self.block_size, overwrite=True
        )

    def group_saliency(self, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return ``1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q`` per group (:func:`~mfac.prune.group_saliency`)."""
        assert self._finv is not None, "prepare() first"
        return group_saliency(w, self._finv, labels)

    def group_update(
        self, w: torch.Tensor, removed: torch.Tensor, labels: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """``"independent"``: the sum of the per-group OBS corrections; other kinds as :meth:`update`."""
        assert self._finv is not None, "prepare() first"
        check_update(kind)
        if kind == "independent":
            return group_independent_update(w, self._finv, removed, labels)
        return self.update(w, removed, kind)

    def release(self) -> None:
        """Drop ``G``, ``F^{-1}`` and its diagonal."""
        self._grads = self._finv = self._diag = None
        self.last_damp = None


class _DiagonalUpdates:
    """The updates of a diagonal curvature: no cross terms to compensate with, so every kind zeroes.

    A group's saliency is the sum of its weights' saliencies (``sum_{q in Q} w_q^2 F_qq / 2``; the group
    magnitude for ``F = I``). Mixed in before the curvature class whose ``saliency`` it sums.
    """

    def update(self, w: torch.Tensor, removed: torch.Tensor, kind: str) -> torch.Tensor:
        """Zero the removed weights (a diagonal curvature has no cross terms to compensate with)."""
        check_update(kind)
        return _mask_only(w, removed)

    def group_saliency(self, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the sum of :meth:`saliency` over each group."""
        return _group_sum(self.saliency(w), labels)

    def group_update(
        self, w: torch.Tensor, removed: torch.Tensor, labels: torch.Tensor, kind: str
    ) -> torch.Tensor:
        """Zero the removed groups."""
        return self.update(w, removed, kind)


class DiagonalFisherCurvature(_DiagonalUpdates, FisherCurvature):
    r"""``F = diag(damp + (1/m) sum_i g_i^2)``: OBD-style saliency ``w_q^2 F_qq / 2``, no compensation.

    With a diagonal ``F`` there are no cross terms, so every update kind reduces to zeroing. The squares are
    summed from a gradient stream (:func:`~mfac.collect.stream_grads`): memory ``k`` entries plus one chunk
    of gradients, never ``G``.
    """

    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Stream the gradients and keep only ``damp + mean(G^2)`` per coordinate."""
        self.release()
        sq = torch.zeros(space.kept_dim, dtype=torch.float64, device=space.device)
        for chunk in stream_grads(
            model, self.loss_fn, self.data, self.ngrads, chunk=min(self.ngrads, 16), params=space,
            masked=space.has_masks, **self.collect,
        ):
            sq += chunk.square().sum(dim=0, dtype=torch.float64)
        damp = self._absolute_damp(float(sq.sum()), self.ngrads * space.kept_dim)
        self._diag_fisher = (sq / self.ngrads).add_(damp).to(space.dtype)

    def saliency(self, w: torch.Tensor) -> torch.Tensor:
        """Return ``w^2 F_qq / 2``."""
        return w.square() * self._diag_fisher / 2.0

    def release(self) -> None:
        """Drop the diagonal."""
        super().release()
        self._diag_fisher = None


class IdentityCurvature(_DiagonalUpdates, Curvature):
    """``F = I``: saliency ``w_q^2 / 2`` (magnitude pruning); no compensation. Needs no data."""

    needs_data = False

    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Nothing to estimate."""

    def saliency(self, w: torch.Tensor) -> torch.Tensor:
        """Return ``w^2 / 2``."""
        return w.square() / 2.0

