"""mfac: matrix-free inverse-Fisher curvature (M-FAC) for PyTorch.

Importing mfac has no side effects: no global flags, no default dtypes, no logging configuration.
Multi-process sharding lives in :mod:`mfac.distributed` (imported on demand).
"""

from mfac.collect import collect_grads, evaluate_loss
from mfac.fisher import (
    DenseInverseFisher,
    InverseFisher,
    SlidingInverseFisher,
    StaticInverseFisher,
)
from mfac.numerics import MFACWarning, NotPositiveDefiniteError, NumericalWarning
from mfac.optim import MFAC, MFACPreconditioner
from mfac.params import ParamSpace, default_prunable

__version__ = "0.1.0"

__all__ = [
    # inverse-Fisher operators
    "DenseInverseFisher",
    "InverseFisher",
    "SlidingInverseFisher",
    "StaticInverseFisher",
    # optimization
    "MFAC",
    "MFACPreconditioner",
    # gradients and parameters
    "ParamSpace",
    "collect_grads",
    "default_prunable",
    "evaluate_loss",
    # numerics
    "MFACWarning",
    "NotPositiveDefiniteError",
    "NumericalWarning",
]
