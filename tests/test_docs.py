"""The documentation site's sources stay in step with the code (the build itself is ``make docs``, -W).

* every module of the package has an ``automodule`` entry in ``docs/api/`` (a new module is documented);
* every recipe block of ``tests/test_integrations.py`` is included by ``docs/integrations.md`` and every
  ``literalinclude`` marker there exists in its file (renaming a recipe breaks this test, not only the docs).
"""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import mfac

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_every_module_is_in_the_api_reference():
    documented = set()
    for page in (DOCS / "api").glob("*.rst"):
        documented |= set(re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), flags=re.M))
    modules = {"mfac"} | {
        info.name for info in pkgutil.walk_packages(mfac.__path__, prefix="mfac.")
        if not info.name.rsplit(".", 1)[-1].startswith("_")
    }
    missing = sorted(modules - documented)
    assert not missing, f"add these modules to a page of docs/api/: {missing}"
    assert not documented - modules, f"docs/api/ names modules that do not exist: {sorted(documented - modules)}"


def test_integration_recipes_are_included_and_their_markers_exist():
    page = (DOCS / "integrations.md").read_text()
    includes = re.findall(r"```\{literalinclude\} (\S+)\n(.*?)```", page, flags=re.S)
    assert includes
    included = set()
    for path, options in includes:
        text = (DOCS / path).read_text()
        start = re.search(r':start-after: "(.*?)"', options)
        pyobject = re.search(r":pyobject: (\S+)", options)
        if start:
            assert start.group(1) in text, f"{start.group(1)!r} not in {path}"
            included.add(start.group(1))
        if pyobject:
            assert f"def {pyobject.group(1)}(" in text, f"{pyobject.group(1)} not in {path}"
    recipes = set(re.findall(r"# \[recipe: [a-z0-9-]+\]", (ROOT / "tests" / "test_integrations.py").read_text()))
    assert recipes and recipes <= included, f"recipes not shown in docs/integrations.md: {recipes - included}"
