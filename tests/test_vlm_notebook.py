"""``examples/vlm.ipynb`` runs offline top to bottom in a Jupyter kernel (tiny random LLaVA built from a config)
and shows its two figures."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("transformers")

from test_notebooks import _errors, _execute, _pngs  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "vlm.ipynb"

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def test_vlm_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_vlm_notebook_runs_and_shows_its_figures(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _execute(nb, NOTEBOOK.parent, monkeypatch)
    assert not _errors(nb)
    shown = [len(_pngs(c)) for c in nb.cells if c.cell_type == "code"]
    assert shown.count(1) == 2 and sum(shown) == 2, shown
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "(1, 2, 64, 64)" in text and "(1, 2, 4, 4)" in text
