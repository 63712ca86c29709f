"""Sphinx configuration of mfac's documentation (``make docs``: HTML in docs/_build/html, -W)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's mfac, whatever is installed

import mfac  # noqa: E402

project = "mfac"
author = "the mfac authors"
copyright = "2026, the mfac authors"
release = mfac.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "notebooks/README.md"]
templates_path = []

# notebooks are executed once by `python docs/render_notebooks.py` (make docs) and rendered as they are
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = False
suppress_warnings = [
    "myst.xref_missing",  # the experiments' README links to scripts of the repository, not to pages
]

html_theme = "furo"
html_title = f"mfac {release}"
html_static_path = []
