"""Every notebook in notebooks/ runs top to bottom (walkthroughs must not rot)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

# 03 reads a quickstart's outputs: tests/test_quickstart.py runs it on the short quickstart it already trains
ON_QUICKSTART = {"03_quickstart_results.ipynb"}
NOTEBOOKS = sorted(p for p in (pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb")
                   if p.name not in ON_QUICKSTART)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
