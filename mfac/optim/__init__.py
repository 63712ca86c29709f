"""The M-FAC optimizer (a ``torch.optim.Optimizer``) and the M-FAC gradient preconditioner.

``MFAC`` steps the parameters along ``-lr * F^{-1} g`` (with the paper's momentum and weight decay);
``MFACPreconditioner`` rewrites ``p.grad`` with ``F^{-1} g`` for any other optimizer. Both keep one
sliding window of the last ``ngrads`` gradients over all parameters (:mod:`mfac.fisher.sliding`).
"""

from mfac.optim.mfac import MFAC, MFACPreconditioner

__all__ = ["MFAC", "MFACPreconditioner"]
