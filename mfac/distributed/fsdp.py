"""FSDP2 helpers: a ``DTensor``'s local shard, a rank's flat slice, and the ``d``-sized all-gather.

Per step (the optimizer's placement uses them on every ``step``): :func:`local_tensor` and
:func:`local_flat` are local; :func:`gather_full` is the one ``d``-sized collective (DDP only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mfac._flat import FlatLayout
from mfac.distributed._comm import CommStats
from mfac.distributed._layout import ShardSpec

__all__ = ["gather_full", "local_flat", "local_tensor"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return this rank's part of ``tensor``.

    The local shard of a ``DTensor`` (FSDP2 ``fully_shard`` parameters and gradients; a view that shares
    its storage), else the tensor itself (DDP, FSDP1 flat parameters, plain tensors).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return tensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_flat(
    tensors: Iterable[torch.Tensor | None],
    *,
    dtype: torch.dtype | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Concatenate the local parts (:func:`local_tensor`) of ``tensors``, flattened, into one vector.

    A None entry (a parameter without gradient) contributes zeros, which needs ``sizes`` (the local
    numel of each entry). This is rank ``r``'s slice of the FSDP global vector (see the module docs).
    Built on the package's one flattener (:class:`mfac._flat.FlatLayout`); a ``sizes[i]`` that
    disagrees with a tensor's local numel raises instead of misaligning the later parts.
    """
    local = [None if t is None else local_tensor(t) for t in tensors]
    if sizes is None:
        if any(t is None for t in local):
            raise ValueError("a None tensor needs `sizes` to know how many zeros it stands for")
        sizes = [t.numel() for t in local]
    dtype = dtype or next((t.dtype for t in local if t is not None), torch.float32)
    device = next((t.device for t in local if t is not None), torch.device("cpu"))
    flat = FlatLayout(sizes)
    return flat.gather(local, torch.empty(flat.dim, dtype=dtype, device=device), masked=False)


def gather_full(
    local: torch.Tensor,
    shard: ShardSpec,
    *,
    process_group: Any = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Assemble the whole ``(d,)`` vector from every rank's ``(d_r,)`` slice (collective).

    This *is* ``d``-sized communication (an all-gather of ``d`` floats): the operators never need it;
    a DDP optimizer does, to apply a sharded update to replicated parameters (as ZeRO-1 does).
    """
    if local.shape != (shard.size,):
        raise ValueError(f"local must have shape ({shard.size},), got {tuple(local.shape)}")
    if shard.world_size == 1:
        return local.clone()
    width = max(shard.sizes)
    padded = torch.zeros(width, dtype=local.dtype, device=local.device)
    padded[: shard.size] = local
    parts = [torch.empty_like(padded) for _ in range(shard.world_size)]
    dist.all_gather(parts, padded, group=process_group)
    if stats is not None:
        stats.record("other", width * local.element_size() * shard.world_size)
    return torch.cat([p[:n] for p, n in zip(parts, shard.sizes, strict=True)])


