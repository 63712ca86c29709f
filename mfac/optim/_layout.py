"""The window's coordinates: the kept entries of the optimizer's active parameters, flat.

Private to :mod:`mfac.optim`. A thin layer over :class:`mfac._flat.FlatLayout` (the offsets and kept
indices, shared with :class:`mfac.params.ParamSpace`). Unlike a ``ParamSpace``, the flat vector here
has its own dtype (the window's *compute dtype*, float32 or better), which may differ from the
parameters' (e.g. bfloat16 parameters, float32 window) and from one parameter to the next; gradients
are cast while they are gathered, in the same copy. Only kept coordinates are ever stored: the flat
vector is the kept vector of the ``FlatLayout``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from mfac._flat import FlatLayout

__all__: list[str] = []


@dataclass(frozen=True)
class _Slot:
    param: torch.Tensor
    offset: int  # into the flat (d,) vector of kept coordinates
    size: int  # number of kept coordinates of this parameter
    kept: torch.Tensor | None  # long (size,) flat indices into the parameter; None = all kept


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class Layout:
    """Ordered parameters, each contributing its kept coordinates to a flat ``(d,)`` vector.

    Args:
        params: the parameters, in flat order.
        masks: ``{param: bool tensor shaped like it}`` (True = kept) for the masked ones.
        dtype: dtype of the flat vectors (gather output, scatter input).
        device: their device (that of the parameters).
        local: the part of a parameter or gradient that is this process's (identity by default;
            the local shard of a DTensor under FSDP, see :class:`mfac.distributed.DistributedWindow`).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        masks: Mapping[torch.Tensor, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        local: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._local = local or _identity
        params = list(params)
        mask_list = [masks.get(p) for p in params]
        # a masked parameter is whole (masks are refused with sharded parameters); else its local part
        shapes = [
            self._local(p).shape if m is None else p.shape for p, m in zip(params, mask_list, strict=True)
        ]
        numels = [math.prod(shape) for shape in shapes]
        self.flat = FlatLayout.from_masks(mask_list, numels, device=device)
        flat = self.flat
        self.slots: list[_Slot] = [
            _Slot(p, flat.kept_offsets[i], flat.sizes[i], flat.kept[i]) for i, p in enumerate(params)
        ]
        self.dim = flat.kept_dim
        self.dtype = dtype
        self.device = device
        self._shapes = shapes
        self._index = {s.param: i for i, s in enumerate(self.slots)}  # tensors hash by identity

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters, in flat order."""
        return [s.param for s in self.slots]

    def __contains__(self, param: torch.Tensor) -> bool:
        return param in self._index

    def gather(
        self,
        tensors: Sequence[torch.Tensor | None],
        out: torch.Tensor,
        weight_decay: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Write ``t + weight_decay * param`` (kept coordinates, cast to ``dtype``) into ``out``.

        Args:
            tensors: one tensor shaped like its parameter per slot, or None (contributes zeros).
            out: shape ``(d,)``, ``dtype``, overwritten and returned.
            weight_decay: per slot, added times the parameter where the tensor is not None.
        """
        local = self._local
        if local is not _identity:
            tensors = [None if t is None else local(t) for t in tensors]
        return self.flat.gather(tensors, out, alpha=weight_decay, addend=self._param_part)

    def _param_part(self, index: int) -> torch.Tensor:
        return self._local(self.slots[index].param.detach())

    def scatter(self, vec: torch.Tensor, index: int) -> torch.Tensor:
        """Return slot ``index``'s part of ``vec`` (shape ``(d,)``), shaped like its parameter.

        Masked-out coordinates are zero. A view of ``vec`` when the parameter has no mask, else a
        new tensor.
        """
        return self.flat.scatter(vec, index, self._shapes[index])
