"""Figures that show themselves exactly once in Jupyter, JupyterLab and VS Code notebooks.

A figure built with matplotlib's object API (no pyplot, as :func:`legrad.viz.visualize` does to stay headless and
thread-safe) has no pyplot manager, so the inline backend never shows it, and IPython draws a plain
``Figure`` returned by a cell only when ``%matplotlib inline`` registered a formatter for it. A
`NotebookFigure` publishes its own PNG instead, with or without the magic.
"""

from __future__ import annotations

import base64
import contextlib
import io
import sys
from typing import Any

from matplotlib.figure import Figure

__all__ = ["NotebookFigure", "notebook_shell"]


def notebook_shell() -> Any:
    """The running IPython kernel shell (Jupyter, JupyterLab, VS Code notebooks), or None.

    IPython is only consulted when something already imported it, so scripts never pay for it.
    """
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
    except Exception:  # pragma: no cover - a broken IPython install must not break plotting
        return None
    # Only kernels (ipykernel's ZMQ shell) have a ``kernel``; a terminal IPython has none.
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


class NotebookFigure(Figure):
    """A matplotlib ``Figure`` that shows itself exactly once in a notebook.

    A figure built without pyplot has no manager, and IPython draws a plain ``Figure`` only when
    ``%matplotlib inline`` registered a formatter for it. This subclass draws itself instead
    (``_ipython_display_`` publishes one PNG), with or without the magic, so returning it as a cell's
    last expression shows it once. After ``show=True`` displayed it, the rest of that same cell does
    not display it again (the last-expression echo would otherwise duplicate it); later cells do.
    Everything else is a plain ``Figure`` (``savefig``, axes, ...).
    """

    def __init__(self, *args: Any, display_dpi: float = 100.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._display_dpi = float(display_dpi)
        self._hold_display = False

    def _repr_png_(self) -> bytes:
        """The figure as PNG bytes (tight bounding box), for IPython and other rich frontends."""
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=self._display_dpi, bbox_inches="tight")
        return buf.getvalue()

    def _mimebundle(self) -> dict[str, str]:
        return {"image/png": base64.b64encode(self._repr_png_()).decode("ascii"), "text/plain": repr(self)}

    def _ipython_display_(self) -> None:
        """Publishes the PNG once (IPython calls this for ``display(fig)`` and a cell's last expression)."""
        if self._hold_display:
            return
        from IPython.display import display

        display(self._mimebundle(), raw=True)

    def show_in_notebook(self, shell: Any) -> None:
        """Displays now and holds further displays until the current cell has finished.

        Args:
            shell: the running IPython kernel shell (`notebook_shell`).
        """
        from IPython.display import display

        display(self._mimebundle(), raw=True)
        self._hold_display = True

        def release(*_: Any) -> None:
            self._hold_display = False
            with contextlib.suppress(ValueError):
                shell.events.unregister("post_run_cell", release)

        try:
            shell.events.register("post_run_cell", release)
        except Exception:  # pragma: no cover - no event manager: never hold
            self._hold_display = False

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_hold_display"] = False
        return state
