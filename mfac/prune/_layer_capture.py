r"""Forward hooks that accumulate each layer's input Hessian, and the capture of the first block's inputs.

:class:`HessianAccumulator` keeps ``S = sum_t x_t x_t^T`` over the layer inputs ``x_t`` (tokens, or unfolded
patches) and the sample count ``n``; :meth:`~HessianAccumulator.hessian` returns ``H = 2 S / n``
(``c x c``, ``c^2 * 4`` bytes in float32). Summing first and scaling once is the same ``H`` as the
reference's running mean, in one pass.

:func:`capture_block_inputs` runs the model on each calibration batch until the first block is called, keeps
that call's positional and keyword arguments (the hidden states and whatever the model passes along:
attention masks, position ids or embeddings), and stops the forward there by raising a private exception:
nothing after the first block runs. Memory: ``N * seq * width`` entries for the hidden states of ``N``
sequences (plus the other tensors the model passes to its blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mfac.prune._layer_targets import LayerTarget

__all__ = ["BlockCall", "HessianAccumulator", "capture_block_inputs", "map_tensors", "run_model"]


class _Captured(Exception):  # control flow only, never seen by users
    pass


class HessianAccumulator:
    """Accumulate ``sum x x^T`` over a layer's inputs through a forward hook (``dtype``: float32/float64)."""

    def __init__(self, target: LayerTarget, dtype: torch.dtype) -> None:
        self.target = target
        self.dtype = dtype
        self.sum: torch.Tensor | None = None  # shape: (c, c)
        self.nsamples = 0
        self.error: str | None = None
        self._handle = target.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            self.error = f"layer {self.target.name!r} was called without a tensor input"
            return
        cols, count = self.target.inputs(x.detach())
        cols = cols.to(self.dtype)
        if not bool(torch.isfinite(cols).all()):
            self.error = self.error or f"the inputs of layer {self.target.name!r} are not finite (NaN or inf)"
            return
        if self.sum is None:
            self.sum = torch.zeros(cols.shape[1], cols.shape[1], dtype=self.dtype, device=cols.device)
        self.sum.addmm_(cols.T, cols)
        self.nsamples += count

    def remove(self) -> None:
        self._handle.remove()

    def hessian(self) -> torch.Tensor:
        """``H = 2 S / n``, shape ``(c, c)``.

        Raises:
            ValueError: the layer saw non-finite inputs, or no input at all.
        """
        if self.error:
            raise ValueError(self.error)
        if self.sum is None or self.nsamples == 0:
            raise ValueError(
                f"layer {self.target.name!r} was never called on the calibration data: is it used in the "
                "model's forward (or in this block)?"
            )
        return self.sum.mul(2.0 / self.nsamples)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts (other values unchanged)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def run_model(model: nn.Module, batch: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> Any:
    """``forward_fn(model, batch)``, else ``model(**batch)`` for a mapping, else ``model(batch)``."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(batch)


class BlockCall:
    """The arguments of one call of a block; the hidden states are ``args[0]`` or ``kwargs[key]``."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args = args
        self.kwargs = kwargs
        if args and isinstance(args[0], torch.Tensor):
            self.key: str | None = None
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            self.key = "hidden_states"
        else:
            raise ValueError(
                "the first block was called without its hidden states as the first positional argument "
                "or as hidden_states=...; pass forward_fn or use sequential=False"
            )

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.key is None else self.kwargs[self.key]

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        if self.key is None:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall(self.args, {**self.kwargs, self.key: hidden})

    def to(self, device: torch.device | None) -> BlockCall:
        if device is None:
            return self
        move = lambda t: t.to(device)  # noqa: E731
        return BlockCall(map_tensors(self.args, move), map_tensors(self.kwargs, move))

    def __call__(self, block: nn.Module) -> torch.Tensor:
        out = block(*self.args, **self.kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting "
                            "with the hidden states")
        return out


def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    data: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    store: torch.device | None,
) -> list[BlockCall]:
    """Run the model on each batch up to ``first_block``; return one :class:`BlockCall` per batch.

    Args:
        model: the model.
        first_block: the first repeated block (its forward pre-hook stops the model).
        data: the calibration batches.
        forward_fn: ``forward_fn(model, batch)`` (None: :func:`run_model`'s default).
        store: device the captured tensors are kept on (None: where they were produced).

    Raises:
        ValueError: ``data`` is empty, a batch never reaches the first block, or its hidden states are not
            finite.
    """
    calls: list[BlockCall] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        keep = lambda t: t.detach().to(store) if store is not None else t.detach()  # noqa: E731
        calls.append(BlockCall(map_tensors(args, keep), map_tensors(kwargs, keep)))
        raise _Captured

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i, batch in enumerate(data):
            try:
                run_model(model, batch, forward_fn)
            except _Captured:
                pass
            else:
                raise ValueError(
                    f"calibration batch {i} ran through the model without calling its first block"
                )
            if not bool(torch.isfinite(calls[-1].hidden).all()):
                raise ValueError(
                    f"the hidden states of calibration batch {i} at the first block are not finite"
                )
    finally:
        handle.remove()
    if not calls:
        raise ValueError("data is empty: layer-wise pruning needs at least one calibration batch")
    return calls
