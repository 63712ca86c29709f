r"""Mask selection from scores: global, per layer, and N:M semi-structured.

Scores and masks are dicts keyed by parameter name, each tensor shaped like its parameter; a mask is a bool
tensor with ``True`` = kept. Every selector takes the masks of an earlier pruning step as ``keep``:
coordinates already pruned stay pruned (they are removed first, whatever their score), so a target sparsity
counts them. Low score = pruned first; ties are broken by position (stable sort), so results are
deterministic.

Counting: pruning a fraction ``s`` of ``n`` weights removes ``round(s * n)`` of them (Python's ``round``, as
``torch.nn.utils.prune`` does), so the sparsity reached is exact up to that rounding.

N:M: the ``N`` kept weights of every group of ``M`` consecutive entries along one axis of the parameter, its
*group axis*; groups never straddle the other axes. ``"2:4"`` keeps 2 of every 4 (50 % sparsity), ``"4:8"``
keeps 4 of every 8. Sparse tensor-core kernels need the groups along each layer's *input* dimension, whatever
the storage; the layouts (:func:`nm_axes`, ``nm_axis=`` of :func:`~mfac.prune.prune_oneshot`):

* ``"input"`` (default): a Linear ``(out, in)`` along ``in``; a transformers ``Conv1D`` ``(in, out)`` along
  ``in`` (dim 0); a Conv1d/2d/3d ``(out, in, *kernel)`` along its flattened ``in * kh * kw`` (SparseGPT's
  layout: for a 3x3 kernel a group of 4 spans kernel positions of one or two input channels).
* ``"channels"`` (NVIDIA ASP's layout): as ``"input"``, but a convolution is grouped along ``in``: ``M``
  consecutive input channels at each kernel position and output channel (ASP views a conv weight as
  ``permute(2, 3, 0, 1).reshape(-1, in)``); needs ``in`` divisible by ``M``.

``"rows"`` groups ``M`` consecutive entries of ``param.reshape(param.shape[0], -1)`` for every parameter (the
stored rows: for a ``Conv1D`` that is the *output* dimension). An ``int`` axis (or ``{name: axis}``) groups
along that dimension of each parameter, the other dimensions flattened: ``axis=1`` of a Conv2d is ASP's.
Internally an axis is ``None`` (the stored-rows layout) or a dimension index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mfac.numerics import check_bool_mask, check_fraction, check_not_meta

__all__ = [
    "check_nm",
    "mask_sparsity",
    "nm_axes",
    "nm_groups",
    "parse_pattern",
    "prune_count",
    "select_global",
    "select_nm",
    "select_per_layer",
]

Tensors = Mapping[str, torch.Tensor]
#: a group axis: None (``M`` consecutive entries of ``reshape(shape[0], -1)``) or a dimension index
Axis = int | None
Axes = Axis | Mapping[str, Axis]
NM_LAYOUTS = ("input", "channels", "rows")


# ---------------------------------------------------------------------------------------- helpers
def prune_count(numel: int, sparsity: float) -> int:
    """Return the number of weights pruned out of ``numel`` at ``sparsity``: ``round(sparsity * numel)``."""
    return round(float(sparsity) * numel)


def _check_scores(scores: Tensors, keep: Tensors | None) -> dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping):
        raise TypeError("scores must be a dict {name: tensor shaped like the parameter}, got "
                        f"{type(scores).__name__}")
    if not scores:
        raise ValueError("scores must be a non-empty dict {name: tensor shaped like the parameter}, got {}")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"score of {name!r} must be a torch.Tensor, got {type(s).__name__}")
        if bool(torch.isnan(s).any()):
            raise ValueError(f"score of {name!r} has NaN entries")
    return _check_keep(scores, keep)


def _check_keep(scores: Tensors, keep: Tensors | None) -> dict[str, torch.Tensor]:
    """Check the ``keep`` masks of a selector: the mask contract, each shaped like its score.

    Returns ``dict(keep)`` (the caller's tensors; moved to the scores' devices where used).
    """
    keep = dict(keep or {})
    unknown = sorted(set(keep) - set(scores))
    if unknown:
        raise ValueError(f"keep masks given for parameters without scores: {unknown}")
    for name, k in keep.items():
        check_bool_mask(k, f"keep mask of {name!r}", scores[name].shape)
        check_not_meta(k, f"keep mask of {name!r}")
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
    sparsity = check_fraction(sparsity, "sparsity")
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
        per = {n: check_fraction(sparsity[n], f"sparsity[{n!r}]") for n in scores}
    else:
        value = check_fraction(sparsity, "sparsity")
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


def _check_axis(tensor: torch.Tensor, axis: Axis, name: str) -> Axis:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"N:M group axis of {name!r} must be an int or None, got {axis!r}")
    if not -tensor.dim() <= axis < max(tensor.dim(), 1):
        raise ValueError(
            f"N:M group axis {axis} of {name!r} is out of range for its shape {tuple(tensor.shape)}"
        )
    return axis % max(tensor.dim(), 1)


def _rows_view(tensor: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``tensor`` as ``(rows, width)`` with groups running along ``width``."""
    if axis is None:
        rows = tensor.shape[0] if tensor.dim() > 1 else 1
        return tensor.reshape(rows, -1)
    moved = tensor.movedim(axis, -1) if tensor.dim() else tensor.reshape(1)
    return moved.reshape(-1, moved.shape[-1])


def _from_rows_view(rows: torch.Tensor, like: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Inverse of :func:`_rows_view`: back to ``like``'s shape."""
    if axis is None or like.dim() <= 1:
        return rows.reshape(like.shape)
    moved_shape = like.movedim(axis, -1).shape
    return rows.reshape(moved_shape).movedim(-1, axis)


def nm_groups(tensor: torch.Tensor, m: int, name: str = "tensor", axis: Axis = None) -> torch.Tensor:
    """View ``tensor`` as ``(groups, m)``: ``m`` consecutive entries along its group axis.

    ``axis=None``: along the rows of ``tensor.reshape(shape[0], -1)``; an int: along that dimension, the
    others flattened (a copy when the axis is not the last one).

    Raises:
        ValueError: the length along the group axis is not divisible by ``m``.
    """
    axis = _check_axis(tensor, axis, name)
    rows = _rows_view(tensor, axis)
    width = rows.shape[1] if rows.dim() == 2 else 0
    if width % m:
        where = "rows of" if axis is None else f"dimension {axis} of length"
        raise ValueError(
            f"N:M groups of {m} need the group axis of {name!r} to be divisible by {m}; its shape "
            f"{tuple(tensor.shape)} has {where} {width}. Choose another nm_axis, leave it out of params or "
            "use unstructured sparsity"
        )
    return rows.reshape(-1, m)


def nm_axes(model: nn.Module, names: Sequence[str], layout: str | Axes = "input") -> dict[str, Axis]:
    """Return the N:M group axis of each named parameter of ``model`` (see the module docstring).

    Args:
        model: the model (modules are looked up to tell a ``Conv1D`` from a Linear).
        names: user-facing parameter names.
        layout: ``"input"`` (each layer's input dimension; convolutions flattened ``in * kh * kw``),
            ``"channels"`` (input dimension; convolutions grouped over input channels at each kernel position,
            NVIDIA ASP's layout), ``"rows"`` (stored rows), an ``int`` dimension for every parameter, or
            ``{name: int | None}`` (names left out get ``"input"``).

    Returns:
        ``{name: axis}`` with ``axis`` None (stored rows) or a dimension index, for :func:`select_nm`.
    """
    from mfac.params import is_transformers_conv1d, writable_parameter

    per_name: Mapping[str, Axis] = {}
    rule = f"nm_axis must be one of {NM_LAYOUTS}, an int or a dict {{name: axis}}; got {layout!r}"
    if isinstance(layout, str) and layout not in NM_LAYOUTS:
        raise ValueError(rule)
    if not isinstance(layout, (str, Mapping)) and (isinstance(layout, bool) or not isinstance(layout, int)):
        raise TypeError(rule)
    if isinstance(layout, Mapping):
        unknown = sorted(set(layout) - set(names))
        if unknown:
            raise ValueError(f"nm_axis given for parameters that are not pruned here: {unknown}")
        per_name, layout = layout, "input"
    out: dict[str, Axis] = {}
    for name in names:
        param = writable_parameter(model, name)
        if name in per_name:
            out[name] = _check_axis(param, per_name[name], name)
            continue
        if not isinstance(layout, str):
            out[name] = _check_axis(param, layout, name)
            continue
        path, _, _ = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        if layout == "rows":
            out[name] = None
        elif is_transformers_conv1d(module):
            out[name] = 0  # weight (in, out), used as x @ W
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layout == "channels":
            out[name] = 1  # (out, in, *kernel): in-channels at each kernel position
        else:
            out[name] = None  # Linear (out, in), convolutions flattened (out, in * prod(kernel)), others
    return out


def _axis_of(axis: Axes, name: str) -> Axis:
    return axis.get(name) if isinstance(axis, Mapping) else axis


def select_nm(
    scores: Tensors, n: int, m: int, *, keep: Tensors | None = None, axis: Axes = None
) -> dict[str, torch.Tensor]:
    """Keep the ``n`` highest scores in every group of ``m`` (see the module docstring for groups).

    Coordinates already pruned in ``keep`` stay pruned (a group may then keep fewer than ``n``).

    Args:
        scores: ``{name: score tensor}``.
        n: how many are kept per group.
        m: the group size.
        keep: masks of an earlier step.
        axis: the group axis, one for all (None: stored rows; an int: that dimension) or ``{name: axis}``
            (:func:`nm_axes` gives each layer's input dimension).

    Returns:
        ``{name: bool mask}``, exactly ``m - n`` pruned per group (more where ``keep`` pruned more).

    Example (a transformers ``Conv1D`` weight is stored ``(in, out)``: its input dimension is ``axis=0``):
        >>> score = torch.tensor([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])   # (in=4, out=2)
        >>> select_nm({"w": score}, 2, 4, axis=0)["w"]            # 2 of the 4 inputs of each output
        tensor([[ True, False],
                [ True, False],
                [False,  True],
                [False,  True]])
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
        raise ValueError(f"select_nm needs integers 0 <= n <= m, m >= 1; got n={n}, m={m}")
    keep = _check_scores(scores, keep)
    out = {}
    for name, s in scores.items():
        ax = _check_axis(s, _axis_of(axis, name), name)
        groups = nm_groups(_masked_scores(s, keep.get(name)), m, name, ax)
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=s.device)
        if n:
            # stable: argsort descending keeps the earlier of tied entries
            order = torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n]
            mask.scatter_(1, order, True)
        mask = _from_rows_view(mask, s, ax)
        if name in keep:
            mask &= keep[name].to(s.device)
        out[name] = mask.contiguous()
    return out


def check_nm(mask: torch.Tensor, n: int, m: int, axis: Axis = None) -> bool:
    """Whether every group of ``m`` of ``mask`` along ``axis`` keeps at most ``n`` entries."""
    return bool((nm_groups(mask, m, axis=axis).sum(dim=1) <= n).all())
