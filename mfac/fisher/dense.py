"""The explicit ``d x d`` reference operator (tests, notebooks, tiny models)."""

from __future__ import annotations

import torch

from mfac.fisher.base import InverseFisher, check_grads
from mfac.numerics import SMALL_DTYPE, check_damp

__all__ = ["DenseInverseFisher"]


class DenseInverseFisher(InverseFisher):
    r"""``F^{-1}`` formed explicitly: ``F = damp I + (1/m) G^T G`` inverted in float64.

    Args:
        grads: shape ``(m, d)``, one gradient per row (``m = 0`` gives ``F = damp I``).
        damp: ``lambda > 0``.

    Memory: ``d * d`` entries of the gradients' dtype (plus a float64 ``d x d`` work matrix).
    Cost: ``O(m d^2 + d^3)`` to build, ``O(d^2)`` per product. The reference the matrix-free operators
    are tested against; never use it for real models.
    """

    def __init__(self, grads: torch.Tensor, damp: float) -> None:
        grads = check_grads(grads)
        damp = check_damp(damp)
        m, d = grads.shape
        super().__init__(d, damp, grads.dtype, grads.device)
        g64 = grads.to(SMALL_DTYPE)
        fisher = damp * torch.eye(d, dtype=SMALL_DTYPE, device=grads.device)
        if m:
            fisher = fisher + (g64.T @ g64) / m
        self._ngrads = m
        #: the explicit ``F^{-1}``, shape ``(d, d)``, in the gradients' dtype.
        self.matrix = torch.cholesky_inverse(torch.linalg.cholesky(fisher)).to(grads.dtype)

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
