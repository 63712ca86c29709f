"""The explicit ``d x d`` reference operator (tests, notebooks, tiny models)."""

from __future__ import annotations

import torch

from mfac.fisher.base import InverseFisher, check_grads
from mfac.numerics import SMALL_DTYPE, allocate, check_damp, safe_cholesky

__all__ = ["DenseInverseFisher"]


class DenseInverseFisher(InverseFisher):
    r"""``F^{-1}`` formed explicitly: ``F = damp I + (1/m) G^T G`` inverted in float64.

    Args:
        grads: shape ``(m, d)``, one gradient per row (``m = 0`` gives ``F = damp I``).
        damp: ``lambda > 0`` (``1 / damp`` finite in the gradients' dtype).

    The ``d x d`` Cholesky goes through :func:`~mfac.numerics.safe_cholesky`: when ``damp`` is too
    small for float64 to see it next to ``G^T G / m`` a jitter is added with a
    :class:`~mfac.numerics.NumericalWarning` (recorded in :attr:`jitter`), or
    :class:`~mfac.numerics.NotPositiveDefiniteError` is raised.

    Memory: ``d * d`` entries of the gradients' dtype (plus a float64 ``d x d`` work matrix).
    Cost: ``O(m d^2 + d^3)`` to build, ``O(d^2)`` per product. The reference the matrix-free operators
    are tested against; never use it for real models.
    """

    def __init__(self, grads: torch.Tensor, damp: float) -> None:
        grads = check_grads(grads)
        damp = check_damp(damp, grads.dtype)
        m, d = grads.shape
        super().__init__(d, damp, grads.dtype, grads.device)
        g64 = grads.to(SMALL_DTYPE)
        fisher = allocate((d, d), SMALL_DTYPE, grads.device, "dense d x d Fisher")
        fisher.diagonal().fill_(damp)
        if m:
            fisher.addmm_(g64.T, g64, alpha=1.0 / m)
        self._ngrads = m
        factor, self.jitter = safe_cholesky(
            fisher, what="dense Fisher damp*I + G^T G / m", entry_dtype=SMALL_DTYPE
        )
        #: the explicit ``F^{-1}``, shape ``(d, d)``, in the gradients' dtype.
        self.matrix = torch.cholesky_inverse(factor).to(grads.dtype)

    @property
    def ngrads(self) -> int:
        """``m``: the number of gradient rows."""
        return self._ngrads

    def _mul(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix  # symmetric: (F^{-1} x^T)^T = x F^{-1}

    def _diag(self) -> torch.Tensor:
        return self.matrix.diagonal().clone()

    def _submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        return self.matrix[idx][:, idx]

    def to_dense(self) -> torch.Tensor:
        """Return a copy of the explicit ``F^{-1}``, shape ``(d, d)``."""
        return self.matrix.clone()
