"""``examples/qwen2_vl.ipynb`` runs offline top to bottom in a fresh Jupyter kernel (a tiny random Qwen2-VL with
its real processor classes explains its own answer) and shows its answer figure once."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("transformers.models.qwen2_vl")

from test_notebooks import _errors, _execute, _pngs  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "qwen2_vl.ipynb"

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def test_qwen2_vl_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_qwen2_vl_notebook_runs_and_shows_its_answer_figure_once(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _execute(nb, NOTEBOOK.parent, monkeypatch)
    assert not _errors(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    shown = [len(_pngs(c)) for c in code]
    assert sum(shown) == 1 and "answer_figure(" in code[shown.index(1)].source, shown
    (figure,) = _pngs(code[shown.index(1)])
    assert figure.width > figure.height > 100  # the image, the answer's map and the token maps, in rows of 4
    # Nothing on stderr (progress bars, config warnings).
    assert [o.text for c in code for o in c.outputs if o.output_type == "stream" and o.name == "stderr"] == []
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "Qwen2VLForConditionalGeneration Qwen2VLProcessor Qwen2VLImageProcessor" in text  # loaded back
    assert "patch grid [1, 12, 12]" in text and "answer map (1, 192, 192)" in text
    assert "(1, 1, 12, 12)" in text
