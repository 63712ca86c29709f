r"""The interface every inverse-Fisher operator implements.

All operators represent ``F^{-1}`` for the damped empirical Fisher (``G``: ``(n, d)`` gradient rows, ``s``
the averaging count, usually ``n = m``; ``damp`` is :math:`\lambda`)

.. math::

    F = \lambda I + \frac{1}{s} G^\top G .

Public methods validate and normalise their input and then call a private hook that only ever sees the
canonical form (a 2-D ``(k, d)`` block of row vectors of the operator's dtype and device).
"""

from __future__ import annotations

import abc

import numpy as np
import torch

from mfac.numerics import check_finite, check_not_meta, check_same_placement

__all__ = ["MAX_GROUP_SOLVE", "InverseFisher", "check_grads"]

#: ``group_solve`` refuses pieces (a group's part in one block) of more coordinates than this.
MAX_GROUP_SOLVE = 8192


class InverseFisher(abc.ABC):
    """``F^{-1}`` for ``F = damp * I + (1/m) G^T G`` as a matrix-free operator of size ``d x d``.

    Subclasses implement ``_mul`` (on ``(k, d)``), ``_diag`` and ``_submatrix`` (on a validated 1-D
    index tensor), and the properties ``ngrads``.

    Placement hooks (a placed operator, e.g. the column-sharded ones of :mod:`mfac.distributed`,
    overrides these and nothing public): :meth:`_reduce` (every sum over the ``d`` coordinates that
    feeds the ``m x m`` algebra), :attr:`_index_dim` (how many coordinates an index may address),
    :meth:`_to_dense` and :meth:`_check_available`. Their defaults are the single-process ones: no
    communication.
    """

    #: how an index argument is named in error messages (a sharded operator: global coordinates).
    _index_label = "idx"

    def __init__(
        self,
        dim: int,
        damp: float,
        dtype: torch.dtype,
        device: torch.device,
        *,
        io_dtype: torch.dtype | None = None,
    ) -> None:
        self._dim = int(dim)
        self._damp = float(damp)
        #: the compute dtype (of the stored factors and of every private hook's vectors).
        self._dtype = dtype
        #: the dtype of the vectors the public methods take and return (``dtype`` unless the operator
        #: computes in a wider one, e.g. float32 for half-precision gradients).
        self._io_dtype = io_dtype or dtype
        self._device = torch.device(device)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """``d``: the number of coordinates (parameters)."""
        return self._dim

    @property
    def damp(self) -> float:
        """``lambda`` in ``F = lambda I + (1/m) G^T G`` (never its reciprocal)."""
        return self._damp

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the vectors the operator takes and returns (the gradients' dtype)."""
        return self._io_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype the operator stores its factors in and computes with (``dtype``, or float32 for half)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the vectors the operator takes and returns."""
        return self._device

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)``."""
        return (self._dim, self._dim)

    @property
    @abc.abstractmethod
    def ngrads(self) -> int:
        """Number of gradients the Fisher is currently built from."""

    # ------------------------------------------------------------------ public, validating
    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``F^{-1} x``.

        Args:
            x: shape ``(d,)``, or ``(k, d)`` for ``k`` vectors as rows; the operator's dtype and device.

        Returns:
            Same shape as ``x``: ``F^{-1} x`` (or each row multiplied).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_same_placement(x, "x", self._io_dtype, self._device)
        if x.dim() not in (1, 2) or x.shape[-1] != self._dim:
            raise ValueError(
                f"x must have shape ({self._dim},) or (k, {self._dim}), got {tuple(x.shape)}"
            )
        rows = x.unsqueeze(0) if x.dim() == 1 else x
        out = self._to_io(self._mul(rows.to(self._dtype)))
        return out.squeeze(0) if x.dim() == 1 else out

    def diag(self) -> torch.Tensor:
        """Return ``diag(F^{-1})``, shape ``(d,)``."""
        return self._to_io(self._diag())

    def _to_io(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (compute dtype) in the public dtype: itself when they agree."""
        return out if out.dtype == self._io_dtype else out.to(self._io_dtype)

    def submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the dense block ``F^{-1}[idx][:, idx]``, shape ``(s, s)`` for ``s = len(idx)``.

        Args:
            idx: 1-D integer tensor of distinct-or-not coordinates in ``[0, d)``.

        Cost: ``O(s^2 m)`` (it is what joint OBS removal of ``s`` weights needs).
        """
        idx = self._check_index(idx)
        return self._to_io(self._submatrix(idx))

    def group_solve(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        r"""Return ``c`` with ``c_Q = ([F^{-1}]_QQ)^{-1} x_Q`` for every group ``Q`` of coordinates.

        The groups are ``Q_q = {j : labels[j] == q}`` for each label ``q >= 0``; coordinates with a negative
        label belong to no group and get ``c_j = 0``. This is the solve behind group OBS (group saliency
        ``1/2 x_Q^T c_Q``, update ``-F^{-1} c``) and exact joint removal (one group: the removed set).

        Args:
            x: shape ``(d,)``, the operator's dtype and device.
            labels: shape ``(d,)``, integer.

        Returns:
            ``c``, shape ``(d,)``, float64 (the small solves are done in float64).

        A group whose ``[F^{-1}]_QQ`` splits into independent pieces (coordinates in different blocks of a
        block-diagonal operator) is solved piece by piece, which is exact. Cost: ``O(|P|^2 m + |P|^3)`` per
        piece ``P`` (``O(|P|^3)`` for explicit blocks); work in slabs of about ``2^22`` float64 entries.

        Raises:
            ValueError: a piece has more than ``MAX_GROUP_SOLVE`` coordinates (a dense solve of that size).
        """
        if not isinstance(x, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("x and labels must be torch.Tensors")
        check_same_placement(x, "x", self._dtype, self._device)
        if x.shape != (self._dim,):
            raise ValueError(f"x must have shape ({self._dim},), got {tuple(x.shape)}")
        if labels.shape != (self._dim,) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor of shape ({self._dim},), got {labels.dtype} "
                f"{tuple(labels.shape)}"
            )
        return self._group_solve(x, labels.to(device=self._device, dtype=torch.long))

    def to_dense(self) -> torch.Tensor:
        """Return ``F^{-1}`` as an explicit ``(d, d)`` matrix (tests, notebooks, tiny ``d`` only)."""
        return self._to_io(self._to_dense())

    def to_scipy(self):
        """Return a ``scipy.sparse.linalg.LinearOperator`` view (float64 numpy in and out).

        The view is symmetric (``rmatvec == matvec``); it computes in the operator's dtype and device.
        """
        self._check_available("to_scipy")
        from scipy.sparse.linalg import LinearOperator

        def matmat(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x)
            rows = torch.as_tensor(np.ascontiguousarray(x.reshape(self._dim, -1).T))
            out = self._mul(rows.to(device=self._device, dtype=self._dtype))
            result = out.T.to(device="cpu", dtype=torch.float64).numpy()
            return result.reshape(x.shape)

        return LinearOperator(
            shape=self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat,
            dtype=np.float64,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self._dim}, ngrads={self.ngrads}, damp={self._damp:g}, "
            f"dtype={self._io_dtype}, device={self._device})"
        )

    # ------------------------------------------------------------------ helpers
    def _check_index(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.dtype in (torch.bool, torch.uint8) or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"idx must be an integer index tensor, got dtype {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
        bound = self._index_dim
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise IndexError(
                f"{self._index_label} must lie in [0, {bound}), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        return idx.to(device=self._device, dtype=torch.long)

    # ------------------------------------------------------------------ placement hooks
    def _reduce(self, partial: torch.Tensor) -> None:  # noqa: B027  (a hook with a no-op default)
        """Sum partial contractions over the ``d`` coordinates (``G x``, ``G G^T``, ``|v|^2``) across shards.

        In place. The identity on one process; sharded operators (``mfac.distributed``) all-reduce here.
        Only ``m``-sized vectors and ``m x m`` matrices ever pass through it.
        """

    @property
    def _index_dim(self) -> int:
        """Number of coordinates indices address: ``d`` (a sharded operator: the global ``d``)."""
        return self._dim

    def _to_dense(self) -> torch.Tensor:
        """``F^{-1}`` as a ``(d, d)`` matrix in the compute dtype: ``F^{-1}`` applied to the identity."""
        return self._mul(torch.eye(self._dim, dtype=self._dtype, device=self._device))

    def _check_available(self, method: str) -> None:  # noqa: B027  (a hook with a no-op default)
        """Raise ``NotImplementedError`` if public ``method`` cannot work under this placement."""

    # ------------------------------------------------------------------ hooks
    def _group_solve(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Pieces of equal size are solved together: gather ``(n, s, s)`` submatrices, batched Cholesky."""
        from mfac.numerics import SMALL_DTYPE, batched_spd_solve

        out = torch.zeros(self._dim, dtype=SMALL_DTYPE, device=self._device)
        seg = self._segments(labels)
        members = (seg >= 0).nonzero().squeeze(1)
        if members.numel() == 0:
            return out
        _, compact = torch.unique(seg[members], return_inverse=True)
        order = torch.argsort(compact, stable=True)
        coords = members[order]  # grouped by piece, increasing position inside each
        sizes = torch.bincount(compact)
        starts = torch.cumsum(sizes, 0) - sizes
        largest = int(sizes.max())
        if largest > MAX_GROUP_SOLVE:
            raise ValueError(
                f"a group (or its part in one block) has {largest} coordinates > MAX_GROUP_SOLVE = "
                f"{MAX_GROUP_SOLVE}: its dense solve is too large. Use block_size, smaller groups, or "
                "mfac.prune.restricted_joint_update for the joint removal of a large set"
            )
        for size in torch.unique(sizes).tolist():
            first = starts[sizes == size]
            per = max(1, (1 << 22) // (size * size))
            for lo in range(0, first.numel(), per):
                idx = coords[first[lo : lo + per, None] + torch.arange(size, device=self._device)]
                sub = self._submatrices(idx).to(SMALL_DTYPE)  # (n, s, s)
                rhs = x[idx].to(SMALL_DTYPE).unsqueeze(-1)
                out[idx] = batched_spd_solve(sub, rhs, what="[F^-1]_QQ").squeeze(-1)
        return out

    def _segments(self, labels: torch.Tensor) -> torch.Tensor:
        """Refine group labels into pieces whose ``[F^{-1}]`` blocks are independent (default: none)."""
        return labels

    def _submatrices(self, idx: torch.Tensor) -> torch.Tensor:
        """``F^{-1}[idx[i]][:, idx[i]]`` for each row of ``idx`` ``(n, s)``: shape ``(n, s, s)``."""
        return torch.stack([self._submatrix(row) for row in idx])

    @staticmethod
    def _split_by_block(labels: torch.Tensor, block: int) -> torch.Tensor:
        """Labels made distinct per block of ``block`` consecutive coordinates (negative ones kept)."""
        blk = torch.arange(labels.numel(), device=labels.device) // block
        nblocks = int(blk[-1]) + 1 if labels.numel() else 1
        return torch.where(labels >= 0, labels * nblocks + blk, labels)

    @abc.abstractmethod
    def _mul(self, x: torch.Tensor) -> torch.Tensor:
        """``F^{-1}`` applied to each row of ``x`` (shape ``(k, d)``, canonical dtype/device)."""

    @abc.abstractmethod
    def _diag(self) -> torch.Tensor:
        """``diag(F^{-1})``, shape ``(d,)``."""

    @abc.abstractmethod
    def _submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        """``F^{-1}[idx][:, idx]`` for a validated long index tensor on the operator's device."""


def check_grads(grads: torch.Tensor, name: str = "grads", *, finite: bool = True) -> torch.Tensor:
    """Validate an ``(m, d)`` gradient matrix: a floating tensor with d >= 1 (and finite entries).

    ``finite=False`` skips the finiteness pass, for callers that check it more cheaply themselves.
    """
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (m, d), got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"{name} must have shape (m, d), got {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {grads.dtype}")
    if grads.shape[1] < 1:
        raise ValueError(f"{name} must have d >= 1 columns, got shape {tuple(grads.shape)}")
    check_not_meta(grads, name)
    if finite:
        check_finite(grads, name)
    return grads
