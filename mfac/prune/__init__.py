"""OBS pruning with M-FAC curvature: scores, one-shot pruning with recomputation, schedules, N:M, masks.

Public entry points (see :mod:`mfac.prune.pruner` for the semantics):

* :func:`obs_scores`, :func:`prune_oneshot`, :class:`GradualPruner` with :class:`CubicSchedule` /
  :class:`StepSchedule`;
* masks that stay applied through fine-tuning: :func:`apply_masks` / :class:`MaskHandle`;
* the ``torch.nn.utils.prune`` bridge: :func:`apply_torch_prune`, :func:`torch_importance_scores`,
  :func:`torch_prune_parameters`;
* baselines: :func:`magnitude_scores`, :func:`magnitude_prune`, :func:`diagonal_fisher_scores`;
* layer-wise OBS on each layer's reconstruction loss (SparseGPT, OBC) with sequential calibration:
  :func:`prune_layerwise` and its :class:`LayerReport` (:mod:`mfac.prune.layerwise`);
* building blocks: OBS formulas on an operator (:mod:`mfac.prune.scores`), selection
  (:mod:`mfac.prune.masks`), curvature sources (:class:`Curvature`).
"""

from mfac.prune.baselines import diagonal_fisher_scores, magnitude_prune, magnitude_scores
from mfac.prune.bridge import apply_torch_prune, torch_importance_scores, torch_prune_parameters
from mfac.prune.curvature import (
    Curvature,
    DiagonalFisherCurvature,
    FisherCurvature,
    IdentityCurvature,
)
from mfac.prune.enforce import MaskHandle, apply_masks
from mfac.prune.groups import group_labels, select_groups
from mfac.prune.layerwise import LAYERWISE_METHODS, LayerReport, prune_layerwise
from mfac.prune.masks import (
    check_nm,
    mask_sparsity,
    nm_axes,
    parse_pattern,
    select_global,
    select_nm,
    select_per_layer,
)
from mfac.prune.pruner import DEFAULT_UPDATE, GradualPruner, obs_scores, prune_oneshot
from mfac.prune.schedule import CubicSchedule, PruningSchedule, StepSchedule, recompute_steps
from mfac.prune.scores import (
    group_independent_update,
    group_saliency,
    independent_update,
    joint_loss_increase,
    joint_update,
    obs_saliency,
    restricted_joint_update,
)

__all__ = [
    # entry points
    "DEFAULT_UPDATE",
    "GradualPruner",
    "obs_scores",
    "prune_oneshot",
    # layer-wise OBS (SparseGPT, OBC)
    "LAYERWISE_METHODS",
    "LayerReport",
    "prune_layerwise",
    # schedules
    "CubicSchedule",
    "PruningSchedule",
    "StepSchedule",
    "recompute_steps",
    # masks
    "MaskHandle",
    "apply_masks",
    "check_nm",
    "mask_sparsity",
    "nm_axes",
    "parse_pattern",
    "select_global",
    "select_nm",
    "select_per_layer",
    # torch.nn.utils.prune bridge
    "apply_torch_prune",
    "torch_importance_scores",
    "torch_prune_parameters",
    # baselines
    "diagonal_fisher_scores",
    "magnitude_prune",
    "magnitude_scores",
    # curvature sources
    "Curvature",
    "DiagonalFisherCurvature",
    "FisherCurvature",
    "IdentityCurvature",
    # OBS formulas on an operator
    "independent_update",
    "joint_loss_increase",
    "joint_update",
    "obs_saliency",
    "restricted_joint_update",
    # group (structured) OBS
    "group_independent_update",
    "group_labels",
    "group_saliency",
    "select_groups",
]
