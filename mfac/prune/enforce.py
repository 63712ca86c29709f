r"""Keeping pruned weights at zero through fine-tuning: weights, gradients and optimizer state.

Zeroing a weight once is not enough (pruned weights come back). During training a pruned
coordinate can be revived by its gradient, by momentum accumulated before pruning, by Adam's running averages,
or by anything that writes ``.grad`` directly. :class:`MaskHandle` closes each route:

* a tensor hook on each masked parameter multiplies its gradient by the mask as autograd produces it (so
  gradient clipping, logging and gradient windows such as :class:`mfac.MFAC`'s see zeros);
* an optimizer *pre*-step hook masks ``.grad`` again (gradients written by hand, ``torch.func``);
* an optimizer *post*-step hook zeros the pruned weights and every per-parameter state tensor shaped like its
  parameter (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ...), so no optimizer, torch's or another, can
  move them; attaching zeros that state once, immediately.

Works with any ``torch.optim.Optimizer`` (it uses ``register_step_pre_hook`` / ``register_step_post_hook``).
Optimizers that keep state not shaped like the parameters (e.g. :class:`mfac.MFAC`'s gradient window) are best
given the masks themselves (its sparse mode, via :meth:`MaskHandle.param_masks`); the hooks still keep the
weights at zero.

For modules reparametrized by ``torch.nn.utils.prune`` the masked tensor is ``weight_orig`` (its own forward
pre-hook already masks the forward pass; this handle additionally keeps ``weight_orig`` and the optimizer
state at zero).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from mfac.params import check_masks, writable_parameter

logger = logging.getLogger(__name__)

__all__ = ["MaskHandle", "apply_masks"]


class MaskHandle:
    """Masks kept applied to a model's parameters (and to attached optimizers) until :meth:`remove`.

    Args:
        model: the model.
        masks: ``{parameter name: bool tensor shaped like it}`` (True = kept), names as in
            ``model.named_parameters()`` (user-facing for ``torch.nn.utils.prune`` modules).
        optimizers: optimizers to :meth:`attach` right away.

    On creation the pruned weights are zeroed. Use :meth:`update` after a further pruning step (gradual
    pruning) and :meth:`remove` to release every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, torch.Tensor],
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizers = _check_optimizers(optimizers)  # before anything is zeroed or hooked
        self._model = model
        self._params: dict[str, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._scale: dict[str, torch.Tensor] = {}
        self._tensor_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._optim_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self.update(masks)
        for optimizer in optimizers:
            self.attach(optimizer)

    # ------------------------------------------------------------------ public
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}`` currently enforced (the handle's own copies: do not modify)."""
        return dict(self._masks)

    def param_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{parameter tensor: bool mask}``: the form optimizers with a sparse mode take."""
        return {self._params[n]: m for n, m in self._masks.items()}

    def update(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Enforce ``masks`` from now on (replacing the current ones; names not given are released)."""
        lookup = functools.partial(writable_parameter, self._model)
        checked = {name: (lookup(name), mask) for name, mask in check_masks(masks, lookup, move=True).items()}
        for name in list(self._masks):
            if name not in checked:
                self._tensor_hooks.pop(name).remove()
                del self._masks[name], self._scale[name], self._params[name]
        for name, (param, mask) in checked.items():
            self._params[name] = param
            self._masks[name] = mask
            self._scale[name] = mask.to(param.dtype)
            if name not in self._tensor_hooks:
                self._tensor_hooks[name] = param.register_hook(functools.partial(self._mask_grad, name))
        self.apply()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep ``optimizer`` from reviving pruned weights (zeros its state there now and after each step)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if any(o is optimizer for o in self._optimizers):
            return
        self._optimizers.append(optimizer)
        self._optim_hooks.append(optimizer.register_step_pre_hook(self._pre_step))
        self._optim_hooks.append(optimizer.register_step_post_hook(self._post_step))
        self._zero_state(optimizer)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights, their ``.grad`` and the attached optimizers' state there, now."""
        for name, param in self._params.items():
            param.mul_(self._scale[name])
            if param.grad is not None:
                param.grad.mul_(self._scale[name])
        for optimizer in self._optimizers:
            self._zero_state(optimizer)

    def remove(self) -> None:
        """Release all hooks (weights stay as they are)."""
        for hook in self._tensor_hooks.values():
            hook.remove()
        for hook in self._optim_hooks:
            hook.remove()
        self._tensor_hooks.clear()
        self._optim_hooks.clear()
        self._optimizers.clear()

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        total = sum(m.numel() for m in self._masks.values())
        pruned = sum(int((~m).sum()) for m in self._masks.values())
        return (
            f"MaskHandle({len(self._masks)} tensors, sparsity={pruned / max(total, 1):.4f}, "
            f"{len(self._optimizers)} optimizers)"
        )

    # ------------------------------------------------------------------ hooks
    def _mask_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self._scale[name]

    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for name, param in self._params.items():
            if param.grad is not None:
                param.grad.mul_(self._scale[name])

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for name, param in self._params.items():
            param.mul_(self._scale[name])
        self._zero_state(optimizer)

    @torch.no_grad()
    def _zero_state(self, optimizer: torch.optim.Optimizer) -> None:
        for name, param in self._params.items():
            state = optimizer.state.get(param)
            if not state:
                continue
            keep = self._masks[name]
            for value in state.values():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == param.shape
                    and value.is_floating_point()
                ):
                    value.masked_fill_(~keep, 0)


def apply_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    *,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (),
) -> MaskHandle:
    """Zero the pruned weights of ``model`` and keep them at zero through training.

    Args:
        model: the model.
        masks: ``{name: bool mask}`` (True = kept), e.g. what :func:`~mfac.prune.prune_oneshot` returns.
        optimizers: one optimizer or several to attach (more later with :meth:`MaskHandle.attach`).

    Returns:
        A :class:`MaskHandle`; ``handle.remove()`` releases the hooks.

    Example::

        masks = mfac.prune_oneshot(model, loss_fn, calib, 0.9, ngrads=256, damp=1e-4)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        handle = mfac.prune.apply_masks(model, masks, optimizers=opt)
        ...  # fine-tune: pruned weights stay exactly zero
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = (optimizers,)
    return MaskHandle(model, masks, optimizers)


def _check_optimizers(optimizers: object) -> list[torch.optim.Optimizer]:
    """``optimizers`` as a list, each a ``torch.optim.Optimizer`` (``TypeError`` otherwise)."""
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    if isinstance(optimizers, (str, bytes)) or not isinstance(optimizers, Iterable):
        raise TypeError(
            "optimizers must be a torch.optim.Optimizer or an iterable of them, got "
            f"{type(optimizers).__name__} {optimizers!r}"
        )
    out = list(optimizers)
    for opt in out:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizers must be torch.optim.Optimizer instances, got {type(opt).__name__}")
    return out
