"""docs/tutorial.ipynb: paired with docs/tutorial.md through jupytext, committed with its outputs, and
executed here (nbclient, a real Jupyter kernel) on random images, as its SMALL switch runs it."""

from __future__ import annotations


import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from tiny import ROOT

NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
TEXT = ROOT / "docs" / "tutorial.md"


def code(notebook) -> list[str]:
    return [cell.source.strip() for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebook_and_its_text_hold_the_same_cells():
    committed, text = nbformat.read(NOTEBOOK, as_version=4), jupytext.read(TEXT)
    assert code(committed) == code(text), "docs/tutorial.md changed: run `.venv/bin/jupytext --sync docs/tutorial.md` (then execute it)"
    markdown = lambda nb: [c.source.strip() for c in nb.cells if c.cell_type == "markdown"]  # noqa: E731
    assert markdown(committed) == markdown(text)


def test_the_committed_notebook_shows_its_outputs():
    cells = [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the samples and the reconstructions
    text = "".join(o.get("text", "") for o in outputs)
    assert "restored bit for bit: True" in text and "back to functional, bit for bit: True" in text
    assert "Warning" not in text  # nothing a reader has to wonder about


def test_the_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PUREFLAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "step 20 | loss:" in text
    assert "restored bit for bit: True" in text and "back to functional, bit for bit: True" in text
    for form in ("Flax linen", "Equinox", "Flax NNX"):
        difference = float(text.split(f"{form}: largest difference from the functional form ")[1].split()[0])
        assert difference <= 1e-5, (form, difference)
