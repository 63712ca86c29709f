"""The examples in mfac's docstrings run as doctests (one test case per module that has any).

Every module of the package is imported and its docstrings collected with :mod:`doctest`; a module
without examples is skipped. Modules that need an optional dependency are skipped when it is absent.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import mfac

pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = [
    "mfac",
    *sorted(info.name for info in pkgutil.walk_packages(mfac.__path__, prefix="mfac.") if not info.ispkg),
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    # only the module's own objects (re-exports are tested where they are defined)
    return [t for t in finder.find(module, name) if t.examples and t.filename == module.__file__]


def test_examples_exist_in_the_main_modules():
    with_examples = {name for name in MODULES if _tests(name)}
    for name in ("mfac.params", "mfac.prune.masks", "mfac.fisher.static", "mfac.optim.mfac"):
        assert name in with_examples, f"{name} has no docstring example"


@pytest.mark.parametrize("name", [name for name in MODULES if _tests(name)])
def test_docstring_examples(name):
    tests = _tests(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        test.globs.setdefault("torch", torch)
        torch.manual_seed(0)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (see above)"
