"""Parameters <-> one flat vector.

The curvature operators of mfac work on vectors of ``d`` coordinates; models hold a list of
parameter tensors. :class:`ParamSpace` is the bridge: it fixes an order of parameters, gives each
one a slice ``[offset, offset + numel)`` of the flat vector, converts both ways (``flatten`` /
``unflatten``), reads the flat gradient (``grad_vector``) and writes flat updates back into the
parameters in place (``add_``, ``copy_``).

Masks (sparse models)
---------------------
A space may carry boolean masks (``True`` = kept). The kept coordinates, in flat order, form the
*kept space* of ``k <= d`` coordinates; every method that takes ``masked=True`` reads or writes
``(k,)`` vectors instead of ``(d,)`` ones, so the gradient window of a pruned model only needs
``m * k`` entries. ``restrict`` / ``expand`` convert between the two. The offsets and kept indices
are those of the one flattener of mfac (``mfac._flat.FlatLayout``), which the optimizer's window
uses too.

One mask contract holds at every entry point that takes masks (this space, ``MFAC(masks=)``,
``prune_oneshot`` / ``obs_scores`` / ``GradualPruner``, ``apply_masks``, ``apply_torch_prune``, the
selectors' ``keep``): a mask is a ``torch.bool`` tensor shaped like its parameter, ``True`` = kept,
holding values (not meta). Masks are keyed by user-facing parameter names, except for the optimizer,
which has no names and takes ``{parameter tensor: mask}`` (``MaskHandle.param_masks()``). The 0/1
``weight_mask`` buffers of ``torch.nn.utils.prune`` are not masks in this sense: :func:`prune_masks`
converts them. :func:`check_mask` / :func:`check_masks` apply the contract (same error types and
messages everywhere: ``TypeError`` for a non-tensor or a non-bool dtype, ``ValueError`` for a shape,
device or meta tensor); entry points that keep a copy for the hot path (this space, the optimizer)
refuse a mask on another device, the others move it.

``torch.nn.utils.prune``
------------------------
Pruning a module with ``torch.nn.utils.prune`` replaces its parameter ``weight`` by a parameter
``weight_orig`` and a buffer ``weight_mask``; ``module.weight`` becomes a plain attribute,
recomputed as ``weight_orig * weight_mask`` by a forward pre-hook. mfac keeps the *user-facing* name
(``"fc.weight"``) and resolves it to the tensor that must be written, ``weight_orig``
(:func:`writable_parameter`, :func:`named_writable_parameters`). Writing into ``weight_orig`` leaves
``module.weight`` stale until the next forward pass, which recomputes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mfac._flat import FlatLayout
from mfac._reparam import base_leaf, mask_buffer, writable
from mfac.numerics import check_bool_mask, check_not_meta

logger = logging.getLogger(__name__)

__all__ = [
    "ParamSpace",
    "default_prunable",
    "is_transformers_conv1d",
    "named_writable_parameters",
    "prunable_types",
    "prune_masks",
    "writable_parameter",
]

_PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

TensorsLike = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------------- module helpers
def _split(name: str) -> tuple[str, str]:
    path, _, leaf = name.rpartition(".")
    return path, leaf


def named_writable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(user-facing name, parameter to write)`` in ``model.named_parameters()`` order.

    Identical to ``model.named_parameters()`` except for modules reparametrized by
    ``torch.nn.utils.prune``: their ``"<module>.weight_orig"`` is yielded as ``"<module>.weight"``
    (the name the user knows), paired with the ``weight_orig`` parameter (the tensor that OBS
    updates and optimizers must write; ``module.weight`` is recomputed from it on the next forward).
    Shared (tied) parameters are yielded once, under their first name, as ``named_parameters``
    does.
    """
    for name, param in model.named_parameters():
        path, leaf = _split(name)
        owner = model.get_submodule(path) if path else model
        base = base_leaf(owner, leaf)
        yield (f"{path}.{base}" if path else base, param) if base else (name, param)


def writable_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Return the parameter to write for the user-facing parameter ``name`` of ``model``.

    For a module pruned with ``torch.nn.utils.prune``, ``"fc.weight"`` resolves to the parameter
    ``fc.weight_orig`` (``fc.weight`` itself is then a plain tensor recomputed as
    ``weight_orig * weight_mask`` before each forward: writing into it would be lost). Any other
    name resolves to ``model.get_parameter(name)``; the raw ``"fc.weight_orig"`` is accepted too.

    Raises:
        ValueError: ``name`` names no parameter of ``model``.
    """
    if not isinstance(name, str):
        raise TypeError(f"parameter name must be a str, got {type(name).__name__} {name!r}")
    path, leaf = _split(name)
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        owner = None
    if owner is not None:
        param = writable(owner, leaf)
        if param is not None:
            return param
    raise ValueError(f"{name!r} is not a parameter of {type(model).__name__}")


def _transformers_conv1d() -> type | None:
    """Return transformers' ``Conv1D`` class if transformers is already imported, else None.

    Never imports transformers: a model holding a ``Conv1D`` has imported it already.
    """
    import sys

    module = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(module, "Conv1D", None)
    return cls if isinstance(cls, type) else None


def prunable_types() -> tuple[type, ...]:
    """Return the module types whose ``weight`` :func:`default_prunable` selects.

    ``nn.Linear``, ``nn.Conv1d/2d/3d``, and transformers' ``Conv1D`` (GPT-2's projections, a weight
    stored ``(in, out)`` and used as ``x @ W``) when transformers is imported.
    """
    conv1d = _transformers_conv1d()
    return _PRUNABLE_TYPES + ((conv1d,) if conv1d is not None else ())


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight ``(in, out)``, ``y = x @ W + b``)."""
    conv1d = _transformers_conv1d()
    return conv1d is not None and isinstance(module, conv1d)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """``(device, data address, numel)`` of ``t``: equal for two parameters viewing the same memory.

    The tensor's own address, not its storage's: parameters that are views into one flat buffer
    (FSDP) share a storage but not an address. None where there is no memory (meta, fake tensors).
    """
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (str(t.device), ptr, t.numel()) if ptr else None


def _embedding_tensors(model: nn.Module) -> tuple[set[int], set[tuple[str, int, int]]]:
    """Identities and storages of every embedding weight of ``model`` (tied copies included)."""
    ids: set[int] = set()
    storages: set[tuple[str, int, int]] = set()
    for module in model.modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        for param in (module._parameters.get("weight"), writable(module, "weight")):
            if param is None:
                continue
            ids.add(id(param))
            key = _storage_key(param)
            if key is not None:
                storages.add(key)
    return ids, storages


def default_prunable(model: nn.Module) -> list[str]:
    """Return the names of the weights the pruner prunes by default: the layers' projections.

    Selected: the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers
    ``Conv1D`` module (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``; see :func:`prunable_types`).
    Never selected: biases, normalization parameters, embeddings, and any weight *shared with an
    embedding*: a language-model head tied to the token embedding (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``; ``BertForMaskedLM``'s ``cls.predictions.decoder.weight`` is
    ``bert.embeddings.word_embeddings.weight``). Ties are detected by identity (the same
    ``Parameter`` object) and by shared storage (a second ``Parameter`` viewing the same memory),
    never by module type or name. An untied head is an ordinary Linear and is selected.

    Names are user-facing (``"fc.weight"`` also for a module reparametrized by
    ``torch.nn.utils.prune``) and come in the order of ``model.named_parameters()``. A weight tied
    between two prunable layers (no embedding) is listed once, under its first name.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10))
        >>> default_prunable(model)
        ['1.weight', '3.weight']
        >>> model[3].weight = model[0].weight          # a head tied to the embedding
        >>> default_prunable(model)
        ['1.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    embedding_ids, embedding_storages = _embedding_tensors(model)
    types = prunable_types()
    wanted: set[int] = set()
    for module in model.modules():
        if not isinstance(module, types):
            continue
        weight = writable(module, "weight")
        if weight is None or id(weight) in embedding_ids:
            continue
        key = _storage_key(weight)
        if key is not None and key in embedding_storages:
            continue
        wanted.add(id(weight))
    return [name for name, param in named_writable_parameters(model) if id(param) in wanted]


def prune_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the boolean masks (``True`` = kept) of the parameters pruned by torch.nn.utils.prune.

    Returns:
        ``{user-facing name: weight_mask.bool()}`` (new tensors), ready for
        ``ParamSpace(masks=...)``.
    """
    masks: dict[str, torch.Tensor] = {}
    for name, _ in named_writable_parameters(model):
        path, leaf = _split(name)
        owner = model.get_submodule(path) if path else model
        buffer = None if leaf in owner._parameters else mask_buffer(owner, leaf)
        if buffer is not None:
            masks[name] = buffer.detach().bool()
    return masks


# ------------------------------------------------------------------------------- the mask contract
def check_mask(mask: object, name: str, param: torch.Tensor, *, move: bool = False) -> torch.Tensor:
    """Check one mask against its parameter; return a detached copy on the parameter's device.

    The contract every entry point of mfac applies (see "Masks" in the module docs): a ``torch.bool``
    tensor (``TypeError`` otherwise: a 0/1 float mask such as a ``torch.nn.utils.prune`` buffer is
    refused, convert it with ``.bool()`` or :func:`prune_masks`) of the parameter's shape
    (``ValueError``), holding values (not on the meta device: ``ValueError``). A mask on another
    device than its parameter is moved there with ``move`` and refused (``ValueError``) without.

    Args:
        mask: the mask, ``True`` = kept.
        name: how messages name it, e.g. ``"mask of 'fc.weight'"``.
        param: its parameter (shape and device).
        move: move a mask on another device instead of refusing it.

    Returns:
        A new bool tensor (the caller's copy: later changes to ``mask`` are not seen).
    """
    check_bool_mask(mask, name, param.shape)
    assert isinstance(mask, torch.Tensor)
    if mask.device != param.device and not move:
        raise ValueError(f"{name} must be on {param.device}, got {mask.device}")
    check_not_meta(mask, name)
    return mask.detach().to(param.device, copy=True)


def check_masks(
    masks: object,
    lookup: Callable[[str], torch.Tensor],
    *,
    move: bool = False,
    what: str = "masks",
) -> dict[str, torch.Tensor]:
    """Check a name-keyed masks dict; return ``{name: checked copy}`` (:func:`check_mask` on each).

    Args:
        masks: ``{user-facing parameter name: bool mask}``; anything but a mapping is a ``TypeError``.
        lookup: the parameter of a name (raising ``ValueError`` for names that are not parameters).
        move: see :func:`check_mask`.
        what: how messages name the argument.

    Every mask is checked before anything is returned, so a caller that applies the result after this
    call changes nothing when a mask is bad.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"{what} must be a dict {{name: bool tensor}}, got {type(masks).__name__}")
    return {
        name: check_mask(mask, f"mask of {name!r}", lookup(name), move=move)
        for name, mask in masks.items()
    }


# ------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class _Entry:
    name: str
    param: torch.Tensor
    mask: torch.Tensor | None  # bool, shape of param; None = all kept

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def numel(self) -> int:
        return self.param.numel()


class ParamSpace:
    """An ordered list of parameters seen as one flat vector of ``d`` coordinates.

    Parameter ``i`` occupies ``vec[offsets[i] : offsets[i] + numels[i]]``, in row-major order of
    its (logical) shape, whatever its memory layout. All parameters must share one floating dtype
    and one device: those of every flat vector of the space.

    The space holds references to the parameters (no copies), plus a copy of each mask (``d`` bytes
    at most) and the kept indices (``8 * k`` bytes, only when masks are given). Masks are
    snapshotted: to change them, build a new space with :meth:`with_masks`.

    Args:
        named_params: ``(name, tensor)`` pairs, in the order of the flat vector. The tensors are
            what ``add_`` / ``copy_`` write and ``grad_vector`` reads ``.grad`` from (for modules
            pruned by ``torch.nn.utils.prune`` pass ``weight_orig``: see :meth:`from_module`).
        masks: optional ``{name: bool tensor shaped like the parameter}``, ``True`` = kept;
            parameters without an entry keep every coordinate.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> space = ParamSpace.from_module(model)
        >>> space.dim, space.named_slices()
        (8, {'weight': slice(0, 6, None), 'bias': slice(6, 8, None)})
        >>> vec = space.param_vector()          # shape: (8,), a copy
        >>> space.add_(torch.ones(8), alpha=-0.1)  # in place, also under torch.no_grad()
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.Tensor]],
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        pairs = list(named_params)
        if not pairs:
            raise ValueError("a ParamSpace needs at least one parameter, got none")
        seen_names: set[str] = set()
        seen_ids: dict[int, str] = {}
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"named_params must hold (name, tensor) pairs, got {item!r}")
            name, param = item
            if not isinstance(name, str):
                raise TypeError(f"parameter names must be str, got {type(name).__name__} {name!r}")
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    f"parameter {name!r} must be a torch.Tensor, got {type(param).__name__}"
                )
            if name in seen_names:
                raise ValueError(f"parameter name {name!r} appears twice; names must be unique")
            if id(param) in seen_ids:
                raise ValueError(
                    f"parameter {name!r} is the same tensor as {seen_ids[id(param)]!r} (tied); "
                    "list each tensor once"
                )
            if param.is_sparse or param.layout != torch.strided:
                raise TypeError(
                    f"parameter {name!r} must be a dense (strided) tensor, got {param.layout}"
                )
            seen_names.add(name)
            seen_ids[id(param)] = name

        first_name, first = pairs[0]
        if not first.is_floating_point():
            raise TypeError(
                f"parameters must be floating point, got {first_name!r} of dtype {first.dtype}"
            )
        for name, param in pairs[1:]:
            if param.dtype != first.dtype:
                raise TypeError(
                    f"all parameters of a ParamSpace must share one dtype (the flat vector's): "
                    f"{first_name!r} is {first.dtype} but {name!r} is {param.dtype}"
                )
            if param.device != first.device:
                raise ValueError(
                    f"all parameters of a ParamSpace must be on one device (the flat vector's): "
                    f"{first_name!r} is on {first.device} but {name!r} is on {param.device}"
                )
        self._dtype = first.dtype
        self._device = first.device

        masks = {} if masks is None else masks
        if not isinstance(masks, Mapping):
            try:  # (name, mask) pairs, as dict() takes them, are accepted too
                masks = dict(masks)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise TypeError(
                    f"masks must be a dict {{name: bool tensor}}, got {type(masks).__name__}"
                ) from None
        unknown = [n for n in masks if n not in seen_names]
        if unknown:
            raise ValueError(
                f"masks given for unknown parameters {unknown}; known: {sorted(seen_names)}"
            )

        params = dict(pairs)
        checked = check_masks(masks, params.__getitem__)
        entries = [_Entry(name, param, checked.get(name)) for name, param in pairs]
        self._entries = entries
        # offsets and kept indices: the one flattener (mfac._flat), shared with the optimizer
        self._flat = FlatLayout.from_masks(
            [e.mask for e in entries], [e.numel for e in entries], device=self._device
        )
        self._dim = self._flat.dim
        self._kept_dim = self._flat.kept_dim
        self._index = {e.name: i for i, e in enumerate(entries)}
        self._has_masks = self._flat.masked
        self._kept_indices = self._flat.kept_indices()  # shape: (k,); None without masks

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
        requires_grad_only: bool = True,
    ) -> ParamSpace:
        """Build the space of (some of) ``model``'s parameters, in ``named_parameters()`` order.

        Names are user-facing: for a module pruned by ``torch.nn.utils.prune``, ``"fc.weight"``
        names the parameter ``fc.weight_orig``, which is what the space reads gradients from and
        writes to (see :func:`named_writable_parameters`).

        Args:
            model: the module.
            names: the parameters to include (any order; the space uses the model's order), or
                None for every parameter (only those with ``requires_grad`` when
                ``requires_grad_only``).
                Explicitly named parameters are included whatever their ``requires_grad``.
            masks: as in the constructor, keyed by user-facing names.
            requires_grad_only: with ``names=None``, skip parameters with ``requires_grad=False``.

        Raises:
            ValueError: an unknown or repeated name, or no parameter selected.
        """
        available = list(named_writable_parameters(model))
        if names is None:
            chosen = [(n, p) for n, p in available if p.requires_grad or not requires_grad_only]
            if not chosen:
                raise ValueError(
                    f"{type(model).__name__} has no parameters with requires_grad=True"
                )
            return cls(chosen, masks=masks)
        if isinstance(names, str):
            raise TypeError(f"names must be a list of parameter names, got the string {names!r}")
        wanted = list(names)
        for n in wanted:
            if not isinstance(n, str):
                raise TypeError(f"parameter names must be str, got {type(n).__name__} {n!r}")
        repeated = sorted({n for n in wanted if wanted.count(n) > 1})
        if repeated:
            raise ValueError(f"parameter names must be unique, got {repeated} more than once")
        known = {n for n, _ in available}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            listing = sorted(known)
            more = "" if len(listing) <= 10 else f" ... ({len(listing)} in all)"
            raise ValueError(
                f"unknown parameter names {unknown} for {type(model).__name__}; "
                f"known: {listing[:10]}{more}"
            )
        selected = set(wanted)
        return cls([(n, p) for n, p in available if n in selected], masks=masks)

    def select(self, names: Iterable[str]) -> ParamSpace:
        """Return a new space over the named subset (in this space's order), masks carried over.

        This is how to *skip* parameters consistently, e.g. those whose ``.grad`` is None:
        ``space.select([n for n, p in space.named_params() if p.grad is not None])``.
        """
        wanted = set(names)
        unknown = sorted(wanted - set(self._index))
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; known: {self.names}")
        entries = [e for e in self._entries if e.name in wanted]
        masks = {e.name: e.mask for e in entries if e.mask is not None}
        return ParamSpace([(e.name, e.param) for e in entries], masks=masks)

    def with_masks(self, masks: Mapping[str, torch.Tensor] | None) -> ParamSpace:
        """Return a new space over the same parameters with ``masks`` (None: no masks)."""
        return ParamSpace(self.named_params(), masks=masks)

    # ------------------------------------------------------------------------------ layout
    @property
    def dim(self) -> int:
        """``d``: the total number of coordinates (sum of the parameters' numels)."""
        return self._dim

    @property
    def kept_dim(self) -> int:
        """``k``: the number of kept coordinates (``== dim`` without masks)."""
        return self._kept_dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters and of every flat vector of the space."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters and of every flat vector of the space."""
        return self._device

    @property
    def has_masks(self) -> bool:
        """Whether any parameter carries a mask."""
        return self._has_masks

    @property
    def names(self) -> list[str]:
        """Parameter names, in flat order."""
        return [e.name for e in self._entries]

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameter tensors (the ones written to), in flat order."""
        return [e.param for e in self._entries]

    @property
    def shapes(self) -> list[torch.Size]:
        """Parameter shapes, in flat order."""
        return [e.shape for e in self._entries]

    @property
    def numels(self) -> list[int]:
        """Parameter numels, in flat order."""
        return [e.numel for e in self._entries]

    @property
    def offsets(self) -> list[int]:
        """Start of each parameter in the full ``(d,)`` vector."""
        return list(self._flat.offsets)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}`` of the masked parameters (the space's copies: do not modify)."""
        return {e.name: e.mask for e in self._entries if e.mask is not None}

    def named_params(self) -> list[tuple[str, torch.Tensor]]:
        """``[(name, tensor)]`` in flat order."""
        return [(e.name, e.param) for e in self._entries]

    def named_slices(self, *, masked: bool = False) -> dict[str, slice]:
        """Return ``{name: slice}`` of each parameter in the ``(d,)`` (or kept ``(k,)``) vector."""
        flat = self._flat
        starts, widths = (flat.kept_offsets, flat.sizes) if masked else (flat.offsets, flat.numels)
        return {e.name: slice(a, a + n) for e, a, n in zip(self._entries, starts, widths, strict=True)}

    def kept_indices(self) -> torch.Tensor:
        """Return the flat indices (into ``(d,)``) of the kept coordinates: increasing, ``(k,)``."""
        if self._kept_indices is None:
            return torch.arange(self._dim, device=self._device)
        return self._kept_indices

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        kept = f", kept_dim={self._kept_dim}" if self._has_masks else ""
        return (
            f"ParamSpace({len(self._entries)} tensors, dim={self._dim}{kept}, "
            f"dtype={self._dtype}, device={self._device})"
        )

    # ------------------------------------------------------------------------------ conversions
    def _as_list(self, tensors: TensorsLike, what: str) -> list[torch.Tensor | None]:
        if isinstance(tensors, torch.Tensor):
            raise TypeError(
                f"{what} must be a list or dict of tensors shaped like the parameters, "
                "got one tensor"
            )
        if isinstance(tensors, Mapping):
            missing = [n for n in self._index if n not in tensors]
            extra = [n for n in tensors if n not in self._index]
            if missing or extra:
                raise ValueError(
                    f"{what} must have exactly the keys {self.names}; "
                    f"missing {missing}, extra {extra}"
                )
            return [tensors[e.name] for e in self._entries]
        items = list(tensors)
        if len(items) != len(self._entries):
            raise ValueError(
                f"{what} must hold {len(self._entries)} tensors (one per parameter), "
                f"got {len(items)}"
            )
        return items

    def flatten(
        self, tensors: TensorsLike, *, masked: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters into one flat vector.

        Args:
            tensors: one tensor per parameter (list in flat order, or dict by name), each of shape
                ``(*batch, *param.shape)`` with the same (possibly empty) leading ``batch`` shape;
                the space's dtype and device.
            masked: keep only the kept coordinates.
            out: optional output, shape ``(*batch, d)`` (``(*batch, k)`` when masked).

        Returns:
            Shape ``(*batch, d)``, or ``(*batch, k)`` when ``masked``; a new tensor (or ``out``).
        """
        items = self._as_list(tensors, "tensors")
        batch: torch.Size | None = None
        for e, t in zip(self._entries, items, strict=True):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"tensor for {e.name!r} must be a torch.Tensor, got {type(t).__name__}"
                )
            nb = t.dim() - len(e.shape)
            if nb < 0 or t.shape[nb:] != e.shape:
                raise ValueError(
                    f"tensor for {e.name!r} must have shape (*batch, *{tuple(e.shape)}) "
                    f"(the parameter's), got {tuple(t.shape)}"
                )
            if batch is None:
                batch = t.shape[:nb]
            elif t.shape[:nb] != batch:
                raise ValueError(
                    f"all tensors must share one batch shape: {tuple(batch)} before {e.name!r}, "
                    f"but {e.name!r} has batch shape {tuple(t.shape[:nb])}"
                )
            self._check_placement(t, f"tensor for {e.name!r}")
        assert batch is not None
        width = self._kept_dim if masked else self._dim
        if out is None:
            out = torch.empty((*batch, width), dtype=self._dtype, device=self._device)
        else:
            self._check_placement(out, "out")
            if out.shape != (*batch, width):
                raise ValueError(f"out must have shape {(*batch, width)}, got {tuple(out.shape)}")
        return self._flat.gather(items, out, masked=masked)

    def masked_flatten(
        self, tensors: TensorsLike, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``flatten(tensors, masked=True)``: the kept coordinates only, shape ``(*batch, k)``."""
        return self.flatten(tensors, masked=True, out=out)

    def unflatten(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into views shaped like the parameters.

        Args:
            vec: shape ``(*batch, d)``.

        Returns:
            One view of ``vec`` per parameter, shape ``(*batch, *param.shape)`` (writes go to
            ``vec``).
        """
        self._check_vector(vec, self._dim, "vec")
        return self._flat.unflatten(vec, self.shapes)

    def named_unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``unflatten`` as ``{name: view}``."""
        return dict(zip(self.names, self.unflatten(vec), strict=True))

    def masked_unflatten(self, vec: torch.Tensor, *, fill: float = 0.0) -> list[torch.Tensor]:
        """Scatter a kept-coordinates vector back into tensors shaped like the parameters.

        Args:
            vec: shape ``(*batch, k)``.
            fill: value at the masked-out (pruned) coordinates.

        Returns:
            New tensors (not views), shape ``(*batch, *param.shape)`` each.
        """
        return self.unflatten(self.expand(vec, fill=fill))

    def restrict(self, vec: torch.Tensor) -> torch.Tensor:
        """Return the kept coordinates of a full vector: ``(*batch, d) -> (*batch, k)``.

        Without masks this returns ``vec`` itself (no copy).
        """
        self._check_vector(vec, self._dim, "vec")
        return self._flat.restrict(vec)

    def expand(self, vec: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
        """Return a full vector from kept coordinates: ``(*batch, k) -> (*batch, d)``.

        Masked-out coordinates get ``fill``.

        Without masks this returns ``vec`` itself (no copy).
        """
        self._check_vector(vec, self._kept_dim, "vec")
        return self._flat.expand(vec, fill=fill)

    # ------------------------------------------------------------------------------ read
    def param_vector(self, *, masked: bool = False) -> torch.Tensor:
        """Return the parameter values as a flat vector (a copy), ``(d,)`` (``(k,)`` if masked)."""
        return self.flatten([e.param.detach() for e in self._entries], masked=masked)

    def grad_vector(self, *, zero_for_none: bool = False, masked: bool = False) -> torch.Tensor:
        """Return the parameters' ``.grad`` as a flat vector (a copy), ``(d,)`` or ``(k,)``.

        Args:
            zero_for_none: what a ``.grad`` of None becomes. False (default): raise ``ValueError``
                naming the parameters. True: zeros (the gradient of a loss that does not use the
                parameter). To *skip* such parameters instead, build a smaller space with
                :meth:`select` once and use it consistently. Sparse gradients are densified.
            masked: return the kept coordinates only.
        """
        grads: list[torch.Tensor] = []
        missing: list[str] = []
        for e in self._entries:
            g = e.param.grad
            if g is None:
                missing.append(e.name)
                g = torch.zeros_like(e.param, memory_format=torch.contiguous_format)
            elif g.layout != torch.strided:
                g = g.to_dense()
            grads.append(g.detach())
        if missing and not zero_for_none:
            raise ValueError(
                f"parameters {missing} have .grad None; pass zero_for_none=True to read zeros, or "
                "build a space without them (ParamSpace.select) to skip them"
            )
        return self.flatten(grads, masked=masked)

    # ------------------------------------------------------------------------------ write
    def add_(self, vec: torch.Tensor, alpha: float = 1.0, *, masked: bool = False) -> None:
        """Do ``param += alpha * vec`` in place for every parameter (no ``.data`` rebinding).

        Runs under ``torch.no_grad()`` (and works inside one); autograd does not record it.

        Args:
            vec: shape ``(d,)``, or ``(k,)`` with ``masked=True``.
            alpha: scale.
            masked: ``vec`` holds the kept coordinates only; masked-out ones are left untouched.
                Without it a full ``(d,)`` vector is added everywhere, masks or not.
        """
        self._check_vector(vec, self._kept_dim if masked else self._dim, "vec", batched=False)
        full = self.expand(vec) if masked else vec
        with torch.no_grad():
            torch._foreach_add_(self.params, self.unflatten(full), alpha=alpha)

    def copy_(self, vec: torch.Tensor, *, masked: bool = False) -> None:
        """Do ``param[...] = vec`` in place for every parameter (no ``.data`` rebinding).

        Args:
            vec: shape ``(d,)``, or ``(k,)`` with ``masked=True``.
            masked: ``vec`` holds the kept coordinates only; masked-out ones keep their values.
        """
        self._check_vector(vec, self._kept_dim if masked else self._dim, "vec", batched=False)
        with torch.no_grad():
            if not masked:
                for p, v in zip(self.params, self.unflatten(vec), strict=True):
                    p.copy_(v)
                return
            for e, part in zip(self._entries, self._flat.split(vec, masked=True), strict=True):
                if e.mask is None:
                    e.param.copy_(part.view(e.shape))
                else:
                    e.param.masked_scatter_(e.mask, part)

    # ------------------------------------------------------------------------------ checks
    def _check_placement(self, t: torch.Tensor, what: str) -> None:
        if t.dtype != self._dtype:
            raise TypeError(
                f"{what} must have dtype {self._dtype} (the parameters'), got {t.dtype}"
            )
        if t.device != self._device:
            raise ValueError(
                f"{what} must be on device {self._device} (the parameters'), got {t.device}"
            )

    def _check_vector(
        self, vec: torch.Tensor, width: int, what: str, *, batched: bool = True
    ) -> None:
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(vec).__name__}")
        self._check_placement(vec, what)
        ok = vec.dim() >= 1 and vec.shape[-1] == width and (batched or vec.dim() == 1)
        if not ok:
            want = f"({width},)" if not batched else f"(..., {width})"
            raise ValueError(f"{what} must have shape {want}, got {tuple(vec.shape)}")

