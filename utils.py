"""Repository-root shim so that ``from utils import visualize`` (as in the original LeGrad README) works.

The implementation lives in :mod:`legrad.viz`.
"""

from legrad.viz import colorize, overlay, visualize

__all__ = ["visualize", "overlay", "colorize"]
