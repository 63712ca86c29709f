r"""The paper's own formulations, written from the math: the baselines of ``experiments/bench_core.py``.

These are *not* part of mfac. They follow the M-FAC paper (Frantar, Kurtic, Alistarh, NeurIPS 2021) as
published, slow and numerically fragile where the paper is, so that the benchmark compares mfac's
operators with the algorithms they replace. All of them use the paper's averaging ``1/m`` and

    F = damp * I + (1/m) * G^T G,        G: (m, d), rows g_1 .. g_m

(a) :func:`static_recursion`: the static build as a sequence of Sherman-Morrison steps,

        F_0 = damp I,    F_i = F_{i-1} + g_i g_i^T / m,
        v_i = F_{i-1}^{-1} g_i,    den_i = m + g_i^T v_i,
        F_i^{-1} x = F_{i-1}^{-1} x - v_i (v_i^T x) / den_i,

    so that ``v_i = g_i / damp - sum_{j<i} v_j (v_j^T g_i) / den_j``: for each ``i`` one matrix-vector
    product over the previous rows ``V[:i] @ g_i`` and one back ``V[:i]^T @ coeff``; a Python loop over
    ``i``. Cost ``O(m^2 d)`` as matrix-vector products (memory-bound), against BLAS-3 for mfac.

(b) :class:`PaperSlidingWindow`: the sliding-window step as published. The Gram matrix ``G G^T`` is kept
    in the buffer dtype (float32), its row ``r`` is refreshed with one pass ``G g`` when ``g`` replaces
    row ``r``, the ``m x m`` matrix ``K = m I + G G^T / damp`` is re-factored from scratch every step
    (Cholesky, ``O(m^3)``) and

        F^{-1} g = g / damp - G^T (K^{-1} (G g)) / damp^2

    (the cancellation-prone form: both terms are about ``g / damp`` when ``damp`` is small).

(c) :func:`diag_rowloop`: ``diag(F^{-1}) = 1/damp - sum_i v_i * v_i / den_i`` accumulated with a
    Python loop over the ``m`` rows (each row is read once, the accumulator read and written ``m`` times).
"""

from __future__ import annotations

import torch

__all__ = ["PaperSlidingWindow", "diag_rowloop", "recursion_mul", "static_recursion"]


def static_recursion(grads: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a) The paper's static build: ``v_i = F_{i-1}^{-1} g_i`` and ``den_i = m + g_i^T v_i``.

    Args:
        grads: ``G``, shape ``(m, d)``.
        damp: ``lambda > 0``.

    Returns:
        ``(V, den)``: ``V`` of shape ``(m, d)`` (rows ``v_i``, the dtype of ``grads``) and ``den`` of
        shape ``(m,)``, with ``F^{-1} = I / damp - sum_i v_i v_i^T / den_i``.

    Cost: ``sum_i 2 i d = m^2 d`` multiply-adds as matrix-vector products, plus ``m`` Python iterations.
    """
    m = grads.shape[0]
    vecs = torch.empty_like(grads)  # shape: (m, d)
    den = torch.empty(m, dtype=grads.dtype, device=grads.device)
    inv_damp = 1.0 / damp
    for i in range(m):
        g = grads[i]
        if i == 0:
            v = g * inv_damp
        else:
            prev = vecs[:i]  # shape: (i, d)
            coeff = torch.mv(prev, g).div_(den[:i])  # v_j^T g_i / den_j, one pass over the i rows
            v = torch.addmv(g, prev.T, coeff, beta=inv_damp, alpha=-1.0)  # second pass, back
        vecs[i] = v
        den[i] = m + torch.dot(g, v)
    return vecs, den


def recursion_mul(vecs: torch.Tensor, den: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """``F^{-1} x = x / damp - V^T ((V x) / den)`` from the output of :func:`static_recursion`.

    ``x`` has shape ``(d,)``; returns shape ``(d,)``. Two passes over ``V``.
    """
    coeff = torch.mv(vecs, x).div_(den)
    return torch.addmv(x, vecs.T, coeff, beta=1.0 / damp, alpha=-1.0)


def diag_rowloop(vecs: torch.Tensor, den: torch.Tensor, damp: float) -> torch.Tensor:
    """(c) The paper's diagonal: ``1/damp - sum_i v_i^2 / den_i`` with a Python loop over the rows.

    ``vecs``: shape ``(m, d)``; ``den``: shape ``(m,)``. Returns shape ``(d,)``.
    """
    out = torch.full((vecs.shape[1],), 1.0 / damp, dtype=vecs.dtype, device=vecs.device)
    for v, dn in zip(vecs, den.tolist(), strict=True):
        out.addcmul_(v, v, value=-1.0 / dn)
    return out


class PaperSlidingWindow:
    r"""(b) The paper's sliding-window step: ``K`` re-factored every step, cancellation-prone output.

    Args:
        grads: the window buffer ``G``, shape ``(m, d)``, used in place (not copied). Empty rows are
            zeros, and the ``1/m`` averaging is used from the start, as in the paper.
        damp: ``lambda > 0``.
        gram: the Gram matrix ``G G^T`` of ``grads`` in its dtype, shape ``(m, m)``; computed in the
            buffer dtype if not given (the paper keeps it in float32).
        next_row: ring index the next gradient overwrites.
        write_rows: if False, :meth:`update_mul` assumes the caller has already written ``g`` into row
            ``next_row`` of ``grads`` (a buffer shared with another operator).

    A step: write ``g`` into row ``r``; ``b = G g`` (one pass, buffer dtype); Gram row and column ``r``
    <- ``b``; ``K = m I + Gram / damp``; Cholesky of ``K`` (``O(m^3)``, buffer dtype); ``c = K^{-1} b``;
    ``F^{-1} g = g / damp - G^T c / damp^2`` (second pass). If the Cholesky fails (``K`` not numerically
    positive definite in the buffer dtype) the step returns NaNs and ``failed_steps`` counts it.
    """

    def __init__(self, grads: torch.Tensor, damp: float, *, gram: torch.Tensor | None = None,
                 next_row: int = 0, write_rows: bool = True) -> None:
        self.grads = grads  # shape: (m, d)
        self.damp = float(damp)
        self.gram = (grads @ grads.T) if gram is None else gram.to(grads.dtype).clone()  # (m, m)
        self.next_row = int(next_row)
        self.write_rows = write_rows
        self.failed_steps = 0
        m = grads.shape[0]
        self._eye_m = m * torch.eye(m, dtype=grads.dtype, device=grads.device)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """Replace the oldest row by ``g`` (shape ``(d,)``) and return ``F^{-1} g``."""
        m = self.grads.shape[0]
        r = self.next_row
        if self.write_rows:
            self.grads[r].copy_(g)
        b = torch.mv(self.grads, g)  # G g: the new Gram row, one pass
        self.gram[r, :] = b
        self.gram[:, r] = b
        system = torch.add(self._eye_m, self.gram, alpha=1.0 / self.damp)  # K = m I + G G^T / damp
        factor, info = torch.linalg.cholesky_ex(system)  # O(m^3), every step
        self.next_row = (r + 1) % m
        if int(info) != 0:
            self.failed_steps += 1
            return torch.full_like(g, float("nan"))
        coeff = torch.cholesky_solve(b.unsqueeze(-1), factor).squeeze(-1)  # K^{-1} G g
        return torch.addmv(g, self.grads.T, coeff, beta=1.0 / self.damp,
                           alpha=-1.0 / self.damp**2)
