r"""Layer-wise OBS solvers on one layer's reconstruction loss: SparseGPT, OBC, and the Wanda/magnitude masks.

A layer ``y = W x`` with ``W`` of shape ``(r, c)`` (``r`` outputs, ``c`` inputs) and calibration inputs
``X`` (``c, N``). Pruning minimises ``||(W - W') X||_F^2 = n/2 sum_i dw_i H dw_i^T`` with
``H = 2 X X^T / n``: one quadratic per output row, all rows sharing the same ``c x c`` Hessian. Every solver
here takes ``W`` already viewed as ``(r, c)`` (a Conv2d unfolded to ``c = in * kh * kw``, a GPT-2 ``Conv1D``
transposed) and the *damped* Hessian (:func:`prepare_hessian`), and returns the new weights and the mask.

* :func:`sparsegpt`: the column sweep (Frantar & Alistarh, 2023). Columns are eliminated in the fixed order
  ``0..c-1``; the inverse Hessian of the remaining columns ``j..c-1`` is then shared by all rows and its first
  row is ``U_jj U_{j, j:}`` with ``H^{-1} = U^T U`` (``U`` upper). Pruning ``w_ij`` costs ``w_ij^2 / U_jj^2``
  and propagates ``err_ij = (w_ij - w'_ij) / U_jj`` as ``w_{i, j+1:} -= err_ij U_{j, j+1:}``. Lazy batches of
  ``blocksize`` columns apply these updates inside the batch only and hand the batch's errors ``E`` on to
  all later columns with one product ``W[:, b:] -= E U[batch, b:]`` (BLAS-3). The mask is chosen adaptively
  at the start of every ``mask_blocksize`` columns from the *current* (already updated) weights; N:M
  chooses, in every group of ``M`` consecutive columns, the ``M - N`` of least error per row when the sweep
  reaches the group.
  Cost: one Cholesky of ``H``, one inverse, one Cholesky of ``H^{-1}`` (``O(c^3)``), then ``O(r c^2)``.
  Memory: ``W`` in the solve dtype plus ``2 c^2`` entries.
* :func:`obc`: exact greedy OBS per row (Frantar, Singh & Alistarh, 2022): repeatedly remove, in each row,
  the weight of least ``w_q^2 / [H_R^{-1}]_qq`` among the remaining set ``R``, update
  ``w -= (w_q / [H_R^{-1}]_qq) H_R^{-1} e_q``, and drop ``q`` from ``R`` by one Gaussian elimination step
  of ``H_R^{-1}`` (``O(c^2)``). Cost ``O(r c^3)``; memory ``rows_per_batch * c^2`` entries (rows are batched).
* :func:`wanda_mask` / :func:`magnitude_mask`: no update; scores ``|W_ij| ||X_j||`` compared within each
  output row (Wanda's rule), or ``|W_ij|`` over the whole layer (SparseGPT's magnitude baseline).

Exact counts: unstructured targets prune ``round(s * r * c)`` weights per layer exactly; blocks (SparseGPT)
or rows (OBC, Wanda) receive cumulative-rounding shares of that total.
"""

from __future__ import annotations

import torch

from mfac.numerics import safe_cholesky

__all__ = [
    "block_counts",
    "hessian_inverse_factor",
    "magnitude_mask",
    "obc",
    "prepare_hessian",
    "reconstruction_error",
    "sparsegpt",
    "wanda_mask",
]


def block_counts(total: int, sizes: list[int], sparsity: float) -> list[int]:
    """Split ``round(sparsity * total)`` over parts of the given sizes by cumulative rounding (sum exact)."""
    counts, done, seen = [], 0, 0
    for size in sizes:
        seen += size
        upto = round(sparsity * seen) if seen < total else round(sparsity * total)
        counts.append(upto - done)
        done = upto
    return counts


def prepare_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped copy of ``H`` and the mask of dead inputs.

    Dead inputs (``H_jj == 0``: the input is zero on every calibration sample) get ``H_jj = 1`` (their
    weights do not change the output and are pruned/zeroed by the caller); then
    ``H += damp * mean(diag H) * I``.

    Args:
        hessian: ``(c, c)`` symmetric, ``2 X X^T / n``.
        damp: relative damping (fraction of the mean diagonal), ``> 0``.

    Returns:
        ``(H_damped, dead)`` with ``dead`` a bool ``(c,)``.
    """
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    return h, dead


def hessian_inverse_factor(hessian: torch.Tensor, what: str = "layer Hessian") -> torch.Tensor:
    """Upper ``U`` with ``H^{-1} = U^T U`` (both Choleskys through :func:`mfac.numerics.safe_cholesky`)."""
    lower, _ = safe_cholesky(hessian, what=what, entry_dtype=torch.float32)
    inverse = torch.cholesky_inverse(lower)
    lower_inv, _ = safe_cholesky(inverse, what=f"inverse of the {what}", entry_dtype=torch.float32)
    return lower_inv.mT.contiguous()


def reconstruction_error(hessian: torch.Tensor, weight: torch.Tensor, new_weight: torch.Tensor) -> float:
    """Return ``||W X - W' X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T)`` (undamped ``H``)."""
    h = hessian.to(torch.float64)
    w = weight.to(torch.float64)
    dw = w - new_weight.to(torch.float64)
    base = float(((w @ h) * w).sum())
    err = float(((dw @ h) * dw).sum())
    return err / base if base > 0 else (0.0 if err == 0 else float("inf"))


def _select_lowest(scores: torch.Tensor, count: int, forced: torch.Tensor | None) -> torch.Tensor:
    """Bool mask (True = pruned) of the ``count`` lowest entries of ``scores`` (forced ones first)."""
    flat = scores.reshape(-1)
    if forced is not None:
        flat = flat.masked_fill(forced.reshape(-1), float("-inf"))
        count = max(count, int(forced.sum()))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if count:
        pruned[torch.argsort(flat, stable=True)[:count]] = True
    return pruned.reshape(scores.shape)


def _current(w: torch.Tensor, errors: torch.Tensor, u: torch.Tensor, b0: int, j: int, b1: int,
             stop: int) -> torch.Tensor:
    """Return the current weights of columns ``j:stop`` (those past the lazy batch still owe its errors)."""
    if stop <= b1:
        return w[:, j:stop]
    pending = errors[:, : j - b0] @ u[b0:j, b1:stop]
    return torch.cat([w[:, j:b1], w[:, b1:stop] - pending], dim=1)


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    mask_blocksize: int | None = None,
    dead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT column sweep (see the module docstring).

    Args:
        weight: ``(r, c)`` weights, in the solve dtype (not modified).
        hessian: ``(c, c)`` damped Hessian (:func:`prepare_hessian`), same dtype.
        sparsity: fraction pruned (unstructured; exactly ``round(sparsity * r * c)`` weights).
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive columns of each row (``sparsity`` unused).
        blocksize: lazy-batch width (columns whose updates stay inside the batch).
        mask_blocksize: width of the adaptive-mask blocks (default ``blocksize``).
        dead: ``(c,)`` bool, inputs that are always zero: their weights are pruned first.

    Returns:
        ``(new_weight, kept)``: the updated ``(r, c)`` weights (exact zeros where pruned) and the bool mask.
    """
    rows, cols = weight.shape
    w = weight.clone()
    u = hessian_inverse_factor(hessian)
    forced = None
    if dead is not None and bool(dead.any()):
        forced = dead.unsqueeze(0).expand(rows, cols)
        w[forced] = 0.0
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    mask_bs = mask_blocksize or blocksize
    if nm is None:
        starts = list(range(0, cols, mask_bs))
        sizes = [min(mask_bs, cols - s) for s in starts]
        shares = block_counts(rows * cols, [rows * s for s in sizes], sparsity)
        counts = dict(zip(starts, shares, strict=True))
    diag_sq = u.diagonal() ** 2  # [H_{j:}^{-1}]_jj
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        block = w[:, b0:b1]  # a view: updates inside the batch land in w directly
        u_block = u[b0:b1, b0:b1]
        errors = torch.zeros(rows, b1 - b0, dtype=w.dtype, device=w.device)
        for j in range(b0, b1):
            k = j - b0
            if nm is None and j in counts:  # start of an adaptive-mask block: choose from current weights
                m1 = min(j + mask_bs, cols)
                scores = _current(w, errors, u, b0, j, b1, m1) ** 2 / diag_sq[j:m1]
                sub = forced[:, j:m1] if forced is not None else None
                pruned[:, j:m1] = _select_lowest(scores, counts[j], sub)
            elif nm is not None and j % nm[1] == 0:
                n, m = nm
                scores = _current(w, errors, u, b0, j, b1, j + m) ** 2 / diag_sq[j : j + m]
                if forced is not None:
                    scores = scores.masked_fill(forced[:, j : j + m], float("-inf"))
                drop = torch.argsort(scores, dim=1, stable=True)[:, : m - n]
                pruned[:, j : j + m].scatter_(1, drop, True)
            col = block[:, k]
            err = torch.where(pruned[:, j], col, torch.zeros_like(col)) / u[j, j]
            # w_{i, j:b1} -= err_i * U_{j, j:b1}; column j then holds w - err * U_jj = the kept value or 0
            block[:, k:] -= err.unsqueeze(1) * u_block[k, k:].unsqueeze(0)
            errors[:, k] = err
        if b1 < cols:
            w[:, b1:] -= errors @ u[b0:b1, b1:]
    w[pruned] = 0.0
    return w, ~pruned


def obc(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    dead: torch.Tensor | None = None,
    rows_per_batch: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact greedy OBS per row (OBC); rows are processed ``rows_per_batch`` at a time.

    Args:
        weight: ``(r, c)`` weights (not modified).
        hessian: ``(c, c)`` damped Hessian.
        sparsity: fraction pruned; row ``i`` prunes its cumulative-rounding share of ``round(s * r * c)``.
        nm: ``(n, m)``: a group of ``m`` consecutive columns closes once ``m - n`` of it are pruned.
        dead: ``(c,)`` bool inputs that are always zero: pruned first (their removal costs nothing).
        rows_per_batch: rows whose inverse Hessians (``c^2`` entries each) are resident at once.

    Returns:
        ``(new_weight, kept)``.
    """
    rows, cols = weight.shape
    hinv_full = torch.cholesky_inverse(safe_cholesky(hessian, what="layer Hessian",
                                                     entry_dtype=torch.float32)[0])
    if nm is None:
        per_row = block_counts(rows * cols, [cols] * rows, sparsity)
    else:
        n, m = nm
        per_row = [(cols // m) * (m - n)] * rows
    out = weight.clone()
    kept = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    for r0 in range(0, rows, rows_per_batch):
        r1 = min(r0 + rows_per_batch, rows)
        w = out[r0:r1]  # view
        alive = kept[r0:r1]  # view
        counts = torch.tensor(per_row[r0:r1], device=weight.device)
        hinv = hinv_full.unsqueeze(0).repeat(r1 - r0, 1, 1)
        idx = torch.arange(r1 - r0, device=weight.device)
        if dead is not None and bool(dead.any()):
            alive[:, dead] = False
            w[:, dead] = 0.0
            # eliminating the dead columns from H^{-1}: they carry zero weight, so no update of w
            for q in torch.nonzero(dead).flatten().tolist():
                col = hinv[:, :, q].clone()
                hinv -= col.unsqueeze(2) * col.unsqueeze(1) / col[:, q].reshape(-1, 1, 1)
        removed = (~alive).sum(dim=1)
        for _ in range(int(counts.max()) if len(counts) else 0):
            active = removed < counts
            if not bool(active.any()):
                break
            diag = hinv.diagonal(dim1=1, dim2=2)
            scores = w**2 / diag
            closed = ~alive
            if nm is not None:
                full = (~alive).reshape(r1 - r0, -1, nm[1]).sum(dim=2) >= nm[1] - nm[0]
                closed = closed | full.repeat_interleave(nm[1], dim=1)
            scores = scores.masked_fill(closed, float("inf"))
            q = torch.argmin(scores, dim=1)
            col = hinv[idx, :, q]  # H_R^{-1} e_q, shape (rows, c)
            d = torch.where(active, col[idx, q], torch.ones_like(col[idx, q]))
            coef = torch.where(active, w[idx, q] / d, torch.zeros_like(d))
            w -= coef.unsqueeze(1) * col
            # Gaussian elimination of row/column q (only in the rows still pruning)
            step = (col.unsqueeze(2) * col.unsqueeze(1)) / d.reshape(-1, 1, 1)
            hinv -= step * active.reshape(-1, 1, 1)
            w[idx[active], q[active]] = 0.0
            alive[idx[active], q[active]] = False
            removed += active.long()
        w[~alive] = 0.0
    return out, kept


def magnitude_mask(weight: torch.Tensor, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
                   ) -> torch.Tensor:
    """Kept-mask of layer-wise magnitude pruning: the smallest ``|W|`` of the layer, or per N:M group."""
    return _score_mask(weight.abs(), sparsity, nm, per_row=False)


def wanda_mask(weight: torch.Tensor, input_sq_norms: torch.Tensor, *, sparsity: float = 0.0,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Kept-mask of Wanda: scores ``|W_ij| * ||X_j||`` compared within each output row (or N:M group).

    Args:
        weight: ``(r, c)``.
        input_sq_norms: ``(c,)``, ``||X_j||^2`` (the undamped Hessian's diagonal up to a constant factor).
        sparsity: fraction pruned, the same count in every row (cumulative rounding).
        nm: ``(n, m)`` groups along the rows instead.
    """
    scores = weight.abs() * input_sq_norms.clamp_min(0).sqrt().unsqueeze(0)
    return _score_mask(scores, sparsity, nm, per_row=True)


def _score_mask(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, *, per_row: bool,
                ) -> torch.Tensor:
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        groups = scores.reshape(rows, cols // m, m)
        drop = torch.argsort(groups, dim=2, stable=True)[..., : m - n]
        pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, drop, True)
        return ~pruned.reshape(rows, cols)
    if not per_row:
        return ~_select_lowest(scores, round(sparsity * rows * cols), None)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    order = torch.argsort(scores, dim=1, stable=True)
    for i, count in enumerate(block_counts(rows * cols, [cols] * rows, sparsity)):
        pruned[i, order[i, :count]] = True
    return ~pruned
