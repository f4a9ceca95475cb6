"""examples/era9.ipynb runs top to bottom, as a student would run it, on small synthetic data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "era9.ipynb"
KERNEL = "tinycifar-test"

pytestmark = pytest.mark.slow


def test_committed_without_outputs():
    """Outputs in the file would hide a notebook that no longer runs (and bloat every diff)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def this_python_kernel(root: Path) -> Path:
    """A kernel spec that runs this very interpreter, so the notebook sees the tinycifar under test,
    whatever kernels the machine has registered (found through $JUPYTER_PATH)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return root


def text_of(cell: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters_cell(nb).source = (
        f'EPOCHS = 1\nPRESET = "seed"\nDATASET = "synthetic"\nSYNTHETIC_SIZE = 300\nBATCH_SIZE = 100\n'
        f'DATA_DIR = "unused"\nOUT_DIR = {str(tmp_path / "run")!r}\n')
    monkeypatch.setenv("JUPYTER_PATH", str(this_python_kernel(tmp_path / "jupyter")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(text_of(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "all 9 rules pass" in outputs and "receptive field" in outputs
    assert "final test accuracy" in outputs and "Test set:" in outputs
    figures = [cell for cell in nb.cells if any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))]
    assert len(figures) == 3  # curves, mistakes, Grad-CAM
    assert (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "era9.onnx").stat().st_size > 100_000
    assert "four random images" in outputs
