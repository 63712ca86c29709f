"""Repository-wide pytest setup: the docstring examples of ``mfac`` run with a fixed seed, one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_setup(request: pytest.FixtureRequest) -> None:
    """Docstring examples (``--doctest-modules``) start from ``torch.manual_seed(0)`` with ``torch`` bound."""
    if isinstance(request.node, pytest.DoctestItem):
        request.getfixturevalue("doctest_namespace")["torch"] = torch
        torch.manual_seed(0)
