"""Execute the research notebooks once and write the executed copies to ``docs/notebooks/`` for Sphinx.

    python docs/render_notebooks.py [--force]

The committed notebooks carry no outputs; the site shows them executed at their ``QUICK = True`` sizes.
The kernel is an ipykernel on this interpreter (``sys.executable``), whatever kernelspecs are installed, as
in ``tests/test_notebooks.py``. A copy newer than its notebook (and than the mfac sources) is kept unless
``--force``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks"
TARGET = ROOT / "docs" / "notebooks"


def _kernel_manager(tmp: Path):
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name=f"Python ({sys.executable})",
                language="python",
                env={"IPYTHONDIR": str(tmp / "ipython"), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
                     "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
            )

    return KernelManager(kernel_spec_manager=ThisInterpreter(), connection_file=str(tmp / "kernel.json"))


def _stale(source: Path, target: Path) -> bool:
    if not target.exists():
        return True
    newest = max(p.stat().st_mtime for p in [source, *(ROOT / "mfac").rglob("*.py")])
    return target.stat().st_mtime < newest


def render(force: bool = False) -> list[Path]:
    """Execute every notebook whose executed copy is missing or stale; return the copies written."""
    import nbclient
    import nbformat

    TARGET.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(SOURCE.glob("*.ipynb")):
        target = TARGET / source.name
        if not force and not _stale(source, target):
            continue
        nb = nbformat.read(source, as_version=4)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            client = nbclient.NotebookClient(nb, km=_kernel_manager(Path(tmp)), timeout=600,
                                             resources={"metadata": {"path": str(SOURCE)}})
            client.execute()
        nbformat.write(nb, target)
        written.append(target)
        print(f"{source.name}: executed in {time.perf_counter() - start:.1f} s -> {target.relative_to(ROOT)}")
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-execute even if the copies are fresh")
    render(parser.parse_args(argv).force)


if __name__ == "__main__":
    main()
