"""Where the optimizer's window lives: the placement protocol and its local default.

The optimizer keeps its math and asks a *placement* three things, unconditionally, at every step:

* :meth:`Placement.local`: the part of a parameter or gradient this process works on;
* :meth:`Placement.new_fisher`: the window over the flat vector of those parts (collective);
* :meth:`Placement.update_mul`: add the flat gradient to the window and return the flat step
  (collective), raising :class:`~mfac.numerics.NonFiniteGradientError` on every process when the
  gradient is not finite on one of them.

:class:`LocalPlacement` (one process, no communication) is the default; the multi-process one is
:class:`mfac.distributed.DistributedWindow`. Private to :mod:`mfac.optim`: users pass a placement as
``MFAC(..., distributed=DistributedWindow())``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from mfac.fisher.compressed import CompressedSlidingInverseFisher
from mfac.fisher.lowp import LOW_PRECISION_WINDOW_DTYPES, LowPrecisionSlidingInverseFisher
from mfac.fisher.sliding import SlidingInverseFisher
from mfac.numerics import NonFiniteGradientError

__all__: list[str] = []


class NonFiniteElsewhere(NonFiniteGradientError):
    """The gradient is not finite on some process (perhaps another one): raised by a placement's vote."""


@runtime_checkable
class Placement(Protocol):
    """What the optimizer needs from the place its window lives in (see the module docstring)."""

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the part of ``tensor`` (a parameter or its gradient) this process works on."""
        ...

    def new_fisher(
        self,
        dim: int,
        ngrads: int,
        damp: float,
        *,
        params: Sequence[torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str | None,
        average_over: Literal["seen", "ngrads"] = "seen",
    ) -> SlidingInverseFisher:
        """Build the window over this process's ``dim`` flat coordinates of ``params`` (collective)."""
        ...

    def update_mul(
        self, fisher: SlidingInverseFisher, flat: torch.Tensor, *, check_finite: bool = True
    ) -> torch.Tensor:
        """Add the flat gradient to ``fisher``; return the flat ``F^{-1} g`` (collective).

        With ``check_finite``, a non-finite gradient (on any process) raises
        :class:`~mfac.numerics.NonFiniteGradientError` on every process and changes no window.
        """
        ...


class LocalPlacement:
    """One process: the window holds every coordinate; nothing is communicated.

    Args:
        density: None (the dense :class:`~mfac.fisher.sliding.SlidingInverseFisher`) or the kept
            fraction of a compressed window (:class:`~mfac.fisher.compressed.CompressedSlidingInverseFisher`).
        window_dtype: None, or the storage dtype of a dense window (``torch.bfloat16``:
            :class:`~mfac.fisher.lowp.LowPrecisionSlidingInverseFisher`); ignored with ``density``
            (whose values take ``storage["values_dtype"]``).
        **storage: the compressed window's storage options (``values_dtype``, ``index_dtype``), passed
            to its constructor; only with ``density``.
    """

    def __init__(
        self, density: float | None = None, *, window_dtype: torch.dtype | None = None, **storage: torch.dtype
    ) -> None:
        if storage and density is None:
            raise ValueError(f"storage options {sorted(storage)} need a compressed window (density)")
        self.density = density
        self.window_dtype = window_dtype
        self.storage = storage

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.storage.items())
        if self.window_dtype is not None:
            extra += f", window_dtype={self.window_dtype!r}"
        return f"LocalPlacement(density={self.density!r}{extra})"

    @staticmethod
    def local(tensor: torch.Tensor) -> torch.Tensor:
        """Return the whole tensor: one process works on all of it."""
        return tensor

    def new_fisher(
        self,
        dim: int,
        ngrads: int,
        damp: float,
        *,
        params: Sequence[torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str | None,
        average_over: Literal["seen", "ngrads"] = "seen",
    ) -> SlidingInverseFisher:
        """Build the window: compressed with a ``density``, low-precision with a ``window_dtype``, else dense.

        No communication.
        """
        if self.density is not None:
            return CompressedSlidingInverseFisher(
                dim, ngrads, damp, density=self.density, dtype=dtype, device=device,
                average_over=average_over, **self.storage,
            )
        if self.window_dtype is not None:
            return LowPrecisionSlidingInverseFisher(
                dim, ngrads, damp, window_dtype=self.window_dtype, dtype=dtype, device=device,
                average_over=average_over,
            )
        return SlidingInverseFisher(dim, ngrads, damp, dtype=dtype, device=device, average_over=average_over)

    @staticmethod
    def update_mul(
        fisher: SlidingInverseFisher, flat: torch.Tensor, *, check_finite: bool = True
    ) -> torch.Tensor:
        """``fisher.update_mul``: the window's own finiteness check, folded into its one host read."""
        return fisher.update_mul(flat, check_finite=check_finite)


def check_compressed_storage(
    density: float | None, values_dtype: Any, index_dtype: Any
) -> dict[str, torch.dtype]:
    """Validate the compressed window's storage options; return the operator's keyword arguments."""
    if values_dtype not in (None, torch.bfloat16):
        raise ValueError(f"values_dtype must be None or torch.bfloat16, got {values_dtype!r}")
    if index_dtype not in (None, torch.int32, torch.int16):
        raise ValueError(f"index_dtype must be None, torch.int32 or torch.int16, got {index_dtype!r}")
    if density is None and (values_dtype is not None or index_dtype not in (None, torch.int32)):
        raise ValueError(
            f"values_dtype={values_dtype!r} / index_dtype={index_dtype!r} set the storage of a "
            "compressed window: they need density < 1"
        )
    out = {}
    if density is None:  # the dense window (index_dtype=torch.int32 alone is its default)
        return out
    if values_dtype is not None:
        out["values_dtype"] = values_dtype
    if index_dtype is not None:
        out["index_dtype"] = index_dtype
    return out


def check_window_dtype(window_dtype: Any, distributed: Any) -> torch.dtype | None:
    """Validate the optimizer's ``window_dtype`` (the storage dtype of the window); return it."""
    if window_dtype is not None and not isinstance(window_dtype, torch.dtype):
        raise TypeError(
            f"window_dtype must be a torch.dtype or None, got {type(window_dtype).__name__} {window_dtype!r}"
        )
    if window_dtype is not None and window_dtype not in LOW_PRECISION_WINDOW_DTYPES:
        raise ValueError(
            f"window_dtype (the storage dtype of the window) must be None or one of "
            f"{LOW_PRECISION_WINDOW_DTYPES}, got {window_dtype!r}"
        )
    if window_dtype is not None and distributed is not None:
        raise ValueError(
            f"window_dtype={window_dtype} cannot be combined with distributed: the sharded window "
            "is stored in its compute dtype; use window_dtype=None with distributed"
        )
    return window_dtype
