"""Alias of :mod:`legrad.eval.metrics`, kept for compatibility."""

from legrad.eval.metrics import *  # noqa: F403
from legrad.eval.metrics import __all__  # noqa: F401
