"""Heatmap overlays and figures for people to look at (front ends, notebooks).

* :mod:`~legrad.viz.overlays` -- colour maps and overlays at a bounded display size;
* :mod:`~legrad.viz.figure` -- :func:`visualize`: an image and one overlay per prompt; :func:`answer_figure`:
  a VLM's own answer, one overlay per token;
* :mod:`~legrad.viz.display` -- figures that show themselves once in notebooks.

The engine never imports this package.
"""

from .display import NotebookFigure
from .figure import answer_figure, visualize
from .overlays import DISPLAY_MAX_SIDE, colorize, fit_for_display, heatmap_to_array, overlay, to_rgb_array

__all__ = ["overlay", "visualize", "answer_figure", "NotebookFigure", "to_rgb_array", "heatmap_to_array", "colorize",
           "fit_for_display", "DISPLAY_MAX_SIDE"]
