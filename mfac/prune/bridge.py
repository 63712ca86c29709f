r"""Bridge to ``torch.nn.utils.prune``.

* Our scores as its ``importance_scores``: :func:`torch_prune_parameters` and :func:`torch_importance_scores`
  give the ``[(module, "weight"), ...]`` list and the ``{(module, "weight"): score}`` dict that
  ``global_unstructured`` takes::

      scores = mfac.obs_scores(model, loss_fn, calib, ngrads=256, damp=1e-4)
      prune.global_unstructured(torch_prune_parameters(model, scores), prune.L1Unstructured,
                                importance_scores=torch_importance_scores(model, scores),
                                amount=0.9)

  (``L1Unstructured`` ranks by ``|score|``; OBS saliencies are >= 0, so the ranking is ours.) This selects the
  weights, but applies no OBS update: :func:`~mfac.prune.prune_oneshot` does both.
* Our masks as its reparametrization: :func:`apply_torch_prune` calls ``prune.custom_from_mask`` for each mask
  (combined with an existing mask if the module already has one); ``prune.remove(module, "weight")`` later
  makes it permanent.
* Models that are already reparametrized: :func:`~mfac.prune.prune_oneshot` reads the effective weight
  ``weight_orig * weight_mask``, treats the existing mask as already pruned, writes the OBS-updated weights
  into ``weight_orig`` (see :func:`mfac.params.writable_parameter`) and extends ``weight_mask`` with the new
  mask, so the forward pass and its gradients follow the new mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from mfac._reparam import is_reparametrized, user_leaf
from mfac.params import check_masks, writable_parameter

__all__ = [
    "apply_torch_prune",
    "is_torch_pruned",
    "resolve_module",
    "torch_importance_scores",
    "torch_prune_parameters",
]


def resolve_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``"layer.0.weight"`` -> ``(model.layer[0], "weight")`` (user-facing names; ``*_orig`` accepted)."""
    writable_parameter(model, name)  # validates the name
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return module, user_leaf(module, leaf)


def is_torch_pruned(module: nn.Module, leaf: str) -> bool:
    """Whether ``module.<leaf>`` is reparametrized by ``torch.nn.utils.prune``."""
    return is_reparametrized(module, leaf)


def torch_prune_parameters(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str]]:
    """Return ``[(module, leaf)]`` for parameter names (e.g. the keys of a scores or masks dict)."""
    return [resolve_module(model, n) for n in names]


def torch_importance_scores(
    model: nn.Module, scores: Mapping[str, torch.Tensor]
) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """Re-key ``{name: score}`` as ``{(module, leaf): score}`` (``global_unstructured``'s form)."""
    return {resolve_module(model, n): s for n, s in scores.items()}


def apply_torch_prune(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Apply ``masks`` (True = kept) as ``torch.nn.utils.prune`` reparametrizations.

    A module without one gets ``weight_orig`` (the current values) and ``weight_mask``; a module that has one
    gets the product of its mask and ours (``prune.custom_from_mask`` composes them).
    """
    # every mask is checked before any module is reparametrized
    checked = check_masks(masks, lambda name: writable_parameter(model, name), move=True)
    for name, mask in checked.items():
        torch_prune.custom_from_mask(*resolve_module(model, name), mask)
