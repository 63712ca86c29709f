r"""Groups of weights pruned together (structured OBS) and their selection.

A *grouping* gives every weight of a pruned parameter a group number; a group is removed whole, with the exact
group OBS score and update of the block-diagonal (or full) Fisher (:func:`~mfac.prune.scores.group_saliency`):

    rho_Q = 1/2 w_Q^T ([F^{-1}]_QQ)^{-1} w_Q,        dw = -F^{-1} E_Q ([F^{-1}]_QQ)^{-1} w_Q.

Specs, per parameter (``groups=`` of :func:`~mfac.prune.prune_oneshot`, :func:`~mfac.prune.obs_scores`,
:class:`~mfac.prune.GradualPruner`: one spec for every parameter, or ``{name: spec}`` where a parameter left
out is unstructured):

* ``"block:N"`` (e.g. ``"block:4"``, oBERT's 4-block): ``N`` consecutive weights along each row of
  ``param.reshape(rows, -1)``, i.e. along the input dimension of a Linear ``(out, in)`` weight (the grouping
  of N:M patterns, :func:`~mfac.prune.masks.nm_groups`); the row length must be divisible by ``N``;
* ``"rows"``: whole output rows / channels (``param[i]``);
* ``"none"``: every weight its own group;
* an integer tensor shaped like the parameter: the user's group numbers (e.g. the attention head of each
  weight); equal numbers are one group, any values.

A group may span several Fisher blocks: ``[F^{-1}]_QQ`` is then block-diagonal and the score and update
split exactly by block. Selection ranks the groups by score (comparable across parameters: each is a loss
increase) and removes the prefix whose weight count is nearest the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mfac.numerics import check_fraction
from mfac.prune.masks import _check_keep, nm_groups, prune_count

__all__ = ["GROUP_SPECS", "group_labels", "select_groups"]

#: the named group specs (besides ``"block:N"`` and label tensors).
GROUP_SPECS = ("rows", "none")

Spec = str | torch.Tensor


def _labels_of(name: str, param: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Local group numbers ``0..n-1`` of one parameter, shaped like it (long, on its device)."""
    shape, device = param.shape, param.device
    numel = param.numel()
    if isinstance(spec, torch.Tensor):
        if spec.shape != shape or spec.is_floating_point() or spec.dtype == torch.bool:
            raise ValueError(
                f"group labels of {name!r} must be an integer tensor of shape {tuple(shape)}, got "
                f"{spec.dtype} {tuple(spec.shape)}"
            )
        _, compact = torch.unique(spec.to(device).reshape(-1), return_inverse=True)
        return compact.reshape(shape)
    if not isinstance(spec, str):
        raise TypeError(
            f"group spec of {name!r} must be a string or a label tensor, got {type(spec).__name__}"
        )
    if spec == "none":
        return torch.arange(numel, device=device).reshape(shape)
    if spec == "rows":
        rows = shape[0] if len(shape) > 1 else 1
        return (torch.arange(numel, device=device) // max(numel // max(rows, 1), 1)).reshape(shape)
    if spec.startswith("block:") and spec[6:].isdigit() and int(spec[6:]) >= 1:
        size = int(spec[6:])
        index = torch.arange(numel, device=device).reshape(shape)
        groups = nm_groups(index, size, name)  # (numel / size, size), raises on a bad row length
        out = torch.empty(numel, dtype=torch.long, device=device)
        out[groups.reshape(-1)] = torch.arange(groups.shape[0], device=device).repeat_interleave(size)
        return out.reshape(shape)
    raise ValueError(
        f"group spec of {name!r} must be 'block:N' (N >= 1), one of {GROUP_SPECS}, or a label tensor; "
        f"got {spec!r}"
    )


def group_labels(
    params: Mapping[str, torch.Tensor], groups: Spec | Mapping[str, Spec]
) -> dict[str, torch.Tensor]:
    """Group numbers of every weight, distinct across parameters: ``{name: long tensor shaped like it}``.

    Args:
        params: ``{name: parameter}`` in flat order.
        groups: one spec for all (see the module docstring), or ``{name: spec}`` (missing names:
            ``"none"``).

    Returns:
        Labels numbered ``0..n-1`` over all parameters together (the groups of one parameter are
        consecutive numbers).

    Raises:
        ValueError: an unknown name or spec, labels of the wrong shape, a row length not divisible by ``N``.
    """
    if isinstance(groups, Mapping):
        unknown = sorted(set(groups) - set(params))
        if unknown:
            raise ValueError(f"groups given for parameters that are not pruned here: {unknown}")
        specs = {n: groups.get(n, "none") for n in params}
    else:
        specs = dict.fromkeys(params, groups)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, param in params.items():
        local = _labels_of(name, param, specs[name])
        out[name] = local + offset
        offset += int(local.max()) + 1 if local.numel() else 0
    return out


def select_groups(
    scores: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    *,
    keep: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Remove whole groups of lowest score until the sparsity target is (nearest to) reached.

    Args:
        scores: ``{name: tensor shaped like the parameter}``, every kept weight holding its group's score.
        labels: :func:`group_labels`.
        sparsity: one target over all parameters (one global ranking), or ``{name: target}`` (each
            parameter ranked alone), counting the weights pruned in ``keep``.
        keep: masks of an earlier step (True = kept).

    Returns:
        ``{name: bool mask}``: ``keep`` with the chosen groups' kept weights removed. The number of weights
        removed is the prefix sum of the ranked groups' kept sizes nearest to the target (ties: fewer).
    """
    names = list(scores)
    keep = _check_keep(scores, keep)
    if isinstance(sparsity, Mapping):
        if set(sparsity) != set(names):
            raise ValueError(f"per-layer sparsity must cover exactly the scored parameters {names}")
        parts: Sequence[tuple[list[str], float]] = [
            ([n], check_fraction(sparsity[n], f"sparsity[{n!r}]")) for n in names
        ]
    else:
        parts = [(names, check_fraction(sparsity, "sparsity"))]
    removed: dict[str, torch.Tensor] = {}
    for part, target in parts:
        kp = torch.cat([
            (keep[n] if n in keep else torch.ones_like(scores[n], dtype=torch.bool)).reshape(-1).cpu()
            for n in part
        ])
        lab = torch.cat([labels[n].reshape(-1).cpu() for n in part])
        sc = torch.cat([scores[n].detach().reshape(-1).to(torch.float64).cpu() for n in part])
        need = prune_count(kp.numel(), target) - int((~kp).sum())
        chosen = torch.zeros(kp.numel(), dtype=torch.bool)
        if need > 0 and bool(kp.any()):
            kept_lab = lab[kp]
            groups, compact = torch.unique(kept_lab, return_inverse=True)
            sizes = torch.bincount(compact)
            gscore = torch.zeros(groups.numel(), dtype=torch.float64).scatter_reduce_(
                0, compact, sc[kp], "amax", include_self=False
            )
            order = torch.argsort(gscore, stable=True)
            prefix = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes[order], 0)])
            count = int(torch.argmin((prefix - need).abs()))  # first (fewest) of the nearest
            drop = torch.zeros(groups.numel(), dtype=torch.bool)
            drop[order[:count]] = True
            chosen[kp.nonzero().squeeze(1)] = drop[compact]
        offset = 0
        for n in part:
            size = scores[n].numel()
            removed[n] = chosen[offset : offset + size].reshape(scores[n].shape)
            offset += size
    out = {}
    for n in names:
        base = keep[n] if n in keep else torch.ones_like(scores[n], dtype=torch.bool)
        out[n] = base & ~removed[n].to(base.device)
    return out
