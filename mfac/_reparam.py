"""The ``torch.nn.utils.prune`` reparametrization, decoded in one place.

Private. Pruning ``module.<leaf>`` with ``torch.nn.utils.prune`` (``prune.l1_unstructured``,
``prune.custom_from_mask``, ``prune.global_unstructured``) removes the parameter ``<leaf>`` and adds

* a parameter ``<leaf>_orig``: the dense values, the tensor optimizers and OBS updates must write;
* a buffer ``<leaf>_mask``: 0/1 in the parameter's dtype (1 = kept);
* a forward pre-hook that recomputes the plain attribute ``module.<leaf> = <leaf>_orig * <leaf>_mask``.

A leaf is *reparametrized* exactly when both the ``_orig`` parameter and the ``_mask`` buffer exist.
Everything in mfac that reads or writes that convention (user-facing names in :mod:`mfac.params`,
the bridge and the pruner in :mod:`mfac.prune`, the layer-wise targets, gradient collection) calls
the functions below, so the suffixes are spelled here only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__: list[str] = []

ORIG = "_orig"
MASK = "_mask"


def is_reparametrized(module: nn.Module, leaf: str) -> bool:
    """Whether ``module.<leaf>`` is reparametrized (``<leaf>_orig`` parameter and ``<leaf>_mask`` buffer)."""
    return f"{leaf}{ORIG}" in module._parameters and f"{leaf}{MASK}" in module._buffers


def base_leaf(module: nn.Module, leaf: str) -> str | None:
    """Return ``"weight"`` if ``leaf == "weight_orig"`` is a reparametrization's ``_orig``, else None."""
    if not leaf.endswith(ORIG):
        return None
    base = leaf[: -len(ORIG)]
    return base if base and is_reparametrized(module, base) else None


def user_leaf(module: nn.Module, leaf: str) -> str:
    """Return the user-facing leaf: ``"weight_orig"`` -> ``"weight"`` if reparametrized, else ``leaf``."""
    return base_leaf(module, leaf) or leaf


def writable(module: nn.Module, leaf: str) -> nn.Parameter | None:
    """Return the parameter to write for ``module.<leaf>``: itself, else ``<leaf>_orig``, else None."""
    param = module._parameters.get(leaf)
    if param is not None:
        return param
    if is_reparametrized(module, leaf):
        return module._parameters[f"{leaf}{ORIG}"]
    return None


def mask_buffer(module: nn.Module, leaf: str) -> torch.Tensor | None:
    """Return the ``<leaf>_mask`` buffer (0/1, the parameter's dtype) of a reparametrized leaf, else None."""
    return module._buffers[f"{leaf}{MASK}"] if is_reparametrized(module, leaf) else None


def reparametrized_leaves(module: nn.Module) -> list[str]:
    """Return the reparametrized leaves of ``module`` itself (not of its children), in buffer order."""
    leaves = []
    for key in module._buffers:
        if key.endswith(MASK):
            base = key[: -len(MASK)]
            if base and is_reparametrized(module, base):
                leaves.append(base)
    return leaves


def write_mask(module: nn.Module, leaf: str, keep: torch.Tensor) -> None:
    """Overwrite the ``<leaf>_mask`` buffer with ``keep`` (bool, True = kept) and refresh ``module.<leaf>``.

    ``module.<leaf>`` is set to ``<leaf>_orig * <leaf>_mask`` (under the caller's grad mode), what
    the forward pre-hook computes, so the attribute is current before the next forward too.
    """
    buffer = module._buffers[f"{leaf}{MASK}"]
    buffer.copy_(keep.to(buffer.dtype))
    setattr(module, leaf, module._parameters[f"{leaf}{ORIG}"] * buffer)
