r"""Baselines in the same API: global magnitude and the diagonal Fisher (OBD).

Both are OBS with a diagonal curvature, so they share the pruner (:func:`~mfac.prune.prune_oneshot` with
``curvature="identity"`` or ``"diagonal"``), its masks, schedules, N:M patterns and the scorer API:

* magnitude: ``F = I``, saliency ``w_q^2 / 2`` (ranked like ``|w_q|``); no compensation.
* diagonal Fisher (Optimal Brain Damage with the empirical Fisher's diagonal):
  ``F_qq = damp + (1/m) sum_i g_iq^2``, saliency ``w_q^2 F_qq / 2``; no compensation (a diagonal
  curvature has no cross terms, so the OBS update only zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mfac.prune.pruner import obs_scores, prune_oneshot

__all__ = ["diagonal_fisher_scores", "magnitude_prune", "magnitude_scores"]


def magnitude_scores(
    model: nn.Module,
    *,
    params: Sequence[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``|w|`` keyed by parameter name (0 where already pruned), shaped like each parameter."""
    scores = obs_scores(
        model, None, None, ngrads=1, damp=1.0, params=params, masks=masks, curvature="identity"
    )
    return {n: (2.0 * s).sqrt_() for n, s in scores.items()}


def diagonal_fisher_scores(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    data: Iterable[Any],
    *,
    ngrads: int,
    damp: float,
    params: Sequence[str] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    collect: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """OBD saliencies ``w_q^2 (damp + mean_i g_iq^2) / 2`` keyed by parameter name."""
    return obs_scores(
        model,
        loss_fn,
        data,
        ngrads=ngrads,
        damp=damp,
        params=params,
        masks=masks,
        curvature="diagonal",
        collect=collect,
    )


def magnitude_prune(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None = None,
    *,
    pattern: str | tuple[int, int] | None = None,
    params: Sequence[str] | None = None,
    scope: str = "global",
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Magnitude pruning (global by default) in place; returns the masks (True = kept). Needs no data."""
    return prune_oneshot(
        model,
        None,
        None,
        sparsity,
        pattern=pattern,
        params=params,
        scope=scope,
        masks=masks,
        curvature="identity",
        update="none",
    )
