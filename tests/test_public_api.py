"""The public surface: every name in ``__all__`` resolves, and importing mfac changes no global state."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mfac
import mfac.prune


@pytest.mark.parametrize("module", [mfac, mfac.prune])
def test_all_names_resolve_and_are_unique(module):
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_top_level_prune_names_are_the_subpackage_ones():
    for name in ("prune_oneshot", "obs_scores", "GradualPruner", "apply_masks"):
        assert getattr(mfac, name) is getattr(mfac.prune, name)


_PROBE = r"""
import logging, sys, warnings, torch
before = (torch.get_default_dtype(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
          torch.get_num_threads(), len(logging.getLogger().handlers), list(warnings.filters),
          torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision())
import mfac, mfac.prune, mfac.optim
after = (torch.get_default_dtype(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.get_num_threads(), len(logging.getLogger().handlers), list(warnings.filters),
         torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision())
assert before == after, (before, after)
heavy = [m for m in ("matplotlib", "sklearn", "scipy", "mfac.distributed") if m in sys.modules]
assert not heavy, heavy
"""


def test_import_has_no_side_effects_and_prints_nothing():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
