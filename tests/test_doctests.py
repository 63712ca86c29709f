"""The examples in mfac's docstrings exist where a reader looks for them.

The examples themselves run as doctests through ``--doctest-modules`` (set in ``pyproject.toml``; the
README's test command passes ``mfac`` beside ``tests``), seeded by the repository's ``conftest.py``. This
module checks that the main modules keep an example, so that removing one cannot pass unnoticed.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mfac

pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = [
    "mfac",
    *sorted(info.name for info in pkgutil.walk_packages(mfac.__path__, prefix="mfac.") if not info.ispkg),
]


def _tests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    # only the module's own objects (re-exports are tested where they are defined)
    return [t for t in finder.find(module, name) if t.examples and t.filename == module.__file__]


def test_examples_exist_in_the_main_modules():
    with_examples = {name for name in MODULES if _tests(name)}
    for name in ("mfac.params", "mfac.prune.masks", "mfac.fisher.static", "mfac.optim.mfac"):
        assert name in with_examples, f"{name} has no docstring example"
