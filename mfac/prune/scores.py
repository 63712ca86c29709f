r"""OBS saliencies and weight updates as pure functions of an inverse-curvature operator.

Optimal Brain Surgeon on the quadratic model ``1/2 dw^T F dw`` of the loss around the weights ``w`` (``F``:
the damped empirical Fisher, or any SPD curvature; ``F^{-1}`` is given as an
:class:`~mfac.fisher.InverseFisher`):

* removing weight ``q`` alone costs the **saliency** ``rho_q = w_q^2 / (2 [F^{-1}]_qq)``
  (:func:`obs_saliency`); the best compensation of the other weights is
  ``dw = -(w_q / [F^{-1}]_qq) F^{-1} e_q``.
* removing a set ``S`` with the **independent** update (the paper's reference code): the sum of the
  single-weight corrections, ``dw = -F^{-1} v`` with ``v_q = w_q / [F^{-1}]_qq`` on ``S`` and 0 elsewhere
  (:func:`independent_update`). One product with ``F^{-1}``.
* removing ``S`` **jointly** (exact on the quadratic model):

      dw = -F^{-1}[:, S] ([F^{-1}]_SS)^{-1} w_S,    loss increase 1/2 w_S^T ([F^{-1}]_SS)^{-1} w_S.

  Two routes to the same vector:

  - :func:`joint_update`, from the operator's public interface: ``submatrix(S)`` and a dense float64 Cholesky
    solve, then one ``mul``. Cost ``O(|S|^2 m + |S|^3 + dm)``, memory ``|S|^2``: for ``|S|`` up to a few
    thousand (tests, per-layer or per-block use).
  - :func:`restricted_joint_update`, for the empirical Fisher ``F = damp I + (1/m) G^T G`` from its gradients:
    with ``K`` the coordinates that stay, the same update is

        dw_S = -w_S,    dw_K = F_KK^{-1} F_KS w_S = F_KK^{-1} (1/m) G_K^T (G_S w_S)

    (the constrained minimiser of ``1/2 dw^T F dw`` subject to ``dw_S = -w_S``; ``([F^{-1}]_SS)^{-1}`` is the
    Schur complement ``F_SS - F_SK F_KK^{-1} F_KS``). ``F_KK`` is the damped Fisher of the gradients with the
    ``S`` columns zeroed, so ``F_KK^{-1}`` is one more operator build (``O(m^2 d)``, the Woodbury ``m x m``
    route or the direct ``B x B`` one) and one ``mul``, whatever ``|S|``. Block-diagonal Fishers decouple:
    zeroing columns keeps the block layout, and ``F_KS`` is taken block by block.

Every update here returns ``dw`` with ``dw_S = -w_S`` exactly, so ``w + dw`` is exactly zero on ``S`` (the
independent update's raw value on ``S`` is only approximately ``-w_S``; it is overridden). All vectors are
flat, shape ``(d,)``, in the operator's dtype and on its device.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

from mfac.fisher import InverseFisher, StaticInverseFisher
from mfac.fisher.base import check_grads
from mfac.numerics import SMALL_DTYPE, NumericalWarning, check_damp, check_same_placement

logger = logging.getLogger(__name__)

__all__ = [
    "fisher_cross_product",
    "group_independent_update",
    "group_saliency",
    "independent_update",
    "joint_loss_increase",
    "joint_update",
    "obs_saliency",
    "restricted_joint_update",
]

#: ``joint_update`` refuses index sets larger than this (the dense ``|S| x |S|`` system).
MAX_DENSE_JOINT = 8192


# ---------------------------------------------------------------------------------------- checks
def _check_vector(w: torch.Tensor, finv: InverseFisher, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.shape != (finv.dim,):
        raise ValueError(f"{name} must have shape ({finv.dim},) (the operator's d), got {tuple(w.shape)}")
    check_same_placement(w, name, finv.dtype, finv.device)
    return w


def _as_index(removed: torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    """Turn a bool mask ``(d,)`` (True = removed) or an index tensor into sorted unique long indices."""
    if not isinstance(removed, torch.Tensor):
        removed = torch.as_tensor(removed)
    if removed.dtype == torch.bool:
        if removed.shape != (dim,):
            raise ValueError(f"a boolean removed mask must have shape ({dim},), got {tuple(removed.shape)}")
        return removed.to(device).nonzero().squeeze(1)
    if removed.is_floating_point() or removed.is_complex() or removed.dim() != 1:
        raise TypeError(
            f"removed must be a 1-D integer index tensor or a ({dim},) bool mask, "
            f"got dtype {removed.dtype} and shape {tuple(removed.shape)}"
        )
    idx = removed.to(device=device, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= dim):
        raise IndexError(f"removed indices must lie in [0, {dim}), got [{int(idx.min())}, {int(idx.max())}]")
    idx = torch.unique(idx)  # sorted
    return idx


def _positive_diag(diag: torch.Tensor) -> torch.Tensor:
    """``diag(F^{-1})`` with entries that rounding made <= 0 raised to the smallest normal (+ warning)."""
    tiny = torch.finfo(diag.dtype).tiny
    bad = diag <= tiny
    if bool(bad.any()):
        warnings.warn(
            f"{int(bad.sum())} of {diag.numel()} diagonal entries of F^-1 are <= 0 after rounding "
            f"(min {diag.min().item():.3e}); their saliencies are clamped. damp is probably too small "
            "for this dtype: consider a larger damp or float64 gradients.",
            NumericalWarning,
            stacklevel=3,
        )
        diag = diag.clamp_min(tiny)
    return diag


# ---------------------------------------------------------------------------------------- saliency
def obs_saliency(w: torch.Tensor, finv: InverseFisher, *, diag: torch.Tensor | None = None) -> torch.Tensor:
    r"""OBS saliencies ``rho_q = w_q^2 / (2 [F^{-1}]_qq)``: the loss increase of removing ``q`` alone.

    Args:
        w: the weights, shape ``(d,)``, the operator's dtype and device.
        finv: ``F^{-1}``.
        diag: ``finv.diag()`` if already computed (``O(dm)`` otherwise).

    Returns:
        Shape ``(d,)``, >= 0.
    """
    _check_vector(w, finv)
    if diag is None:
        diag = finv.diag()
    return w.square() / (2.0 * _positive_diag(diag))


# ---------------------------------------------------------------------------------------- updates
def independent_update(
    w: torch.Tensor, finv: InverseFisher, removed: torch.Tensor, *, diag: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Remove ``S`` with the paper's update: the sum of the single-weight OBS corrections.

    ``dw = -F^{-1} v`` with ``v_q = w_q / [F^{-1}]_qq`` for ``q`` in ``S`` (0 elsewhere); then ``dw_S :=
    -w_S``. Exact for ``|S| = 1``; an approximation otherwise (it ignores the interaction of the removed
    weights). Cost: one ``mul`` (``O(dm)``), plus ``diag`` if not given.

    Args:
        w: shape ``(d,)``.
        finv: ``F^{-1}``.
        removed: the set ``S``: a ``(d,)`` bool mask (True = removed) or 1-D indices.
        diag: ``finv.diag()`` if already computed.

    Returns:
        ``dw``, shape ``(d,)``.
    """
    _check_vector(w, finv)
    idx = _as_index(removed, finv.dim, finv.device)
    if diag is None:
        diag = finv.diag()
    v = torch.zeros_like(w)
    v[idx] = w[idx] / _positive_diag(diag[idx])
    dw = finv.mul(v).neg_()
    dw[idx] = -w[idx]
    return dw


def joint_update(w: torch.Tensor, finv: InverseFisher, removed: torch.Tensor) -> torch.Tensor:
    r"""Exact joint OBS removal of ``S`` from the operator's public interface.

    ``c = ([F^{-1}]_SS)^{-1} w_S`` by :meth:`~mfac.fisher.InverseFisher.group_solve` (float64 Cholesky; for a
    block-diagonal operator one ``|S_b| x |S_b|`` solve per block ``b``, since ``[F^{-1}]_SS`` is then
    block-diagonal), then ``dw = -F^{-1} c`` and ``dw_S := -w_S``.

    Cost ``O(|S|^2 m + |S|^3 + dm)`` for the full operator, memory ``8 |S|^2`` bytes: for ``|S| <=
    MAX_DENSE_JOINT`` (use :func:`restricted_joint_update` for large sets of the full empirical Fisher).
    Block-diagonal with explicit blocks (:class:`~mfac.fisher.BlockInverseFisher`): ``O(sum_b |S_b|^3 + d B)``
    whatever ``|S|``.

    Args:
        w: shape ``(d,)``.
        finv: ``F^{-1}`` (any :class:`~mfac.fisher.InverseFisher`).
        removed: ``S``: a ``(d,)`` bool mask or 1-D indices.

    Returns:
        ``dw``, shape ``(d,)``.
    """
    _check_vector(w, finv)
    idx = _as_index(removed, finv.dim, finv.device)
    coeff = _restricted_solve(w, finv, idx)
    dw = finv.mul(coeff.to(w.dtype)).neg_()
    dw[idx] = -w[idx]
    return dw


def joint_loss_increase(w: torch.Tensor, finv: InverseFisher, removed: torch.Tensor) -> float:
    r"""``1/2 w_S^T ([F^{-1}]_SS)^{-1} w_S``: the quadratic model's loss increase of the joint removal.

    Same cost and limit as :func:`joint_update`; computed in float64.
    """
    _check_vector(w, finv)
    idx = _as_index(removed, finv.dim, finv.device)
    coeff = _restricted_solve(w, finv, idx)
    return 0.5 * float(w.to(SMALL_DTYPE) @ coeff)


def _restricted_solve(w: torch.Tensor, finv: InverseFisher, idx: torch.Tensor) -> torch.Tensor:
    """``(d,)`` float64: ``([F^{-1}]_SS)^{-1} w_S`` on ``S = idx``, zero elsewhere (one group)."""
    labels = torch.full((finv.dim,), -1, dtype=torch.long, device=finv.device)
    labels[idx] = 0
    try:
        return finv.group_solve(w, labels)
    except ValueError as err:
        if "MAX_GROUP_SOLVE" not in str(err):
            raise
        raise ValueError(
            f"joint_update solves a dense |S| x |S| system; |S| = {idx.numel()} > MAX_DENSE_JOINT = "
            f"{MAX_DENSE_JOINT}. Use restricted_joint_update (the empirical Fisher's m x m route) or a "
            "block-diagonal operator"
        ) from None


# ---------------------------------------------------------------------------------------- groups
def _check_labels(labels: torch.Tensor, finv: InverseFisher) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.shape != (finv.dim,):
        got = getattr(labels, "shape", labels)
        raise ValueError(f"labels must be a tensor of shape ({finv.dim},), got {got}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.to(device=finv.device, dtype=torch.long)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0 (group numbers), got {int(labels.min())}")
    return labels


def group_saliency(w: torch.Tensor, finv: InverseFisher, labels: torch.Tensor) -> torch.Tensor:
    r"""Group OBS saliencies: ``rho_Q = 1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q`` for each group ``Q``.

    The loss increase of removing the whole group ``Q`` alone, with the best compensation of the other
    weights, on the quadratic model. For groups of one weight it is :func:`obs_saliency`.

    Args:
        w: shape ``(d,)``, the operator's dtype and device.
        finv: ``F^{-1}``.
        labels: shape ``(d,)``, integer ``>= 0``: coordinate ``j`` belongs to group ``labels[j]``; groups
            are numbered ``0..n-1`` (a number without coordinates gets saliency 0).

    Returns:
        Shape ``(n,)`` in ``w``'s dtype, ``n = max(labels) + 1``.

    Cost: one :meth:`~mfac.fisher.InverseFisher.group_solve` (for explicit blocks ``O(d B^2)`` at most;
    oBERT's groups of 4 consecutive weights: ``O(16 d)``).
    """
    _check_vector(w, finv)
    labels = _check_labels(labels, finv)
    coeff = finv.group_solve(w, labels)
    n = int(labels.max()) + 1 if labels.numel() else 0
    per_coord = w.to(SMALL_DTYPE) * coeff
    out = torch.zeros(n, dtype=SMALL_DTYPE, device=w.device).index_add_(0, labels, per_coord)
    return out.mul_(0.5).clamp_min_(0.0).to(w.dtype)


def group_independent_update(
    w: torch.Tensor, finv: InverseFisher, removed: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    r"""Remove whole groups with the sum of their single-group OBS corrections.

    ``dw = -F^{-1} c`` with ``c_Q = ([F^{-1}]_QQ)^{-1} w_Q`` for each removed group ``Q`` (0 elsewhere), then
    ``dw_S := -w_S``: exact for one group (``-F^{-1} E_Q ([F^{-1}]_QQ)^{-1} w_Q``), the independent
    approximation for several (:func:`joint_update` removes their union exactly).

    Args:
        w: shape ``(d,)``.
        finv: ``F^{-1}``.
        removed: ``S``, a ``(d,)`` bool mask or indices: a union of whole groups.
        labels: ``(d,)`` group numbers as in :func:`group_saliency`.

    Returns:
        ``dw``, shape ``(d,)``.
    """
    _check_vector(w, finv)
    labels = _check_labels(labels, finv)
    idx = _as_index(removed, finv.dim, finv.device)
    restricted = torch.full_like(labels, -1)
    restricted[idx] = labels[idx]
    coeff = finv.group_solve(w, restricted)
    dw = finv.mul(coeff.to(w.dtype)).neg_()
    dw[idx] = -w[idx]
    return dw


# ---------------------------------------------------------------------------------------- Fisher route
def _block_slabs(dim: int, block: int, chunk: int):
    """Yield ``(start, stop, nblocks)`` column slabs made of whole blocks, about ``chunk`` columns each."""
    per = max(1, chunk // block)
    start = 0
    while start < dim:
        stop = min(start + per * block, dim)
        yield start, stop, -(-(stop - start) // block)
        start = stop


def fisher_cross_product(
    grads: torch.Tensor, v: torch.Tensor, *, block_size: int | None = None, chunk: int = 1 << 20
) -> torch.Tensor:
    r"""``(1/m) G^T G v`` with the block-diagonal structure: ``(1/m) G_b^T (G_b v_b)`` for each block.

    This is ``(F - damp I) v``; for ``v`` supported on ``S`` and restricted to ``K`` (disjoint from ``S``) it
    is ``F_KS v_S``. Two passes over ``G``; for blocks, slabs of about ``chunk`` columns are copied at a time
    (never a full copy of ``G``).

    Args:
        grads: ``G``, shape ``(m, d)``.
        v: shape ``(d,)``, ``G``'s dtype and device.
        chunk: columns per copied slab (block-diagonal case).
        block_size: ``B`` (``None``: one block of ``d``), as in :class:`~mfac.fisher.StaticInverseFisher`.

    Returns:
        Shape ``(d,)``.
    """
    m, d = grads.shape
    if v.shape != (d,):
        raise ValueError(f"v must have shape ({d},), got {tuple(v.shape)}")
    if m == 0:
        return torch.zeros_like(v)
    block = d if block_size is None else min(block_size, d)
    if block == d:
        return grads.T @ (grads @ v) / m
    out = torch.empty_like(v)
    for start, stop, nb in _block_slabs(d, block, chunk):
        width = stop - start
        pad = nb * block - width
        slab = grads[:, start:stop]
        vs = v[start:stop]
        if pad:
            slab = torch.nn.functional.pad(slab, (0, pad))
            vs = torch.nn.functional.pad(vs, (0, pad))
        slab = slab.reshape(m, nb, block)
        coeff = torch.einsum("inb,nb->in", slab, vs.reshape(nb, block))  # (m, nb): G_b v_b
        part = torch.einsum("inb,in->nb", slab, coeff).reshape(-1)  # G_b^T c_b
        out[start:stop] = part[:width] / m
    return out


def restricted_joint_update(
    w: torch.Tensor,
    grads: torch.Tensor,
    damp: float,
    removed: torch.Tensor,
    *,
    block_size: int | None = None,
    overwrite: bool = False,
    build: Callable[[torch.Tensor], InverseFisher] | None = None,
) -> torch.Tensor:
    r"""Exact joint OBS removal of ``S`` for ``F = damp I + (1/m) G^T G`` (optionally block-diagonal).

    ``dw_S = -w_S``; ``dw_K = F_KK^{-1} F_KS w_S`` with ``F_KS w_S = (1/m) G_K^T (G_S w_S)`` (block by block)
    and ``F_KK^{-1}`` the operator built from ``G`` with the columns of ``S`` zeroed (the zeroed coordinates
    decouple: there ``F = damp I`` and the right-hand side is 0). Equal to :func:`joint_update` (see the
    module docstring), but the cost does not depend on ``|S|``.

    Cost: two passes over ``G`` + one operator build ``O(m^2 d)`` + one ``mul`` ``O(md)``. Memory: the build's
    (``~ 2 m d`` entries; ``~ m d`` with ``overwrite=True``, which destroys ``grads``: its ``S`` columns are
    zeroed and the factor is written into it).

    Args:
        w: shape ``(d,)``, ``grads``' dtype and device.
        grads: ``G``, shape ``(m, d)``.
        damp: ``lambda > 0``.
        removed: ``S``: a ``(d,)`` bool mask or 1-D indices.
        block_size: ``B`` of the block-diagonal Fisher (``None``: the full one).
        overwrite: reuse ``grads``' memory (destroying it).
        build: how to build ``F_KK^{-1}`` from the zeroed gradients (default: ``StaticInverseFisher(g, damp,
            block_size=block_size, overwrite=overwrite)``).

    Returns:
        ``dw``, shape ``(d,)``.
    """
    grads = check_grads(grads)
    damp = check_damp(damp, grads.dtype)
    m, d = grads.shape
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor of shape ({d},), got {type(w).__name__}")
    if w.shape != (d,):
        raise ValueError(f"w must have shape ({d},), got {tuple(w.shape)}")
    check_same_placement(w, "w", grads.dtype, grads.device)
    idx = _as_index(removed, d, grads.device)
    dw = torch.zeros_like(w)
    if idx.numel() == 0:
        return dw
    w_removed = torch.zeros_like(w)
    w_removed[idx] = w[idx]
    if block_size is None or min(block_size, d) == d:
        coeff = grads @ w_removed  # (m,) G_S w_S
        work = grads if overwrite else grads.clone()
        work[:, idx] = 0
        rhs = work.T @ coeff / m  # F_KS w_S, zero on S
    else:
        rhs = fisher_cross_product(grads, w_removed, block_size=block_size)  # F_KS w_S on K rows
        rhs[idx] = 0
        work = grads if overwrite else grads.clone()
        work[:, idx] = 0
    if build is None:
        inverse = StaticInverseFisher(work, damp, block_size=block_size, overwrite=True)
    else:
        inverse = build(work)
    del work
    dw = inverse.mul(rhs)
    dw[idx] = -w[idx]
    return dw
