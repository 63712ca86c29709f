r"""A compressed sliding window: top-k rows with error feedback (EFCP), the dense window's algebra.

Each new gradient ``g`` goes through an error-feedback accumulator ``e`` (``d`` numbers) first::

    a   = e + g                         the accumulated gradient
    g'  = top_k(a)                      per block of ``block`` coordinates: the ceil(block * density)
                                        entries of largest |a| (ties: torch.topk's order)
    e  <- a - g'                        what was not sent stays, exactly (the kept entries become 0, or
                                        their rounding error when values are stored in bfloat16)

and ``g'`` (``k`` values + ``k`` indices) becomes the window's newest row. The operator is the
M-FAC inverse over the compressed rows ``G'`` (``n x d``, never materialised):

    F'        = damp I + (1/s) G'^T G'
    F'^{-1} g' = s G'^T (s damp I + G' G'^T)^{-1} e_r      (the window row form: no cancellation)

Everything over the ``n x n`` matrices (Gram bookkeeping, rank-two replacement of a row, refactor,
iterative refinement, breakdown repair) is :class:`~mfac.fisher.sliding.SlidingInverseFisher`'s,
inherited unchanged; this class only overrides the storage hooks:

* Gram row ``G' g'``: a CSR matrix-vector product over the sparse rows (the rows split into segments of
  at most ``chunk`` entries whose float32 partial sums are added in float64, as the dense window does
  chunk by chunk): O(m k). Measured faster than ``index_select`` + sum and a batched gather
  (``experiments/bench_compressed.py``).
* ``G'^T c``: ``index_add_`` of ``c_i v_i`` into a zero ``(d,)`` vector with the int32 indices:
  O(m k + d) (torch.sparse's transposed product measured 2x the dense floor; ``scatter_add_``, which
  needs int64 indices, within noise of it). Redone in float64 when the float32 sum cancels, with the
  dense window's test.

Storage of a row: the values (float32, or bfloat16 with ``values_dtype``) and the indices, either
absolute (int32, the default) or, with ``index_dtype=torch.int16``, as offsets inside their block:
every full block sends the same number of entries (the tail block its own), so entry ``j`` of every
row lies in the block that starts at ``base[j]`` (one ``(k,)`` int32 vector for the whole window) and
``index = base[j] + offset`` with ``0 <= offset < block <= 32768``. The products decode the absolute
indices (and widen bfloat16 values) for a few rows at a time (at most ``2**20`` entries per chunk),
so the transients stay small next to the window.

Per step: O(m k + d) instead of O(m d), plus the same O(m^2) float64 work. Memory:
``m k (bytes(values) + bytes(index)) + d bytes(dtype) + 2 m^2 8`` (values + indices + the accumulator
+ the m x m matrices): at density 0.01, m = 256 and large d, per coordinate of the model

    =====================  ============  ================  ===============
    window                 bytes per d   vs dense float32  state of 1e6 d
    =====================  ============  ================  ===============
    dense, float32         1024          1                 1.00 GB
    float32 + int32        24.5          1/42              24.5 MB
    float32 + int16        19.4          1/53              19.4 MB
    bfloat16 + int16       14.2          1/72              14.2 MB
    =====================  ============  ================  ===============

(the accumulator's 4 bytes included; the m x m matrices, 1 MiB at m = 256, not).

Damping: the compressed rows are nearly orthogonal (a coordinate is sent when its accumulated value is
large, so two rows seldom share coordinates: mean ``|cos|`` between rows 0.02 against 0.11 for the
dense window of an MNIST MLP). With a small ``damp`` the inverse then normalises each row on its own
(``F'^{-1} g' ~ s g' / |g'|^2`` on the sent coordinates), and in short runs (a few window lengths)
the compressed step can be far from the dense one; at a larger ``damp`` ``F'^{-1}`` is close to linear
in ``g'`` and error feedback makes the sums of the steps agree. Tune ``damp`` and ``lr`` for the
compressed window (measured: ``experiments/compressed_window.py``, ``--diagnose``).

Reference: Modoranu et al., "Error Feedback Can Accurately Compress Preconditioners" (ICML 2024).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch

from mfac.fisher.sliding import SlidingInverseFisher
from mfac.numerics import DEFAULT_CHUNK, SMALL_DTYPE, allocate, check_positive_int

__all__ = ["CompressedSlidingInverseFisher", "check_density"]

#: default coordinates per top-k block (the selection streams block by block).
DEFAULT_BLOCK = 4096
_INDEX_DTYPE = torch.int32  # absolute indices (the products' and compress()'s)
_INT16_CANNOT_GROW = (
    "a compressed window with index_dtype=torch.int16 cannot take new coordinates (its offsets are tied "
    "to the block layout of its dim); give every parameter a gradient at the first step, or use "
    "index_dtype=torch.int32"
)
_MAX_INT16_BLOCK = 2**15  # offsets 0 .. block - 1 fit int16
_CHUNK_ENTRIES = 2**20  # stored entries decoded (indices) or widened (values) at a time


def check_density(density: Any) -> float | None:
    """Return ``density`` as a float in (0, 1], or None; raise naming the value and the rule."""
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a real number in (0, 1] or None, got {type(density).__name__} "
                        f"{density!r}")
    value = float(density)
    if not (0.0 < value <= 1.0):  # NaN fails too
        raise ValueError(f"density must be in (0, 1] (the kept fraction of each gradient), got {density}")
    return value


class _SparseRow(NamedTuple):
    """A compressed gradient on its way into the ring (what ``_new_row`` hands to the storage hooks)."""

    values: torch.Tensor  # shape: (k,), values dtype
    indices: torch.Tensor  # shape: (k,), int32, ascending
    dense: torch.Tensor  # shape: (d,), g' with zeros elsewhere, the window's dtype
    residual: torch.Tensor  # shape: (d,), the accumulator after sending g'


class CompressedSlidingInverseFisher(SlidingInverseFisher):
    r"""``F'^{-1}`` over the last ``ngrads`` error-feedback top-k compressions of a gradient stream.

    Args:
        dim, ngrads, damp, dtype, device, average_over, chunk: as for
            :class:`~mfac.fisher.sliding.SlidingInverseFisher` (``dtype``: of the accumulator and of
            the vectors in and out).
        density: kept fraction of each gradient, in (0, 1]: each block of ``block`` coordinates keeps
            its ``ceil(block * density)`` largest entries of the accumulator (the last, shorter block
            ``ceil(len * density)``), so ``k`` (:attr:`row_size`) is slightly above ``density * d``.
        block: coordinates per top-k block (default 4096).
        values_dtype: dtype of the stored values: ``dtype`` (default) or ``torch.bfloat16`` (half
            the value bytes; the rounding error stays in the accumulator, so nothing is lost, and
            the Gram matrix is that of the rounded rows).
        index_dtype: ``torch.int32`` (default: absolute indices) or ``torch.int16`` (offsets inside
            the block, half the index bytes; needs ``block <= 32768``). A window with int16 offsets
            cannot take new coordinates (:meth:`remap_state` refuses it): its rows are tied to the
            block layout of ``dim``.

    ``update(g)`` / ``update_mul(g)`` take the raw gradient ``g`` and compress it; ``update_mul``
    returns ``F'^{-1} g'`` for the compressed ``g'``, which is supported on the union of the
    window's index sets. ``mul``, ``diag`` and ``submatrix`` are those of ``F'``.

    Memory: ``m k (bytes(values_dtype) + bytes(index_dtype)) + d bytes(dtype) + 2 m^2 8`` bytes
    (:attr:`nbytes`; plus ``k`` int32 block starts with int16 offsets and the ``m * ceil(k / chunk)``
    int32 row pointers of the sparse products); transients of a few ``(d,)`` vectors per step, at
    most ``2**20`` decoded indices and values at a time, and the previous accumulator held until the
    next step (what a step that fails its finiteness check restores: + ``d bytes(dtype)``).

    Non-finite gradients: ``torch.topk`` ranks NaN and inf first, so a non-finite accumulator always
    sends a non-finite entry and the window's check on ``|g'|^2`` catches it; the step is then undone
    (rows, Gram matrix and accumulator). With the optimizer's ``check_finite=False`` nothing is checked
    and a NaN stays in the accumulator for good (the dense window forgets it after ``m`` steps).

    Cost per ``update_mul``: O(m k + d) + O(m^2) (O(m^3) on refactors);
    ``mul`` of ``q`` vectors O(q (m k + d)); ``diag`` O((d / chunk) m k + n^2 d).

    Determinism: on CPU every step is deterministic (bit-exact resume). On CUDA, ``index_add_``
    uses atomic adds, so ``G'^T c`` may differ in the last bit between runs.
    """

    def __init__(
        self,
        dim: int,
        ngrads: int,
        damp: float,
        *,
        density: float,
        block: int = DEFAULT_BLOCK,
        values_dtype: torch.dtype | None = None,
        index_dtype: torch.dtype = torch.int32,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        average_over: Literal["seen", "ngrads"] = "seen",
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        density = check_density(density)
        if density is None:
            raise ValueError("density must be in (0, 1] for a compressed window, got None")
        self._density = density
        self._block = check_positive_int(block, "block")
        if values_dtype is not None and values_dtype not in (dtype, torch.bfloat16):
            raise ValueError(
                f"values_dtype must be None, dtype ({dtype}) or torch.bfloat16, got {values_dtype!r}"
            )
        self._values_dtype = dtype if values_dtype is None else values_dtype
        if index_dtype not in (torch.int32, torch.int16):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int16, got {index_dtype!r}")
        if index_dtype == torch.int16 and self._block > _MAX_INT16_BLOCK:
            raise ValueError(
                f"index_dtype=torch.int16 stores offsets inside blocks: block must be <= "
                f"{_MAX_INT16_BLOCK}, got {self._block}"
            )
        self._index_dtype = index_dtype
        if isinstance(dim, int) and dim > torch.iinfo(_INDEX_DTYPE).max:
            raise ValueError(f"dim must be < 2**31 (int32 indices), got {dim}")
        super().__init__(
            dim, ngrads, damp, dtype=dtype, device=device, average_over=average_over, chunk=chunk
        )

    # ------------------------------------------------------------------ properties
    @property
    def density(self) -> float:
        """The requested kept fraction of each gradient."""
        return self._density

    @property
    def block(self) -> int:
        """Coordinates per top-k block."""
        return self._block

    @property
    def row_size(self) -> int:
        """``k``: entries stored per gradient (``sum over blocks of ceil(len(block) * density)``)."""
        return self._k

    @property
    def values_dtype(self) -> torch.dtype:
        """Dtype of the stored values."""
        return self._values_dtype

    @property
    def index_dtype(self) -> torch.dtype:
        """Dtype of the stored indices: int32 (absolute) or int16 (offsets inside the block)."""
        return self._index_dtype

    @property
    def error(self) -> torch.Tensor:
        """The error-feedback accumulator ``e``: what has not been sent yet, shape ``(d,)``. Read-only."""
        return self._error

    @property
    def window(self) -> torch.Tensor:
        """The stored compressed rows as a dense ``(n, d)`` tensor (ring order). Allocates ``n d``."""
        return self._columns(slice(0, self._dim))

    @property
    def nbytes(self) -> int:
        """Bytes of state: values, indices, accumulator and the two ``m x m`` float64 matrices."""
        tensors = (self._values, self._indices, self._error, self._gram, self._inv)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ compression
    def _layout_blocks(self) -> tuple[int, int, int, int]:
        """``(full blocks, entries per full block, length of the tail block, entries of the tail)``."""
        full, tail = divmod(self._dim, self._block)
        per_block = min(self._block, math.ceil(self._block * self._density))
        per_tail = min(tail, math.ceil(tail * self._density)) if tail else 0
        return full, per_block, tail, per_tail

    def _select(self, acc: torch.Tensor) -> torch.Tensor:
        """Return the indices (int64, ascending) of the top entries of ``|acc|``, block by block: ``(k,)``."""
        full, per_block, tail, per_tail = self._layout_blocks()
        mag = acc.abs()
        parts = []
        if full:
            top = mag[: full * self._block].view(full, self._block)
            top = top.topk(per_block, dim=1, sorted=False).indices.sort(dim=1).values
            offsets = torch.arange(0, full * self._block, self._block, device=acc.device)
            parts.append((top + offsets[:, None]).view(-1))
        if tail:
            top = mag[full * self._block :].topk(per_tail, sorted=False).indices.sort().values
            parts.append(top + full * self._block)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def compress(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Error feedback + top-k of ``grad`` without storing anything.

        Returns ``(values, indices, residual)``: the row that :meth:`update` would store and the
        accumulator it would leave, with ``e + grad == scatter(values) + residual`` exactly (in the
        accumulator's dtype; with bfloat16 values the rounding error is in ``residual``).
        """
        self._check_vector(grad, "grad")
        row = self._new_row(grad)
        return row.values, row.indices, row.residual

    def _new_row(self, grad: torch.Tensor) -> _SparseRow:
        self._old_error = None  # drop the previous step's (a restore only follows its own write)
        acc = self._error + grad
        idx = self._select(acc)
        kept = acc[idx]
        values = kept.to(self._values_dtype)
        sent = values.to(self._dtype)
        acc[idx] = kept - sent  # exactly 0 (or the bfloat16 rounding error, exact in float32)
        dense = torch.zeros_like(acc)
        dense[idx] = sent
        return _SparseRow(values, idx.to(_INDEX_DTYPE), dense, acc)

    def _encode(self, indices: torch.Tensor) -> torch.Tensor:
        """Absolute int32 indices ``(..., k)`` in the stored form (int16 offsets: minus the block starts)."""
        if self._index_dtype == _INDEX_DTYPE:
            return indices
        return (indices - self._base).to(self._index_dtype)

    def _absolute(self, rows: slice) -> torch.Tensor:
        """Return the stored rows' absolute indices, int32 ``(r, k)`` (a view for int32 storage)."""
        stored = self._indices[rows]
        if self._index_dtype == _INDEX_DTYPE:
            return stored
        return stored.to(_INDEX_DTYPE) + self._base

    def _row_chunks(self, n: int) -> list[slice]:
        """Row ranges of the first ``n`` rows: one when nothing is decoded, else ``2**20`` entries each."""
        if self._index_dtype == _INDEX_DTYPE and self._values_dtype == self._dtype:
            return [slice(0, n)]
        step = max(1, _CHUNK_ENTRIES // max(self._k, 1))
        return [slice(r, min(n, r + step)) for r in range(0, n, step)]

    def _row_values(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        values = self._values[rows]
        return values if values.dtype == dtype else values.to(dtype)

    # ------------------------------------------------------------------ storage hooks
    def _allocate_rows(self) -> None:
        full, per_block, _, per_tail = self._layout_blocks()
        self._k = full * per_block + per_tail
        shape = (self._m, self._k)
        self._values = allocate(shape, self._values_dtype, self._device, "compressed window values")
        self._indices = allocate(shape, self._index_dtype, self._device, "compressed window indices")
        # start of the block of each of a row's k entries (rows are block-major, sorted in a block)
        starts = torch.arange(full + (per_tail > 0), dtype=_INDEX_DTYPE, device=self._device) * self._block
        counts = torch.tensor([per_block] * full + ([per_tail] if per_tail else []), device=self._device)
        self._base = starts.repeat_interleave(counts)
        self._limit = torch.clamp(self._base + self._block, max=self._dim)  # end of each entry's block
        self._error = allocate((self._dim,), self._dtype, self._device, "error-feedback accumulator")
        self._old_error = self._error
        self._old_values = torch.empty(self._k, dtype=self._values_dtype, device=self._device)
        self._old_indices = torch.empty(self._k, dtype=self._index_dtype, device=self._device)
        # CSR row pointers: each stored row split into segments of at most `chunk` entries.
        self._segments = max(1, math.ceil(self._k / self._chunk))
        bounds = [min(self._k, j * self._chunk) for j in range(self._segments)]
        starts = torch.tensor(bounds, dtype=torch.int64)
        crow = (torch.arange(self._m, dtype=torch.int64)[:, None] * self._k + starts).view(-1)
        crow = torch.cat([crow, torch.tensor([self._m * self._k])])
        self._crow = crow.to(device=self._device, dtype=_INDEX_DTYPE)

    def _check_available(self, method: str) -> None:
        if method == "grow" and self._index_dtype != _INDEX_DTYPE:
            raise NotImplementedError(_INT16_CANNOT_GROW)

    def _grow_rows(self, rows: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        # new k for the new d (each block keeps its share), the old rows remapped and zero-padded
        self._allocate_rows()
        moved = self.remap_state(rows, index, self._dim, self._k)
        for key, mine in self._rows_state().items():
            mine.copy_(moved[key])

    def _clear_rows(self) -> None:
        self._values.zero_()
        self._indices.zero_()
        self._error.zero_()

    def _write_row(self, row: int, grad: _SparseRow, keep_old: bool) -> None:
        # what _restore_row needs: the old row (k values + k indices) and the old accumulator, kept by
        # reference (the new accumulator is the fresh `residual` tensor: no d-sized copy)
        if keep_old:
            self._old_values.copy_(self._values[row])
            self._old_indices.copy_(self._indices[row])
            self._old_error = self._error
        self._values[row].copy_(grad.values)
        self._indices[row].copy_(self._encode(grad.indices))
        self._error = grad.residual

    def _restore_row(self, row: int) -> None:
        self._values[row].copy_(self._old_values)
        self._indices[row].copy_(self._old_indices)
        self._error = self._old_error

    def _row_products(self, grad: _SparseRow, n: int) -> torch.Tensor:
        # |g'|^2 at the new row is non-finite iff the accumulator e + g is: torch.topk ranks NaN and inf
        # first, so a block holding one always sends one (the window's finiteness check stays exact).
        return self._products(grad.dense.unsqueeze(-1), n).squeeze(-1)

    def _csr(self, rows: slice) -> torch.Tensor:
        """Return ``rows`` as an ``(r * segments, d)`` CSR matrix.

        Views of the storage for int32 indices and values in the window's dtype; else the decoded
        indices and widened values of these rows.
        """
        seg = self._segments
        first = rows.start * seg
        crow = self._crow[first : rows.stop * seg + 1]
        if first:
            crow = crow - crow[0]
        with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support.*")
            return torch.sparse_csr_tensor(
                crow, self._absolute(rows).reshape(-1), self._row_values(rows, self._dtype).reshape(-1),
                size=((rows.stop - rows.start) * seg, self._dim), check_invariants=False,
            )

    def _products(self, cols: torch.Tensor, n: int | None = None) -> torch.Tensor:
        n = self.num_stored if n is None else n
        if n == 0:
            return torch.zeros(0, cols.shape[1], dtype=SMALL_DTYPE, device=self._device)
        cols = cols.contiguous()
        parts = []
        for rows in self._row_chunks(n):
            partial = self._csr(rows) @ cols  # (r * segments, q), sums of <= chunk products
            parts.append(partial.view(rows.stop - rows.start, self._segments, -1).sum(1, dtype=SMALL_DTYPE))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _scatter_rows(self, coeff: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out += coeff^T G'`` for ``coeff`` ``(n, q)`` and ``out`` ``(q, d)``, in ``out``'s dtype."""
        q = out.shape[0]
        weights = coeff.to(out.dtype).T  # (q, n)
        shift = self._dim * torch.arange(q, device=self._device)[:, None] if q > 1 else None
        flat = out.view(-1)
        for rows in self._row_chunks(self.num_stored):
            source = weights[:, rows, None] * self._row_values(rows, out.dtype)  # (q, r, k)
            index = self._absolute(rows).reshape(-1)
            if shift is not None:  # one 1-D index_add_ over all q rows (along dim 1: ~100x slower)
                index = (index[None, :] + shift).view(-1)
            flat.index_add_(0, index, source.reshape(-1))
        return out

    def _combination(self, coeff: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(1, self._dim, dtype=self._dtype, device=self._device)
        return self._scatter_rows(coeff[:, None], out).squeeze(0)

    def _combination_float64(self, coeff: torch.Tensor) -> torch.Tensor:
        exact = torch.zeros(1, self._dim, dtype=SMALL_DTYPE, device=self._device)
        return self._scatter_rows(coeff[:, None], exact).squeeze(0).to(self._dtype)

    def _subtract_combination(self, x: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
        return self._scatter_rows(-coeff, x.clone(memory_format=torch.contiguous_format))

    def _columns(self, cols: slice | torch.Tensor) -> torch.Tensor:
        """Dense ``G'[:, cols]``: O(n k) for a slice, O(n k + d) for an index tensor."""
        n = self.num_stored
        indices = self._absolute(slice(0, n)).long()
        rows = torch.arange(n, device=self._device)[:, None].expand(n, self._k)
        if isinstance(cols, slice):
            start, stop, step = cols.indices(self._dim)
            if step != 1:
                raise ValueError(f"column slices must be contiguous, got step {step}")
            keep = (indices >= start) & (indices < stop)
            where, width = indices[keep] - start, stop - start
            out = torch.zeros(n, width, dtype=self._dtype, device=self._device)
            return out.index_put_((rows[keep], where), self._values[:n][keep].to(self._dtype),
                                  accumulate=True)
        unique, inverse = torch.unique(cols, return_inverse=True)
        position = torch.full((self._dim,), -1, dtype=torch.long, device=self._device)
        position[unique] = torch.arange(unique.numel(), device=self._device)
        where = position[indices]
        keep = where >= 0
        out = torch.zeros(n, unique.numel(), dtype=self._dtype, device=self._device)
        out.index_put_((rows[keep], where[keep]), self._values[:n][keep].to(self._dtype),
                       accumulate=True)
        return out[:, inverse]

    def _rows_state(self) -> dict[str, torch.Tensor]:
        return {"values": self._values, "indices": self._indices, "error": self._error}

    def _state_row_norms(self, state: Mapping[str, Any], n: int) -> torch.Tensor:
        """Squared norms of the stored sparse rows (their values), after an index-range check."""
        indices = state["indices"][:n]
        if indices.dtype != self._index_dtype:
            raise ValueError(f"state_dict['indices'] must be {self._index_dtype}, got {indices.dtype}")
        if self._index_dtype == _INDEX_DTYPE:
            if n and bool(((indices < 0) | (indices >= self._dim)).any()):
                raise ValueError(
                    f"state_dict['indices'] must lie in [0, dim={self._dim}), got one out of range"
                )
        elif n:
            indices = indices.to(device=self._device, dtype=_INDEX_DTYPE)
            if bool(((indices < 0) | (indices + self._base >= self._limit)).any()):
                raise ValueError(
                    "state_dict['indices'] (int16 offsets) must lie in [0, length of their block), got "
                    "one out of range"
                )
        if not bool(torch.isfinite(state["error"]).all()):
            raise ValueError("state_dict['error'] (the error-feedback accumulator) must be finite")
        values = state["values"][:n].to(device=self._device)
        return torch.linalg.vector_norm(values, dim=1, dtype=SMALL_DTYPE).square_()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """:class:`SlidingInverseFisher`'s state with the sparse rows, the accumulator and settings."""
        return {
            **super().state_dict(),
            "density": self._density,
            "block": self._block,
            "values_dtype": self._values_dtype,
            "index_dtype": self._index_dtype,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        ``density``, ``block``, ``values_dtype`` and ``index_dtype`` must match (a state without
        ``index_dtype`` has int32 indices).
        """
        if "density" not in state:
            raise ValueError(
                "state_dict holds a dense window (no 'density'); this operator is compressed with "
                f"density={self._density}"
            )
        for key, mine in (("density", self._density), ("block", self._block),
                          ("values_dtype", self._values_dtype)):
            if state.get(key) != mine:
                raise ValueError(f"state_dict has {key}={state.get(key)!r}, this operator {key}={mine!r}")
        theirs = state.get("index_dtype", _INDEX_DTYPE)
        if theirs != self._index_dtype:
            raise ValueError(
                f"state_dict has index_dtype={theirs!r}, this operator index_dtype={self._index_dtype!r}"
            )
        super().load_state_dict(state)

    @staticmethod
    def remap_state(state: dict[str, Any], position: torch.Tensor, dim: int, row_size: int
                    ) -> dict[str, Any]:
        """Move a :meth:`state_dict` into ``dim`` coordinates: old coordinate ``j`` goes to ``position[j]``.

        For a window that grows (new coordinates have been zero in every stored row): indices are
        mapped (``position`` must be increasing, so rows stay sorted), rows padded with zero values
        up to ``row_size`` entries, the accumulator scattered. The Gram matrix and inverse are
        unchanged. Refused (``NotImplementedError``) for int16 offsets: their rows are tied to the
        block layout of the old ``dim``.
        """
        if state.get("index_dtype", _INDEX_DTYPE) != _INDEX_DTYPE:
            raise NotImplementedError(_INT16_CANNOT_GROW)
        values, indices = state["values"], state["indices"]
        pad = row_size - values.shape[1]
        if pad < 0:
            raise ValueError(f"row_size must be >= {values.shape[1]}, got {row_size}")
        position = position.to(indices.device)
        new_indices = position[indices.long()].to(_INDEX_DTYPE)
        fill = torch.full((values.shape[0], pad), dim - 1, dtype=_INDEX_DTYPE, device=indices.device)
        error = torch.zeros(dim, dtype=state["error"].dtype, device=state["error"].device)
        error[position.to(error.device)] = state["error"]
        return {
            **state,
            "dim": dim,
            "values": torch.cat([values, values.new_zeros(values.shape[0], pad)], dim=1),
            "indices": torch.cat([new_indices, fill], dim=1),
            "error": error,
        }
