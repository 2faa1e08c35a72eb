"""Notebooks executed for real: a Jupyter kernel (ipykernel) driven by nbclient, outputs inspected.

* Figures render exactly once in a notebook, with and without ``%matplotlib inline``, with
  ``show=True``/``False``/default, as a cell's last expression or not.
* ``examples/quickstart.ipynb`` (stored without outputs) runs top to bottom on the demo model, each
  ``visualize`` cell showing one image.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.ipynb"

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def _execute(nb: nbformat.NotebookNode, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    # The kernel is a subprocess: it must import this checkout's legrad, and start as a fresh
    # Jupyter kernel does (ipykernel picks its inline backend itself when MPLBACKEND is unset).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _pngs(cell: nbformat.NotebookNode) -> list[Image.Image]:
    """The PNG images among a cell's outputs, decoded (a broken PNG fails here)."""
    images = []
    for out in cell.outputs:
        data = out.get("data", {})
        if "image/png" in data:
            img = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
            img.load()
            images.append(img)
    return images


def _errors(nb: nbformat.NotebookNode) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]


# (cell source, number of images it must show)
DISPLAY_CASES = [
    ("import numpy as np\nfrom legrad.viz import visualize\n"
     "img = np.zeros((16, 16, 3), np.uint8)\nmaps = np.zeros((2, 16, 16))", 0),
    ("visualize(img, maps)", 1),
    ("visualize(img, maps, show=True)", 1),
    ("visualize(img, maps, show=False)", 1),
    ("fig = visualize(img, maps)", 0),
    ("fig = visualize(img, maps, show=False)", 0),
    ("fig = visualize(img, maps, show=True)", 1),
    ("fig = visualize(img, maps, show=True)\nfig", 1),
    ("fig", 1),  # a figure shown by show=True in an earlier cell still renders when asked
    ("from IPython.display import display\ndisplay(fig)", 1),
    ("for _ in range(2):\n    visualize(img, maps, show=True)", 2),
    ("%matplotlib inline", 0),
    ("visualize(img, maps)", 1),
    ("visualize(img, maps, show=True)", 1),
    ("visualize(img, maps, show=False)", 1),
    ("fig = visualize(img, maps)", 0),
    ("fig = visualize(img, maps, show=True)\nfig", 1),
    ("import matplotlib.pyplot as plt\nvisualize(img, maps, show=True)", 1),
]


def test_figures_render_exactly_once_in_a_kernel(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src, _ in DISPLAY_CASES])
    _execute(nb, tmp_path, monkeypatch)
    assert _errors(nb) == []
    for cell, (src, expected) in zip(nb.cells, DISPLAY_CASES):
        images = _pngs(cell)
        assert len(images) == expected, f"{src!r}: {len(images)} images, outputs {cell.outputs}"
        for img in images:
            # The figure itself (image + 2 panels side by side), not an empty or text rendering.
            assert img.width > 2 * img.height > 100
            assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 2


def test_quickstart_is_stored_without_outputs():
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_runs_and_shows_each_figure_once(monkeypatch):
    nb = nbformat.read(QUICKSTART, as_version=4)
    _execute(nb, QUICKSTART.parent, monkeypatch)
    assert _errors(nb) == []
    # Nothing on stderr either (e.g. tqdm's "IProgress not found" warning when ipywidgets is missing).
    assert [o.text for c in nb.cells for o in c.get("outputs", [])
            if o.output_type == "stream" and o.name == "stderr"] == []
    visualize_cells = [c for c in nb.cells if c.cell_type == "code" and "visualize(heatmaps=" in c.source]
    assert len(visualize_cells) >= 4
    for cell in visualize_cells:
        assert len(_pngs(cell)) == 1, cell.source
    for cell in nb.cells:
        if cell.cell_type == "code" and cell not in visualize_cells:
            assert _pngs(cell) == [], cell.source
    # The seed's pattern took the demo model's recommended layer index.
    echoed = [o for c in nb.cells if "model.layer_index" in c.get("source", "") for o in c.outputs]
    from legrad.toy import LAYER_INDEX

    assert [o["data"]["text/plain"] for o in echoed if o.output_type == "execute_result"] == [str(LAYER_INDEX)]
