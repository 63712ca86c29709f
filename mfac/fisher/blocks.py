r"""Block-diagonal inverse Fisher accumulated from a gradient stream: ``G`` is never stored.

With the ``d`` coordinates cut into ``nb = ceil(d / B)`` blocks of ``B`` (the last one may be shorter) and
``B <= m``, each block's Fisher

    F_b = damp I + (1/m) A_b,        A_b = sum_i g_{i,b} g_{i,b}^T        (B x B)

is a sum over gradients, so it can be accumulated as the gradients arrive (WoodFisher's and oBERT's
route): a chunk of ``k`` gradient rows viewed as ``(nb, k, B)`` adds the batched ``A_b += G_b^T G_b`` (one
batched SYRK, ``O(k d B)`` flops). The state is ``nb * B^2 ~ d * B`` numbers, never ``m * d``. Finalising
is one batched float64 Cholesky of ``damp I + A_b / m`` per slab of blocks and its inverse
(``O(d B^2)``), written over the statistics in place.

* :class:`BlockFisherAccumulator`: the streaming builder (``add`` rows or chunks of rows in any order and
  chunking; ``finalize(damp)``).
* :class:`BlockInverseFisher`: the operator over the ``nb`` inverse blocks (``mul``, ``diag``,
  ``submatrix``, ``group_solve``, ``to_dense``, ``to_scipy``). :class:`~mfac.fisher.StaticInverseFisher`'s
  direct route (``B <= m``, from a materialised ``G``) builds the same operator through the same
  :func:`invert_fisher_blocks`: one implementation of the formula.

Memory (float32 statistics): ``nb * B^2 * 4 ~ d * B * 4`` bytes (``d = 110M``, ``B = 50``: 22 GB; ``d =
20M``: 4 GB), against ``m * d * 4`` for ``G`` (``m = 1024``: 20x more). Finalising adds one slab of
float64 work (``slab * B^2 * 8`` bytes, 64 MiB by default). Accumulating in float64 doubles the
statistics (``d * B * 8``) and the finalised operator then needs its own ``d * B * 4``.

Accuracy: float32 statistics summed chunk after chunk carry the rounding of ``m / k`` float32 additions
(besides the float32 products themselves), which is about what the materialised route's float32 Gram
product over ``m`` rows carries; ``experiments/block_obs_stream.py`` measures both against float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from mfac.fisher.base import InverseFisher, check_grads
from mfac.numerics import (
    SMALL_DTYPE,
    allocate,
    check_damp,
    check_finite,
    check_positive_int,
    check_same_placement,
    safe_cholesky,
)

__all__ = ["BlockFisherAccumulator", "BlockInverseFisher", "invert_fisher_blocks"]

#: float64 entries of one finalisation slab (``slab * B^2``): 64 MiB of work.
SLAB_ENTRIES = 1 << 23


def invert_fisher_blocks(
    gram: torch.Tensor, ngrads: int, damp: float, *, entry_dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    r"""``(damp I + A_b / m)^{-1}`` for a batch of block Gram matrices ``A_b = G_b^T G_b``, in float64.

    Args:
        gram: ``A``, shape ``(n, B, B)``, symmetric; float64 (it is overwritten: divided by ``m`` and damped).
        ngrads: ``m >= 1``.
        damp: ``lambda > 0``.
        entry_dtype: the dtype whose rounding produced ``A`` (the jitter of
            :func:`~mfac.numerics.safe_cholesky` scales with it).

    Returns:
        ``(inverses, jitter)``: shape ``(n, B, B)`` float64, and the diagonal jitter the Cholesky needed
        (0.0 normally).

    Raises:
        ValueError: a diagonal entry of ``A`` is not finite (a NaN/inf gradient, or squared norms that
            overflowed the statistics' dtype).

    Cost ``O(n B^3)``. The one implementation of the direct block route, used by
    :class:`BlockFisherAccumulator` and :class:`~mfac.fisher.StaticInverseFisher`.
    """
    diag = gram.diagonal(dim1=-2, dim2=-1)
    if not bool(torch.isfinite(diag).all()):
        raise ValueError(
            "grads must be finite: the block Gram diagonal (squared column norms of G) has NaN or inf; "
            f"a gradient holds NaN/inf or its squares overflow {entry_dtype} (rescale the loss or use "
            "float64)"
        )
    gram.div_(ngrads)
    diag.add_(damp)
    factor, jitter = safe_cholesky(gram, what="Fisher block", entry_dtype=entry_dtype)
    return torch.cholesky_inverse(factor), jitter


class BlockInverseFisher(InverseFisher):
    r"""Block-diagonal ``F^{-1}`` held as its ``nb`` explicit ``B x B`` inverse blocks.

    ``F^{-1} = blockdiag((damp I + (1/m) G_b^T G_b)^{-1})``; the last block covers ``d - (nb - 1) B``
    coordinates (stored zero-padded to ``B``: the padding is decoupled, ``F = damp I`` there).

    Build it with :class:`BlockFisherAccumulator` (from a gradient stream) or
    :class:`~mfac.fisher.StaticInverseFisher` (``route == "direct"``, from ``G``).

    Args:
        inv_blocks: shape ``(nb, B, B)``, the inverse blocks (taken, not copied).
        dim: ``d``, with ``(nb - 1) B < d <= nb B``.
        damp: ``lambda``.
        ngrads: ``m``.

    Memory: ``nb * B^2 * bytes ~ d * B * bytes``. Cost: ``mul`` ``O(d B)`` per vector; ``diag`` ``O(d)``;
    ``submatrix`` ``O(s^2)``; ``group_solve`` ``O(sum over groups of |Q|^3)``, ``O(d B^2)`` at most.
    """

    route = "direct"

    def __init__(self, inv_blocks: torch.Tensor, dim: int, damp: float, ngrads: int) -> None:
        if inv_blocks.dim() != 3 or inv_blocks.shape[1] != inv_blocks.shape[2]:
            raise ValueError(f"inv_blocks must have shape (nb, B, B), got {tuple(inv_blocks.shape)}")
        nb, block = inv_blocks.shape[0], inv_blocks.shape[1]
        if not (nb >= 1 and (nb - 1) * block < dim <= nb * block):
            raise ValueError(f"{nb} blocks of {block} cannot hold dim={dim} coordinates")
        super().__init__(dim, damp, inv_blocks.dtype, inv_blocks.device)
        self._inv_blocks = inv_blocks  # shape: (nb, B, B)
        self._block = block
        self._nblocks = nb
        self._pad = nb * block - dim
        self._ngrads = int(ngrads)
        #: diagonal jitter the block Cholesky needed (0.0 normally).
        self.jitter = 0.0

    @property
    def ngrads(self) -> int:
        """``m``: the number of gradients accumulated."""
        return self._ngrads

    @property
    def block_size(self) -> int:
        """``B``."""
        return self._block

    @property
    def num_blocks(self) -> int:
        """``nb = ceil(d / B)``."""
        return self._nblocks

    @property
    def inverse_blocks(self) -> torch.Tensor:
        """The ``(nb, B, B)`` inverse blocks (a view: do not modify)."""
        return self._inv_blocks

    # ------------------------------------------------------------------ hooks
    def _mul(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        if self._pad:
            x = nnf.pad(x, (0, self._pad))
        xb = x.reshape(k, self._nblocks, self._block).permute(1, 2, 0)  # (nb, B, k)
        y = self._inv_blocks @ xb
        return y.permute(2, 0, 1).reshape(k, -1)[:, : self._dim]

    def _diag(self) -> torch.Tensor:
        return self._inv_blocks.diagonal(dim1=-2, dim2=-1).reshape(-1)[: self._dim].clone()

    def _submatrix(self, idx: torch.Tensor) -> torch.Tensor:
        blk, off = idx // self._block, idx % self._block
        same_block = blk[:, None] == blk[None, :]
        vals = self._inv_blocks[blk[:, None], off[:, None], off[None, :]]
        return vals * same_block

    def _segments(self, labels: torch.Tensor) -> torch.Tensor:
        return self._split_by_block(labels, self._block)

    def _submatrices(self, idx: torch.Tensor) -> torch.Tensor:
        # every row of idx lies in one block (``_segments``)
        blk, off = idx[:, :1] // self._block, idx % self._block
        return self._inv_blocks[blk[:, :, None], off[:, :, None], off[:, None, :]]


class BlockFisherAccumulator:
    r"""Streaming builder of the block-diagonal inverse Fisher: gradients in, :class:`BlockInverseFisher` out.

    Accumulates ``A_b = sum_i g_{i,b} g_{i,b}^T`` for the ``nb = ceil(d / B)`` blocks as gradient rows
    arrive (one at a time or in chunks, any order: the sum does not depend on it beyond rounding), then
    :meth:`finalize` gives ``F^{-1}`` for ``F_b = damp I + A_b / m`` with ``m`` the number of rows added.
    Equal to ``StaticInverseFisher(G, damp, block_size=B)`` for the ``G`` of the same rows, to rounding.

    Args:
        dim: ``d``.
        block_size: ``B`` (``min(B, d)`` is used); the direct route is meant for ``B <= m``.
        dtype: dtype of the gradients and of the finished operator (default float32).
        device: where the statistics live.
        accumulate_dtype: dtype of the statistics ``A_b``; default ``dtype`` (float32 statistics for
            float32 gradients; the products of each chunk are formed in ``dtype`` either way).

    Memory: ``nb * B^2 * bytes(accumulate_dtype) ~ d * B * 4`` bytes (float32) for the whole life of the
    builder, which the finished operator then reuses in place. With float64 statistics for float32
    gradients the operator needs its own ``d * B * 4`` bytes: peak ``d * B * 12`` bytes. Plus a padded
    ``k x B`` copy of each chunk's short last block while it is added (whole blocks are read in place).

    Cost: ``add`` of ``k`` rows ``O(k d B)`` (batched matrix products); ``finalize`` ``O(d B^2)``.
    """

    def __init__(
        self,
        dim: int,
        block_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        accumulate_dtype: torch.dtype | None = None,
    ) -> None:
        dim = check_positive_int(dim, "dim")
        block = min(check_positive_int(block_size, "block_size"), dim)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        acc = dtype if accumulate_dtype is None else accumulate_dtype
        if not acc.is_floating_point or torch.finfo(acc).bits < torch.finfo(dtype).bits:
            raise TypeError(
                f"accumulate_dtype must be a floating dtype at least as wide as {dtype}, got {acc}"
            )
        self._dim = dim
        self._block = block
        self._nblocks = math.ceil(dim / block)
        self._pad = self._nblocks * block - dim
        self._dtype = dtype
        self._device = torch.device("cpu" if device is None else device)
        self._acc_dtype = acc
        # shape: (nb, B, B); A_b accumulates G_b^T G_b
        self._stats: torch.Tensor | None = allocate(
            (self._nblocks, block, block), acc, self._device, "block Fisher statistics"
        )
        self._ngrads = 0

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """``d``."""
        return self._dim

    @property
    def block_size(self) -> int:
        """``B``."""
        return self._block

    @property
    def num_blocks(self) -> int:
        """``nb = ceil(d / B)``."""
        return self._nblocks

    @property
    def ngrads(self) -> int:
        """``m``: rows added so far."""
        return self._ngrads

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (``nb * B^2 * bytes``)."""
        return 0 if self._stats is None else self._stats.numel() * self._stats.element_size()

    def __repr__(self) -> str:
        return (
            f"BlockFisherAccumulator(dim={self._dim}, block_size={self._block}, ngrads={self._ngrads}, "
            f"dtype={self._dtype}, accumulate_dtype={self._acc_dtype}, device={self._device})"
        )

    # ------------------------------------------------------------------ stream
    def add(self, grads: torch.Tensor) -> None:
        """Add gradient rows: shape ``(d,)`` for one, ``(k, d)`` for ``k``; the builder's dtype and device.

        Raises ``ValueError`` on NaN/inf entries (the statistics are then left unchanged).
        """
        if self._stats is None:
            raise RuntimeError("finalize() was called: this accumulator is used up; start a new one")
        if isinstance(grads, torch.Tensor) and grads.dim() == 1:
            grads = grads.unsqueeze(0)
        grads = check_grads(grads, finite=False)
        if grads.shape[1] != self._dim:
            raise ValueError(f"grads must have {self._dim} columns (d), got shape {tuple(grads.shape)}")
        check_same_placement(grads, "grads", self._dtype, self._device)  # dtype TypeError, device ValueError
        k = grads.shape[0]
        if k == 0:
            return
        check_finite(grads, "grads")  # one pass over the chunk, before anything is added
        block, whole = self._block, self._dim // self._block
        if whole:  # a view of the whole blocks (no copy of the chunk): (nb, k, B), rows of stride d
            self._add_blocks(0, grads[:, : whole * block].reshape(k, whole, block).transpose(0, 1))
        if self._pad:  # the short last block, zero-padded to B (a k x B copy)
            tail = nnf.pad(grads[:, whole * block :], (0, self._pad))
            self._add_blocks(whole, tail.unsqueeze(0))
        self._ngrads += k

    def _add_blocks(self, first: int, gb: torch.Tensor) -> None:
        """``A_b += G_b^T G_b`` for the blocks ``first, first + 1, ...`` of ``gb`` ``(n, k, B)``."""
        stats = self._stats[first : first + gb.shape[0]]
        if self._acc_dtype == self._dtype:
            stats.baddbmm_(gb.mT, gb)
            return
        # products in the gradients' dtype, summed into the wider statistics slab by slab
        per = max(1, SLAB_ENTRIES // (self._block * self._block))
        for start in range(0, gb.shape[0], per):
            part = gb[start : start + per]
            stats[start : start + per] += part.mT @ part

    def _check_finite_diagonal(self) -> None:
        """``ValueError`` if a diagonal entry of the statistics is NaN/inf (``O(d)``; nothing changed)."""
        if not bool(torch.isfinite(self._stats.diagonal(dim1=-2, dim2=-1)).all()):
            raise ValueError(
                "the block statistics' diagonal (squared gradient entries summed) has NaN or inf: the "
                f"squares overflowed {self._acc_dtype} (rescale the loss, or accumulate_dtype=torch.float64)"
            )

    def sq_norm_sum(self) -> float:
        """``sum_i |g_i|^2 = trace(sum_b A_b)`` in float64 (what ``relative_damp`` scales with)."""
        if self._stats is None:
            raise RuntimeError("finalize() was called: the statistics are gone")
        return float(self._stats.diagonal(dim1=-2, dim2=-1).sum(dtype=SMALL_DTYPE))

    def finalize(self, damp: float, *, keep: bool = False) -> BlockInverseFisher:
        """Invert every ``damp I + A_b / m`` (batched float64 Cholesky, slab by slab) into the operator.

        Args:
            damp: ``lambda > 0`` (absolute; see :meth:`sq_norm_sum` for a scale).
            keep: keep the statistics, so that :meth:`finalize` can be called again with another ``damp``
                (a damping sweep from one pass over the data) and :meth:`add` can go on. The operator
                then gets memory of its own: ``nb * B^2 * bytes(dtype)`` more at the peak.

        Without ``keep`` the statistics' memory becomes the operator's when their dtype is the gradients'
        (in place), and the accumulator is used up afterwards.

        Raises:
            ValueError: no gradient was added; a non-finite statistic (overflow). The accumulator is
                unchanged then.
        """
        damp = check_damp(damp)
        if self._stats is None:
            raise RuntimeError("finalize() was called already")
        if self._ngrads == 0:
            raise ValueError("no gradients were added; add at least one row before finalize()")
        stats = self._stats
        in_place = not keep and stats.dtype == self._dtype
        out = stats if in_place else allocate(tuple(stats.shape), self._dtype, self._device, "block inverses")
        per = max(1, SLAB_ENTRIES // (self._block * self._block))
        jitter = 0.0
        # a non-finite diagonal is caught before the first slab (which may overwrite the statistics), and
        # with one message whether or not they are kept
        self._check_finite_diagonal()
        for start in range(0, self._nblocks, per):
            stop = min(start + per, self._nblocks)
            inv, jit = invert_fisher_blocks(
                stats[start:stop].to(SMALL_DTYPE, copy=True), self._ngrads, damp, entry_dtype=self._dtype
            )
            jitter = max(jitter, jit)
            out[start:stop] = inv
        if not keep:
            self._stats = None
        del stats
        op = BlockInverseFisher(out, self._dim, damp, self._ngrads)
        op.jitter = jitter
        return op
