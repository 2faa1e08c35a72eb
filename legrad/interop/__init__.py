"""Bridges to the toolkits people evaluate explanations with; none of them is imported here.

* :func:`quantus_explain` -- a Quantus ``explain_func`` (:mod:`legrad.interop.quantus`);
* captum: :meth:`legrad.methods.Method.attribute` is a captum ``explanation_func`` as it is
  (``captum.metrics.sensitivity_max(method.attribute, images, target=...)``; see docs/evaluation.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["quantus_explain"]


def __getattr__(name: str) -> Any:
    if name == "quantus_explain":
        from .quantus import quantus_explain

        return quantus_explain
    raise AttributeError(f"module 'legrad.interop' has no attribute {name!r}")
