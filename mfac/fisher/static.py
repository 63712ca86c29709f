r"""Static inverse Fisher: a fixed set of ``m`` gradients, built with BLAS-3 only.

With ``G`` the ``(m, d)`` gradient matrix and ``F = damp I + (1/m) G^T G`` (``damp`` is :math:`\lambda`),
Woodbury gives, with the ``m x m`` SPD matrix ``M``,

.. math::

    F^{-1} = \frac{1}{\lambda}\left(I - G^\top M^{-1} G\right), \qquad M = m \lambda I + G G^\top ,

and with the Cholesky factor :math:`M = L L^\top` and :math:`Q = L^{-1} G` (``m x d``):

.. math::

    F^{-1} x &= \frac{1}{\lambda}\left(x - Q^\top (Q x)\right)
        && \text{two passes over } Q\text{: } O(dm) \\
    \operatorname{diag}(F^{-1}) &= \frac{1}{\lambda}\left(1 - \textstyle\sum_i Q_{ij}^2\right)
        && \text{one pass: } O(dm) \\
    [F^{-1}]_{jk} &= \frac{1}{\lambda}\left(\delta_{jk} - \langle Q_{:,j}, Q_{:,k}\rangle\right)
        && O(m)

This is the paper's static recursion (``v_i = F_{i-1}^{-1} g_i``, denominators ``m + g_i^T v_i``) in BLAS-3
form: its denominators are (up to the factor ``damp``) the pivots of this Cholesky. The build is one Gram
product, one ``m x m`` Cholesky (float64) and one triangular solve; there is no Python loop over ``m``.

Block-diagonal variant: the ``d`` coordinates are cut into blocks of ``B`` (the last block may be shorter)
and each block gets its own ``F_b = damp I + (1/m) G_b^T G_b`` from the same gradients. Blocks are a batch
dimension. When ``B <= m`` the ``B x B`` blocks are inverted directly (O(d B^2) memory-free of ``m``,
WoodFisher's route); otherwise the Woodbury route above is taken per block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from mfac.fisher.base import InverseFisher, check_grads
from mfac.fisher.blocks import BlockInverseFisher, invert_fisher_blocks
from mfac.numerics import (
    DEFAULT_CHUNK,
    accumulated_matmul,
    allocate,
    check_damp,
    check_positive_int,
    safe_cholesky,
)

__all__ = ["StaticInverseFisher"]

#: gradient dtypes the operator computes on in float32 (its vectors stay in the gradients' dtype).
_HALF = (torch.float16, torch.bfloat16)



class StaticInverseFisher(InverseFisher):
    r"""``F^{-1}`` for ``F = damp I + (1/m) G^T G`` over a fixed gradient matrix (pruning, analysis).

    Args:
        grads: ``G``, shape ``(m, d)``, one gradient per row; finite. Its dtype and device are the
            operator's (the vectors ``mul`` takes and returns). float16 / bfloat16 gradients are
            copied to float32 and everything is computed and stored in float32
            (:attr:`compute_dtype`); results are rounded to the gradients' dtype. ``m = 0`` gives
            ``F^{-1} = I / damp``.
        damp: ``lambda > 0``, with ``1 / damp`` finite in the gradients' dtype (``ValueError``).
        block_size: ``B``; ``None`` (default) means one block of size ``d`` (the full operator). The
            last block has ``d - (nb - 1) B`` coordinates.
        overwrite: allow the build to reuse ``grads``' memory for the factor ``Q`` (then ``grads`` is
            destroyed). Only possible for the full operator (``block_size=None``) on a contiguous input;
            brings the peak memory from about ``2 m d`` to about ``m d`` entries.

    Memory: the factor ``Q`` is ``m * d * bytes`` (Woodbury route, ``B > m``) or the blocks'
    inverses ``d * B * bytes`` (direct route, ``B <= m``); plus ``nb * m^2 * 8`` bytes of float64 factors.
    Peak during the build: about ``2 m d`` entries (``m d`` with ``overwrite=True``).

    Cost: build ``O(m^2 d)`` (Gram + triangular solve, BLAS-3) + ``O(nb m^3)``; ``mul`` ``O(md)`` per
    vector; ``diag`` ``O(md)``; ``submatrix`` ``O(s^2 m)``.

    The Gram products are accumulated in float64 (``chunk`` columns at a time in the input dtype), the
    ``m x m`` Cholesky is done in float64; a Gram matrix that rounding left indefinite is repaired with a
    small diagonal jitter and a :class:`~mfac.numerics.NumericalWarning`.

    Example:
        >>> G = torch.randn(8, 100, dtype=torch.float64)           # m = 8 gradients of d = 100
        >>> op = StaticInverseFisher(G, damp=0.1)
        >>> F = 0.1 * torch.eye(100, dtype=torch.float64) + G.T @ G / 8
        >>> x = torch.randn(100, dtype=torch.float64)
        >>> torch.allclose(op.mul(x), torch.linalg.solve(F, x))    # O(md), no d x d matrix
        True
        >>> torch.allclose(op.diag(), torch.linalg.inv(F).diagonal())
        True
    """

    def __init__(
        self,
        grads: torch.Tensor,
        damp: float,
        *,
        block_size: int | None = None,
        overwrite: bool = False,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        grads = check_grads(grads, finite=False)  # checked for free on the Gram diagonal
        io_dtype = grads.dtype
        damp = check_damp(damp, io_dtype)
        m, d = grads.shape
        if block_size is not None:
            check_positive_int(block_size, "block_size")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__} {overwrite!r}")
        self._chunk = check_positive_int(chunk, "chunk")
        if io_dtype in _HALF:
            # no half-precision triangular solves / Cholesky on CPU, and float16 squares overflow at
            # 256: build and store in float32 (a float32 copy of G: m * d * 4 bytes), vectors stay half.
            grads = grads.to(torch.float32)
            overwrite = True  # the copy is ours
        block = d if block_size is None else min(block_size, d)
        super().__init__(d, damp, grads.dtype, grads.device, io_dtype=io_dtype)
        self._ngrads = m
        self._block = block
        self._nblocks = math.ceil(d / block)
        self._pad = self._nblocks * block - d
        #: diagonal jitter the m x m Cholesky needed (0.0 normally; see ``safe_cholesky``).
        self.jitter = 0.0
        if m == 0:
            self.route = "empty"
        elif self._use_direct_route(block, m):
            self.route = "direct"
            self._blocks = self._build_direct(grads)  # (nb, B, B) inverse blocks
        else:
            self.route = "woodbury"
            self._q = self._build_woodbury(grads, overwrite)  # shape: (nb, m, B)

    # ------------------------------------------------------------------ build
    def _use_direct_route(self, block: int, m: int) -> bool:
        """Whether blocks are inverted directly (``B <= m``) rather than through Woodbury.

        A hook: the sharded full operator (:mod:`mfac.distributed`) always takes Woodbury, whose only
        contractions over the (sharded) ``d`` coordinates are ``m``-sized (``G G^T``, ``Q x``).
        """
        return block <= m

    def _blocked(self, cols: torch.Tensor, nblocks: int) -> torch.Tensor:
        """``(m, c)`` column slab -> ``(nblocks, m, B)`` zero-padded block view/copy."""
        m = cols.shape[0]
        pad = nblocks * self._block - cols.shape[1]
        if pad:
            cols = nnf.pad(cols, (0, pad))
        return cols.reshape(m, nblocks, self._block).permute(1, 0, 2)

    def _build_direct(self, grads: torch.Tensor) -> BlockInverseFisher:
        """Invert each ``B x B`` block ``damp I + (1/m) G_b^T G_b`` (float64), batch by batch of blocks.

        The block Gram products run in the input dtype in slabs of ``chunk`` gradients, summed in
        float64 (:func:`~mfac.numerics.accumulated_matmul`); the inversion is
        :func:`~mfac.fisher.blocks.invert_fisher_blocks`, shared with the streaming builder, and the
        result the same :class:`~mfac.fisher.blocks.BlockInverseFisher` operator.
        """
        m = self._ngrads
        block = self._block
        out = allocate((self._nblocks, block, block), self._dtype, self._device, "block inverses")
        # working set per batch of blocks: about ``chunk * max(m, B)`` entries.
        per = max(1, self._chunk // max(block, 1))
        for start in range(0, self._nblocks, per):
            stop = min(start + per, self._nblocks)
            cols = grads[:, start * block : min(stop * block, self._dim)]
            gb = self._blocked(cols, stop - start)  # (nbc, m, B), a view unless padded
            gram = accumulated_matmul(gb.mT, gb, chunk=self._chunk)  # (nbc, B, B) float64
            self._check_finite_norms(gram.diagonal(dim1=-2, dim2=-1), grads, columns=True)
            inv, jitter = invert_fisher_blocks(gram, m, self._damp, entry_dtype=self._dtype)
            self.jitter = max(self.jitter, jitter)
            out[start:stop] = inv
        blocks = BlockInverseFisher(out, self._dim, self._damp, m)
        blocks.jitter = self.jitter
        return blocks

    def _build_woodbury(self, grads: torch.Tensor, overwrite: bool) -> torch.Tensor:
        m = self._ngrads
        if self._nblocks == 1 and not self._pad:
            work = grads.unsqueeze(0)  # a view: the input itself
            in_place = overwrite and grads.is_contiguous()
        else:
            work = allocate((self._nblocks, m, self._block), self._dtype, self._device, "blocked factor Q")
            work.copy_(self._blocked(grads, self._nblocks))
            in_place = True  # ``work`` is our own copy
        # one block: 2-D BLAS calls on the (m, d) matrix itself (batched calls are slower on CPU)
        flat = work[0] if self._nblocks == 1 else work
        gram = accumulated_matmul(flat, flat.mT, chunk=self._chunk)  # (nb?, m, m) float64
        self._reduce(gram)
        diag = gram.diagonal(dim1=-2, dim2=-1)
        self._check_finite_norms(diag, grads, columns=False)
        diag.add_(m * self._damp)
        factor, self.jitter = safe_cholesky(
            gram, what="m x m system m*damp*I + G G^T", entry_dtype=self._dtype
        )
        del gram
        # Q = L^{-1} G as Q^T = G^T L^{-T}: the right-sided solve on the transposed views runs
        # 2-3x faster than the left-sided one on a row-major G (MKL and OpenBLAS), writes Q row-major
        # (what ``mul`` streams), and with ``out=`` works in place without a temporary.
        upper = factor.mT.to(self._dtype).contiguous()
        if not in_place:
            qt = torch.linalg.solve_triangular(upper, flat.mT, upper=True, left=False)
            return qt.mT.unsqueeze(0)
        torch.linalg.solve_triangular(upper, flat.mT, upper=True, left=False, out=flat.mT)
        return work

    def _check_finite_norms(self, sq_norms: torch.Tensor, grads: torch.Tensor, *, columns: bool) -> None:
        """Raise ``ValueError`` if a squared row (``columns``: column) norm of ``G`` is not finite.

        These norms are the Gram diagonal the build forms anyway, and one is non-finite exactly when its
        row (column) holds a NaN or inf, or overflows the input dtype: the check is free, where
        ``isfinite(G)`` would be one more pass and a ``(m, d)`` temporary. Counting is done only on
        failure. Sharded operators check after ``_reduce``, so all ranks agree.
        """
        bad = ~torch.isfinite(sq_norms)
        if not bool(bad.any()):
            return
        if columns:
            nan, inf = int(torch.isnan(grads).sum()), int(torch.isinf(grads).sum())
            where = ""
        else:
            rows = bad.reshape(-1, self._ngrads).any(0).nonzero().flatten()
            sub = grads[rows]
            nan, inf = int(torch.isnan(sub).sum()), int(torch.isinf(sub).sum())
            shown = rows[:8].tolist()
            where = f" (rows {shown}{' ...' if len(rows) > 8 else ''})"
        if nan or inf:
            raise ValueError(f"grads must be finite, got {nan} NaN and {inf} inf entries{where}")
        raise ValueError(
            f"grads must be finite: squared norms overflow {self._dtype}{where} (or, for a sharded "
            "operator, another rank's grads hold NaN or inf); rescale the loss or use float64"
        )

    # ------------------------------------------------------------------ properties
    @property
    def ngrads(self) -> int:
        """``m``: the number of gradient rows."""
        return self._ngrads

    @property
    def block_size(self) -> int:
        """``B``: the block size (``d`` for the full operator)."""
        return self._block

    @property
    def num_blocks(self) -> int:
        """``nb = ceil(d / B)``."""
        return self._nblocks

    # ------------------------------------------------------------------ hooks
    def _to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(k, d)`` rows -> ``(nb, B, k)`` columns per block."""
        k = x.shape[0]
        if self._pad:
            x = nnf.pad(x, (0, self._pad))
        return x.reshape(k, self._nblocks, self._block).permute(1, 2, 0)

    def _from_blocks(self, y: torch.Tensor) -> torch.Tensor:
        """``(nb, B, k)`` -> ``(k, d)`` rows."""
        k = y.shape[-1]
        return y.permute(2, 0, 1).reshape(k, -1)[:, : self._dim]

    def _mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.route == "empty":
            return x / self._damp
        if self.route == "direct":
            return self._blocks._mul(x)
        xb = self._to_blocks(x)
        if self._nblocks == 1:  # 2-D BLAS: two passes over Q, (m, k) in between
            q = self._q[0]
            coeff = q @ x.T  # (m, k)
            self._reduce(coeff)
            return torch.addmm(x, coeff.T, q, alpha=-1.0).div_(self._damp)
        coeff = self._q @ xb  # (nb, m, k)
        self._reduce(coeff)
        yb = torch.baddbmm(xb, self._q.mT, coeff, alpha=-1.0).div_(self._damp)
        return self._from_blocks(yb)

    def _diag(self) -> torch.Tensor:
        if self.route == "empty":
            return torch.full((self._dim,), 1.0 / self._damp, dtype=self._dtype, device=self._device)
        if self.route == "direct":
            return self._blocks._diag()
        diag = self._column_sq_norms().neg_().add_(1.0).div_(self._damp)  # (nb, B)
        return diag.reshape(-1)[: self._dim].clone()

    def _column_sq_norms(self) -> torch.Tensor:
        """``colsum(Q * Q)`` per block, shape ``(nb, B)``: one pass over the row-major ``Q``.

        Accumulates ``q_i * q_i`` row by row (``addcmul_``; the ``(nb, B)`` accumulator stays in cache
        for moderate ``d``). Reductions over the strided ``m`` axis (``vector_norm(Q, dim=-2)``,
        ``einsum``) measured 5-20x slower than a pass, squared column slabs 1.6-3x; this loop 0.9-1.6x.
        """
        q = self._q  # (nb, m, B)
        out = torch.zeros(q.shape[0], q.shape[2], dtype=self._dtype, device=self._device)
        for i in range(q.shape[1]):
            row = q[:, i, :]
            out.addcmul_(row, row)
        return out

    def _submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        same_coord = (idx[:, None] == idx[None, :]).to(self._dtype)
        if self.route == "empty":
            return same_coord / self._damp
        if self.route == "direct":
            return self._blocks._submatrix(idx)
        cols, blk = self._factor_columns(idx)  # (s, m), (s,)
        same_block = blk[:, None] == blk[None, :]
        inner = (cols @ cols.T) * same_block
        return (same_coord - inner) / self._damp

    def _factor_columns(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``Q[:, idx]`` as rows ``(s, m)``, and each coordinate's block ``(s,)`` (Woodbury route).

        A placement hook: a sharded full operator gathers the columns from the ranks holding them.
        """
        blk, off = idx // self._block, idx % self._block
        return self._q[blk, :, off], blk

    def _segments(self, labels: torch.Tensor) -> torch.Tensor:
        if self.route == "empty":  # F^{-1} = I / damp: every coordinate is independent
            return torch.where(labels >= 0, torch.arange(self._dim, device=labels.device), labels)
        return self._split_by_block(labels, self._block) if self._nblocks > 1 else labels

    def _submatrices(self, idx: torch.Tensor) -> torch.Tensor:
        if self.route == "empty":
            return super()._submatrices(idx)
        if self.route == "direct":
            return self._blocks._submatrices(idx)
        # every row of idx lies in one block (``_segments``): (n, s, m) columns of Q, one batched product
        blk, off = idx // self._block, idx % self._block
        cols = self._q[blk, :, off]  # (n, s, m)
        same = (idx[:, :, None] == idx[:, None, :]).to(self._dtype)
        return (same - cols @ cols.mT) / self._damp
