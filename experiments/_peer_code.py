"""The paper's own sliding-window code, loaded from files for side-by-side measurements (not part of mfac).

Two peers, both loaded *by file path* and run unmodified except for one CPU shim:

* IST-DASLab/M-FAC ``optim.py`` (``HInvFastUpMulti``, the code of the NeurIPS 2021 paper). It is not
  vendored: write it under ``results/`` (git-ignored) with, e.g.,
  ``git --git-dir=<clone>/.git show HEAD:optim.py > results/peers/mfac_paper_optim.py`` and pass
  ``--paper-code`` (default: that path). Importing it switches TF32 off process-wide; the flags are
  restored right after the import.
* ista-daslab-optimizers ``dense_mfac/dense_core_mfac.py`` (``DenseCoreMFAC``, the maintained version),
  from the installed package's directory (its ``__init__`` needs the CUDA extensions, the file itself
  has a PyTorch fallback). Its import-time print is swallowed.

The shims: both call ``torch.lu(A, pivot=False)``, which torch implements only on CUDA. On CPU,
:func:`lu_nopivot_shim` provides it for the symmetric positive definite ``A`` they factor
(``m I + G G^T / damp``): with ``A = C C^T`` (Cholesky, same dtype), the unpivoted LU is
``L = C diag(C)^{-1}``, ``U = diag(C) C^T``, packed as torch returns it. Both peers run their
documented CPU fallbacks otherwise (Python loops over ``m`` for the coefficient matrix and the
triangular solve); their ``nn.parallel.parallel_apply`` over a one-device split becomes a plain call.

Both constructors compute ``G G^T`` in the window's dtype; for large windows that is avoided by
:func:`install_window`, which builds the peer on a one-column placeholder and then points it at the
benchmark's window and its (float32) Gram matrix, as the peer's own ``__init__`` would have left it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

DEFAULT_PAPER_CODE = Path("results/peers/mfac_paper_optim.py")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    sys.modules.setdefault(name, module)
    return module


def load_paper(path: Path = DEFAULT_PAPER_CODE) -> ModuleType | None:
    """IST-DASLab/M-FAC's ``optim.py`` as a module, or None if the file is not there."""
    return _load(path, "_peer_mfac_paper_optim") if path.is_file() else None


def load_ista() -> ModuleType | None:
    """ista-daslab-optimizers' ``dense_core_mfac.py`` as a module, or None if not installed."""
    spec = importlib.util.find_spec("ista_daslab_optimizers")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "dense_mfac" / "dense_core_mfac.py"
    return _load(path, "_peer_ista_dense_core_mfac") if path.is_file() else None


def _lu_nopivot(a: torch.Tensor, pivot: bool = True, get_infos: bool = False) -> Any:
    if pivot or a.is_cuda:
        return _ORIGINAL_LU(a, pivot=pivot, get_infos=get_infos)
    chol = torch.linalg.cholesky(a)
    d = chol.diagonal()
    lower = chol / d  # unit lower triangular (columns scaled)
    upper = d[:, None] * chol.mT
    packed = torch.tril(lower, -1) + torch.triu(upper)
    pivots = torch.arange(1, a.shape[-1] + 1, dtype=torch.int32)
    if get_infos:
        return packed, pivots, torch.zeros((), dtype=torch.int32)
    return packed, pivots


_ORIGINAL_LU = torch.lu
_ORIGINAL_PARALLEL_APPLY = torch.nn.parallel.parallel_apply


def _serial_apply(modules: Any, inputs: Any, *args: Any, **kwargs: Any) -> list[Any]:
    return [fn(x) for fn, x in zip(modules, inputs, strict=True)]


@contextlib.contextmanager
def lu_nopivot_shim() -> Iterator[None]:
    """Within the block the peers run on CPU: ``torch.lu(A, pivot=False)`` for SPD ``A`` (see the module
    doc) and ``nn.parallel.parallel_apply`` over their one-device split as a plain call (it needs an
    accelerator to pick a device)."""
    torch.lu = _lu_nopivot
    torch.nn.parallel.parallel_apply = _serial_apply
    try:
        yield
    finally:
        torch.lu = _ORIGINAL_LU
        torch.nn.parallel.parallel_apply = _ORIGINAL_PARALLEL_APPLY


def install_window(peer: Any, window: torch.Tensor, gram: torch.Tensor, next_row: int) -> Any:
    """Point a peer built on a placeholder at ``window`` (m, d), its Gram ``gram`` and ring index.

    Sets what the peer's ``__init__`` sets from its gradients (``d``, the one-device split ``grads``,
    ``dper``, ``dots``), then runs its own ``setup()`` as ``__init__`` does.
    """
    d = window.shape[1]
    peer.d = d
    peer.dper = d + 1  # its split over one device: the whole range
    peer.grads = [window]
    peer.dots = gram.to(window.dtype).clone()
    peer.last = next_row
    with lu_nopivot_shim():
        peer.setup()
    return peer


def new_paper(module: ModuleType, window: torch.Tensor, gram: torch.Tensor, damp: float,
              next_row: int) -> Any:
    """``HInvFastUpMulti`` on ``window``; step with ``peer.update_mul(g)`` inside the shim."""
    m = window.shape[0]
    with lu_nopivot_shim():
        peer = module.HInvFastUpMulti(torch.zeros(m, 1, dtype=window.dtype), "cpu", ["cpu"], damp)
    return install_window(peer, window, gram, next_row)


def new_ista(module: ModuleType, window: torch.Tensor, gram: torch.Tensor, damp: float,
             next_row: int) -> Any:
    """``DenseCoreMFAC`` on ``window``; step with ``peer.integrate_gradient_and_precondition(g, g)``."""
    m = window.shape[0]
    with lu_nopivot_shim():
        peer = module.DenseCoreMFAC(torch.zeros(m, 1, dtype=window.dtype), "cpu", ["cpu"], damp)
    return install_window(peer, window, gram, next_row)
