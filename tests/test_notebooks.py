"""Execute the research notebooks in ``notebooks/`` as committed (one test case per notebook).

Each notebook checks its own claims with ``assert`` in its code cells, so executing it is the test. The
kernel is an ipykernel on this interpreter (``sys.executable``), whatever kernelspecs are installed (a
user-level ``python3`` kernelspec may point at another Python); it runs in the notebook's folder with its
IPython profile, connection file and thread settings confined to the test: no global side effects.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: wall-clock budget per notebook, kernel start included (they take well under half of it on 2 cores)
TIME_LIMIT_S = 60


class _ThisInterpreter(KernelSpecManager):
    """Resolves every kernel name to an ipykernel on ``sys.executable`` (never an installed kernelspec).

    ``env`` is added to the kernel's environment (which otherwise is this process's).
    """

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__()
        self.kernel_env = dict(env)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            env=self.kernel_env,
        )


def _kernel_manager(tmp_path: Path) -> KernelManager:
    specs = _ThisInterpreter(
        {
            "IPYTHONDIR": str(tmp_path / "ipython"),  # no profile created under ~/.ipython
            # the notebooks' problems are tiny: one BLAS/OpenMP thread each keeps two notebooks running side by
            # side (pytest -n 2) from oversubscribing the cores, which costs 10x and more in wall time
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        }
    )
    return KernelManager(kernel_spec_manager=specs, connection_file=str(tmp_path / "kernel.json"))


def test_notebooks_found() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_woodbury_to_mfac.ipynb",
        "02_fisher_spectrum.ipynb",
        "03_obs_step_by_step.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path: Path) -> None:
    """Outputs stripped; opens with the question (markdown) and ends with the findings (markdown)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} of {path.name} has outputs"
    assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## Findings")
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.source.startswith("QUICK = True"), "the size knob must come first and default to quick"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=TIME_LIMIT_S,  # per cell; the total is checked below
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell's traceback) on a failing cell or assert
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.1f} s (limit {TIME_LIMIT_S} s)"
