"""mfac: matrix-free inverse-Fisher curvature (M-FAC) for PyTorch.

Importing mfac has no side effects: no global flags, no default dtypes, no logging configuration.
The pruning API's main entry points are re-exported here; all of it lives in :mod:`mfac.prune`.
Multi-process sharding lives in :mod:`mfac.distributed` (imported on demand).
"""

from mfac.collect import collect_grads, evaluate_loss, stream_grads
from mfac.fisher import (
    BlockFisherAccumulator,
    BlockInverseFisher,
    CompressedSlidingInverseFisher,
    DenseInverseFisher,
    InverseFisher,
    LowPrecisionSlidingInverseFisher,
    SlidingInverseFisher,
    StaticInverseFisher,
)
from mfac.numerics import MFACWarning, NotPositiveDefiniteError, NumericalWarning
from mfac.optim import MFAC, MFACPreconditioner
from mfac.params import ParamSpace, default_prunable
from mfac.prune import (
    CubicSchedule,
    GradualPruner,
    MaskHandle,
    StepSchedule,
    apply_masks,
    obs_scores,
    prune_oneshot,
)
from mfac.prune.layerwise import LayerReport, prune_layerwise

__version__ = "0.1.0"

__all__ = [
    # inverse-Fisher operators
    "CompressedSlidingInverseFisher",
    "DenseInverseFisher",
    "InverseFisher",
    "LowPrecisionSlidingInverseFisher",
    "SlidingInverseFisher",
    "StaticInverseFisher",
    # optimization
    "MFAC",
    "MFACPreconditioner",
    # pruning (more in mfac.prune)
    "CubicSchedule",
    "GradualPruner",
    "MaskHandle",
    "StepSchedule",
    "apply_masks",
    "obs_scores",
    "prune_oneshot",
    # layer-wise pruning (SparseGPT, OBC)
    "LayerReport",
    "prune_layerwise",
    # gradients and parameters
    "ParamSpace",
    "collect_grads",
    "default_prunable",
    "evaluate_loss",
    # streaming block-diagonal Fisher
    "BlockFisherAccumulator",
    "BlockInverseFisher",
    "stream_grads",
    # numerics
    "MFACWarning",
    "NotPositiveDefiniteError",
    "NumericalWarning",
]
