"""Heatmap overlays and figures for people to look at (front ends, notebooks).

* :mod:`~legrad.viz.overlays` -- colour maps and overlays at a bounded display size;
* :mod:`~legrad.viz.figure` -- :func:`visualize`: an image and one overlay per prompt;
* :mod:`~legrad.viz.display` -- figures that show themselves once in notebooks.

The engine never imports this package.
"""

from .display import NotebookFigure
from .figure import visualize
from .overlays import DISPLAY_MAX_SIDE, colorize, fit_for_display, heatmap_to_array, overlay, to_rgb_array

__all__ = ["overlay", "visualize", "NotebookFigure", "to_rgb_array", "heatmap_to_array", "colorize",
           "fit_for_display", "DISPLAY_MAX_SIDE"]
