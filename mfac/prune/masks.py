r"""Mask selection from scores: global, per layer, and N:M semi-structured.

Scores and masks are dicts keyed by parameter name, each tensor shaped like its parameter; a mask is a bool
tensor with ``True`` = kept. Every selector takes the masks of an earlier pruning step as ``keep``:
coordinates already pruned stay pruned (they are removed first, whatever their score), so a target sparsity
counts them. Low score = pruned first; ties are broken by position (stable sort), so results are
deterministic.

Counting: pruning a fraction ``s`` of ``n`` weights removes ``round(s * n)`` of them (Python's ``round``, as
``torch.nn.utils.prune`` does), so the sparsity reached is exact up to that rounding.

N:M: the ``N`` kept weights of every group of ``M`` consecutive entries of ``param.reshape(rows, -1)`` (``rows
= param.shape[0]``; groups never straddle rows, so a Linear weight ``(out, in)`` is grouped along ``in`` and a
Conv weight ``(out, in, kh, kw)`` along its flattened ``in * kh * kw``, as SparseGPT does). ``"2:4"`` keeps 2
of every 4 (50 % sparsity), ``"4:8"`` keeps 4 of every 8.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "check_nm",
    "mask_sparsity",
    "nm_groups",
    "parse_pattern",
    "prune_count",
    "select_global",
    "select_nm",
    "select_per_layer",
]

Tensors = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------- helpers
def prune_count(numel: int, sparsity: float) -> int:
    """Return the number of weights pruned out of ``numel`` at ``sparsity``: ``round(sparsity * numel)``."""
    return round(float(sparsity) * numel)


def _check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(sparsity).__name__} {sparsity!r}")
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {sparsity}")
    return value


def _check_scores(scores: Tensors, keep: Tensors | None) -> dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("scores must be a non-empty dict {name: tensor shaped like the parameter}")
    keep = dict(keep or {})
    unknown = sorted(set(keep) - set(scores))
    if unknown:
        raise ValueError(f"keep masks given for parameters without scores: {unknown}")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"score of {name!r} must be a torch.Tensor, got {type(s).__name__}")
        if bool(torch.isnan(s).any()):
            raise ValueError(f"score of {name!r} has NaN entries")
        k = keep.get(name)
        if k is not None:
            if not isinstance(k, torch.Tensor) or k.dtype != torch.bool:
                raise TypeError(f"keep mask of {name!r} must be a bool tensor (True = kept)")
            if k.shape != s.shape:
                raise ValueError(
                    f"keep mask of {name!r} has shape {tuple(k.shape)}, its score {tuple(s.shape)}"
                )
    return keep


def _masked_scores(score: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Scores in float64 with already-pruned coordinates at -inf (they go first)."""
    s = score.detach().to(torch.float64)
    if keep is not None:
        s = s.masked_fill(~keep.to(s.device), float("-inf"))
    return s


def mask_sparsity(masks: Tensors) -> float:
    """Fraction of pruned (False) entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 0.0
    pruned = sum(int((~m).sum()) for m in masks.values())
    return pruned / total


# ---------------------------------------------------------------------------------------- unstructured
def select_global(
    scores: Tensors, sparsity: float, *, keep: Tensors | None = None
) -> dict[str, torch.Tensor]:
    """Prune the ``round(sparsity * n)`` lowest scores over all parameters together (``n`` in all).

    Args:
        scores: ``{name: score tensor}``, each shaped like its parameter (comparable across layers,
            as OBS saliencies are: each is a loss increase).
        sparsity: target fraction of pruned weights, in ``[0, 1]``, counting those pruned in ``keep``.
        keep: masks of an earlier step (True = kept); missing names: all kept.

    Returns:
        ``{name: bool mask}`` (True = kept), on the scores' devices. If ``keep`` already prunes more than the
        target, it is returned unchanged (nothing is un-pruned).
    """
    sparsity = _check_sparsity(sparsity)
    keep = _check_scores(scores, keep)
    names = list(scores)
    devices = {scores[n].device for n in names}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")  # one ranking, one device
    flat = torch.cat([_masked_scores(scores[n], keep.get(n)).reshape(-1).to(device) for n in names])
    count = prune_count(flat.numel(), sparsity)
    new = torch.ones(flat.numel(), dtype=torch.bool, device=device)
    if count:
        order = torch.argsort(flat, stable=True)
        new[order[:count]] = False
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for n in names:
        s = scores[n]
        part = new[offset : offset + s.numel()].reshape(s.shape).to(s.device)
        if n in keep:
            part &= keep[n].to(s.device)
        out[n] = part
        offset += s.numel()
    return out


def select_per_layer(
    scores: Tensors, sparsity: float | Mapping[str, float], *, keep: Tensors | None = None
) -> dict[str, torch.Tensor]:
    """Prune ``round(s_t * numel_t)`` lowest scores within each parameter ``t`` separately.

    Args:
        scores: ``{name: score tensor}``.
        sparsity: one fraction for every parameter, or ``{name: fraction}`` covering all of them.
        keep: masks of an earlier step.

    Returns:
        ``{name: bool mask}``.
    """
    keep = _check_scores(scores, keep)
    if isinstance(sparsity, Mapping):
        missing = sorted(set(scores) - set(sparsity))
        extra = sorted(set(sparsity) - set(scores))
        if missing or extra:
            raise ValueError(
                f"per-layer sparsity must cover exactly the scored parameters; "
                f"missing {missing}, extra {extra}"
            )
        per = {n: _check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in scores}
    else:
        value = _check_sparsity(sparsity)
        per = dict.fromkeys(scores, value)
    out = {}
    for n, s in scores.items():
        flat = _masked_scores(s, keep.get(n)).reshape(-1)
        count = prune_count(flat.numel(), per[n])
        mask = torch.ones(flat.numel(), dtype=torch.bool, device=s.device)
        if count:
            mask[torch.argsort(flat, stable=True)[:count]] = False
        mask = mask.reshape(s.shape)
        if n in keep:
            mask &= keep[n].to(s.device)
        out[n] = mask
    return out


# ---------------------------------------------------------------------------------------- N:M
def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> ``(n, m)``: keep ``n`` of every ``m``, with ``1 <= n < m``."""
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
        n, m = (int(p) for p in parts)
    elif isinstance(pattern, tuple) and len(pattern) == 2 and all(isinstance(v, int) for v in pattern):
        n, m = pattern
    else:
        raise TypeError(f"pattern must be a string 'N:M' or a tuple (N, M), got {pattern!r}")
    if not 1 <= n < m:
        raise ValueError(f"pattern N:M needs 1 <= N < M (N kept of every M), got {n}:{m}")
    return n, m


def nm_groups(tensor: torch.Tensor, m: int, name: str = "tensor") -> torch.Tensor:
    """View ``tensor`` as ``(groups, m)``: ``m`` consecutive entries of ``tensor.reshape(rows, -1)``.

    Raises:
        ValueError: the row length (``numel / shape[0]``; ``numel`` for 1-D) is not divisible by ``m``.
    """
    rows = tensor.shape[0] if tensor.dim() > 1 else 1
    width = tensor.numel() // max(rows, 1)
    if width % m:
        raise ValueError(
            f"N:M groups of {m} need the row length of {name!r} to be divisible by {m}; its shape "
            f"{tuple(tensor.shape)} has rows of {width}. Leave it out of params or use unstructured sparsity"
        )
    return tensor.reshape(-1, m)


def select_nm(scores: Tensors, n: int, m: int, *, keep: Tensors | None = None) -> dict[str, torch.Tensor]:
    """Keep the ``n`` highest scores in every group of ``m`` (see the module docstring for groups).

    Coordinates already pruned in ``keep`` stay pruned (a group may then keep fewer than ``n``).

    Returns:
        ``{name: bool mask}``, exactly ``m - n`` pruned per group (more where ``keep`` pruned more).
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise ValueError(f"select_nm needs integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
    keep = _check_scores(scores, keep)
    out = {}
    for name, s in scores.items():
        groups = nm_groups(_masked_scores(s, keep.get(name)), m, name)
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=s.device)
        if n:
            # stable: argsort descending keeps the earlier of tied entries
            order = torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n]
            mask.scatter_(1, order, True)
        mask = mask.reshape(s.shape)
        if name in keep:
            mask &= keep[name].to(s.device)
        out[name] = mask
    return out


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` of ``mask`` keeps at most ``n`` entries."""
    return bool((nm_groups(mask, m).sum(dim=1) <= n).all())
