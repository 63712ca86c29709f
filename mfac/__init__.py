"""mfac: matrix-free inverse-Fisher curvature (M-FAC) for PyTorch.

Importing mfac has no side effects: no global flags, no default dtypes, no logging configuration.
"""

from mfac.fisher import (
    DenseInverseFisher,
    InverseFisher,
    SlidingInverseFisher,
    StaticInverseFisher,
)
from mfac.numerics import MFACWarning, NotPositiveDefiniteError, NumericalWarning

__version__ = "0.1.0"

__all__ = [
    # inverse-Fisher operators
    "DenseInverseFisher",
    "InverseFisher",
    "SlidingInverseFisher",
    "StaticInverseFisher",
    # numerics
    "MFACWarning",
    "NotPositiveDefiniteError",
    "NumericalWarning",
]
