r"""Curvature sources for OBS pruning: what the pruner asks of a curvature estimate.

The pruner (:func:`~mfac.prune.prune_oneshot`) works on the *kept space*: the ``k`` coordinates of the pruned
parameters that are still present, in flat order. At each (re)computation step it calls::

    source.prepare(model, space)     # curvature at the current weights (e.g. collect gradients)
    source.saliency(w)               # (k,) loss increase of removing each weight alone
    source.update(w, removed, kind)  # (k,) weight change removing ``removed`` (dw_S = -w_S)
    source.release()                 # drop the estimate (memory)

Restricting to the kept space is what makes earlier pruning stick (see :mod:`mfac.prune.pruner`). A new
curvature source (e.g. a layer-wise input Hessian, SparseGPT-style) implements these four methods and is
passed as ``curvature=`` to the pruner; masks, schedules, N:M and the scorer API are shared.

Sources here:

* :class:`FisherCurvature`: the M-FAC empirical Fisher ``F = damp I + (1/m) G^T G`` of ``m`` gradients, full
  or block-diagonal (``block_size``), through :class:`~mfac.fisher.StaticInverseFisher`.
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

from mfac.collect import collect_grads
from mfac.fisher import InverseFisher, StaticInverseFisher
from mfac.numerics import check_damp, check_positive_int
from mfac.params import ParamSpace
from mfac.prune.scores import independent_update, obs_saliency, restricted_joint_update

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


class FisherCurvature(Curvature):
    r"""The empirical Fisher of ``ngrads`` gradients, as M-FAC's static inverse (full or block-diagonal).

    ``prepare`` collects ``G`` (``m x k``, kept coordinates only, via :func:`~mfac.collect.collect_grads`) and
    builds ``F^{-1}``. Updates: ``"independent"`` is one ``mul``; ``"joint"`` rebuilds the operator with the
    removed columns zeroed (:func:`~mfac.prune.scores.restricted_joint_update`, cost of one more build,
    exact); ``"none"`` only zeros.

    Memory: ``G`` plus the factor, about ``2 m k`` entries (the joint update reuses ``G``'s memory).

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

    def _gradients(self, model: nn.Module, space: ParamSpace) -> torch.Tensor:
        return collect_grads(
            model,
            self.loss_fn,
            self.data,
            self.ngrads,
            params=space,
            masked=space.has_masks,
            **self.collect,
        )

    def _damp_for(self, grads: torch.Tensor) -> float:
        """Return the absolute damp for this ``G``: ``damp``, or ``damp * |G|_F^2 / (m k)`` if relative."""
        damp = self.damp
        if self.relative_damp:
            scale = float(torch.linalg.vector_norm(grads, dtype=torch.float64)) ** 2 / max(grads.numel(), 1)
            if not (math.isfinite(scale) and scale > 0.0):
                raise ValueError(
                    f"relative_damp needs gradients with a finite, positive mean square, got {scale}"
                )
            damp *= scale
        self.last_damp = damp
        if self.relative_damp:
            logger.debug(
                "relative_damp: damp %g x mean Fisher diagonal %g = %g", self.damp, damp / self.damp, damp
            )
        return damp

    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Collect ``G`` (``m x k``) at the current weights; build ``F^{-1}`` and its diagonal."""
        self.release()
        grads = self._gradients(model, space)  # shape: (m, k)
        self._finv = StaticInverseFisher(
            grads, self._damp_for(grads), block_size=self.block_size, overwrite=not self.retain_grads
        )
        self._grads = grads if self.retain_grads else None
        self._diag = self._finv.diag()

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
        if self._grads is None:
            raise RuntimeError("the joint update needs the gradients: build with retain_grads=True")
        self._finv = None  # free the factor before the second build
        grads, self._grads = self._grads, None
        # a subclass's own ``prepare`` may not have set ``last_damp``: derive it from ``G`` then
        damp = self.last_damp if self.last_damp is not None else self._damp_for(grads)
        return restricted_joint_update(
            w, grads, damp, removed, block_size=self.block_size, overwrite=True
        )

    def release(self) -> None:
        """Drop ``G``, ``F^{-1}`` and its diagonal."""
        self._grads = self._finv = self._diag = None
        self.last_damp = None


class DiagonalFisherCurvature(FisherCurvature):
    r"""``F = diag(damp + (1/m) sum_i g_i^2)``: OBD-style saliency ``w_q^2 F_qq / 2``, no compensation.

    With a diagonal ``F`` there are no cross terms, so every update kind reduces to zeroing. Memory: ``G``
    while collecting (``m k``), then ``k``.
    """

    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Collect ``G`` and keep only ``damp + mean(G^2)`` per coordinate."""
        self.release()
        grads = self._gradients(model, space)
        self._diag_fisher = grads.square().mean(dim=0).add_(self._damp_for(grads))
        del grads

    def saliency(self, w: torch.Tensor) -> torch.Tensor:
        """Return ``w^2 F_qq / 2``."""
        return w.square() * self._diag_fisher / 2.0

    def update(self, w: torch.Tensor, removed: torch.Tensor, kind: str) -> torch.Tensor:
        """Zero the removed weights (a diagonal curvature has no cross terms to compensate with)."""
        check_update(kind)
        return _mask_only(w, removed)

    def release(self) -> None:
        """Drop the diagonal."""
        super().release()
        self._diag_fisher = None


class IdentityCurvature(Curvature):
    """``F = I``: saliency ``w_q^2 / 2`` (magnitude pruning); no compensation. Needs no data."""

    needs_data = False

    def prepare(self, model: nn.Module, space: ParamSpace) -> None:
        """Nothing to estimate."""

    def saliency(self, w: torch.Tensor) -> torch.Tensor:
        """Return ``w^2 / 2``."""
        return w.square() / 2.0

    def update(self, w: torch.Tensor, removed: torch.Tensor, kind: str) -> torch.Tensor:
        """Zero the removed weights (a diagonal curvature has no cross terms to compensate with)."""
        check_update(kind)
        return _mask_only(w, removed)
