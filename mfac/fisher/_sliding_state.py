"""Checkpointing of the sliding window: ``state_dict``, ``load_state_dict`` and their checks.

A mixin of :class:`mfac.fisher.sliding.SlidingInverseFisher` (kept apart so that the step's module stays
readable): it reads the window through the storage hooks (``_rows_state``, ``_state_row_norms``) and the
placement hooks (``_reduce``, ``_extra_state``, ``_check_state_local``), which the variants override
(the compressed, bfloat16 and sharded windows), so every variant shares these checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mfac.numerics import SMALL_DTYPE, check_not_meta

#: the keys of every window's state dict (``jitter`` optional when loading: older states have none);
#: the rows' own keys come from ``_rows_state`` (``grads`` when dense), a placement's from ``_extra_state``
STATE_KEYS = ("dim", "ngrads", "damp", "average_over", "num_seen", "since_refactor", "gram", "inv")


class SlidingCheckpoint:
    """``state_dict`` / ``load_state_dict`` / ``check_state_dict`` of a sliding window (a mixin)."""

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: window, Gram, inverse, counters and settings."""
        return {
            "dim": self._dim,
            "ngrads": self._m,
            "damp": self._damp,
            "average_over": self._average_over,
            "num_seen": self._num_seen,
            "since_refactor": self._since_refactor,
            "jitter": self._jitter,
            **self._rows_state(),
            "gram": self._gram,
            "inv": self._inv,
            **self._extra_state(),
        }

    def _extra_state(self) -> dict[str, Any]:
        """Entries :meth:`state_dict` adds for a placement (a sharded window: its layout); none here."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, copying into this operator's dtype and device.

        The settings (``dim``, ``ngrads``, ``damp``, ``average_over``) must match this operator's.
        Everything is checked before anything is copied (:meth:`check_state_dict`); on an error
        (``ValueError`` for any bad entry, ``TypeError`` if ``state`` is not a dict) the operator is
        left as it was.
        """
        self.check_state_dict(state)
        for key, mine in self._rows_state().items():
            mine.copy_(state[key])
        self._gram.copy_(state["gram"])
        self._inv.copy_(state["inv"])
        self._num_seen = int(state["num_seen"])
        self._since_refactor = int(state["since_refactor"])
        self._jitter = float(state.get("jitter", 0.0))

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise if ``state`` cannot be loaded into this operator; change nothing.

        Checks, in this order: it is a mapping with every key of :meth:`state_dict` (``jitter`` may be
        missing: 0); the settings equal this operator's; the counters are ints in range
        (``num_seen >= 0``, ``0 <= since_refactor <= ngrads``) and the jitter a finite float
        ``>= 0``; the three tensors are floating tensors of shapes ``(m, d)``, ``(m, m)``, ``(m, m)``;
        the Gram matrix and its inverse are finite, the Gram matrix symmetric with zero rows and
        columns beyond the ``n = min(num_seen, m)`` stored gradients; and the Gram diagonal equals the
        squared row norms of the window (relative tolerance ``1e-2``; this also finds a NaN or inf in
        the window, and a window saved from another run). Cost: one pass over the window (``O(md)``)
        plus ``O(m^2)``; no copy of the window.
        """
        sq = self._check_state_local(state)
        self._reduce(sq)  # sharded windows: the full rows' norms (a collective: every rank gets here)
        self._check_gram_diagonal(state, sq)

    def _check_state_local(self, state: Mapping[str, Any]) -> torch.Tensor:
        """Run every check of :meth:`check_state_dict` that needs no reduction over the coordinates.

        Returns the window's squared row norms ``(n,)`` (float64) over this process's columns. A
        placement hook too: a sharded window adds its layout check and makes the ranks agree here,
        before the collective :meth:`_reduce` of the norms.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        rows = self._rows_state()
        expected = (*STATE_KEYS, *rows)
        missing = [k for k in expected if k not in state]
        if missing:
            raise ValueError(
                f"state_dict is missing {missing} (expected the keys of {type(self).__name__}.state_dict(): "
                f"{list(expected)}; got {sorted(map(str, state))})"
            )
        for key, mine in (("dim", self._dim), ("ngrads", self._m), ("damp", self._damp),
                          ("average_over", self._average_over)):
            if state[key] != mine:
                raise ValueError(f"state_dict has {key}={state[key]!r}, this operator {key}={mine!r}")
        m = self._m
        for key in ("num_seen", "since_refactor"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"state_dict[{key!r}] must be an int, got {type(value).__name__} {value!r}")
        num_seen, since = state["num_seen"], state["since_refactor"]
        if num_seen < 0:
            raise ValueError(f"state_dict['num_seen'] must be >= 0, got {num_seen}")
        if not 0 <= since <= m:
            raise ValueError(f"state_dict['since_refactor'] must lie in [0, ngrads={m}], got {since}")
        jitter = state.get("jitter", 0.0)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not (
            math.isfinite(jitter) and jitter >= 0.0
        ):
            raise ValueError(f"state_dict['jitter'] must be a finite float >= 0, got {jitter!r}")
        for key, mine in (*rows.items(), ("gram", self._gram), ("inv", self._inv)):
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state_dict[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            if value.is_floating_point() != mine.is_floating_point():
                kind = "a floating" if mine.is_floating_point() else "an integer"
                raise ValueError(f"state_dict[{key!r}] must be {kind} tensor, got dtype {value.dtype}")
            check_not_meta(value, f"state_dict[{key!r}]")
            if tuple(value.shape) != tuple(mine.shape):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected {tuple(mine.shape)}"
                )
        n = min(num_seen, m)
        gram = state["gram"].to(device=self._device, dtype=SMALL_DTYPE)
        inv = state["inv"].to(device=self._device, dtype=SMALL_DTYPE)
        for key, value in (("gram", gram), ("inv", inv)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"state_dict[{key!r}] must be finite, it holds NaN or inf")
        if n < m and bool((gram[n:] != 0).any() | (gram[:, n:] != 0).any()):
            raise ValueError(
                f"state_dict['gram'] has nonzero entries beyond the {n} stored gradients (num_seen="
                f"{num_seen}): the counters and the Gram matrix do not belong together"
            )
        top = gram[:n, :n]
        if not torch.allclose(top, top.T, rtol=1e-12, atol=0.0):
            raise ValueError("state_dict['gram'] must be symmetric (it is G G^T)")
        return self._state_row_norms(state, n)

    @property
    def _rows_key(self) -> str:
        """The state-dict key of the stored rows' values (what the Gram diagonal is checked against)."""
        return next(iter(self._rows_state()))

    def _state_row_norms(self, state: Mapping[str, Any], n: int) -> torch.Tensor:
        """Squared norms (float64, ``(n,)``) of the first ``n`` rows stored in a checked ``state``.

        Column slab by slab: ``vector_norm(..., dtype=float64)`` converts its whole input first (measured:
        a 1 GB float32 window took 2 GB more), so one call over the window would need ``n d 8`` bytes.
        """
        window = state["grads"][:n]
        total = torch.zeros(n, dtype=SMALL_DTYPE, device=self._device)
        for start in range(0, window.shape[1], self._chunk):
            part = window[:, start : start + self._chunk].to(device=self._device)
            total += torch.linalg.vector_norm(part, dim=1, dtype=SMALL_DTYPE).square_()
        return total

    def _check_gram_diagonal(self, state: Mapping[str, Any], sq: torch.Tensor) -> None:
        """Check the Gram diagonal against the window's squared row norms ``sq`` (relative ``1e-2``)."""
        n = sq.shape[0]
        diag = state["gram"].to(device=self._device, dtype=SMALL_DTYPE).diagonal()[:n]
        if not bool(torch.isfinite(sq).all()):
            raise ValueError(
                f"state_dict[{self._rows_key!r}] must be finite: the window holds NaN or inf (or overflows)"
            )
        bad = (sq - diag).abs() > 1e-2 * torch.maximum(sq, diag) + torch.finfo(torch.float32).tiny
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"state_dict['gram'] does not match state_dict[{self._rows_key!r}]: Gram diagonal "
                f"{float(diag[row]):.6g} but |window row {row}|^2 = {float(sq[row]):.6g} (and "
                f"{int(bad.sum()) - 1} more rows); the window and the Gram matrix come from different "
                "states, or one of them is corrupt"
            )
