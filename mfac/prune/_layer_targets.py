r"""Which layers layer-wise pruning touches, how each is seen as ``y = W x``, and where the blocks are.

A :class:`LayerTarget` wraps one module and views its weight as the ``(r, c)`` matrix of ``y = W x``:

* ``nn.Linear``: ``weight`` is ``(out, in)`` already; ``c = in``.
* ``transformers.pytorch_utils.Conv1D`` (GPT-2): ``weight`` is stored ``(in, out)``; ``W = weight.T``.
* ``nn.Conv2d`` (``groups == 1``, zero padding): ``weight`` ``(out, in, kh, kw)`` flattened to
  ``(out, in * kh * kw)``, the order of ``torch.nn.functional.unfold``'s patches, so each unfolded patch is
  one column of ``X``.

N:M groups therefore always run along the input dimension ``c`` of each output row (what sparse tensor-core
kernels need), also for ``Conv1D``'s transposed storage.

Default targets (:func:`find_targets`): every such module inside the model's repeated blocks (or in the whole
model when it has none), never a weight that is (the same tensor as) an embedding's, so a language-model
head tied to its token embedding is left alone; biases and normalisation parameters are never targets.
``transformers`` is never imported here: ``Conv1D`` is recognised only when ``transformers`` already is.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mfac._reparam import is_reparametrized

__all__ = ["BLOCK_PATHS", "LayerTarget", "find_blocks", "find_targets", "resolve_targets"]

#: attribute paths of the repeated blocks in common layouts, tried in this order
BLOCK_PATHS = (
    "transformer.h",  # GPT-2, GPT-J, BLOOM
    "model.layers",  # LLaMA, Mistral, Qwen, Gemma
    "model.decoder.layers",  # OPT
    "model.language_model.layers",
    "gpt_neox.layers",  # Pythia
    "transformer.blocks",  # MPT
    "transformer.layers",
    "bert.encoder.layer",  # BERT
    "roberta.encoder.layer",
    "deberta.encoder.layer",
    "encoder.layer",
    "layers",
    "blocks",
    "h",
)


def _conv1d_type() -> type | None:
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d_t"`` (transformers' transposed Conv1D), ``"conv2d"`` or None (not a layer)."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d_t"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _unsupported(module: nn.Module) -> str | None:
    """Why a recognised layer cannot be pruned layer-wise (None if it can)."""
    if is_reparametrized(module, "weight"):
        return ("it is reparametrized by torch.nn.utils.prune (call torch.nn.utils.prune.remove first; "
                "pass the masks back with apply_torch_prune afterwards)")
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return f"Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r} is not supported"
    return None


@dataclass(eq=False)
class LayerTarget:
    """One prunable layer seen as ``y = W x`` with ``W`` of shape ``(rows, cols)``."""

    name: str  # the weight's parameter name, e.g. "transformer.h.0.attn.c_attn.weight"
    module: nn.Module
    kind: str  # "linear" | "conv1d_t" | "conv2d"

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def rows(self) -> int:
        w = self.weight
        return w.shape[1] if self.kind == "conv1d_t" else w.shape[0]

    @property
    def cols(self) -> int:
        return self.weight.numel() // self.rows

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """Return a copy of ``W`` as ``(rows, cols)`` in ``dtype``."""
        w = self.weight.detach()
        w = w.T if self.kind == "conv1d_t" else w.reshape(w.shape[0], -1)
        return w.to(dtype=dtype, copy=True).contiguous()

    def to_param_shape(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`matrix`'s view: ``(rows, cols)`` -> the parameter's shape."""
        if self.kind == "conv1d_t":
            return matrix.T.contiguous()
        return matrix.reshape(self.weight.shape)

    @torch.no_grad()
    def write(self, matrix: torch.Tensor) -> None:
        """Write ``(rows, cols)`` weights into the parameter in place (its dtype and device kept)."""
        self.weight.copy_(self.to_param_shape(matrix))

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Return the layer input as rows ``(tokens, cols)`` and the number of samples it counts.

        Samples count sequences (the leading dimension of a ``(batch, seq, width)`` input; images for a
        Conv2d), as the SparseGPT reference does; a 2-D ``(batch, width)`` input counts its rows. The count
        only scales ``H``; masks and updates do not depend on it (``damp`` is relative).
        """
        if self.kind == "conv2d":
            m = self.module
            if x.dim() == 3:
                x = x.unsqueeze(0)
            patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return patches.transpose(1, 2).reshape(-1, self.cols), x.shape[0]
        count = x.shape[0]
        return x.reshape(-1, self.cols), count


def _embedding_param_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
    }


def find_blocks(model: nn.Module, blocks: str | Sequence[nn.Module] | None = None) -> list[nn.Module] | None:
    """Return the model's repeated blocks, or None if it has none.

    ``blocks`` if given (a path like ``"transformer.h"`` or the modules), else the first of
    :data:`BLOCK_PATHS` that is an ``nn.ModuleList``, else the longest ``nn.ModuleList`` of >= 2 modules of
    one type.
    """
    if blocks is not None:
        if isinstance(blocks, str):
            try:
                found = model.get_submodule(blocks)
            except AttributeError:
                raise ValueError(f"blocks={blocks!r} is not a submodule of {type(model).__name__}") from None
            return list(found.children()) if isinstance(found, (nn.ModuleList, nn.Sequential)) else [found]
        found = list(blocks)
        if not found or not all(isinstance(b, nn.Module) for b in found):
            raise TypeError("blocks must be a submodule path or a non-empty sequence of nn.Module")
        inside = {id(m) for m in model.modules()}
        if any(id(b) not in inside for b in found):
            raise ValueError("every module in blocks must be a submodule of the model")
        return found
    for path in BLOCK_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return list(found)
    best: list[nn.Module] | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kids = list(module)
            if len({type(k) for k in kids}) == 1 and (best is None or len(kids) > len(best)):
                best = kids
    return best


def find_targets(model: nn.Module, blocks: list[nn.Module] | None) -> list[LayerTarget]:
    """Default targets: supported layers inside ``blocks`` (or the whole model), no embedding-tied weights."""
    tied = _embedding_param_ids(model)
    inside = None
    if blocks is not None:
        inside = {id(m) for b in blocks for m in b.modules()}
    out, seen = [], set()
    for module_name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or (inside is not None and id(module) not in inside) or _unsupported(module):
            continue
        weight = module._parameters.get("weight")
        if weight is None or id(weight) in tied or id(weight) in seen:
            continue
        seen.add(id(weight))
        out.append(LayerTarget(f"{module_name}.weight" if module_name else "weight", module, kind))
    return out


def resolve_targets(model: nn.Module, names: Sequence[str]) -> list[LayerTarget]:
    """Targets named by the user: parameter names (``"fc.weight"``) or module names (``"fc"``).

    Raises:
        ValueError: a name that is not a supported layer of the model, or a weight tied to an embedding.
    """
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"targets must be a sequence of names (str), got {names!r}")
    if not names:
        raise ValueError("targets is empty: name at least one layer")
    tied = _embedding_param_ids(model)
    modules = dict(model.named_modules())
    out, seen = [], set()
    for name in names:
        module_name = name[: -len(".weight")] if name.endswith(".weight") else name
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"target {name!r} is not a module or weight of {type(model).__name__}")
        kind = layer_kind(module)
        if kind is None:
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; layer-wise pruning handles nn.Linear, "
                "transformers' Conv1D and nn.Conv2d"
            )
        why = _unsupported(module)
        if why:
            raise ValueError(f"target {name!r} cannot be pruned layer-wise: {why}")
        if id(module.weight) in tied:
            raise ValueError(f"target {name!r} is tied to an embedding (the same tensor); it is never pruned")
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        out.append(LayerTarget(f"{module_name}.weight", module, kind))
    return out
