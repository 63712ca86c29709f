"""Offsets and kept indices of a list of tensors laid end to end: the one flattener of mfac.

Private. :class:`mfac.params.ParamSpace` (parameters <-> one flat vector, by name), the optimizer's
window layout (:class:`mfac.optim._layout.Layout`, the kept coordinates of the parameters that have a
gradient, cast to the window's dtype) and the distributed helpers (a rank's local coordinates) are
thin layers over :class:`FlatLayout`, so the offsets, the kept indices and the copies between tensors
and flat vectors are computed in one place.

The model
---------
``n`` tensors, tensor ``i`` with ``numel_i`` entries in row-major order of its logical shape. Tensor
``i`` may keep a subset of its entries, given as increasing flat indices ``kept_i`` (``(k_i,)``, long;
None = all kept, ``k_i = numel_i``). Two flat vectors follow:

* the *full* vector, ``d = sum numel_i`` entries: tensor ``i`` at ``[offset_i, offset_i + numel_i)``;
* the *kept* vector, ``k = sum k_i`` entries: tensor ``i``'s kept entries at
  ``[kept_offset_i, kept_offset_i + k_i)``, in the order of ``kept_i``.

Every operation works on an optional leading batch shape (``(*batch, d)`` / ``(*batch, k)``), along
the last dimension. Without any kept indices the two vectors coincide and ``restrict`` / ``expand``
return their input.

Costs: :meth:`FlatLayout.gather` and :meth:`FlatLayout.scatter` are one copy (or one
``index_select`` / ``index_copy_``) per tensor: O(d) memory traffic, ``n`` small kernel launches, no
arithmetic (so their results are bit-exact copies, casting only where the output dtype differs).
Memory held: ``8 * k`` bytes of kept indices (only for tensors that have them), plus the ``(k,)``
global index of :meth:`FlatLayout.kept_indices` once asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__: list[str] = []


class FlatLayout:
    """``n`` tensors laid end to end in one flat vector, each with optional kept indices.

    Args:
        numels: number of entries of each tensor, in flat order.
        kept: per tensor, None (every entry kept) or a 1-D long tensor of increasing flat indices into
            that tensor (the kept entries); a ``(0,)`` tensor keeps nothing. Referenced, not copied.
        device: device of the index tensors this layout creates (:meth:`kept_indices`); that of the
            given kept indices by default, else the CPU.

    Attributes (read only):
        numels, offsets: per tensor, its size and start in the full ``(d,)`` vector.
        sizes, kept_offsets: per tensor, its number of kept entries and start in the kept ``(k,)``
            vector.
        kept: the kept indices as given (None entries for tensors that keep everything).
        dim, kept_dim: ``d`` and ``k``.
        masked: whether any tensor has kept indices.

    Example:
        >>> flat = FlatLayout.from_masks([torch.tensor([[True, False], [True, True]]), None], [4, 2])
        >>> flat.dim, flat.kept_dim, flat.kept_offsets
        (6, 5, [0, 3])
        >>> flat.kept_indices().tolist()
        [0, 2, 3, 4, 5]
    """

    __slots__ = (
        "_device", "_full_spec", "_kept_indices", "_kept_spec", "dim", "kept", "kept_dim",
        "kept_offsets", "masked", "numels", "offsets", "sizes",
    )

    def __init__(
        self,
        numels: Sequence[int],
        kept: Sequence[torch.Tensor | None] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        numels = [int(n) for n in numels]
        kept = [None] * len(numels) if kept is None else list(kept)
        if len(kept) != len(numels):
            raise ValueError(f"kept must hold one entry per tensor ({len(numels)}), got {len(kept)}")
        if any(n < 0 for n in numels):
            raise ValueError(f"numels must be >= 0, got {numels}")
        offsets, kept_offsets, sizes = [], [], []
        offset = kept_offset = 0
        for n, idx in zip(numels, kept, strict=True):
            size = n if idx is None else idx.numel()
            offsets.append(offset)
            kept_offsets.append(kept_offset)
            sizes.append(size)
            offset += n
            kept_offset += size
        self.numels: list[int] = numels
        self.offsets: list[int] = offsets
        self.sizes: list[int] = sizes
        self.kept_offsets: list[int] = kept_offsets
        self.kept: list[torch.Tensor | None] = kept
        self.dim: int = offset
        self.kept_dim: int = kept_offset
        self.masked: bool = any(idx is not None for idx in kept)
        if device is None:
            device = next((idx.device for idx in kept if idx is not None), torch.device("cpu"))
        self._device = torch.device(device)
        self._kept_indices: torch.Tensor | None = None
        # per tensor (start, width, kept indices or None), for the copy loops
        self._kept_spec = list(zip(kept_offsets, sizes, kept, strict=True))
        self._full_spec = [(a, n, None) for a, n in zip(offsets, numels, strict=True)]

    @classmethod
    def from_masks(
        cls,
        masks: Sequence[torch.Tensor | None],
        numels: Sequence[int] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> FlatLayout:
        """Build from boolean masks (True = kept; None = all kept): ``kept_i = nonzero(mask_i.flatten())``.

        ``numels`` is needed only where a mask is None (default: each mask's numel).
        """
        if numels is None:
            if any(m is None for m in masks):
                raise ValueError("numels are needed for the tensors that have no mask")
            numels = [m.numel() for m in masks]  # type: ignore[union-attr]
        kept = [None if m is None else m.reshape(-1).nonzero().squeeze(1) for m in masks]
        return cls(numels, kept, device=device)

    def __len__(self) -> int:
        return len(self.numels)

    def __repr__(self) -> str:
        return f"FlatLayout({len(self.numels)} tensors, dim={self.dim}, kept_dim={self.kept_dim})"

    # ------------------------------------------------------------------------------ indices
    def widths(self, *, masked: bool = False) -> list[int]:
        """Per tensor, its width in the kept (``masked``) or the full vector."""
        return self.sizes if masked else self.numels

    def kept_indices(self) -> torch.Tensor | None:
        """Return the flat indices into ``(d,)`` of the kept entries, increasing, ``(k,)`` (None: unmasked).

        Built on first use and cached (``8 * k`` bytes).
        """
        if not self.masked:
            return None
        if self._kept_indices is None:
            parts = [
                torch.arange(n, device=self._device) + off if idx is None else idx + off
                for n, off, idx in zip(self.numels, self.offsets, self.kept, strict=True)
            ]
            self._kept_indices = (
                torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=self._device)
            )
        return self._kept_indices

    # ------------------------------------------------------------------------------ views
    def split(self, vec: torch.Tensor, *, masked: bool = False) -> list[torch.Tensor]:
        """Return views of each tensor's part of ``vec``: ``(*batch, k)`` if ``masked``, else ``(*batch, d)``.

        One ``narrow`` per tensor, not ``Tensor.split``: its views are outputs of a multi-output view
        op, which autograd forbids writing into in place when ``vec`` was made under ``no_grad``. To
        write into parts of a vector that autograd records, take each view just before its write.
        """
        starts, widths = (self.kept_offsets, self.sizes) if masked else (self.offsets, self.numels)
        return [vec.narrow(-1, a, n) for a, n in zip(starts, widths, strict=True)]

    def unflatten(self, vec: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Return views of a full ``(*batch, d)`` vector, shaped ``(*batch, *shape_i)``.

        Writes into them go to ``vec``.
        """
        batch = vec.shape[:-1]
        return [
            vec.narrow(-1, a, n).view((*batch, *shape))
            for a, n, shape in zip(self.offsets, self.numels, shapes, strict=True)
        ]

    # ------------------------------------------------------------------------------ copies
    def select(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Return the kept entries of tensor ``index`` from its flat ``(*batch, numel_i)`` form.

        ``flat`` itself if the tensor keeps every entry.
        """
        idx = self.kept[index]
        return flat if idx is None else flat.index_select(-1, idx)

    def gather(
        self,
        tensors: Sequence[torch.Tensor | None],
        out: torch.Tensor,
        *,
        masked: bool = True,
        alpha: Sequence[float] | None = None,
        addend: Callable[[int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Copy tensors into one flat vector: ``out[..., part_i] = t_i (+ alpha_i * addend(i))``.

        The kept entries of each tensor when ``masked``, all of them otherwise. The optional axpy is
        the optimizer's weight decay ``g + wd * w`` fused into the same pass over the parts.

        Args:
            tensors: per tensor, shape ``(*batch, *shape_i)`` (any strides; any dtype, cast by the copy),
                or None (its part is zeroed).
            out: shape ``(*batch, k)`` when ``masked``, else ``(*batch, d)``; overwritten and returned.
            masked: write the kept entries only (the kept vector), else every entry (the full one).
            alpha: per tensor, a scale; where it is nonzero and ``t_i`` is not None, ``addend(i)``
                (shaped like ``t_i``, called only there) times ``alpha_i`` is added to the part.
            addend: see ``alpha``; required with it.
        """
        spec = self._kept_spec if masked else self._full_spec
        if out.dim() == 1:  # the optimizer's per-step case: plain slices, reshape(-1) (fastest calls)
            for i, (t, (start, width, idx)) in enumerate(zip(tensors, spec, strict=True)):
                # each view made just before its write: a view made earlier would keep stale
                # autograd metadata once a copy of a tensor that requires grad puts ``out`` on the graph
                part = out[start : start + width]
                if t is None:
                    part.zero_()
                    continue
                flat = t.reshape(-1)
                part.copy_(flat if idx is None else flat.index_select(0, idx))
                if alpha is not None and alpha[i] != 0.0:
                    extra = addend(i).reshape(-1)  # type: ignore[misc]
                    part.add_(extra if idx is None else extra.index_select(0, idx), alpha=alpha[i])
            return out
        batch = out.shape[:-1]
        for i, (t, (start, width, idx)) in enumerate(zip(tensors, spec, strict=True)):
            part = out[..., start : start + width]
            if t is None:
                part.zero_()
                continue
            flat = t.reshape(*batch, self.numels[i])  # not -1: ambiguous for an empty tensor
            part.copy_(flat if idx is None else flat.index_select(-1, idx))
            if alpha is not None and alpha[i] != 0.0:
                extra = addend(i).reshape(*batch, self.numels[i])  # type: ignore[misc]
                part.add_(extra if idx is None else extra.index_select(-1, idx), alpha=alpha[i])
        return out

    def scatter(
        self, vec: torch.Tensor, index: int, shape: Sequence[int], *, fill: float = 0.0
    ) -> torch.Tensor:
        """Return tensor ``index`` from a kept ``(*batch, k)`` vector, shaped ``(*batch, *shape)``.

        A view of ``vec`` when the tensor keeps every entry; else a new tensor with ``fill`` at the
        entries that are not kept.
        """
        start, width, idx = self._kept_spec[index]
        if vec.dim() == 1:  # the optimizer's per-step case: plain slicing, the fastest view
            part = vec[start : start + width]
            if idx is None:
                return part.view(shape)
            n = self.numels[index]
            full = (torch.zeros(n, dtype=vec.dtype, device=vec.device) if fill == 0.0
                    else torch.full((n,), fill, dtype=vec.dtype, device=vec.device))
            return full.index_copy_(0, idx, part).view(shape)
        batch = vec.shape[:-1]
        part = vec[..., start : start + width]
        if idx is None:
            return part.view((*batch, *shape))
        full = torch.full((*batch, self.numels[index]), fill, dtype=vec.dtype, device=vec.device)
        return full.index_copy_(-1, idx, part).view((*batch, *shape))

    def restrict(self, vec: torch.Tensor) -> torch.Tensor:
        """Return the kept entries of a full vector, ``(*batch, d) -> (*batch, k)``.

        ``vec`` itself if not masked (no copy).
        """
        idx = self.kept_indices()
        return vec if idx is None else vec.index_select(-1, idx)

    def expand(self, vec: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
        """Return a full vector from kept entries, ``(*batch, k) -> (*batch, d)``, ``fill`` elsewhere.

        ``vec`` itself if not masked, else a new tensor.
        """
        idx = self.kept_indices()
        if idx is None:
            return vec
        out = torch.full((*vec.shape[:-1], self.dim), fill, dtype=vec.dtype, device=vec.device)
        return out.index_copy_(-1, idx, vec)
