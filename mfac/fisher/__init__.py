"""Inverse of the damped empirical Fisher ``F = damp I + (1/m) G^T G`` as matrix-free operators."""

from mfac.fisher.base import InverseFisher
from mfac.fisher.blocks import BlockFisherAccumulator, BlockInverseFisher
from mfac.fisher.compressed import CompressedSlidingInverseFisher
from mfac.fisher.dense import DenseInverseFisher
from mfac.fisher.lowp import LowPrecisionSlidingInverseFisher
from mfac.fisher.sliding import SlidingInverseFisher
from mfac.fisher.static import StaticInverseFisher

__all__ = [
    "BlockFisherAccumulator",
    "BlockInverseFisher",
    "CompressedSlidingInverseFisher",
    "DenseInverseFisher",
    "InverseFisher",
    "LowPrecisionSlidingInverseFisher",
    "SlidingInverseFisher",
    "StaticInverseFisher",
]
