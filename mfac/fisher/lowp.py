r"""A sliding window stored in bfloat16: half the memory, the products still float32-accurate.

The window ``G`` (``m x d``) is kept in bfloat16; the vectors in and out, the products over the window
and all ``m x m`` work keep their precision (``dtype``, float32 by default; the Gram matrix and ``P``
float64). Each new gradient is rounded once, ``g~ = bf16(g)``, and the operator is *exactly* the
M-FAC inverse over the rounded rows ``G~``:

    F~        = damp I + (1/s) G~^T G~
    F~^{-1} g~ = s G~^T (s damp I + G~ G~^T)^{-1} e_r      (the window row form: no cancellation)

up to the float32 rounding of the two passes, as for a float32 window. What bfloat16 costs is the
rounding of the gradients themselves (8 significant bits, relative ``2^-9`` per entry), not of the
products: bfloat16 partial sums (torch's bfloat16 ``mv`` rounds every output to bfloat16) would put a
relative error of ``~4e-3`` on every Gram entry, which ``damp``-sized pivots amplify. So each pass
converts the window tile by tile into a small reused ``dtype`` buffer (``n x w`` with ``w`` columns,
``n w bytes(dtype)`` <= ``tile_bytes``, sized to stay in cache) and runs the product there:

* Gram row ``G~ g~``: one ``mv`` per tile, float32 partial sums of ``w`` terms added in float64;
* ``G~^T c``: one ``mv`` per tile into the output slice; ``G~ X`` and ``X - C^T G~`` (``mul``) the
  same with ``mm``; the cancelling case and ``diag`` / ``submatrix`` as for the float32 window.

Everything over the ``n x n`` matrices (rank-two row replacement, refactors, refinement, the checks,
checkpoint validation) is :class:`~mfac.fisher.sliding.SlidingInverseFisher`'s, inherited: this class
overrides only the storage hooks.

When to use it: when the float32 window does not fit (``m d 4`` bytes: ``m = 1024`` at ``d = 1e7`` is 40
GB; in bfloat16 20 GB), or to double ``m`` in the same memory. Not for speed on CPU. Measured
(``experiments/bench_lowp.py``, tables in ``experiments/README.md``): the step differs from the float32
window's by the rounding of the gradients (relative ``2.6e-3``-``3.2e-3`` for ``damp``
``1e-1``..``1e-5``, m = 64 and 256, d = 1e5) while it is within ``3e-6`` of the exact step of the rounded
rows (float32's own error: ``1e-6``); MFAC on digits (3 seeds) reached the same train loss and a test
accuracy within about one standard deviation (MLP 97.6 vs 97.7 %, CNN 96.5 +- 0.2 vs 97.5 +- 1.0 %). The
price is time: torch has no bfloat16-in, float32-out product on CPU, and converting the window through
the tile cost 3-4.5x the float32 floor per step on this machine (CPU time; torch's own bfloat16 products,
which round to 8 bits, ran at 0.5-0.75x the floor: what a fused kernel could reach, e.g. on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch

from mfac.fisher.sliding import WINDOW_CHUNK, SlidingInverseFisher
from mfac.numerics import SMALL_DTYPE, allocate, check_positive_int

__all__ = ["LOW_PRECISION_WINDOW_DTYPES", "LowPrecisionSlidingInverseFisher", "check_window_dtype"]

#: storage dtypes a low-precision window supports (float16's range, 6e-5..65504, is too narrow for
#: raw gradients: it would under- and overflow silently).
LOW_PRECISION_WINDOW_DTYPES = (torch.bfloat16,)
#: default bytes of the conversion buffer (``m x w`` in ``dtype``); measured (m = 256, d = 1e6, CPU):
#: 8 MiB ran 10-20 % faster than 1 MiB, 256 KiB 30 % slower. ``w`` is capped at ``chunk`` (partial sums).
DEFAULT_TILE_BYTES = 1 << 23
#: fewest columns per tile (narrower tiles make the strided conversion of the window row-runs too short).
_MIN_TILE_COLS = 256


def check_window_dtype(window_dtype: Any, dtype: torch.dtype) -> torch.dtype | None:
    """Return ``window_dtype`` (None: the window is stored in ``dtype``); raise naming the rule.

    ``window_dtype`` is the storage dtype of a sliding window whose vectors and products are ``dtype``:
    None, ``dtype`` itself (the same as None) or one of :data:`LOW_PRECISION_WINDOW_DTYPES`.
    """
    if window_dtype is None or window_dtype == dtype:
        return None
    if not isinstance(window_dtype, torch.dtype):
        raise TypeError(f"window_dtype must be a torch.dtype or None, got {type(window_dtype).__name__} "
                        f"{window_dtype!r}")
    if window_dtype not in LOW_PRECISION_WINDOW_DTYPES:
        raise ValueError(
            f"window_dtype must be None (the window in {dtype}) or one of "
            f"{LOW_PRECISION_WINDOW_DTYPES}, got {window_dtype}"
            + (": float16's range (6e-5..65504) under- and overflows gradients"
               if window_dtype == torch.float16 else "")
        )
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a {window_dtype} window computes in float32 or float64, got dtype={dtype}")
    return window_dtype


class LowPrecisionSlidingInverseFisher(SlidingInverseFisher):
    r"""``F~^{-1}`` over the last ``ngrads`` gradients, stored rounded to ``window_dtype`` (bfloat16).

    Args:
        dim, ngrads, damp, dtype, device, average_over, chunk: as for
            :class:`~mfac.fisher.sliding.SlidingInverseFisher`; ``dtype`` (float32 or float64) is the
            dtype of the vectors in and out and of the products over the window.
        window_dtype: storage dtype of the window: ``torch.bfloat16``.
        tile_bytes: bytes of the conversion buffer; its width ``w`` is ``tile_bytes / (m bytes(dtype))``
            columns (at least 256, at most ``chunk``).

    ``update(g)`` / ``update_mul(g)`` round ``g`` to ``window_dtype`` and store it; ``update_mul``
    returns ``F~^{-1} g~`` (see the module docstring). :attr:`window` is the stored bfloat16 rows.
    ``mul``, ``diag`` and ``submatrix`` are those of ``F~``, in ``dtype``.

    Memory: ``m d 2`` bytes for the window (``m = 1024, d = 1e6``: 2 GiB instead of 4 GiB), one
    ``(d,)`` bfloat16 row kept for undoing a failed step, the ``tile_bytes`` buffer, a ``(d,)``
    ``dtype`` transient per step, and ``3 m^2 8`` bytes of float64 state.

    Cost per ``update_mul``: the two passes over the window (each reads ``m d 2`` bytes and converts
    them through the cache-resident tile: ``d / w`` pairs of small copies and products) plus the
    float32 window's O(m^2) float64 work.

    Checkpoints: :meth:`state_dict` holds the bfloat16 window (``grads``) and ``window_dtype``; it
    loads back bit for bit. A float32 window's state is refused (rounding it would break the Gram
    matrix it was saved with).
    """

    def __init__(
        self,
        dim: int,
        ngrads: int,
        damp: float,
        *,
        window_dtype: torch.dtype = torch.bfloat16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        average_over: Literal["seen", "ngrads"] = "seen",
        chunk: int = WINDOW_CHUNK,
        tile_bytes: int = DEFAULT_TILE_BYTES,
    ) -> None:
        if window_dtype is None or window_dtype == dtype:
            raise ValueError(
                f"window_dtype must be one of {LOW_PRECISION_WINDOW_DTYPES} for a low-precision window, "
                f"got {window_dtype}; use SlidingInverseFisher for a window in {dtype}"
            )
        if isinstance(dtype, torch.dtype):  # SlidingInverseFisher checks anything else about dtype
            check_window_dtype(window_dtype, dtype)
        self._window_dtype = window_dtype
        self._tile_bytes = check_positive_int(tile_bytes, "tile_bytes")
        self._tile: torch.Tensor | None = None  # the conversion buffer, allocated on first use
        super().__init__(
            dim, ngrads, damp, dtype=dtype, device=device, average_over=average_over, chunk=chunk
        )
        bytes_per = torch.empty((), dtype=self._dtype).element_size()
        width = self._tile_bytes // (self._m * bytes_per)
        self._tile_cols = max(_MIN_TILE_COLS, min(self._chunk, width, self._dim))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_tile": None}

    # ------------------------------------------------------------------ properties
    @property
    def window_dtype(self) -> torch.dtype:
        """The storage dtype of the window (bfloat16)."""
        return self._window_dtype

    @property
    def tile_cols(self) -> int:
        """``w``: window columns converted per tile."""
        return self._tile_cols

    @property
    def nbytes(self) -> int:
        """Bytes of state: the window and the two ``m x m`` float64 matrices."""
        return sum(t.numel() * t.element_size() for t in (self._grads, self._gram, self._inv))

    # ------------------------------------------------------------------ the tiles
    def _tiles(self, n: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(columns, G~[:n, columns] in dtype)`` tile by tile; the tensor is a reused buffer.

        Each yielded tile is valid until the next one is requested (one buffer, ``n x w``).
        """
        tile = self._tile
        if tile is None:
            tile = self._tile = torch.empty(
                self._m, self._tile_cols, dtype=self._dtype, device=self._device
            )
        window = self._grads[:n]
        for start in range(0, self._dim, self._tile_cols):
            cols = slice(start, min(start + self._tile_cols, self._dim))
            buf = tile[:n, : cols.stop - start]
            buf.copy_(window[:, cols])
            yield cols, buf

    def _num_tiles(self) -> int:
        return -(-self._dim // self._tile_cols)

    # ------------------------------------------------------------------ storage hooks
    def _allocate_rows(self) -> None:
        self._grads = allocate((self._m, self._dim), self._window_dtype, self._device,
                               f"{self._window_dtype} gradient window")
        self._old_row = torch.empty(self._dim, dtype=self._window_dtype, device=self._device)

    def _new_row(self, grad: torch.Tensor) -> torch.Tensor:
        """Return the row to store: ``grad`` rounded to ``window_dtype`` (round to nearest even)."""
        return grad.to(self._window_dtype)

    def _row_products(self, grad: torch.Tensor, n: int) -> torch.Tensor:
        rounded = grad.to(self._dtype)  # exact: g~ in dtype
        parts = torch.empty(self._num_tiles(), n, dtype=self._dtype, device=self._device)
        for i, (cols, buf) in enumerate(self._tiles(n)):
            torch.mv(buf, rounded[cols], out=parts[i])
        return parts.sum(0, dtype=SMALL_DTYPE)

    def _products(self, cols: torch.Tensor) -> torch.Tensor:
        n = self.num_stored
        k = cols.shape[1]
        if self._dtype == SMALL_DTYPE:
            out = torch.zeros(n, k, dtype=SMALL_DTYPE, device=self._device)
            for sl, buf in self._tiles(n):
                out.addmm_(buf, cols[sl])
            return out
        parts = torch.empty(self._num_tiles(), n, k, dtype=self._dtype, device=self._device)
        for i, (sl, buf) in enumerate(self._tiles(n)):
            torch.mm(buf, cols[sl], out=parts[i])
        return parts.sum(0, dtype=SMALL_DTYPE)

    def _combination(self, coeff: torch.Tensor) -> torch.Tensor:
        coeff = coeff.to(self._dtype)
        out = torch.empty(self._dim, dtype=self._dtype, device=self._device)
        for cols, buf in self._tiles(coeff.shape[0]):
            torch.mv(buf.T, coeff, out=out[cols])
        return out

    def _subtract_combination(self, x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        coeff_t = coeff.T
        for cols, buf in self._tiles(coeff.shape[0]):
            out[:, cols].addmm_(coeff_t, buf, alpha=-1.0)
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """:class:`SlidingInverseFisher`'s state (the window in ``window_dtype``) and ``window_dtype``."""
        return {**super().state_dict(), "window_dtype": self._window_dtype}

    def _check_state_local(self, state: Mapping[str, Any]) -> torch.Tensor:
        if isinstance(state, Mapping):
            saved = state.get("window_dtype")
            if saved != self._window_dtype:
                raise ValueError(
                    f"state_dict has window_dtype={saved!r}, this operator window_dtype="
                    f"{self._window_dtype} (a window saved in another dtype: build the operator "
                    "with the saved window_dtype)"
                )
            grads = state.get("grads")
            if isinstance(grads, torch.Tensor) and grads.dtype != self._window_dtype:
                raise ValueError(
                    f"state_dict['grads'] must be {self._window_dtype}, got {grads.dtype}: its Gram matrix "
                    "belongs to the unrounded rows"
                )
        return super()._check_state_local(state)
