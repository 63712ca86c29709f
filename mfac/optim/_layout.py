"""The window's coordinates: the kept entries of the optimizer's active parameters, flat.

Private to :mod:`mfac.optim`. Unlike :class:`mfac.params.ParamSpace`, the flat vector here has its
own dtype (the window's *compute dtype*, float32 or better), which may differ from the parameters'
(e.g. bfloat16 parameters, float32 window) and from one parameter to the next; gradients are cast
while they are gathered, in the same copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

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
        slots = []
        offset = 0
        for p in params:
            mask = masks.get(p)
            kept = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
            size = self._local(p).numel() if kept is None else kept.numel()
            slots.append(_Slot(p, offset, size, kept))
            offset += size
        self.slots: list[_Slot] = slots
        self.dim = offset
        self.dtype = dtype
        self.device = device
        self._index = {s.param: i for i, s in enumerate(slots)}  # tensors hash by identity

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
        for i, (slot, t) in enumerate(zip(self.slots, tensors, strict=True)):
            part = out[slot.offset : slot.offset + slot.size]
            if t is None:
                part.zero_()
                continue
            part.copy_(self._kept(self._local(t), slot))
            wd = 0.0 if weight_decay is None else weight_decay[i]
            if wd != 0.0:
                part.add_(self._kept(self._local(slot.param.detach()), slot), alpha=wd)
        return out

    def scatter(self, vec: torch.Tensor, index: int) -> torch.Tensor:
        """Return slot ``index``'s part of ``vec`` (shape ``(d,)``), shaped like its parameter.

        Masked-out coordinates are zero. A view of ``vec`` when the parameter has no mask, else a
        new tensor.
        """
        slot = self.slots[index]
        part = vec[slot.offset : slot.offset + slot.size]
        if slot.kept is None:
            return part.view(self._local(slot.param).shape)
        full = torch.zeros(slot.param.numel(), dtype=vec.dtype, device=vec.device)
        return full.index_copy_(0, slot.kept, part).view(slot.param.shape)

    @staticmethod
    def _kept(t: torch.Tensor, slot: _Slot) -> torch.Tensor:
        flat = t.reshape(-1)
        return flat if slot.kept is None else flat.index_select(0, slot.kept)
